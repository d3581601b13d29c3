"""Cohort scoring: many slides per command, one output folder per slide, resumable, split across torchrun ranks.

* :func:`list_slides` reads the cohort: every slide file of a folder, or the rows of a CSV (:data:`CSV_COLUMNS`).
* :func:`balance_by_size` deals the slides to the ranks, largest first onto the least-loaded rank (file size).
* :func:`score_cohort_slide` scores one slide into a temporary sibling folder, writes :data:`DONE_FILE` last and
  renames the folder into place, so a slide folder either holds every output and its marker, or is redone.
* :func:`slide_state` tells a done slide (marker present, same fingerprint: model SHA-256 and settings), one to
  (re)do (no folder, or a folder without its marker) and one done with another model or other settings (refused).
* :func:`cohort_rows` and :func:`write_cohort_table` merge the per-slide records into ``cohort.csv`` and
  ``cohort.json``.

:func:`run_cohort` ties them together for ``python -m her2_monai wsi --slides ...``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from her2_monai.constants import CLASS_NAMES
from her2_monai.fileio import atomic_write, replace_folder, sha256_file, write_json_atomic
from her2_monai.wsi.ranks import RankGroup

__all__ = [
    "SLIDE_EXTENSIONS",
    "CSV_COLUMNS",
    "DONE_FILE",
    "TABLE_FILES",
    "CohortError",
    "CohortIncompleteError",
    "CohortSlide",
    "list_slides",
    "balance_by_size",
    "run_fingerprint",
    "plan_cohort",
    "slide_state",
    "score_cohort_slide",
    "cohort_rows",
    "table_csv",
    "write_cohort_table",
    "run_cohort",
]

logger = logging.getLogger(__name__)

#: File extensions taken from a ``--slides`` folder: what the tifffile, OpenSlide and PIL readers open.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide", ".dcm",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip
#: Columns of a cohort CSV: ``slide`` is required; ``slide_id`` (output folder name) and ``ihc_slide`` are optional.
CSV_COLUMNS = ("slide", "slide_id", "ihc_slide")
#: The completion marker of a slide folder, written last.
DONE_FILE = "cohort_slide.json"
#: Failure records of slides that raised (retried by the next run), under the output folder.
FAILURES_DIR = ".cohort_failures"
#: The cohort table files in the output folder.
TABLE_FILES = {"csv": "cohort.csv", "json": "cohort.json"}
_PARTIAL, _STALE = ".partial", ".stale"


class CohortError(ValueError):
    """The cohort cannot be run as asked (bad listing, an output folder made with another model or settings)."""


class CohortIncompleteError(RuntimeError):
    """The cohort ran to the end but some slides failed; the message is the summary line, the table is written.

    Attributes:
        summary: the ``cohort.json`` content.
    """

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class CohortSlide:
    """One slide of the cohort.

    Attributes:
        slide_id: name of its output folder (unique in the cohort).
        path: the slide file.
        ihc_path: the registered IHC slide of a pair, or ``None``.
        size_bytes: file size (0 for a missing file), the load used to balance the ranks.
    """

    slide_id: str
    path: Path
    ihc_path: Path | None = None
    size_bytes: int = 0


def _checked_id(slide_id: str, where: str) -> str:
    if not slide_id or slide_id.startswith(".") or "/" in slide_id or "\\" in slide_id:
        raise CohortError(
            f"{where}: slide id {slide_id!r} cannot name an output folder (it must be non-empty, must not start "
            "with '.' and must not contain '/' or '\\')"
        )
    return slide_id


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _slides_of_folder(folder: Path) -> list[CohortSlide]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
    if not files:
        raise CohortError(f"--slides folder '{folder}' holds no slide file (extensions: {', '.join(SLIDE_EXTENSIONS)})")
    return [CohortSlide(_checked_id(p.stem, f"'{p}'"), p, None, _size(p)) for p in files]


def _slides_of_csv(table: Path) -> list[CohortSlide]:
    with open(table, newline="") as stream:
        reader = csv.DictReader(stream)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "slide" not in columns:
            raise CohortError(
                f"cohort CSV '{table}' has no 'slide' column (its columns: {columns or 'none'}); expected "
                f"{', '.join(CSV_COLUMNS)} ('slide' required)"
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    slides = []
    for line, row in enumerate(rows, start=2):
        if not row.get("slide"):
            raise CohortError(f"cohort CSV '{table}', line {line}: the 'slide' column is empty")
        path = Path(row["slide"]) if Path(row["slide"]).is_absolute() else table.parent / row["slide"]
        ihc = row.get("ihc_slide") or None
        ihc_path = None if ihc is None else (Path(ihc) if Path(ihc).is_absolute() else table.parent / ihc)
        for name, file in (("slide", path), ("ihc_slide", ihc_path)):
            if file is not None and not file.is_file():
                raise CohortError(f"cohort CSV '{table}', line {line}: {name} '{file}' not found")
        slide_id = _checked_id(row.get("slide_id") or path.stem, f"cohort CSV '{table}', line {line}")
        slides.append(CohortSlide(slide_id, path, ihc_path, _size(path) + (_size(ihc_path) if ihc_path else 0)))
    if not slides:
        raise CohortError(f"cohort CSV '{table}' lists no slide")
    return slides


def list_slides(source: str | os.PathLike) -> list[CohortSlide]:
    """The slides of a cohort folder (every file with one of :data:`SLIDE_EXTENSIONS`, sorted by name) or CSV.

    A CSV has a header row with ``slide`` (required: the slide file; a relative path resolves against the CSV's
    folder) and optionally ``slide_id`` (the output folder name; default the file name without its extension) and
    ``ihc_slide`` (the registered IHC slide of a pair). Other columns are ignored.

    Args:
        source: the folder or the ``.csv`` file.

    Returns:
        The slides in listing order.

    Raises:
        CohortError: for a missing source, a CSV without a ``slide`` column or with a missing file, an empty cohort,
            or two slides with the same id.
    """
    source = Path(source)
    if source.is_dir():
        slides = _slides_of_folder(source)
    elif source.is_file():
        slides = _slides_of_csv(source)
    else:
        raise CohortError(f"--slides '{source}' not found: give a folder of slides or a CSV with a 'slide' column")
    seen: dict[str, Path] = {}
    for slide in slides:
        if slide.slide_id in seen:
            raise CohortError(
                f"slides '{seen[slide.slide_id]}' and '{slide.path}' would share the output folder "
                f"'{slide.slide_id}': give them distinct ids (a cohort CSV with a 'slide_id' column)"
            )
        seen[slide.slide_id] = slide.path
    return slides


def balance_by_size(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Deal items to ranks: largest first, each onto the rank with the least total so far (ties: lowest rank).

    Args:
        sizes: the load of each item (file sizes).
        world_size: number of ranks.

    Returns:
        For each rank, the indices of its items in listing order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += int(sizes[index])
        shares[rank].append(index)
    return [sorted(share) for share in shares]


def run_fingerprint(model_file: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a slide's outputs depend on besides the slide: the model file's SHA-256 and the run settings.

    Args:
        model_file: the bundle's ``model.pt``.
        settings: tiling, stain, region, reader, refer threshold, stain normalisation, inference config digest.

    Returns:
        ``{"model_sha256": ..., "settings": ...}`` (JSON round-tripped, so that it compares equal to a stored one).
    """
    return json.loads(json.dumps({"model_sha256": sha256_file(model_file), "settings": dict(settings)}))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def slide_state(folder: Path, fingerprint: Mapping[str, Any]) -> str:
    """``"done"`` (marker present with this fingerprint), ``"todo"`` (no folder, or a folder without a readable
    marker: half-written) or ``"mismatch"`` (done with another model or other settings)."""
    if not folder.is_dir():
        return "todo"
    record = _read_json(folder / DONE_FILE)
    if record is None or "row" not in record:
        return "todo"
    return "done" if record.get("fingerprint") == dict(fingerprint) else "mismatch"


def _describe_mismatch(folder: Path, fingerprint: Mapping[str, Any]) -> str:
    stored = (_read_json(folder / DONE_FILE) or {}).get("fingerprint") or {}
    if stored.get("model_sha256") != fingerprint["model_sha256"]:
        return (
            f"model SHA-256 {str(stored.get('model_sha256'))[:12]}... there, {fingerprint['model_sha256'][:12]}... now"
        )
    old, new = stored.get("settings") or {}, fingerprint["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "settings differ: " + ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in changed)


def _remove_leftovers(output: Path) -> list[Path]:
    """Delete the temporary slide folders a killed run left (``.<id>.*.partial`` / ``.stale``)."""
    removed = []
    for leftover in output.glob(".*"):
        if leftover.is_dir() and leftover.name.endswith((_PARTIAL, _STALE)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def plan_cohort(
    slides: Sequence[CohortSlide], output: Path, fingerprint: Mapping[str, Any], world_size: int
) -> dict[str, Any]:
    """Which slides are left to score and which rank scores each (run once, by rank 0).

    Returns:
        ``{"todo": [indices], "done": [indices], "shares": [[indices of rank r]]}``.

    Raises:
        CohortError: if a slide folder was made with another model or other settings (naming up to 3 of them).
    """
    states = [slide_state(output / s.slide_id, fingerprint) for s in slides]
    mismatched = [s for s, state in zip(slides, states) if state == "mismatch"]
    if mismatched:
        details = "; ".join(
            f"'{output / s.slide_id}': {_describe_mismatch(output / s.slide_id, fingerprint)}" for s in mismatched[:3]
        )
        raise CohortError(
            f"{len(mismatched)} slide folder(s) in '{output}' were made with another model or other settings "
            f"({details}); give another --output, or remove those folders to score them again"
        )
    _remove_leftovers(output)
    todo = [i for i, state in enumerate(states) if state == "todo"]
    shares = balance_by_size([slides[i].size_bytes for i in todo], world_size)
    return {
        "todo": todo,
        "done": [i for i, state in enumerate(states) if state == "done"],
        "shares": [[todo[k] for k in share] for share in shares],
    }


def _row(slide: CohortSlide, summary: dict[str, Any] | None, seconds: float, rank: int, reason: str = "") -> dict:
    """One line of the cohort table (``summary``: the slide's ``slide.json``, ``None`` when it failed)."""
    row: dict[str, Any] = {
        "slide_id": slide.slide_id,
        "slide": str(slide.path),
        "ihc_slide": "" if slide.ihc_path is None else str(slide.ihc_path),
        "status": "failed",
        "reason": reason,
        "call": None,
        "refer": None,
        "equivocal": None,
        "refer_reasons": [],
        "tissue_tiles": 0,
        "tile_counts": {name: 0 for name in CLASS_NAMES},
        "referred_tiles": 0,
        "refused_tiles": 0,
        "refused_tiles_by_reason": {},
        "seconds": round(seconds, 3),
        "tiles_per_second": 0.0,
        "reader": "",
        "rank": rank,
    }
    if summary is None:
        return row
    row.update(
        {
            "status": "scored",
            "call": summary["score"],
            "refer": summary["refer"],
            "equivocal": summary["equivocal"],
            "refer_reasons": list(summary["call"].get("refer_reasons", [])),
            "tissue_tiles": summary["tissue_tiles"],
            "tile_counts": dict(summary["tile_counts"]),
            "referred_tiles": summary["referred_tiles"],
            "refused_tiles": summary["no_tissue_tiles"],
            "refused_tiles_by_reason": dict(summary["refused_tiles_by_reason"]),
            "tiles_per_second": summary["timing"]["tiles_per_second"],
            "reader": summary["slide_info"]["backend"],
        }
    )
    if summary["tissue_tiles"] == 0:
        row.update({"status": "failed", "reason": "no tissue: no tile of the grid has enough tissue (--min_tissue)"})
    return row


def _verdict(row: Mapping[str, Any]) -> str:
    """The call of a scored slide in words, as the single-slide command prints it."""
    verdict = "no call" if row["call"] is None else f"HER2 {row['call']}"
    return verdict + (" (equivocal)" if row["equivocal"] else "") + (" - refer" if row["refer"] else "")


def score_cohort_slide(
    slide: CohortSlide,
    output: Path,
    score: Callable[[CohortSlide, Path], dict[str, Any]],
    fingerprint: Mapping[str, Any],
    rank: int = 0,
) -> dict[str, Any]:
    """Score one slide into ``output/<slide_id>`` atomically, or record why it failed.

    The outputs go to a temporary sibling folder (``.<slide_id>.<random>.partial``); :data:`DONE_FILE` (the table
    row and the fingerprint) is written last, then the folder is renamed into place. A slide that raises gets a
    failure record in ``.cohort_failures/<slide_id>.json`` and no folder (the next run tries it again).

    Args:
        slide: the slide.
        output: the cohort's output folder.
        score: writes the slide's outputs into the folder it is given and returns its ``slide.json`` content
            (:func:`~her2_monai.wsi.run.run_wsi` with the loaded predictor).
        fingerprint: :func:`run_fingerprint`.
        rank: the rank scoring it (recorded).

    Returns:
        The slide's table row.
    """
    failure = output / FAILURES_DIR / f"{slide.slide_id}.json"
    temporary = Path(tempfile.mkdtemp(prefix=f".{slide.slide_id}.", suffix=_PARTIAL, dir=output))
    start = time.perf_counter()
    try:
        summary = score(slide, temporary)
    except Exception as err:  # noqa: BLE001 - any failure of one slide is recorded and the cohort goes on
        shutil.rmtree(temporary, ignore_errors=True)
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        row = _row(slide, None, time.perf_counter() - start, rank, reason)
        write_json_atomic({"row": row, "fingerprint": dict(fingerprint)}, failure)
        logger.warning("slide '%s' failed: %s", slide.path, reason)
        return row
    row = _row(slide, summary, time.perf_counter() - start, rank)
    write_json_atomic({"row": row, "fingerprint": dict(fingerprint)}, temporary / DONE_FILE)
    replace_folder(temporary, output / slide.slide_id, stale_suffix=_STALE)
    failure.unlink(missing_ok=True)
    return row


def cohort_rows(
    slides: Sequence[CohortSlide], output: Path, fingerprint: Mapping[str, Any], scored_now: set[str]
) -> list[dict[str, Any]]:
    """The table rows of every slide, in listing order, from the slide folders' markers and the failure records.

    A slide with neither (a rank stopped before reaching it) is listed as failed with that reason.

    Args:
        slides: the cohort.
        output: the output folder.
        fingerprint: this run's fingerprint (a marker or record with another is not this run's result).
        scored_now: ids of the slides this run scored (the others were done earlier: ``done_in_this_run`` false).
    """
    rows = []
    for slide in slides:
        marker = _read_json(output / slide.slide_id / DONE_FILE)
        failure = _read_json(output / FAILURES_DIR / f"{slide.slide_id}.json")
        record = next((r for r in (marker, failure) if r and r.get("fingerprint") == dict(fingerprint)), None)
        if record is None:
            row = _row(slide, None, 0.0, -1, "not scored: the rank that had it stopped before reaching it")
        else:
            row = dict(record["row"])
        row["done_in_this_run"] = slide.slide_id in scored_now
        row["output"] = str(output / slide.slide_id) if marker is not None and record is marker else ""
        rows.append(row)
    return rows


_CSV_FIELDS = (
    "slide_id", "slide", "ihc_slide", "status", "reason", "call", "refer", "equivocal", "refer_reasons",
    "tissue_tiles", *(f"tiles_{name}" for name in CLASS_NAMES), "referred_tiles", "refused_tiles",
    "refused_reasons", "seconds", "tiles_per_second", "reader", "rank", "done_in_this_run", "output",
)  # fmt: skip


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The cohort table as CSV text: one line per slide, tile counts in ``tiles_<score>`` columns, refusals as
    ``reason:count`` pairs joined by ``;``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(_CSV_FIELDS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {k: ("" if v is None else v) for k, v in row.items()}
        flat.update({f"tiles_{name}": row["tile_counts"].get(name, 0) for name in CLASS_NAMES})
        flat["refer_reasons"] = "; ".join(row["refer_reasons"])
        flat["refused_reasons"] = ";".join(f"{k}:{v}" for k, v in sorted(row["refused_tiles_by_reason"].items()))
        writer.writerow(flat)
    return buffer.getvalue()


def write_cohort_table(output: Path, rows: Sequence[Mapping[str, Any]], run: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``cohort.csv`` and ``cohort.json`` (``{"run": ..., "slides": rows}``) atomically.

    Returns:
        The ``cohort.json`` content.
    """
    content = {"run": dict(run), "slides": [dict(r) for r in rows]}
    text = table_csv(rows)
    atomic_write(output / TABLE_FILES["csv"], lambda tmp: tmp.write_text(text))
    write_json_atomic(content, output / TABLE_FILES["json"])
    return content


def _run_record(rows: Sequence[Mapping[str, Any]], fingerprint: Mapping[str, Any], world: int, seconds: float) -> dict:
    now = [r for r in rows if r["done_in_this_run"]]
    tiles_now = sum(r["tissue_tiles"] - r["refused_tiles"] for r in now if r["status"] == "scored")
    calls = {name: sum(r["call"] == name for r in rows if r["status"] == "scored") for name in CLASS_NAMES}
    return {
        "slides": len(rows),
        "scored": sum(r["status"] == "scored" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "no_call": sum(r["status"] == "scored" and r["call"] is None for r in rows),
        "referred": sum(bool(r["refer"]) for r in rows if r["status"] == "scored"),
        "calls": calls,
        "done_in_this_run": len(now),
        "skipped_done_earlier": len(rows) - len(now),
        "world_size": world,
        "seconds": round(seconds, 3),
        "slides_per_hour": round(3600.0 * len(now) / seconds, 2) if seconds > 0 else 0.0,
        "tiles_this_run": tiles_now,
        "tiles_per_second": round(tiles_now / seconds, 3) if seconds > 0 else 0.0,
        **dict(fingerprint),
    }


def run_cohort(
    source: str | os.PathLike,
    output: str | os.PathLike,
    load: Callable[[RankGroup], tuple[Callable[[CohortSlide, Path], dict[str, Any]], dict[str, Any]]],
    group: RankGroup | None = None,
    log_table: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Score a cohort: list it, plan it on rank 0, score each rank's share, merge the table on rank 0.

    Args:
        source: ``--slides``: a folder or a CSV (:func:`list_slides`).
        output: the output folder (shared by every rank, on every node).
        load: given the rank group, loads the model and returns ``(score, fingerprint)``: ``score(slide, folder)``
            writes one slide's outputs and returns its ``slide.json`` content.
        group: the ranks (default: from the torchrun environment, one process without it).
        log_table: called on rank 0 with the output folder and the ``cohort.json`` content (MLflow).

    Returns:
        The ``cohort.json`` content on rank 0, ``None`` on the other ranks.

    Raises:
        CohortError: for a bad listing or output folders of another model or settings.
        CohortIncompleteError: on rank 0, when some slides failed (the table is written).
    """
    group = group or RankGroup.from_environment()
    start = time.perf_counter()
    with group:
        slides = list_slides(source)
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        score, fingerprint = load(group)
        plan = group.from_rank0(lambda: plan_cohort(slides, output, fingerprint, group.world_size))
        share = plan["shares"][group.rank]
        logger.info(
            "rank %d of %d: %d slides to score (%d of %d done earlier)",
            group.rank,
            group.world_size,
            len(share),
            len(plan["done"]),
            len(slides),
        )
        for count, index in enumerate(share, start=1):
            row = score_cohort_slide(slides[index], output, score, fingerprint, group.rank)
            verdict = row["reason"] if row["status"] == "failed" else _verdict(row)
            print(
                f"[rank {group.rank}] {count}/{len(share)} {slides[index].slide_id}: {verdict} ({row['seconds']:.1f} s)"
            )
        group.barrier()
        if group.rank != 0:
            return None
        scored_now = {slides[i].slide_id for i in plan["todo"]}
        rows = cohort_rows(slides, output, fingerprint, scored_now)
        content = write_cohort_table(
            output, rows, _run_record(rows, fingerprint, group.world_size, time.perf_counter() - start)
        )
    if log_table is not None:
        log_table(output, content)
    run = content["run"]
    if run["failed"]:
        failed = [r["slide_id"] for r in rows if r["status"] == "failed"]
        names = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise CohortIncompleteError(
            f"cohort: {run['scored']} of {run['slides']} slides scored, {run['failed']} failed ({names}); "
            f"reasons in {output / TABLE_FILES['csv']}",
            content,
        )
    return content
