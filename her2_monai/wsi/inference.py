"""Whole-slide (or region) HER2 scoring: tissue tiles streamed in batches through the bundle's predictor.

:class:`WholeSlideScorer` plans the tiles (thumbnail -> tissue mask -> grid at the model's magnification), reads
them batch by batch and sends each batch through the bundle's inference preprocessing
(:meth:`~her2_monai.inference.predictor.HER2Predictor.prepare`: input checks, resizing) and
:meth:`~her2_monai.inference.deploy.HER2Deploy.predict_batch`. Reading and preprocessing the next batch run in a
background thread while the network runs on the current one, so the per-tile checks do not stall the model. Only the
thumbnail, one or two batches of tiles and one small result row per tile are held, whatever the slide's size.

Stains: ``he`` (the common case: an H&E slide), ``ihc`` (an IHC slide), ``auto`` (each tile is routed by the branch
selector, as ``predict --image`` does), or a registered pair (an H&E slide plus an IHC slide in the same pixel frame,
read at the same coordinates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY
from her2_monai.inference.batching import AUTO_BATCH_MAX, auto_batch_size
from her2_monai.inference.records import IMAGE_KEY
from her2_monai.wsi.call import slide_call
from her2_monai.wsi.reader import Slide
from her2_monai.wsi.tissue import Tile, tile_grid, tissue_mask

__all__ = ["AUTO_COMPILE_TILES", "STAIN_MODES", "TilingSettings", "TilePlan", "WholeSlideScorer", "model_input_side"]

#: How the slide's stain is given: declared H&E or IHC, or decided per tile by the branch selector.
STAIN_MODES = ("he", "ihc", "auto")
#: Tissue tiles from which ``wsi --compile auto`` (the default) compiles the network: about a minute of compilation
#: against 0.3-0.5 s saved per 512 px tile with the paper model on 2 CPU cores (docs/performance.md).
AUTO_COMPILE_TILES = 1000
#: Threads that run the per-tile input checks of a batch (NumPy and SciPy release the GIL for most of them: 1.8x
#: with 2 threads on 2 cores, measured on 512 px tiles).
CHECK_THREADS = max(1, min(2, os.cpu_count() or 1))
#: Model input side (px) that :attr:`TilingSettings.compile_min_tiles` refers to.
COMPILE_REFERENCE_SIDE = 512


def model_input_side(predictor: Any) -> int | None:
    """The input side (px) of the model behind ``predictor`` (a torch bundle's or an ONNX export's), if it says."""
    network = getattr(predictor, "network", None)
    metadata = getattr(getattr(network, "net", None), "metadata", None) or {}
    side = metadata.get("image_size") or getattr(getattr(network, "net", None), "image_size", None)
    return int(side) if side else None


@dataclass(frozen=True)
class TilingSettings:
    """How a slide is cut into tiles.

    Attributes:
        tile_size: tile side in pixels of the read level. The ``bci`` model was trained on BCI's 1024 px patches at
            about 0.46 um/px (20x), resized to 512: 1024 px at level 0 of a 20x slide is the same field of view.
        level: pyramid level the tiles are read from (ignored when ``mpp`` is set).
        overlap: pixels (of the read level) shared by neighbouring tiles.
        min_tissue: smallest share of a tile covered by tissue for it to be scored.
        mpp: when set, tiles cover ``tile_size`` pixels *at this resolution* (microns per pixel): the level and the
            read size are chosen from the slide's own resolution (the slide must record it).
        thumbnail_size: longer side of the thumbnail the tissue mask is computed on.
        batch_size: tiles per forward pass; ``None`` (the default):
            :func:`~her2_monai.inference.batching.auto_batch_size` of the model's input side and device.
        compile_min_tiles: slides with at least this many tissue tiles are scored through ``torch.compile`` (the
            predictor's network is compiled on the first batch, once per process; the last, partial batch is padded
            so no second graph is compiled), for a model with 512 px input; a model with input side ``s`` needs
            ``(512 / s)^2`` times as many (the demo's 64 px model: 64x), since its forward pass is that much cheaper
            and the compilation is not. ``None``: as the predictor was loaded (``--compile``). Compiling costs about
            a minute and then runs the paper model 1.5-1.6x faster than eagerly (``docs/performance.md``).
    """

    tile_size: int = 1024
    level: int = 0
    overlap: int = 0
    min_tissue: float = 0.5
    mpp: float | None = None
    thumbnail_size: int = 2048
    batch_size: int | None = None
    compile_min_tiles: int | None = AUTO_COMPILE_TILES

    def __post_init__(self) -> None:
        if self.tile_size < 16:
            raise ValueError(f"tile_size must be at least 16 pixels, got {self.tile_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (or None: chosen from the model), got {self.batch_size}")
        if self.thumbnail_size < 64:
            raise ValueError(f"thumbnail_size must be at least 64 pixels, got {self.thumbnail_size}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if self.compile_min_tiles is not None and self.compile_min_tiles < 1:
            raise ValueError(f"compile_min_tiles must be at least 1 (or None), got {self.compile_min_tiles}")


@dataclass
class TilePlan:
    """The tiles of a slide (or region) and what they were chosen from.

    Attributes:
        tiles: the tissue tiles to score.
        thumbnail: ``(h, w, 3)`` uint8 overview of the whole slide.
        downsample: level-0 pixels per thumbnail pixel.
        mask: ``(h, w)`` tissue mask of the thumbnail.
        area: ``(x, y, width, height)`` that was tiled, in level-0 pixels.
        level: the read level.
        read_size: tile side in pixels of the read level.
        tile_size_level0: tile side in level-0 pixels.
        grid_tiles: tiles in the grid before the tissue filter.
    """

    tiles: list[Tile]
    thumbnail: np.ndarray
    downsample: float
    mask: np.ndarray
    area: tuple[int, int, int, int]
    level: int
    read_size: int
    tile_size_level0: int
    grid_tiles: int


def _read_geometry(slide: Slide, settings: TilingSettings) -> tuple[int, int]:
    """``(level, read size)`` for the settings: as given, or chosen for the target ``mpp``."""
    if settings.mpp is None:
        return slide.check_level(settings.level), settings.tile_size
    if slide.mpp is None:
        raise ValueError(
            f"slide '{slide.path.name}' does not record its resolution (microns per pixel), so --mpp cannot be used; "
            "give --tile_size and --level instead"
        )
    factor = settings.mpp / slide.mpp  # level-0 pixels per target pixel
    level = max((i for i, d in enumerate(slide.level_downsamples) if d <= factor * 1.01), default=0)
    return level, max(16, int(round(settings.tile_size * factor / slide.level_downsamples[level])))


def _check_area(slide: Slide, region: Sequence[int] | None) -> tuple[int, int, int, int]:
    width, height = slide.dimensions
    if region is None:
        return 0, 0, width, height
    if len(region) != 4:
        raise ValueError(f"region must be (x, y, width, height) in level-0 pixels, got {list(region)}")
    x, y, w, h = (int(v) for v in region)
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise ValueError(
            f"region (x={x}, y={y}, width={w}, height={h}) is not inside the slide ({width} x {height} at level 0)"
        )
    return x, y, w, h


def plan_tiles(slide: Slide, settings: TilingSettings, region: Sequence[int] | None = None) -> TilePlan:
    """Thumbnail, tissue mask and tissue tiles of a slide or of a region of it.

    Args:
        slide: the opened slide.
        settings: tiling settings.
        region: ``(x, y, width, height)`` in level-0 pixels (``None``: the whole slide).

    Returns:
        The plan.

    Raises:
        ValueError: for a region outside the slide, a missing level or an ``mpp`` the slide cannot serve.
    """
    area = _check_area(slide, region)
    level, read_size = _read_geometry(slide, settings)
    thumbnail, downsample = slide.thumbnail(settings.thumbnail_size)
    mask = tissue_mask(thumbnail)
    scale = slide.level_downsamples[level]
    tiles = tile_grid(area, mask, downsample, read_size, scale, level, settings.overlap, settings.min_tissue)
    grid = tile_grid(area, np.ones_like(mask), downsample, read_size, scale, level, settings.overlap, 0.0)
    return TilePlan(
        tiles, thumbnail, downsample, mask, area, level, read_size, int(round(read_size * scale)), len(grid)
    )


def _batches(items: Sequence[Tile], size: int) -> Iterator[Sequence[Tile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class WholeSlideScorer:
    """Score the tissue tiles of a slide with a :class:`~her2_monai.inference.predictor.HER2Predictor`.

    Args:
        predictor: the bundle's predictor (:func:`~her2_monai.inference.predictor.load_predictor`).
        settings: tiling settings.
        stain: one of :data:`STAIN_MODES` (ignored for a pair).
        progress: show a progress bar (tqdm, on stderr).

    Raises:
        ValueError: for an unknown stain mode.
    """

    def __init__(
        self, predictor: Any, settings: TilingSettings | None = None, stain: str = "he", progress: bool = True
    ):
        if stain not in STAIN_MODES:
            raise ValueError(f"stain must be one of {list(STAIN_MODES)}, got '{stain}'")
        self.predictor = predictor
        self.settings = settings or TilingSettings()
        self.stain = stain
        self.progress = progress

    def _prepared(
        self, slide: Slide, ihc_slide: Slide | None, tiles: Sequence[Tile], checkers: ThreadPoolExecutor
    ) -> list[dict]:
        """Read one batch of tiles (in order, from this thread: slide readers need not be thread-safe) and preprocess
        them (input checks, resizing) split over ``checkers``: the reader thread's part."""
        records = self._records(slide, ihc_slide, tiles)
        share = -(-len(records) // CHECK_THREADS)
        parts = [records[i : i + share] for i in range(0, len(records), share)]
        return [item for part in checkers.map(self.predictor.prepare, parts) for item in part]

    def _compile_if_worth_it(self, tiles: int) -> bool:
        """Turn the network's ``torch.compile`` on for a slide of at least ``compile_min_tiles`` tiles (for a model
        with 512 px input; proportionally more for a smaller input, whose forward pass is cheaper while the
        compilation is not); whether the slide is scored compiled."""
        network = getattr(self.predictor, "network", None)
        if not hasattr(network, "compile_network"):
            return False
        threshold = self.settings.compile_min_tiles
        side = model_input_side(self.predictor) or COMPILE_REFERENCE_SIDE
        if threshold is not None and tiles * side**2 >= threshold * COMPILE_REFERENCE_SIDE**2:
            network.compile_network = True
        return bool(network.compile_network)

    def batch_size(self) -> int:
        """Tiles per forward pass: the settings', or :func:`auto_batch_size` of the model's input side and the
        predictor's device (16 for a predictor that does not say its side)."""
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        side = model_input_side(self.predictor)
        return auto_batch_size(side, getattr(self.predictor, "device", "cpu")) if side else AUTO_BATCH_MAX

    def _records(self, slide: Slide, ihc_slide: Slide | None, tiles: Sequence[Tile]) -> list[dict]:
        records = []
        for tile in tiles:
            pixels = slide.read_region(tile.x, tile.y, tile.read_size, tile.read_size, tile.level)
            if ihc_slide is not None:
                partner = ihc_slide.read_region(tile.x, tile.y, tile.read_size, tile.read_size, tile.level)
                record = {HE_KEY: pixels, IHC_KEY: partner}
            else:
                record = {IMAGE_KEY if self.stain == "auto" else self.stain: pixels}
            records.append({**record, "id": f"tile_{tile.index:06d}"})
        return records

    def score(
        self, slide: Slide, ihc_slide: Slide | None = None, region: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Plan, read and score the tissue tiles.

        Args:
            slide: the H&E slide (or the one slide, of the declared or unknown stain).
            ihc_slide: the registered IHC slide of a pair (same level-0 size and pixel frame).
            region: ``(x, y, width, height)`` in level-0 pixels (``None``: the whole slide).

        Returns:
            ``plan`` (:class:`TilePlan`), ``rows`` (one dict per tile: position, tissue share and the prediction),
            ``call`` (:func:`~her2_monai.wsi.call.slide_call`), ``stain``, ``seconds``, ``refused`` (tiles the input
            checks refused: not scored), ``refused_reasons`` (their count per first refer reason) and ``batch_size``
            (tiles per forward pass).

        Raises:
            ValueError: for a pair whose slides differ in size, or a bad region or level.
        """
        if ihc_slide is not None:
            if ihc_slide.dimensions != slide.dimensions or ihc_slide.level_count < slide.level_count:
                raise ValueError(
                    f"the IHC slide ({ihc_slide.dimensions[0]} x {ihc_slide.dimensions[1]}, {ihc_slide.level_count} "
                    f"levels) does not match the H&E slide ({slide.dimensions[0]} x {slide.dimensions[1]}, "
                    f"{slide.level_count} levels): register the pair first (python -m her2_monai register)"
                )
        start = time.perf_counter()
        plan = plan_tiles(slide, self.settings, region)
        rows: list[dict[str, Any]] = []
        refused = 0  # tiles the input checks turned away (no/too little tissue, pen ink, wrong marker): no score
        refused_reasons: dict[str, int] = {}
        batch_size = self.batch_size()
        batches = list(_batches(plan.tiles, batch_size))
        compiled = self._compile_if_worth_it(len(plan.tiles))
        bar = tqdm(total=len(plan.tiles), desc="HER2 tiles", unit="tile", disable=not self.progress)
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(CHECK_THREADS) as checkers:
            pending = reader.submit(self._prepared, slide, ihc_slide, batches[0], checkers) if batches else None
            for index, batch in enumerate(batches):
                prepared = pending.result()
                if index + 1 < len(batches):
                    pending = reader.submit(self._prepared, slide, ihc_slide, batches[index + 1], checkers)
                if compiled and len(prepared) < batch_size:  # one graph shape: no recompilation
                    prepared = prepared + [prepared[-1]] * (batch_size - len(prepared))
                for tile, result in zip(batch, self.predictor.predict_prepared(prepared, batch_size)):
                    if result["score"] is None:
                        refused += 1
                        for reason in result.get("refer_reasons", [])[:1]:  # the first is the input check's
                            refused_reasons[reason] = refused_reasons.get(reason, 0) + 1
                        continue
                    rows.append(_row(tile, result))
                bar.update(len(batch))
        bar.close()
        call = slide_call([r["score"] for r in rows], [r["refer"] for r in rows])
        stain = "pair" if ihc_slide is not None else self.stain
        seconds = time.perf_counter() - start
        return {
            "plan": plan,
            "rows": rows,
            "call": call,
            "stain": stain,
            "seconds": seconds,
            "refused": refused,
            "refused_reasons": refused_reasons,
            "batch_size": batch_size,
        }


def _row(tile: Tile, result: dict[str, Any]) -> dict[str, Any]:
    """One tile's result row: geometry, tissue share and the prediction fields."""
    row = {k: v for k, v in asdict(tile).items() if k != "index"}
    row = {"tile": tile.index, **row}
    probabilities = result["probabilities"]
    row.update(
        {
            "score": result["score"],
            "confidence": result["confidence"],
            "refer": bool(result["refer"]),
            "refer_reasons": list(result.get("refer_reasons", [])),
            "probabilities": {name: float(p) for name, p in zip(CLASS_NAMES, probabilities)},
            "scenario": result["scenario"],
            "detected_stains": list(result.get("detected_stains", [])),
            "stain_confidence": result.get("stain_confidence"),
        }
    )
    return row
