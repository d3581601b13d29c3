"""``run_wsi``: score a slide (or a region of it) with the bundle and write its files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from her2_monai.constants import HE_KEY, IHC_KEY
from her2_monai.data.provenance import model_provenance, provenance_warnings
from her2_monai.wsi.inference import TilingSettings, WholeSlideScorer
from her2_monai.wsi.outputs import OUTPUT_FILES, write_outputs
from her2_monai.wsi.reader import open_slide

__all__ = ["run_wsi", "slide_summary"]


def slide_summary(
    result: dict[str, Any],
    slide: Any,
    settings: TilingSettings,
    model: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> dict:
    """The ``slide.json`` content of a scored slide.

    Top-level ``score`` (the slide-level call, ``None`` if no tile could be used), ``refer``, ``equivocal``,
    ``tile_counts`` (per class, over tiles not referred), ``referred_tiles``, ``tissue_tiles``, ``no_tissue_tiles``
    (tiles of the tissue mask that the per-image input checks refused: not scored; ``refused_tiles_by_reason`` counts
    them per reason: no_tissue, insufficient_tissue, pen_ink, wrong_marker), ``warnings`` and ``provenance``
    (what the model was trained on, :func:`~her2_monai.data.provenance.model_provenance`; a model trained on the
    demo data warns that its scores are not valid for real tissue), then the details: ``call`` (shares and the
    rule), ``tiling``, ``slide`` geometry, ``stain``, ``model``, ``timing`` (seconds, tiles per second and tiles
    per forward pass) and ``outputs``.
    """
    provenance = dict(provenance) if provenance is not None else model_provenance(None)
    plan, rows, call = result["plan"], result["rows"], result["call"]
    seconds = float(result["seconds"])
    stain_calls = {HE_KEY: 0, IHC_KEY: 0}
    for row in rows:
        if result["stain"] == "auto" and row["detected_stains"]:
            stain_calls[row["detected_stains"][0]] += 1
    summary = {
        "slide": slide.path.name,
        "score": call["score"],
        "refer": call["refer"],
        "equivocal": call["equivocal"],
        "tile_counts": call["counts"],
        "referred_tiles": call["referred"],
        "tissue_tiles": len(plan.tiles),
        "no_tissue_tiles": int(result.get("refused", 0)),
        "refused_tiles_by_reason": dict(result.get("refused_reasons", {})),
        "warnings": provenance_warnings(provenance),
        "provenance": provenance,
        "call": call,
        "stain": result["stain"],
        "tiling": {
            "area": list(plan.area),
            "level": plan.level,
            "tile_size": plan.read_size,
            "tile_size_level0": plan.tile_size_level0,
            "tile_um": None if slide.mpp is None else round(plan.tile_size_level0 * slide.mpp, 2),
            "overlap": settings.overlap,
            "min_tissue": settings.min_tissue,
            "grid_tiles": plan.grid_tiles,
            "tissue_share_of_slide": round(float(plan.mask.mean()), 4),
            "thumbnail_downsample": round(plan.downsample, 4),
        },
        "slide_info": {
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "levels": [list(d) for d in slide.level_dimensions],
            "mpp": slide.mpp,
        },
        "model": model,
        "timing": {
            "seconds": round(seconds, 3),
            "tiles_per_second": round(len(rows) / seconds, 3) if rows else 0.0,
            "batch_size": result.get("batch_size"),
        },
        "outputs": {k: v for k, v in OUTPUT_FILES.items() if k != "slide"},
    }
    if result["stain"] == "auto":
        summary["stain_calls"] = stain_calls
    return summary


def run_wsi(
    slide: str | os.PathLike,
    output: str | os.PathLike,
    predictor: Any = None,
    bundle: str | os.PathLike = "bundle",
    config_file: str | os.PathLike | None = None,
    ihc_slide: str | os.PathLike | None = None,
    stain: str = "he",
    settings: TilingSettings | None = None,
    region: Sequence[int] | None = None,
    backend: str = "auto",
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Score a whole slide (or a region) and write ``slide.json``, ``tiles.csv``, ``tiles.geojson``, ``heatmap.png``.

    Args:
        slide: the slide file (SVS, tiled TIFF, anything OpenSlide reads when installed, or a plain PNG/JPEG/TIFF).
        output: output folder.
        predictor: a loaded predictor (default: :func:`~her2_monai.inference.predictor.load_predictor` on ``bundle``).
        bundle: bundle folder with ``models/model.pt``.
        config_file: inference config (default ``<bundle>/configs/inference.json``).
        ihc_slide: the registered IHC slide of a pair (then ``slide`` is the H&E).
        stain: ``he``, ``ihc`` or ``auto`` (ignored for a pair).
        settings: tiling settings.
        region: ``(x, y, width, height)`` in level-0 pixels (``None``: the whole slide).
        backend: slide reader backend (``auto``, ``tifffile``, ``openslide``, ``pil``).
        progress: show a progress bar.
        overrides: inference-config overrides for the predictor (``stain_normalization``, ``device``, ...).

    Returns:
        The ``slide.json`` content.

    Raises:
        her2_monai.wsi.reader.SlideOpenError: if a slide cannot be opened.
        FileNotFoundError: if the bundle's model file is missing.
        ValueError: for bad settings, a region outside the slide or a pair that does not match.
    """
    settings = settings or TilingSettings()
    if predictor is None:
        from her2_monai.inference import load_predictor

        predictor = load_predictor(bundle, config_file, **overrides)  # the scorer gives each batch its size
    metadata = getattr(getattr(predictor.network, "net", None), "metadata", {}) or {}
    model = {k: metadata.get(k) for k in ("profile", "image_size") if k in metadata}
    with open_slide(slide, backend) as opened:
        partner = open_slide(ihc_slide, backend) if ihc_slide is not None else None
        try:
            scorer = WholeSlideScorer(predictor, settings, stain=stain, progress=progress)
            result = scorer.score(opened, partner, region)
        finally:
            if partner is not None:
                partner.close()
        summary = slide_summary(result, opened, settings, model, model_provenance(metadata))
        if partner is not None:
            summary["ihc_slide"] = Path(ihc_slide).name
        write_outputs(output, summary, result)
    return summary
