"""How a bundle run that stops on a known problem ends: on the problem and its fix, not on MONAI's traceback.

``python -m monai.bundle run ...`` wraps every error of a config expression in ``RuntimeError: Failed to evaluate
ConfigExpression ...``, so the project's own message (what is wrong and how to fix it) sits in the middle of a long
traceback whose last lines quote a config expression. The bundle configs call :func:`install_excepthook` first in
their ``initialize`` lists; from then on, an uncaught error whose chain holds one of :func:`known_errors` ends the
process (exit status 1, as before) with that error's message on the **last line of stderr**, flattened to one line.
The traceback is kept behind ``HER2_DEBUG=1``, which prints it in full before that line. Any other error is reported
by the previous hook, untouched.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["DEBUG_ENV", "known_errors", "find_known_error", "error_line", "install_excepthook"]

#: Environment variable that keeps the full traceback of a known error (``1``/``true``).
DEBUG_ENV = "HER2_DEBUG"


def known_errors() -> tuple[type[BaseException], ...]:
    """The project's errors whose message names the problem and its fix (imported on use: no import cycles)."""
    from her2_monai.bundle_lock import BundleLockedError
    from her2_monai.data.checks import DataCheckError
    from her2_monai.data.datalist import DatalistError
    from her2_monai.data.image_reader import ImageReadError
    from her2_monai.fileio import ChecksumMismatchError
    from her2_monai.networks.factory import ArchitectureOverrideError
    from her2_monai.networks.pretrained import PretrainedWeightsError
    from her2_monai.networks.record import ArchitectureMismatchError
    from her2_monai.networks.unfreeze import StateDictMismatchError

    return (
        DataCheckError,
        DatalistError,
        ImageReadError,
        ArchitectureMismatchError,
        ArchitectureOverrideError,
        ChecksumMismatchError,
        BundleLockedError,
        PretrainedWeightsError,
        StateDictMismatchError,
    )


def find_known_error(error: BaseException | None) -> BaseException | None:
    """The first of :func:`known_errors` in ``error``'s chain of causes and contexts, or ``None``."""
    kinds, seen = known_errors(), set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def error_line(error: BaseException) -> str:
    """``error: <Kind>: <message>`` on one line (a message's line breaks become spaces)."""
    message = " ".join(str(error.args[0] if len(error.args) == 1 else error).split())
    return f"error: {type(error).__name__}: {message}"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def _hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    known = find_known_error(error)
    if known is None:
        _previous_hook(kind, error, trace)
        return
    if _debug():
        _previous_hook(kind, error, trace)
    else:
        print(f"The run stopped (set {DEBUG_ENV}=1 for the traceback).", file=sys.stderr)
    print(error_line(known), file=sys.stderr, flush=True)


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Make known errors end the process on their message (see the module docstring); installing twice is a no-op."""
    global _previous_hook
    if sys.excepthook is not _hook:
        _previous_hook = sys.excepthook
        sys.excepthook = _hook
