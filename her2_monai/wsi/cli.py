"""``python -m her2_monai wsi``: HER2 call for a whole slide (or a region) with the trained bundle."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["wsi", "parse_batch_size", "parse_region"]


def parse_region(region: Any) -> tuple[int, int, int, int] | None:
    """``"x,y,width,height"`` (or a 4-sequence) in level-0 pixels -> a tuple; ``None`` stays ``None``.

    Raises:
        ValueError: for anything else.
    """
    if region is None:
        return None
    values = region.split(",") if isinstance(region, str) else list(region) if isinstance(region, (list, tuple)) else []
    try:
        numbers = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 4:
        raise ValueError(f"--region must be x,y,width,height in level-0 pixels, got {region!r}")
    return numbers  # type: ignore[return-value]


def wsi(
    slide: str | None = None,
    output: str | None = None,
    bundle: str = "bundle",
    config_file: str | None = None,
    ihc_slide: str | None = None,
    stain: str = "he",
    tile_size: int = 1024,
    level: int = 0,
    overlap: int = 0,
    min_tissue: float = 0.5,
    mpp: float | None = None,
    batch_size: int | str = "auto",
    region: str | None = None,
    backend: str = "auto",
    progress: bool = True,
    refer_threshold: float | None = None,
    stain_normalization: str | None = None,
    stain_reference: str | None = None,
    stain_reference_ihc: str | None = None,
    device: str | None = None,
    compile: bool | str = "auto",
    runtime: str = "torch",
    onnx: str | None = None,
    slides: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "her2-monai",
    run_name: str | None = None,
) -> None:
    """Score the tissue of a whole slide tile by tile and make a slide-level HER2 call; or a cohort with --slides.

    Writes into OUTPUT: slide.json (slide-level score, tile counts per class, tissue tile count, the call's shares,
    tiling and timing), tiles.csv (one row per tile), tiles.geojson (tile squares with scores; QuPath: File > Import
    objects) and heatmap.png (scores over the thumbnail). The slide-level rule is ASCO/CAP-style: referred tiles are
    excluded and counted, the call is the highest score reached or exceeded by more than 10% of the other tiles.

    Args:
        slide: slide file: SVS or tiled/pyramidal TIFF (tifffile; JPEG tiles need imagecodecs), any format OpenSlide
            reads when it is installed, or a plain PNG/JPEG (decoded whole).
        output: output folder (created).
        bundle: bundle folder holding models/model.pt (and configs/inference.json).
        config_file: inference config (default <bundle>/configs/inference.json).
        ihc_slide: registered IHC slide of a pair (SLIDE is then the H&E); same size and pixel frame.
        stain: stain of SLIDE: he (default), ihc, or auto (the branch selector decides per tile).
        tile_size: tile side in pixels of the read level (1024 at level 0 of a 20x slide = the BCI patch field).
        level: pyramid level the tiles are read from.
        overlap: pixels shared by neighbouring tiles.
        min_tissue: smallest tissue share of a scored tile (0-1).
        mpp: tiles cover TILE_SIZE pixels at this resolution (microns/pixel); level and read size follow from the
            slide's own resolution.
        batch_size: tiles per forward pass, or auto (the default): on a CPU chosen from the model's input side,
            about 512 x 512 model pixels per pass (512 px model: 1 tile, 256 px: 4, 128 px or smaller: 16), where
            this network ran fastest (docs/performance.md, "Tiles per batch"); 16 on a GPU.
        region: only this region, "x,y,width,height" in level-0 pixels.
        backend: slide reader: auto, tifffile, openslide or pil.
        progress: show a progress bar.
        refer_threshold: tile confidence below which a tile is referred (default: the bundle's).
        stain_normalization: as for predict (default: as recorded in the model file).
        stain_reference: H&E target for --stain_normalization.
        stain_reference_ihc: IHC target for --stain_normalization.
        device: cpu, cuda, cuda:N (default: the bundle's choice).
        compile: run the network through torch.compile (with frozen weights): the first batch pays the compilation
            (up to about a minute on 2 CPU cores), later ones run 1.7-1.9x faster (docs/performance.md). The default,
            auto, compiles for slides of at least 1000 tissue tiles with a 512 px model (proportionally more for a
            smaller model input); true compiles always, false never (the eager network).
        runtime: torch (the bundle's model), or the ONNX export (`export --format onnx`) run by onnxruntime (fp32)
            or openvino (`pip install -e ".[openvino]"`; bf16 on CPUs with bf16 hardware, the fastest CPU path
            measured, no compilation wait). One slide only; not with --slides, --device, --compile true or --config_file
            (the export holds its inference config).
        onnx: the ONNX export folder for --runtime onnxruntime/openvino (default <bundle>/models/onnx).
        slides: a cohort instead of --slide: a folder of slides or a CSV with a 'slide' column (optional 'slide_id',
            'ihc_slide'); OUTPUT gets one folder per slide and cohort.csv/cohort.json. Done slides are skipped;
            under torchrun the slides are split across the processes (docs/wsi.md).
        tracking_uri: cohort only: log the run and its table to this MLflow store.
        experiment_name: cohort only: the MLflow experiment.
        run_name: cohort only: the MLflow run name (default wsi-cohort-<OUTPUT folder name>).
    """
    if slides is not None:
        if slide is not None or ihc_slide is not None:
            raise ValueError("give either --slide (one slide) or --slides (a cohort folder or CSV), not both")
        slide = str(slides)
    for flag, value in (("slides" if slides is not None else "slide", slide), ("output", output)):
        if value is None or isinstance(value, bool):
            raise ValueError(f"--{flag} is required and needs a path")
    if isinstance(ihc_slide, bool):
        raise ValueError("--ihc_slide needs a path")
    from her2_monai.utils import as_bool
    from her2_monai.wsi.inference import AUTO_COMPILE_TILES, TilingSettings
    from her2_monai.wsi.run import run_wsi

    auto_compile = isinstance(compile, str) and compile.strip().lower() == "auto"
    try:
        compile_always = not auto_compile and as_bool(compile, "--compile")
    except ValueError:
        raise ValueError(f"--compile must be true, false or auto, got '{compile}'") from None
    given = {"--slides": slides is not None, "--device": device is not None, "--compile true": compile_always}
    given["--config_file"] = config_file is not None
    tiles_per_batch = parse_batch_size(batch_size)
    load_export = _export_loader(runtime, onnx, bundle, given, refer_threshold)
    settings = TilingSettings(
        compile_min_tiles=AUTO_COMPILE_TILES if auto_compile and load_export is None else None,
        tile_size=int(tile_size),
        level=int(level),
        overlap=int(overlap),
        min_tissue=float(min_tissue),
        mpp=None if mpp is None else float(mpp),
        batch_size=tiles_per_batch,
    )
    overrides: dict[str, Any] = {}
    if refer_threshold is not None:
        overrides["refer_threshold"] = float(refer_threshold)
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    if compile_always:
        overrides["compile"] = True
    stain_options = {"stain_normalization": stain_normalization, "stain_reference": stain_reference}
    stain_options["stain_reference_ihc"] = stain_reference_ihc
    overrides.update({k: str(v) for k, v in stain_options.items() if v is not None})
    if slides is not None:
        from her2_monai.wsi.cohort_cli import score_cohort

        options = {"stain": str(stain), "region": parse_region(region), "backend": str(backend)}
        options["progress"] = as_bool(progress, "--progress")
        tracking = None if tracking_uri is None else (str(tracking_uri), str(experiment_name), run_name)
        score_cohort(str(slides), str(output), bundle, config_file, settings, options, overrides, tracking)
        return
    predictor = None
    if load_export is not None:  # the export's predictor takes the stain options; the rest was refused above
        predictor = load_export(**{k: v for k, v in overrides.items() if k.startswith("stain_")})
        overrides = {}
    summary = run_wsi(
        str(slide),
        str(output),
        predictor=predictor,
        bundle=bundle,
        config_file=config_file,
        ihc_slide=None if ihc_slide is None else str(ihc_slide),
        stain=str(stain),
        settings=settings,
        region=parse_region(region),
        backend=str(backend),
        progress=as_bool(progress, "--progress"),
        **overrides,
    )
    counts = " ".join(f"{k}:{v}" for k, v in summary["tile_counts"].items())
    verdict = "no call" if summary["score"] is None else f"HER2 {summary['score']}"
    flags = (" (equivocal)" if summary["equivocal"] else "") + (" - refer" if summary["refer"] else "")
    print(
        f"{summary['slide']}: {verdict}{flags}; {summary['tissue_tiles']} tissue tiles ({counts}, referred "
        f"{summary['referred_tiles']}); {summary['timing']['tiles_per_second']:.2f} tiles/s; "
        f"written to {Path(output).resolve()}"
    )
    for warning in summary.get("warnings", []):
        print(f"WARNING: {warning}")


def parse_batch_size(value: Any) -> int | None:
    """``--batch_size``: a positive whole number, or auto (``None``: chosen from the model's input side).

    Args:
        value: the option as given (``"auto"``, a number or its text).

    Returns:
        The number of tiles per forward pass, or ``None`` for auto.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError(f"--batch_size must be a whole number of tiles (1 or more) or auto, got '{value}'")
    if int(value) < 1:
        raise ValueError(f"--batch_size must be at least 1 tile (or auto), got {value}")
    return int(value)


def _export_loader(
    runtime: str,
    onnx: str | None,
    bundle: str,
    given: dict[str, bool],
    refer_threshold: float | None,
) -> Callable[..., Any] | None:
    """For ``--runtime onnxruntime|openvino``: a function of the stain options that loads the export's predictor
    (``None`` for ``--runtime torch``). ``given`` says which options the export runtimes do not take were given.

    Raises:
        ValueError: for an unknown runtime, or options the export runtimes do not take.
    """
    from her2_monai.inference.onnx_runtime import check_runtime, load_onnx_predictor

    if not check_runtime(runtime, onnx):
        return None
    for flag, present in given.items():
        if present:
            raise ValueError(f"--runtime {runtime} runs one slide on the CPU with the export's own graphs: drop {flag}")
    folder = str(onnx or Path(bundle) / "models" / "onnx")
    threshold = None if refer_threshold is None else float(refer_threshold)
    return functools.partial(load_onnx_predictor, folder, refer_threshold=threshold, runtime=runtime)
