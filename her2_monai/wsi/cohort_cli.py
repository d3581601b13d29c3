"""``python -m her2_monai wsi --slides ...``: a cohort run with the bundle's model, alone or under torchrun."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from her2_monai.wsi.cohort import TABLE_FILES, CohortError, CohortSlide, run_cohort, run_fingerprint
from her2_monai.wsi.inference import TilingSettings
from her2_monai.wsi.ranks import RankGroup

__all__ = ["model_file", "cohort_settings", "score_cohort", "log_cohort_run"]

#: Settings that change how fast a slide is scored, not its result: left out of the fingerprint.
_SPEED_ONLY = ("batch_size", "compile_min_tiles")


def model_file(bundle: str | Path, config_file: str | Path | None) -> Path:
    """The ``model.pt`` the inference config loads (its ``model_weights``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        str(config_file) if config_file is not None else str(Path(bundle) / "configs" / "inference.json")
    )
    parser.update({"bundle_root": str(bundle)})
    return Path(parser.get_parsed_content("model_weights"))


def cohort_settings(
    settings: TilingSettings, options: dict[str, Any], overrides: dict[str, Any], predictor: Any, config: Path
) -> dict[str, Any]:
    """Everything besides the model that a slide's result depends on (the fingerprint's ``settings``).

    Args:
        settings: tiling settings (``batch_size`` left out: it changes the speed, not the tiles).
        options: ``stain``, ``region`` and ``backend``.
        overrides: the inference-config overrides (stain normalisation and its references; ``device`` and
            ``compile`` are left out).
        predictor: the loaded predictor (its effective refer threshold).
        config: the inference config file (its SHA-256).
    """
    from her2_monai.fileio import sha256_file

    tiling = {k: v for k, v in asdict(settings).items() if k not in _SPEED_ONLY}
    stain_options = {k: v for k, v in overrides.items() if k.startswith("stain_")}
    region = options.get("region")
    return {
        **tiling,
        "stain": options["stain"],
        "region": None if region is None else list(region),
        "backend": options["backend"],
        "refer_threshold": predictor.refer_threshold,
        **stain_options,
        "inference_config_sha256": sha256_file(config),
    }


def log_cohort_run(
    tracking: tuple[str, str, str | None], metadata: dict[str, Any]
) -> Callable[[Path, dict[str, Any]], None]:
    """A ``log_table`` for :func:`~her2_monai.wsi.cohort.run_cohort`: one MLflow run with the cohort's counts as
    metrics, its settings and model digest as params, and ``cohort.csv``/``cohort.json`` as artifacts.

    Args:
        tracking: ``(tracking URI, experiment name, run name or None)``.
        metadata: the model's metadata (its training-data provenance becomes tags).
    """

    def log(output: Path, content: dict[str, Any]) -> None:
        from her2_monai.data.provenance import provenance_tags
        from her2_monai.tracking import log_evaluation_run

        uri, experiment, name = tracking
        run = content["run"]
        params = {"model_sha256": run["model_sha256"], "world_size": run["world_size"], **run["settings"]}
        report = {k: v for k, v in run.items() if k not in ("settings", "model_sha256", "world_size")}
        tags = {**provenance_tags(metadata), "model_sha256": run["model_sha256"]}
        artifacts = [output / TABLE_FILES["csv"], output / TABLE_FILES["json"]]
        try:
            log_evaluation_run(
                uri,
                experiment,
                name or f"wsi-cohort-{output.resolve().name}",
                report,
                artifacts,
                params=params,
                tags=tags,
                kind="wsi_cohort",
            )
        except Exception as err:  # noqa: BLE001 - any store failure: the table is written, the logging is not
            raise CohortError(
                f"MLflow logging to {uri} failed ({type(err).__name__}: {err}); the table is in "
                f"{output / TABLE_FILES['csv']}"
            ) from err

    return log


def score_cohort(
    slides: str,
    output: str,
    bundle: str | Path,
    config_file: str | Path | None,
    settings: TilingSettings,
    options: dict[str, Any],
    overrides: dict[str, Any],
    tracking: tuple[str, str, str | None] | None = None,
) -> dict[str, Any] | None:
    """Score the cohort ``slides`` into ``output`` and print its summary line (last on stderr, on rank 0).

    Args:
        slides: a folder or a cohort CSV.
        output: the output folder.
        bundle: the bundle folder.
        config_file: the inference config (default ``<bundle>/configs/inference.json``).
        settings: tiling settings.
        options: ``stain``, ``region``, ``backend``, ``progress``.
        overrides: inference-config overrides (as for one slide).
        tracking: ``(tracking URI, experiment, run name)`` to log the run to MLflow, or ``None``.

    Returns:
        The ``cohort.json`` content on rank 0, ``None`` on the other ranks.

    Raises:
        her2_monai.wsi.cohort.CohortIncompleteError: when some slides failed (rank 0; the table is written).
    """
    from her2_monai.inference import load_predictor
    from her2_monai.wsi.run import run_wsi

    config = Path(config_file) if config_file is not None else Path(bundle) / "configs" / "inference.json"
    metadata: dict[str, Any] = {}

    def load(group: RankGroup):
        import torch

        local = dict(overrides)
        if group.distributed and "device" not in local and torch.cuda.is_available():
            local["device"] = f"$torch.device('cuda:{group.local_rank % torch.cuda.device_count()}')"
        predictor = load_predictor(bundle, config, **local)  # the scorer gives each batch its size
        metadata.update(getattr(getattr(predictor.network, "net", None), "metadata", {}) or {})
        fingerprint = run_fingerprint(
            model_file(bundle, config), cohort_settings(settings, options, overrides, predictor, config)
        )

        def score(slide: CohortSlide, folder: Path) -> dict[str, Any]:
            return run_wsi(
                slide.path,
                folder,
                predictor=predictor,
                ihc_slide=slide.ihc_path,
                stain=options["stain"],
                settings=settings,
                region=options["region"],
                backend=options["backend"],
                progress=options["progress"],
            )

        return score, fingerprint

    log_table = None if tracking is None else log_cohort_run(tracking, metadata)
    content = run_cohort(slides, output, load, log_table=log_table)
    if content is not None:
        run = content["run"]
        print(
            f"cohort: {run['scored']} of {run['slides']} slides scored, 0 failed ({run['done_in_this_run']} this run, "
            f"{run['skipped_done_earlier']} done earlier); table: {Path(output) / TABLE_FILES['csv']}",
            file=sys.stderr,
        )
    return content
