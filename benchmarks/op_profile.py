"""Where the time of a step goes, by kind of operator, from ``torch.profiler`` (used by the other benchmarks).

Self CPU time of every ATen operator is summed into a few kinds: convolutions (forward and backward, transposed
included), matrix multiplies, normalisation, padding, copies and dtype casts, the optimizer, and the rest
(element-wise maths, reductions, views). The convolution share bounds what any change outside the convolutions
can win: with everything else at zero time, a step still takes its convolution time.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

#: (kind, substrings of ATen operator names), first match wins; checked on lower-case names.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear")),
    ("normalisation", ("norm",)),
    ("padding", ("pad",)),
    ("copies and dtype casts", ("copy_", "to_copy", "clone", "contiguous")),
    ("optimizer", ("adam", "_foreach")),
)
OTHER = "element-wise and other"


def kind_of(name: str) -> str:
    """The kind of the ATen operator ``name`` (e.g. ``"aten::mkldnn_convolution"`` -> ``"convolution"``)."""
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return OTHER


def op_profile(step: Callable[[], object], reps: int = 1) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Profile ``reps`` calls of ``step`` (already warmed up).

    Returns:
        Seconds per call by kind (``KINDS`` and ``OTHER``, plus ``"total"``), and the operators as
        ``(name, seconds per call, calls per call)`` sorted by time, longest first.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    by_kind = {kind: 0.0 for kind, _ in KINDS} | {OTHER: 0.0}
    seconds_of: dict[str, float] = {}
    calls_of: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        seconds = event.self_cpu_time_total / 1e6 / reps
        # An optimizer's updates are plain element-wise operators: tell them apart by the step they run in.
        by_kind["optimizer" if _in_optimizer_step(event) else kind_of(event.name)] += seconds
        seconds_of[event.name] = seconds_of.get(event.name, 0.0) + seconds
        calls_of[event.name] = calls_of.get(event.name, 0) + 1
    ops = [(name, seconds, calls_of[name] // reps) for name, seconds in seconds_of.items()]
    by_kind["total"] = sum(by_kind.values())
    return by_kind, sorted(ops, key=lambda op: -op[1])


def _in_optimizer_step(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


def format_kinds(columns: dict[str, dict[str, float]]) -> list[str]:
    """Rows of a table: seconds per call by kind (rows) for each labelled profile (columns), with shares."""
    labels = list(columns)
    lines = [f"  {'kind of operator':<26}" + "".join(f"{label:>24}" for label in labels)]
    for kind in [k for k, _ in KINDS] + [OTHER, "total"]:
        cells = []
        for label in labels:
            seconds, total = columns[label][kind], columns[label]["total"]
            cells.append(f"{seconds:>12.3f} s ({100 * seconds / max(total, 1e-12):>4.0f}%)")
        lines.append(f"  {kind:<26}" + "".join(f"{cell:>24}" for cell in cells))
    return lines


def format_top(ops: list[tuple[str, float, int]], top: int = 6) -> list[str]:
    """The ``top`` longest operators as table rows."""
    return [f"    {name:<44}{seconds:>9.3f} s{calls:>7} calls" for name, seconds, calls in ops[:top]]
