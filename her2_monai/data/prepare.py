"""The bundle's data step: pick the dataset (BCI or the built-in demo), scan it, write the datalist."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from her2_monai.data.datalist import build_datalist, write_datalist
from her2_monai.data.demo import ensure_demo_dataset
from her2_monai.data.splits import parse_split_by

__all__ = ["prepare_datalist"]

logger = logging.getLogger(__name__)


def prepare_datalist(
    dataset_dir: str | os.PathLike | None,
    output: str | os.PathLike,
    demo_cache_dir: str | os.PathLike | None = None,
    demo_n_per_class: int = 48,
    demo_image_size: int = 256,
    demo_lab: str = "A",
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    split_by: str | None = None,
) -> str:
    """Write the datalist the bundle trains on and return its path.

    With no ``dataset_dir`` (``None`` or ``""``) the built-in demo dataset is generated on first use (cached) and a
    clear log line says so and how to point the run at BCI instead.

    Args:
        dataset_dir: BCI-layout folder, or ``None``/``""`` for the demo dataset.
        output: datalist JSON path.
        demo_cache_dir: cache folder of demo datasets (default ``$HER2_MONAI_CACHE`` or ``~/.cache/her2_monai``).
        demo_n_per_class, demo_image_size, demo_lab: demo dataset settings.
        val_fraction: stratified validation fraction carved from training.
        seed: seed of that split.
        strict: fail on any dataset problem instead of skipping and listing it.
        split_by: ``""``/``None`` (patch-level), ``"id_block:N"`` or ``"csv:PATH"``: keep groups of patches (slides)
            on one side of the validation split (see :mod:`her2_monai.data.splits`).

    Returns:
        The datalist path as a string.
    """
    demo = not dataset_dir
    if demo:
        dataset_dir = ensure_demo_dataset(
            demo_cache_dir, n_per_class=demo_n_per_class, image_size=demo_image_size, lab=demo_lab
        ).resolve()
        logger.warning(
            "using the built-in DEMO dataset at %s (synthetic patches, for trying the pipeline). "
            "To train on BCI, add: --dataset_dir /path/to/BCI",
            dataset_dir,
        )
    datalist, report = build_datalist(
        dataset_dir, val_fraction=val_fraction, seed=seed, strict=strict, split_by=split_by
    )
    # On real data a patch-level split may put patches of one slide on both sides: say so where it is seen.
    leakage_possible = not demo and parse_split_by(split_by).kind == "record"
    for line in report.summary(datalist).splitlines():
        if line.startswith("WARNING: "):
            logger.warning(line[len("WARNING: ") :])
        elif line == report.split_info and leakage_possible:
            logger.warning(line)
        else:
            logger.info(line)
    return str(write_datalist(datalist, Path(output)))
