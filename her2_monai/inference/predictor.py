"""Predicting files and records with the trained bundle: the ``predict`` command, the Python API and serving.

:class:`HER2Predictor` wires the bundle's preprocessing, the :class:`~her2_monai.inference.deploy.HER2Deploy` module
and :func:`prediction_result`, which turns one post-processed sample into the JSON answer. :func:`load_predictor`
builds it from ``inference.json`` and the model file alone (the architecture comes from the file's record).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import decollate_batch, list_data_collate
from monai.transforms import apply_transform

from her2_monai.calibration.scorer import DEFAULT_REFER_THRESHOLD
from her2_monai.constants import (
    CLASS_NAMES,
    HE_KEY,
    IHC_KEY,
    LABEL_KEY,
    SCENARIOS,
    STAIN_CLASS_NAMES,
    STAIN_KNOWN_KEY,
)
from her2_monai.data.provenance import model_provenance, provenance_warnings
from her2_monai.inference.deploy import (
    NO_IMAGE,
    OOD_KEY,
    PRED_KEY,
    SCENARIO_KEY,
    STAIN_PROB_KEY,
    STAINS_KEY,
    HER2Deploy,
)
from her2_monai.inference.records import IMAGE_KEY, SOURCE_KEYS, check_record_files
from her2_monai.metrics.translation import to_uint8_images
from her2_monai.networks.factory import require_model_file
from her2_monai.stain_batch import autocast, prepare_stain_batch
from her2_monai.transforms.stain_settings import references_from_record
from her2_monai.transforms.tissue import INPUT_REFUSALS, MIN_TISSUE_FRACTION

__all__ = [
    "REFER_REASONS",
    "STAIN_UNCERTAIN_BELOW",
    "prediction_result",
    "HER2Predictor",
    "TorchScriptPredictor",
    "load_predictor",
]

#: An image of unknown stain whose branch-selector probability is below this is referred (``stain_uncertain``): the
#: selector's wrong calls on real images of other labs and magnifications come with lower probabilities than its
#: right ones (``docs/design.md``, branch selector).
STAIN_UNCERTAIN_BELOW = 0.8


def _scalar(value: Any) -> float:
    return float(torch.as_tensor(value).reshape(-1)[0])


#: Why a case is referred to a pathologist (``refer_reasons``), in this order: first the input refusals of the input
#: checks (:data:`~her2_monai.transforms.tissue.INPUT_REFUSALS`: no score is given), then the model's doubts.
REFER_REASONS = (
    *INPUT_REFUSALS,
    "invalid_output",
    "out_of_distribution",
    "stain_mismatch",
    "stain_uncertain",
    "low_confidence",
)


def _input_refusals(item: Mapping[str, Any]) -> list[str]:
    """The input checks' reason codes of a refused sample (``no_tissue`` when a check gave none, as older ones)."""
    codes = [c.strip() for c in str(item.get("tissue_reasons") or "").split(",") if c.strip() in INPUT_REFUSALS]
    return [c for c in INPUT_REFUSALS if c in codes] or ["no_tissue"]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = _scalar(value)
    return number if math.isfinite(number) else None


def prediction_result(
    item: Mapping[str, Any],
    refer_threshold: float | None = None,
    stain_threshold: float = STAIN_UNCERTAIN_BELOW,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON answer for one sample after post-processing (``pred`` = class probabilities).

    A case is referred (``refer: true``) for every reason in ``refer_reasons``: ``no_tissue``,
    ``insufficient_tissue``, ``pen_ink`` and ``wrong_marker`` (the input checks of
    :class:`~her2_monai.transforms.TissueCheckd` refused the input: no HER2 score is given, ``score``,
    ``probabilities`` and ``confidence`` are null, and ``warnings`` says why), ``invalid_output`` (the network gave
    NaN or Inf: no score either), ``out_of_distribution`` (``ood_score`` above the model's threshold for the
    scenario), ``stain_mismatch`` (a declared stain that the branch selector calls the other stain) and
    ``low_confidence`` (calibrated confidence below the referral threshold).

    Args:
        item: one decollated sample: ``pred`` ``(4,)`` probabilities, ``scenario``, ``detected_stains`` ``(2,)``,
            ``stain_confidence`` ``(2,)``, ``stain_known`` and, optionally, the trust outputs of
            :meth:`~her2_monai.inference.deploy.HER2Deploy.predict_batch` (``ood_score``, ``ood_threshold``,
            ``refer_threshold``, ``temperature``, ``entropy``, ``mutual_information``), the tissue check's
            ``tissue_ok``/``tissue_fraction``/``tissue_issue``/``tissue_reasons``, ``id``, the source paths and
            ``label``.
        refer_threshold: confidence below which the case is referred; ``None`` = the model's recorded threshold
            for the sample's scenario (``item["refer_threshold"]``), else 0.5.
        stain_threshold: selector probability below which an image of unknown stain is referred (``stain_uncertain``).
        provenance: what the model was trained on (:func:`~her2_monai.data.provenance.model_provenance`), copied to
            the answer's ``provenance`` with its warnings (demo data, unknown training data) appended to
            ``warnings``, also on refusals; ``None`` leaves both out.

    Returns:
        ``score`` ("0".."3+" or null), ``probabilities`` (4 floats or null), ``confidence`` (max calibrated
        probability or null), ``refer`` (bool), ``refer_reasons``, ``refer_threshold``, ``ood_score`` (null without
        an OOD score), ``ood_threshold``, ``calibrated`` (a temperature was applied), ``scenario``,
        ``detected_stains`` (stain names of the given images: H&E slot then IHC slot, or the one unknown-stain
        image), ``stain_source``, ``warnings`` (declared stains the selector disagrees with, tissue refusals),
        ``stain_confidence`` (the selector's probability of each detected stain),
        ``tissue_fraction`` (per given image), ``stain_attention`` (the CBAM weight of each stain, ``{"he", "ihc"}``;
        a missing stain's weight is that of its synthetic stand-in), with MC dropout ``uncertainty``
        (``predictive_entropy``, ``mutual_information``), and when known ``id``, ``inputs`` (paths) and ``label``
        (true score); with ``provenance`` given, ``provenance`` (``source``, ``dataset``, ``datalist_sha256``).

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
    if refer_threshold is None:
        refer_threshold = _finite(item.get("refer_threshold"))
    threshold = DEFAULT_REFER_THRESHOLD if refer_threshold is None else float(refer_threshold)
    tissue_ok = _scalar(item.get("tissue_ok", 1.0)) > 0.5
    # A NaN or Inf from the network (a damaged model, an overflow) is never turned into a score.
    scored = tissue_ok and bool(torch.isfinite(probabilities).all())
    ood_score, ood_threshold = _finite(item.get(OOD_KEY)), _finite(item.get("ood_threshold"))
    reasons = []
    if not tissue_ok:
        reasons.extend(_input_refusals(item))
        # One warning per refusal: each says which stain, what was found, how much and the threshold.
        issues = [w.strip() for w in str(item.get("tissue_issue") or "").split("; ") if w.strip()]
        warnings.extend(issues or ["no stained tissue in the image"])
    elif not scored:
        reasons.append("invalid_output")
        warnings.append(
            "the network's output was not finite (NaN or Inf), so no score is given: check the model file "
            "(python -m her2_monai predict on a known patch) and the input image"
        )
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        reasons.append("out_of_distribution")
    if known and any(STAIN_CLASS_NAMES[c] != s for s, c in zip((HE_KEY, IHC_KEY), calls) if c != NO_IMAGE):
        reasons.append("stain_mismatch")
    unsure = [c for c in detected_confidence[:1] if c is not None and c < stain_threshold]
    if not known and unsure:
        reasons.append("stain_uncertain")
    if scored and confidence < threshold:
        reasons.append("low_confidence")
    result: dict[str, Any] = {}
    if item.get("id") is not None:
        result["id"] = str(item["id"])
    result.update(
        {
            "score": CLASS_NAMES[best] if scored else None,
            "probabilities": [round(float(p), 6) for p in probabilities] if scored else None,
            "confidence": round(confidence, 6) if scored else None,
            "refer": bool(reasons),
            "refer_reasons": reasons,
            "refer_threshold": threshold,
            "ood_score": None if ood_score is None or not scored else round(ood_score, 6),
            "ood_threshold": ood_threshold,
            "calibrated": _scalar(item.get("calibrated", 0.0)) > 0.5,
            "scenario": SCENARIOS[int(_scalar(item[SCENARIO_KEY]))],
            "detected_stains": detected,
            "stain_source": "declared" if known else "selector",
            "warnings": warnings,
            "stain_confidence": detected_confidence,
        }
    )
    if scored and item.get("stain_attention") is not None:
        weights = [float(v) for v in torch.as_tensor(item["stain_attention"]).reshape(-1).tolist()]
        result["stain_attention"] = {stain: round(w, 6) for stain, w in zip((HE_KEY, IHC_KEY), weights)}
    if "tissue_fraction" in item:
        shares = [float(v) for v in torch.as_tensor(item["tissue_fraction"]).reshape(-1).tolist()]
        result["tissue_fraction"] = [round(v, 4) for v in shares if v >= 0]
    entropy, mutual = _finite(item.get("entropy")), _finite(item.get("mutual_information"))
    if scored and entropy is not None and mutual is not None:
        result["uncertainty"] = {"predictive_entropy": round(entropy, 6), "mutual_information": round(mutual, 6)}
    inputs = {k: str(item[v]) for k, v in SOURCE_KEYS.items() if item.get(v)}
    if inputs:
        result["inputs"] = inputs
    if LABEL_KEY in item and int(_scalar(item[LABEL_KEY])) >= 0:
        result["label"] = CLASS_NAMES[int(_scalar(item[LABEL_KEY]))]
    if provenance is not None:  # every answer, refusals too: the model's training data qualifies all of them
        result["provenance"] = dict(provenance)
        result["warnings"].extend(provenance_warnings(provenance))
    return result


def _one_record(
    he: str | os.PathLike | None, ihc: str | os.PathLike | None, image: str | os.PathLike | None
) -> dict[str, str]:
    if image is not None and (he is not None or ihc is not None):
        raise ValueError("give either --image (stain unknown) or --he/--ihc (declared stains), not both")
    if image is None and he is None and ihc is None:
        raise ValueError("no input image: give --he FILE and/or --ihc FILE, or --image FILE")
    record = {IMAGE_KEY: image} if image is not None else {HE_KEY: he, IHC_KEY: ihc}
    return {k: str(v) for k, v in record.items() if v is not None}


class HER2Predictor:
    """Predict HER2 scores for files or records with the bundle's preprocessing and deployed model.

    Args:
        network: the deployed model with its weights (:class:`~her2_monai.inference.deploy.HER2Deploy`).
        preprocessing: record -> model input (the bundle's inference ``preprocessing``).
        postprocessing: per-sample output transform turning ``pred`` logits into probabilities (the bundle's
            ``postprocessing``); ``None`` applies a softmax.
        device: where to run.
        refer_threshold: confidence below which a case is flagged ``refer`` (``None``: the threshold recorded with
            the model for each scenario, 0.5 for a model without a calibration record).
        amp: mixed precision.
        batch_size: records per forward pass.

    One predictor may serve several threads: the forward passes take turns behind a lock (the network, its
    explanation hooks and a compiled graph are shared), while reading and preprocessing the images run in parallel.

    Raises:
        ValueError: if ``refer_threshold`` is given and outside ``[0, 1]``.
    """

    def __init__(
        self,
        network: HER2Deploy,
        preprocessing: Callable,
        postprocessing: Callable | None = None,
        device: torch.device | str = "cpu",
        refer_threshold: float | None = None,
        amp: bool = False,
        batch_size: int = 8,
    ) -> None:
        if refer_threshold is not None and not 0.0 <= float(refer_threshold) <= 1.0:
            raise ValueError(f"refer_threshold must be in [0, 1], got {refer_threshold}")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.refer_threshold = None if refer_threshold is None else float(refer_threshold)
        self.amp = bool(amp)
        self.batch_size = int(batch_size)
        self._cam: Any = None
        # One forward pass at a time: the network, its CAM hooks and a compiled graph are shared state, so threads
        # (a web server's workers, a thread pool over a folder) take turns; preprocessing runs outside the lock.
        self._lock = threading.Lock()
        if hasattr(self.network, "inference_network"):
            # Build the optimised inference copy now (BatchNorm folding takes a second or two on the paper model), so
            # loading pays for it rather than the first image or slide.
            self.network.inference_network(self.amp)

    @property
    def provenance(self) -> dict[str, Any]:
        """What the model was trained on, as every answer gives it (``provenance``)."""
        return self.network.provenance

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
        for record in records:  # a missing file fails the call before anything is scored
            check_record_files(record)
        results = []
        for start in range(0, len(records), self.batch_size):  # one batch preprocessed at a time: bounded memory
            results.extend(self.predict_prepared(self._preprocess(records[start : start + self.batch_size])))
        return results

    def prepare(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The preprocessing half of :meth:`predict_records`: file checks, loading, input checks, resizing.

        It holds no lock, so a caller may prepare the next records in another thread while the network runs
        (whole-slide inference does).

        Args:
            records: inference records.

        Returns:
            The preprocessed items, in order, for :meth:`predict_prepared`.

        Raises:
            her2_monai.data.image_reader.ImageReadError: naming the file, if an input is missing or unreadable.
        """
        for record in records:
            check_record_files(record)
        return self._preprocess(records)

    def _preprocess(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [apply_transform(self.preprocessing, dict(r)) for r in records]

    def predict_prepared(
        self, prepared: Sequence[dict[str, Any]], batch_size: int | None = None
    ) -> list[dict[str, Any]]:
        """The network half of :meth:`predict_records`, on the items of :meth:`prepare`, ``batch_size`` at a time.

        Args:
            prepared: preprocessed items.
            batch_size: items per forward pass (``None``: the predictor's own ``batch_size``).

        Returns:
            One :func:`prediction_result` dict per item, in order.
        """
        step = self.batch_size if batch_size is None else int(batch_size)
        results = []
        for start in range(0, len(prepared), step):
            batch = list_data_collate(list(prepared[start : start + step]))
            stains = prepare_stain_batch(batch, self.device)
            with self._lock:
                outputs = self.network.predict_batch(
                    stains[HE_KEY], stains[IHC_KEY], stains["mask"], batch.get(STAIN_KNOWN_KEY), self.amp
                )
            for data, out in zip(decollate_batch(batch, detach=True), decollate_batch(outputs, detach=True)):
                merged = {**{k: v for k, v in data.items() if k not in (HE_KEY, IHC_KEY)}, **out}
                results.append(
                    prediction_result(self._postprocess(merged), self.refer_threshold, provenance=self.provenance)
                )
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
        return self.predict_records([_one_record(he, ihc, image)])[0]

    def explain(
        self,
        he: str | os.PathLike | None = None,
        ihc: str | os.PathLike | None = None,
        image: str | os.PathLike | None = None,
        output: str | os.PathLike = "explanation.png",
        methods: str | Sequence[str] = "all",
        title: str | None = None,
    ) -> Path:
        """Write a PNG explaining the call for one patch: class activation maps over each stain and the stain
        attention (see :mod:`her2_monai.explain`).

        The maps are computed on the images the classifier encoded: a missing stain is shown as the CM-GAN made it.

        Args:
            he: H&E file.
            ihc: IHC file.
            image: one file of unknown stain (routed by the branch selector).
            output: PNG path.
            methods: ``"all"`` or CAM method names (``gradcam``, ``gradcampp``, ``scorecam``).
            title: figure title (default: the call and its calibrated confidence).

        Returns:
            The PNG path.

        Raises:
            ValueError: for no input, both ``image`` and ``he``/``ihc``, or an unknown method.
            her2_monai.data.image_reader.ImageReadError: naming the file, if it is missing or unreadable.
        """
        from her2_monai.explain import CAM_METHODS, StainCAM, save_explanation

        names = tuple(CAM_METHODS) if methods == "all" else tuple([methods] if isinstance(methods, str) else methods)
        record = _one_record(he, ihc, image)
        check_record_files(record)
        batch = list_data_collate([apply_transform(self.preprocessing, dict(record))])
        stains = prepare_stain_batch(batch, self.device)
        with self._lock:
            routed = self.network.route(
                stains[HE_KEY], stains[IHC_KEY], stains["mask"], batch.get(STAIN_KNOWN_KEY), self.amp
            )
            if self._cam is None or self._cam.methods != names:
                self._cam = StainCAM(self.network.net, names)
            explanation = self._cam.maps(routed["he"], routed["ihc"], routed["mask"])
        if title is None:
            probabilities = (explanation["probabilities"].log() / self.network.temperature).softmax(dim=0)
            cls = explanation["class_idx"]
            title = f"HER2 {CLASS_NAMES[cls]} (confidence {float(probabilities[cls]):.2f})"
        synthetic = {stain: bool(routed["mask"][0, i] < 0.5) for i, stain in enumerate((HE_KEY, IHC_KEY))}
        return save_explanation(output, explanation, synthetic, title)

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
        with self._lock, autocast(self.device, self.amp):
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
        with self._lock, autocast(self.device, self.amp):
            probabilities = self.network.net.selector(x).float().softmax(dim=1)[0]
        call = int(probabilities.argmax())
        return STAIN_CLASS_NAMES[call], float(probabilities[call])


def _exported_threshold(module: Any, scenario: int) -> float:
    thresholds = list(getattr(module, "refer_thresholds", []))
    return float(thresholds[scenario]) if scenario < len(thresholds) else DEFAULT_REFER_THRESHOLD


class TorchScriptPredictor:
    """Predict with an exported TorchScript file (``ckpt_export``): the same JSON answers as :class:`HER2Predictor`.

    The file holds the model's graphs for both input layouts, the branch selector and the model's image size
    (see :class:`~her2_monai.inference.deploy.HER2Deploy`), and the inference config it was exported with, whose
    preprocessing is used. Declared stains are used as declared; an image of unknown stain is routed by the selector.

    Args:
        path: the ``.ts`` file.
        device: where to run.
        refer_threshold: confidence below which a case is flagged ``refer`` (``None``: the thresholds exported with
            the model's calibration record). The export has no out-of-distribution score, so ``ood_score`` is null.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not an export of this bundle (no inference config or image size inside).
    """

    def __init__(
        self, path: str | os.PathLike, device: torch.device | str = "cpu", refer_threshold: float | None = None
    ) -> None:
        from monai.bundle import ConfigParser

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript model '{path}' not found; export one with ckpt_export (README)")
        extra = {"inference.json": ""}
        try:
            self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
        except RuntimeError as err:
            raise ValueError(f"'{path}' is not a TorchScript file ({str(err).splitlines()[0][:200]})") from None
        if not extra["inference.json"] or not hasattr(self.module, "image_size"):
            raise ValueError(f"'{path}' is not a TorchScript export of this bundle (no inference config inside)")
        self.device = torch.device(device)
        self.refer_threshold = None if refer_threshold is None else float(refer_threshold)
        parser = ConfigParser(json.loads(extra["inference.json"]))
        # Everything the preprocessing reads from a model file comes from the export itself: a model.pt found under
        # the config's bundle_root (e.g. ./bundle) belongs to another model.
        record = json.loads(getattr(self.module, "stain_normalization", "null") or "null")
        # The export does not carry the training record's tissue threshold: the configured one, else the default.
        min_tissue = parser.get_parsed_content("min_tissue_fraction")
        parser.update(
            {
                "model_image_size": int(self.module.image_size),
                "stain_references": references_from_record(record, None, None, None),
                "model_min_tissue_fraction": MIN_TISSUE_FRACTION if min_tissue is None else float(min_tissue),
            }
        )
        self.preprocessing = parser.get_parsed_content("preprocessing")
        # An export of an older version has no provenance: its answers say the training data are unknown.
        self.provenance = json.loads(getattr(self.module, "provenance", "") or "null") or model_provenance(None)

    @torch.no_grad()
    def _outputs(self, item: Mapping[str, Any]) -> dict[str, Any]:
        he, ihc = (torch.as_tensor(item[k]).as_subclass(torch.Tensor)[None].to(self.device) for k in (HE_KEY, IHC_KEY))
        present = torch.as_tensor(item["mask"]).reshape(2) > 0.5
        known = _scalar(item.get(STAIN_KNOWN_KEY, 1.0)) > 0.5
        calls, confidence = [NO_IMAGE, NO_IMAGE], [math.nan, math.nan]
        for slot, image in enumerate((he, ihc)):
            if present[slot]:
                probabilities = self.module.stain_probabilities(image)[0]
                calls[slot], confidence[slot] = int(probabilities.argmax()), float(probabilities.max())
        if bool(present.all()):
            logits, scenario = self.module(torch.cat([he, ihc], dim=1)), SCENARIOS.index("dual")
        else:
            image = he if present[0] else ihc
            is_ihc = bool(present[1]) if known else calls[0] == 1
            logits = self.module.classify_declared(image, torch.tensor([is_ihc], device=self.device))
            scenario = SCENARIOS.index("ihc_only" if is_ihc else "he_only")
        return {
            PRED_KEY: logits[0].float().softmax(dim=0),
            SCENARIO_KEY: scenario,
            STAINS_KEY: torch.tensor(calls),
            STAIN_PROB_KEY: torch.tensor(confidence),
            STAIN_KNOWN_KEY: float(known),
            "temperature": float(getattr(self.module, "temperature", 1.0)),
            "calibrated": float(getattr(self.module, "calibrated", False)),
            "refer_threshold": _exported_threshold(self.module, scenario),
        }

    def predict(
        self,
        he: str | os.PathLike | None = None,
        ihc: str | os.PathLike | None = None,
        image: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Predict one patch (same arguments and answer as :meth:`HER2Predictor.predict`)."""
        record = _one_record(he, ihc, image)
        check_record_files(record)
        item = apply_transform(self.preprocessing, record)
        merged = {**{k: v for k, v in item.items() if k not in (HE_KEY, IHC_KEY)}, **self._outputs(item)}
        return prediction_result(merged, self.refer_threshold, provenance=self.provenance)


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
        refer_threshold=None if parts["refer_threshold"] is None else float(parts["refer_threshold"]),
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
