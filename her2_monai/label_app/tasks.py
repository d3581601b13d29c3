"""MONAI Label tasks of the HER2 app: HER2 score, synthetic stain, whole-slide region scoring and bundle training.

Infer tasks take already-validated local files (the app resolves uploads and datastore ids, see ``main.py``); they
never treat request strings as paths. Each returns ``(png bytes or None, JSON)``; MONAI Label's own ``__call__``
contract (``(file path or None, JSON)``) is kept for its batch-inference path.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask
from PIL import Image

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY
from her2_monai.data.datalist import write_datalist
from her2_monai.data.image_reader import ImageReadError
from her2_monai.data.provenance import provenance_warnings
from her2_monai.label_app.config import AppConfig
from her2_monai.label_app.datalist import build_train_datalist
from her2_monai.label_app.model import ModelHolder
from her2_monai.label_app.uploads import RequestError

__all__ = [
    "InputImage",
    "HER2ScoreTask",
    "StainTranslationTask",
    "WholeSlideTask",
    "RegionRequest",
    "parse_region_request",
    "HER2TrainTask",
    "build_train_command",
    "TRAIN_RUN_IDS",
    "MAX_REGION_PIXELS",
    "MAX_TILES",
]

logger = logging.getLogger(__name__)

_STAINS = (HE_KEY, IHC_KEY)
#: The bundle workflows the train task may start.
TRAIN_RUN_IDS = ("training", "train_classifier", "train_gan")


class InputImage:
    """A validated local image and how to name it to the client (never its server path).

    Args:
        path: the local file (a private upload copy or a datastore image).
        name: the client-facing name: the upload's file name or the datastore id.
        size: ``(width, height)`` in pixels.
    """

    def __init__(self, path: Path, name: str, size: tuple[int, int]) -> None:
        self.path = Path(path)
        self.name = name
        self.size = size


def _choice(params: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = params.get(key, default)
    value = default if value in (None, "") else str(value).strip().lower()
    if value not in choices:
        raise RequestError(400, f"params.{key} must be one of {list(choices)}, got {str(params.get(key))[:40]!r}")
    return value


def _image_error(err: ImageReadError, image: InputImage) -> RequestError:
    return RequestError(400, f"{image.name}: {err.reason}")


class _ServedModelTask(InferTask):
    """A task of the served model on 2D images (by default a classification into the four HER2 scores).

    Args:
        holder: the served model.
        description: what the task does (shown by the app's ``/info``).
        config: the task's parameters with their choices or defaults.
        task_type: MONAI Label's task type.
        labels: the task's labels.
    """

    def __init__(
        self,
        holder: ModelHolder,
        description: str,
        config: dict[str, Any],
        task_type: str = InferType.CLASSIFICATION,
        labels: Sequence[str] = CLASS_NAMES,
    ) -> None:
        super().__init__(
            type=task_type,
            labels=list(labels),
            dimension=2,
            description=description,
            config=config,
        )
        self.holder = holder

    def is_valid(self) -> bool:
        return True


class HER2ScoreTask(_ServedModelTask):
    """HER2 score (0/1+/2+/3+) of one patch, or of an H&E + IHC pair; the same JSON as ``her2_monai predict``.

    Params: ``stain`` (``auto``: the branch selector decides; or ``he``/``ihc`` to declare it) and, for a pair,
    ``he`` or ``ihc`` = the datastore id of the other stain (resolved by the app).

    Args:
        holder: the served model.
    """

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__(
            holder,
            description="HER2 score (0, 1+, 2+, 3+) of an H&E and/or HER2-IHC patch; stain detected when unknown",
            config={"stain": ["auto", "he", "ihc"]},
        )

    def run(self, image: InputImage, params: Mapping[str, Any], partner: tuple[str, InputImage] | None = None) -> dict:
        """Predict.

        Args:
            image: the main image.
            params: request params (``stain``).
            partner: ``(stain, image)`` of the second stain, for a pair.

        Returns:
            The prediction JSON; ``inputs`` names the images as the client knows them.

        Raises:
            RequestError: 400 for contradicting stains or an unreadable image.
        """
        stain = _choice(params, "stain", ("auto", *_STAINS), "auto")
        inputs: dict[str, InputImage]
        if partner is not None:
            other, second = partner
            main_stain = IHC_KEY if other == HE_KEY else HE_KEY
            if stain not in ("auto", main_stain):
                raise RequestError(400, f"params.stain is '{stain}' but params.{other} gives the {other} image too")
            inputs = {main_stain: image, other: second}
        elif stain == "auto":
            inputs = {"image": image}
        else:
            inputs = {stain: image}

        def predict(predictor: Any) -> dict:
            return predictor.predict(**{k: str(v.path) for k, v in inputs.items()})

        try:
            result = self.holder.run(predict)
        except ImageReadError as err:
            culprit = next((v for v in inputs.values() if str(v.path) == err.path), image)
            raise _image_error(err, culprit) from None
        result["inputs"] = {k: v.name for k, v in inputs.items()}
        return result

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        """MONAI Label's contract (batch inference): ``request["image"]`` is a resolved local file."""
        path = Path(request["image"])
        return None, self.run(InputImage(path, str(request.get("image_id", path.stem)), (0, 0)), request)


class StainTranslationTask(_ServedModelTask):
    """The CM-GAN's synthetic IHC for an H&E patch (or synthetic H&E for an IHC patch), as an RGB PNG.

    The image is made at the model's resolution (the bundle's ``image_size``: 64 for the demo profile, 512 for BCI);
    ``size=input`` resizes it back to the uploaded patch's size (bicubic; no detail is added).

    Params: ``source`` (``auto``: the branch selector decides; ``he`` or ``ihc``) and ``size`` (``model`` or
    ``input``).

    Args:
        holder: the served model.
    """

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__(
            holder,
            description="Synthetic IHC for an H&E patch (or H&E for IHC) from the CM-GAN, as an RGB PNG",
            config={"source": ["auto", "he", "ihc"], "size": ["model", "input"]},
            task_type=InferType.OTHERS,
            labels=(),
        )

    def run(self, image: InputImage, params: Mapping[str, Any]) -> tuple[bytes, dict]:
        """Translate one patch.

        Returns:
            ``(PNG bytes, JSON)``; the JSON has ``source_stain``, ``target_stain``, ``width``, ``height``, ``size``
            (``model`` or ``input``), ``image_size`` (the model's), ``stain_source`` (``declared`` or ``selector``),
            ``input`` (the client's name) and ``synthetic: true``.

        Raises:
            RequestError: 400 for bad params or an unreadable image, 501 if the bundle has no CM-GAN.
        """
        source = _choice(params, "source", ("auto", *_STAINS), "auto")
        size = _choice(params, "size", ("model", "input"), "model")

        def translate(predictor: Any) -> tuple[np.ndarray, str, float | None]:
            stain, confidence = (source, None) if source != "auto" else predictor.detect_stain(image.path)
            target = IHC_KEY if stain == HE_KEY else HE_KEY
            return predictor.translate(image.path, target), stain, confidence

        try:
            pixels, stain, confidence = self.holder.run(translate)
        except ImageReadError as err:
            raise _image_error(err, image) from None
        except LookupError as err:
            raise RequestError(501, str(err)) from None
        model_size = int(pixels.shape[0])
        picture = Image.fromarray(pixels, mode="RGB")
        if size == "input" and image.size[0] > 0:
            picture = picture.resize(image.size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        result: dict[str, Any] = {
            "source_stain": stain,
            "target_stain": IHC_KEY if stain == HE_KEY else HE_KEY,
            "width": picture.width,
            "height": picture.height,
            "size": size,
            "image_size": model_size,
            "stain_source": "declared" if source != "auto" else "selector",
            "input": image.name,
            "synthetic": True,
        }
        if confidence is not None:
            result["stain_confidence"] = round(confidence, 6)
        return buffer.getvalue(), result

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        """MONAI Label's contract (batch inference): writes the PNG to a temp file the caller owns."""
        path = Path(request["image"])
        png, result = self.run(InputImage(path, str(request.get("image_id", path.stem)), (0, 0)), request)
        handle, out = tempfile.mkstemp(suffix=".png")
        with os.fdopen(handle, "wb") as stream:
            stream.write(png)
        return out, result


#: Largest region (level-0 pixels) and number of grid tiles one request may ask for.
MAX_REGION_PIXELS = 32768 * 32768
MAX_TILES = 2048
_TILE_RANGE = (32, 4096)


@dataclass(frozen=True)
class RegionRequest:
    """A validated whole-slide request: where, how to tile, which stain.

    Attributes:
        region: ``(x, y, width, height)`` in level-0 pixels, or ``None`` for the whole slide.
        level: pyramid level the tiles are read from.
        tile_size: tile side in pixels of that level.
        overlap: pixels shared by neighbouring tiles.
        min_tissue: smallest tissue share of a scored tile.
        stain: ``he``, ``ihc`` or ``auto``.
    """

    region: tuple[int, int, int, int] | None
    level: int
    tile_size: int
    overlap: int
    min_tissue: float
    stain: str


def _integers(value: Any, key: str, count: int) -> tuple[int, ...]:
    """``count`` integers from a JSON value (a number, or a list of ``count`` numbers)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = []
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            break
        try:
            number = float(item)
        except ValueError:
            break
        if not number.is_integer() or abs(number) > 2**31:
            break
        numbers.append(int(number))
    if len(values) != count or len(numbers) != count:
        what = "an integer" if count == 1 else f"a list of {count} integers"
        raise RequestError(400, f"{key} must be {what}, got {str(value)[:60]!r}")
    return tuple(numbers)


def parse_region_request(spec: Mapping[str, Any]) -> RegionRequest:
    """Read a region request: MONAI Label's ``wsi`` fields (``location`` [x, y] and ``size`` [width, height] in
    level-0 pixels, ``level``, ``tile_size`` [n, n]) plus ``overlap``, ``min_tissue`` and ``stain``; without
    ``location`` and ``size`` the whole slide is scored.

    Raises:
        RequestError: 400 naming the field, 413 for a region larger than :data:`MAX_REGION_PIXELS`.
    """
    region = None
    if spec.get("location") is not None or spec.get("size") is not None:
        x, y = _integers(spec.get("location", [0, 0]), "location", 2)
        width, height = _integers(spec.get("size"), "size", 2)
        if min(x, y) < 0 or min(width, height) < 1:
            raise RequestError(400, f"location must be >= 0 and size >= 1, got {[x, y]} and {[width, height]}")
        if width * height > MAX_REGION_PIXELS:
            raise RequestError(413, f"the region has {width * height:,} pixels, more than {MAX_REGION_PIXELS:,}")
        region = (x, y, width, height)
    level = _integers(spec.get("level", 0) or 0, "level", 1)[0]
    tile = spec.get("tile_size", 256)
    tile = tile if isinstance(tile, (list, tuple)) else [tile, tile]
    width, height = _integers(tile, "tile_size", 2)
    if width != height or not _TILE_RANGE[0] <= width <= _TILE_RANGE[1]:
        raise RequestError(400, f"tile_size must be square, {_TILE_RANGE[0]} to {_TILE_RANGE[1]} pixels, got {tile}")
    overlap = _integers(spec.get("overlap", 0) or 0, "overlap", 1)[0]
    if not 0 <= overlap < width:
        raise RequestError(400, f"overlap must be in [0, tile_size), got {overlap}")
    try:
        min_tissue = float(spec.get("min_tissue", 0.5))
    except (TypeError, ValueError):
        raise RequestError(
            400, f"min_tissue must be a number in [0, 1], got {str(spec.get('min_tissue'))[:40]!r}"
        ) from None
    if not 0.0 <= min_tissue <= 1.0:
        raise RequestError(400, f"min_tissue must be a number in [0, 1], got {min_tissue}")
    stain = _choice(spec, "stain", ("he", "ihc", "auto"), "he")
    return RegionRequest(region, level, width, overlap, min_tissue, stain)


class WholeSlideTask(_ServedModelTask):
    """HER2 scores of the tissue tiles of a slide region, and the region-level call (:mod:`her2_monai.wsi`).

    The slide must be in the app's datastore (slides are too large to upload per request). The answer: ``score``
    (ASCO/CAP-style region call, ``None`` without usable tiles), ``refer``, ``equivocal``, ``tile_counts``,
    ``referred_tiles``, ``tissue_tiles``, ``call`` (shares and rule), ``region``, ``tiling``, ``warnings``,
    ``provenance`` (what the model was trained on, as in ``slide.json``) and ``tiles`` (each: ``x``, ``y``, ``size``
    in level-0 pixels, ``score``, ``confidence``, ``refer``, ``probabilities``, ``tissue``).

    Args:
        holder: the served model.
    """

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__(
            holder,
            description="HER2 region call and per-tile scores for a region of a datastore slide (tiles of tissue)",
            config={"stain": ["he", "ihc", "auto"], "tile_size": 256, "level": 0, "overlap": 0, "min_tissue": 0.5},
        )

    def run(self, slide_path: Path, name: str, request: RegionRequest) -> dict[str, Any]:
        """Score a region.

        Raises:
            RequestError: 415 if the file is not a slide the server reads, 400 for a region outside the slide or a
                level it does not have, 413 for too many tiles.
        """
        from her2_monai.wsi import SlideOpenError, TilingSettings, WholeSlideScorer, open_slide, plan_tiles

        settings = TilingSettings(
            tile_size=request.tile_size, level=request.level, overlap=request.overlap, min_tissue=request.min_tissue
        )
        try:
            slide = open_slide(slide_path)
        except SlideOpenError as err:
            reason = str(err).replace(f"slide '{slide_path}'", name).replace(str(slide_path), name)
            raise RequestError(415, f"not a slide this server can read: {reason}") from None
        with slide:
            try:
                plan = plan_tiles(slide, settings, request.region)
            except ValueError as err:
                raise RequestError(400, f"{name}: {str(err).replace(str(slide_path), name)}") from None
            if plan.grid_tiles > MAX_TILES:
                raise RequestError(
                    413, f"the region holds {plan.grid_tiles} tiles, more than {MAX_TILES}: send a smaller region or "
                    "a larger tile_size"
                )  # fmt: skip

            def score(predictor: Any) -> dict[str, Any]:
                scorer = WholeSlideScorer(predictor, settings, stain=request.stain, progress=False)
                return scorer.score(slide, None, request.region)

            result = self.holder.run(score)
        provenance = self.holder.provenance()  # the model that just answered (cached per model file)
        call, rows, plan = result["call"], result["rows"], result["plan"]
        keep = ("tile", "x", "y", "size", "tissue", "score", "confidence", "refer", "refer_reasons", "probabilities")
        tiles = [{k: row[k] for k in keep} | {"detected_stains": row["detected_stains"]} for row in rows]
        return {
            "image": name,
            "score": call["score"],
            "refer": call["refer"],
            "equivocal": call["equivocal"],
            "tile_counts": call["counts"],
            "referred_tiles": call["referred"],
            "tissue_tiles": len(rows),
            "call": call,
            "region": {"location": list(plan.area[:2]), "size": list(plan.area[2:]), "level": plan.level},
            "tiling": {"tile_size": plan.read_size, "tile_size_level0": plan.tile_size_level0,
                       "overlap": request.overlap, "min_tissue": request.min_tissue, "grid_tiles": plan.grid_tiles},
            "stain": request.stain,
            "seconds": round(float(result["seconds"]), 3),
            "warnings": provenance_warnings(provenance) if provenance is not None else [],
            "provenance": provenance,
            "tiles": tiles,
        }  # fmt: skip

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        """MONAI Label's contract (batch inference): ``request["image"]`` is a resolved local slide file."""
        path = Path(request["image"])
        return None, self.run(path, str(request.get("image_id", path.stem)), parse_region_request(request))


def _override_arg(value: Any) -> str:
    """A command-line value for ``monai.bundle run`` (parsed by ``fire``): strings as they are, others as literals."""
    return value if isinstance(value, str) else repr(value)


def build_train_command(
    config: AppConfig, run_id: str, datalist: Path, extra: Mapping[str, Any] | None = None
) -> list[str]:
    """The ``python -m monai.bundle run ...`` argument list (no shell) for training on ``datalist``.

    Args:
        config: the app settings (bundle folder, overrides, device).
        run_id: one of :data:`TRAIN_RUN_IDS`.
        datalist: the datalist JSON written from the datastore.
        extra: validated numeric overrides from the request.

    Returns:
        The command.

    Raises:
        ValueError: for an unknown ``run_id``.
    """
    if run_id not in TRAIN_RUN_IDS:
        raise ValueError(f"run_id must be one of {list(TRAIN_RUN_IDS)}, got {run_id!r}")
    configs = config.bundle_path / "configs"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        str(configs / "train.json"),
        "--meta_file",
        str(configs / "metadata.json"),
        "--logging_file",
        str(configs / "logging.conf"),
        "--bundle_root",
        str(config.bundle_path),
        "--datalist",
        str(datalist),
    ]
    overrides = {**config.overrides, **dict(extra or {})}
    if config.device is not None:
        overrides["device"] = f"$torch.device('{config.device}')"
    for key, value in overrides.items():
        cmd += [f"--{key}", _override_arg(value)]
    return cmd


#: Request keys of the train task that become bundle overrides, with their allowed range.
_TRAIN_INT_KEYS = {"gan_epochs": (1, 1000), "cls_epochs": (1, 1000), "batch_size": (1, 512)}


class HER2TrainTask(TrainTask):
    """Train the bundle on the app's datastore: ``python -m monai.bundle run training`` in a subprocess.

    The datalist comes from :func:`~her2_monai.label_app.datalist.build_train_datalist` (stain and label from the
    image ids, image info or label files) and is written to ``<bundle>/eval/monailabel_datalist.json``; the trained
    weights replace ``<bundle>/models/*.pt``, which the infer tasks reload on their next request.

    Request keys: ``run_id`` (``training``, ``train_classifier`` or ``train_gan``), ``val_fraction``, ``seed`` and
    the optional ``gan_epochs``, ``cls_epochs``, ``batch_size`` (0 or absent = the bundle's value).

    Args:
        config: the app settings.
    """

    def __init__(self, config: AppConfig) -> None:
        super().__init__("Train the HER2 bundle (CM-GAN, then classifier) on the datastore's labelled patches")
        self.app_config = config
        self._last: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {
            "run_id": list(TRAIN_RUN_IDS),
            "val_fraction": 0.15,
            "seed": 0,
            "gan_epochs": 0,
            "cls_epochs": 0,
            "batch_size": 0,
        }

    def stats(self) -> dict[str, Any]:
        return dict(self._last)

    def parse_request(self, request: Mapping[str, Any]) -> tuple[str, float, int, dict[str, int]]:
        """``(run_id, val_fraction, seed, overrides)`` from a train request.

        Raises:
            ValueError: naming the bad key.
        """
        run_id = request.get("run_id", "training")
        run_id = run_id[0] if isinstance(run_id, list) and run_id else run_id
        if run_id not in TRAIN_RUN_IDS:
            raise ValueError(f"run_id must be one of {list(TRAIN_RUN_IDS)}, got {str(run_id)[:40]!r}")
        try:
            val_fraction = float(request.get("val_fraction", 0.15))
            seed = int(request.get("seed", 0))
        except (TypeError, ValueError):
            raise ValueError("val_fraction must be a number and seed an integer") from None
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        overrides = {}
        for key, (low, high) in _TRAIN_INT_KEYS.items():
            value = request.get(key)
            if value in (None, "", 0, "0"):
                continue
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be an integer, got {str(value)[:40]!r}") from None
            if not low <= number <= high:
                raise ValueError(f"{key} must be in [{low}, {high}], got {number}")
            overrides[key] = number
        return run_id, val_fraction, seed, overrides

    def __call__(self, request: dict, datastore: Any) -> dict[str, Any]:
        """Build the datalist from ``datastore`` and run the bundle's training to completion.

        Returns:
            ``run_id``, ``returncode``, record ``counts`` per split and class, and the ``skipped`` images.

        Raises:
            ValueError: for a bad request or a datastore without enough labelled images.
            RuntimeError: if training exits with an error.
        """
        run_id, val_fraction, seed, extra = self.parse_request(request)
        datalist, report = build_train_datalist(datastore, val_fraction=val_fraction, seed=seed)
        for image_id, reason in report.skipped:
            logger.warning("training datalist: skipped %s: %s", image_id, reason)
        if not datalist["training"] or not datalist["validation"]:
            raise ValueError(
                "not enough labelled images in the datastore: training needs at least one training and one validation "
                f"record (counts: {report.counts}); see the skipped images in the log"
            )
        path = write_datalist(datalist, self.app_config.bundle_path / "eval" / "monailabel_datalist.json")
        cmd = build_train_command(self.app_config, run_id, path, extra)
        logger.info("starting bundle training: %s", " ".join(cmd))
        completed = subprocess.run(cmd, cwd=str(self.app_config.bundle_path.parent), check=False)  # noqa: S603
        self._last = {"run_id": run_id, "returncode": completed.returncode, **report.summary()}
        if completed.returncode != 0:
            raise RuntimeError(f"bundle training '{run_id}' failed with exit status {completed.returncode}")
        return dict(self._last)
