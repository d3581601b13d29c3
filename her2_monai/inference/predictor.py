"""Predicting files and records with the trained bundle: the ``predict`` command, the Python API and serving.

:class:`HER2Predictor` wires the bundle's preprocessing, the :class:`~her2_monai.inference.deploy.HER2Deploy` module
and :func:`prediction_result`, which turns one post-processed sample into the JSON answer. :func:`load_predictor`
builds it from ``inference.json`` and the model file alone (the architecture comes from the file's record).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import decollate_batch, list_data_collate
from monai.transforms import apply_transform

from her2_monai.constants import (
    CLASS_NAMES,
    HE_KEY,
    IHC_KEY,
    LABEL_KEY,
    SCENARIOS,
    STAIN_CLASS_NAMES,
    STAIN_KNOWN_KEY,
)
from her2_monai.inference.deploy import NO_IMAGE, PRED_KEY, SCENARIO_KEY, STAIN_PROB_KEY, STAINS_KEY, HER2Deploy
from her2_monai.inference.records import IMAGE_KEY, SOURCE_KEYS, check_record_files
from her2_monai.metrics.translation import to_uint8_images
from her2_monai.networks.factory import require_model_file
from her2_monai.stain_batch import autocast, prepare_stain_batch

__all__ = ["prediction_result", "HER2Predictor", "load_predictor", "STAIN_UNCERTAIN_BELOW"]

#: An image of unknown stain whose branch-selector probability is below this is referred (``stain_uncertain``): the
#: selector's wrong calls on real images of other labs and magnifications come with lower probabilities than its
#: right ones (``docs/design.md``, branch selector).
STAIN_UNCERTAIN_BELOW = 0.8


def _scalar(value: Any) -> float:
    return float(torch.as_tensor(value).reshape(-1)[0])


def prediction_result(
    item: Mapping[str, Any], refer_threshold: float = 0.5, stain_threshold: float = STAIN_UNCERTAIN_BELOW
) -> dict[str, Any]:
    """The JSON answer for one sample after post-processing (``pred`` = class probabilities).

    Args:
        item: one decollated sample: ``pred`` ``(4,)`` probabilities, ``scenario``, ``detected_stains`` ``(2,)``,
            ``stain_confidence`` ``(2,)``, ``stain_known`` and, optionally, ``id``, the source paths and ``label``.
        refer_threshold: confidence below which the case is flagged for a pathologist.
        stain_threshold: selector probability below which an image of unknown stain is flagged ``stain_uncertain``.

    Returns:
        ``score`` ("0".."3+"), ``probabilities`` (4 floats), ``confidence`` (max probability), ``refer`` (bool: any
        reason in ``refer_reasons``), ``refer_threshold``, ``scenario``, ``detected_stains`` (stain names of the
        given images: H&E slot then IHC slot, or the one unknown-stain image), ``stain_source``, ``warnings``
        (declared stains the selector disagrees with), ``refer_reasons`` (``low_confidence``: confidence below the
        threshold; ``stain_uncertain``: the selector routed an image of unknown stain with a probability below
        ``stain_threshold``), ``stain_confidence`` (the selector's probability of each detected stain), and when
        known ``id``, ``inputs`` (paths) and ``label`` (true score).

    Raises:
        ValueError: if ``pred`` does not hold one probability per class.
    """
    probabilities = torch.as_tensor(item[PRED_KEY]).float().reshape(-1)
    if probabilities.numel() != len(CLASS_NAMES):
        raise ValueError(f"pred must hold {len(CLASS_NAMES)} class probabilities, got {probabilities.numel()}")
    best = int(probabilities.argmax())
    confidence = float(probabilities[best])
    known = _scalar(item.get(STAIN_KNOWN_KEY, 1.0)) > 0.5
    calls = [int(v) for v in torch.as_tensor(item[STAINS_KEY]).reshape(-1).tolist()]
    stain_conf = [float(v) for v in torch.as_tensor(item.get(STAIN_PROB_KEY, [math.nan] * 2)).reshape(-1).tolist()]
    detected, warnings, detected_confidence = [], [], []
    for slot, (declared, call) in enumerate(zip((HE_KEY, IHC_KEY), calls)):
        if call == NO_IMAGE:
            continue
        detected.append(STAIN_CLASS_NAMES[call])
        detected_confidence.append(None if math.isnan(stain_conf[slot]) else round(stain_conf[slot], 6))
        if known and STAIN_CLASS_NAMES[call] != declared:
            warnings.append(
                f"the image given as {declared} looks like {STAIN_CLASS_NAMES[call]} to the branch selector "
                f"(p={stain_conf[slot]:.2f}); the declared stain was used"
            )
    reasons = ["low_confidence"] if confidence < refer_threshold else []
    unsure = [c for c in detected_confidence[:1] if c is not None and c < stain_threshold]
    if not known and unsure:
        reasons.append("stain_uncertain")
    result: dict[str, Any] = {}
    if item.get("id") is not None:
        result["id"] = str(item["id"])
    result.update(
        {
            "score": CLASS_NAMES[best],
            "probabilities": [round(float(p), 6) for p in probabilities],
            "confidence": round(confidence, 6),
            "refer": bool(reasons),
            "refer_threshold": float(refer_threshold),
            "scenario": SCENARIOS[int(_scalar(item[SCENARIO_KEY]))],
            "detected_stains": detected,
            "stain_source": "declared" if known else "selector",
            "warnings": warnings,
            "refer_reasons": reasons,
            "stain_confidence": detected_confidence,
        }
    )
    inputs = {k: str(item[v]) for k, v in SOURCE_KEYS.items() if item.get(v)}
    if inputs:
        result["inputs"] = inputs
    if LABEL_KEY in item and int(_scalar(item[LABEL_KEY])) >= 0:
        result["label"] = CLASS_NAMES[int(_scalar(item[LABEL_KEY]))]
    return result


class HER2Predictor:
    """Predict HER2 scores for files or records with the bundle's preprocessing and deployed model.

    Args:
        network: the deployed model with its weights (:class:`~her2_monai.inference.deploy.HER2Deploy`).
        preprocessing: record -> model input (the bundle's inference ``preprocessing``).
        postprocessing: per-sample output transform turning ``pred`` logits into probabilities (the bundle's
            ``postprocessing``); ``None`` applies a softmax.
        device: where to run.
        refer_threshold: confidence below which a case is flagged ``refer``.
        amp: mixed precision.
        batch_size: records per forward pass.

    Raises:
        ValueError: if ``refer_threshold`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        network: HER2Deploy,
        preprocessing: Callable,
        postprocessing: Callable | None = None,
        device: torch.device | str = "cpu",
        refer_threshold: float = 0.5,
        amp: bool = False,
        batch_size: int = 8,
    ) -> None:
        if not 0.0 <= refer_threshold <= 1.0:
            raise ValueError(f"refer_threshold must be in [0, 1], got {refer_threshold}")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.refer_threshold = float(refer_threshold)
        self.amp = bool(amp)
        self.batch_size = int(batch_size)

    def _postprocess(self, item: dict[str, Any]) -> dict[str, Any]:
        if self.postprocessing is None:
            item[PRED_KEY] = torch.as_tensor(item[PRED_KEY]).softmax(dim=0)
            return item
        return apply_transform(self.postprocessing, item)

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Predict every record (keys ``he``/``ihc`` or ``image``, optional ``id`` and ``label``).

        Args:
            records: inference records.

        Returns:
            One :func:`prediction_result` dict per record, in order.

        Raises:
            her2_monai.data.image_reader.ImageReadError: naming the file, if an input is missing or unreadable.
        """
        for record in records:
            check_record_files(record)
        results = []
        for start in range(0, len(records), self.batch_size):
            items = [apply_transform(self.preprocessing, dict(r)) for r in records[start : start + self.batch_size]]
            batch = list_data_collate(items)
            stains = prepare_stain_batch(batch, self.device)
            outputs = self.network.predict_batch(
                stains[HE_KEY], stains[IHC_KEY], stains["mask"], batch.get(STAIN_KNOWN_KEY), self.amp
            )
            for data, out in zip(decollate_batch(batch, detach=True), decollate_batch(outputs, detach=True)):
                merged = {**{k: v for k, v in data.items() if k not in (HE_KEY, IHC_KEY)}, **out}
                results.append(prediction_result(self._postprocess(merged), self.refer_threshold))
        return results

    def predict(
        self,
        he: str | os.PathLike | None = None,
        ihc: str | os.PathLike | None = None,
        image: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Predict one patch from its H&E and/or IHC file, or from one ``image`` of unknown stain.

        Returns:
            The :func:`prediction_result` dict.

        Raises:
            ValueError: if no input or both ``image`` and ``he``/``ihc`` are given.
            her2_monai.data.image_reader.ImageReadError: naming the file, if it is missing or unreadable.
        """
        if image is not None and (he is not None or ihc is not None):
            raise ValueError("give either --image (stain unknown) or --he/--ihc (declared stains), not both")
        if image is None and he is None and ihc is None:
            raise ValueError("no input image: give --he FILE and/or --ihc FILE, or --image FILE")
        record = {IMAGE_KEY: image} if image is not None else {HE_KEY: he, IHC_KEY: ihc}
        record = {k: str(v) for k, v in record.items() if v is not None}
        return self.predict_records([record])[0]

    @torch.no_grad()
    def translate(self, path: str | os.PathLike, target: str = IHC_KEY) -> np.ndarray:
        """The CM-GAN's synthetic stain for one patch, as the classifier sees it (at the model's image size).

        Args:
            path: the source image (H&E when ``target`` is ``"ihc"``, IHC when it is ``"he"``).
            target: the stain to synthesise, ``"ihc"`` or ``"he"``.

        Returns:
            ``(S, S, 3)`` uint8 RGB image.

        Raises:
            ValueError: for an unknown target.
            LookupError: for a model without a CM-GAN (it fills missing stains by feature substitution).
            her2_monai.data.image_reader.ImageReadError: naming the file, if it is missing or unreadable.
        """
        if target not in (HE_KEY, IHC_KEY):
            raise ValueError(f"target must be '{HE_KEY}' or '{IHC_KEY}', got '{target}'")
        cmgan = self.network.net.cmgan
        if cmgan is None:
            raise LookupError("this model fills missing stains by feature substitution; it has no CM-GAN to translate")
        source = IHC_KEY if target == HE_KEY else HE_KEY
        check_record_files({source: str(path)})
        item = apply_transform(self.preprocessing, {source: str(path)})
        x = prepare_stain_batch(list_data_collate([item]), self.device)[source]
        generator = cmgan.he_to_ihc if target == IHC_KEY else cmgan.ihc_to_he
        with autocast(self.device, self.amp):
            fake = generator(x).float()
        return to_uint8_images(fake)[0]

    @torch.no_grad()
    def detect_stain(self, path: str | os.PathLike) -> tuple[str, float]:
        """The branch selector's call for one image of unknown stain.

        Args:
            path: the image.

        Returns:
            ``("he" | "ihc", probability of that call)``.

        Raises:
            ValueError: for a model without a branch selector.
            her2_monai.data.image_reader.ImageReadError: naming the file, if it is missing or unreadable.
        """
        if self.network.net.selector is None:
            raise ValueError("this model has no branch selector to tell the stain")
        check_record_files({IMAGE_KEY: str(path)})
        item = apply_transform(self.preprocessing, {IMAGE_KEY: str(path)})
        x = prepare_stain_batch(list_data_collate([item]), self.device)[HE_KEY]
        with autocast(self.device, self.amp):
            probabilities = self.network.net.selector(x).float().softmax(dim=1)[0]
        call = int(probabilities.argmax())
        return STAIN_CLASS_NAMES[call], float(probabilities[call])


def load_predictor(
    bundle_root: str | os.PathLike = "bundle",
    config_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    **overrides: Any,
) -> HER2Predictor:
    """Build a :class:`HER2Predictor` from the bundle's ``inference.json`` and its trained model file.

    Args:
        bundle_root: bundle folder holding ``models/`` (and, by default, ``configs/inference.json``).
        config_file: inference config(s) (default ``<bundle_root>/configs/inference.json``).
        overrides: config values to override (``refer_threshold``, ``device``, ...). Architecture options are
            checked against the model file's record.

    Returns:
        The predictor.

    Raises:
        FileNotFoundError: if the config or the model file is missing (naming the command that makes it).
        ValueError: for a damaged or foreign model file, or overrides that disagree with its record.
    """
    from monai.bundle import ConfigParser

    config_file = config_file if config_file is not None else Path(bundle_root) / "configs" / "inference.json"
    files = [str(f) for f in (config_file if isinstance(config_file, (list, tuple)) else [config_file])]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(
                f"inference config '{f}' not found; pass --config_file bundle/configs/inference.json"
            )
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": str(bundle_root), **overrides})
    try:
        require_model_file(parser.get_parsed_content("model_weights"))
        parts = {k: parser.get_parsed_content(k) for k in _PREDICTOR_PARTS}
    except RuntimeError as err:
        raise _root_cause(err) from None
    return HER2Predictor(
        network=parts["network"],
        preprocessing=parts["preprocessing"],
        postprocessing=parts["postprocessing"],
        device=parts["device"],
        refer_threshold=float(parts["refer_threshold"]),
        amp=bool(parts["amp"]),
        batch_size=int(parts["batch_size"]),
    )


_PREDICTOR_PARTS = ("network", "preprocessing", "postprocessing", "device", "refer_threshold", "amp", "batch_size")


def _root_cause(err: BaseException) -> BaseException:
    """The user-facing error inside MONAI's "Failed to evaluate ..." wrappers (missing file, bad weights...)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
        if isinstance(cause, (FileNotFoundError, ValueError, KeyError)):
            return cause
    return err
