"""One prediction path for the bundle's inference workflow, the ``predict`` command and serving.

:func:`forward_stain_batch` runs the deploy network on a batch whose samples have declared stains (H&E, IHC or both)
or one image of unknown stain (the branch selector decides), :func:`prediction_result` turns one post-processed sample
into the JSON answer, and :class:`HER2Predictor` wires both with the bundle's preprocessing and post-processing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import decollate_batch, list_data_collate
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import apply_transform
from torch import nn

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY, SCENARIOS, STAIN_CLASS_NAMES
from her2_monai.engines.utils import autocast, prepare_stain_batch
from her2_monai.inference.network import load_bundle_weights
from her2_monai.inference.records import IMAGE_KEY, SOURCE_KEYS, STAIN_KNOWN_KEY, check_record_files

__all__ = [
    "PRED_KEY",
    "SCENARIO_KEY",
    "STAINS_KEY",
    "STAIN_PROB_KEY",
    "forward_stain_batch",
    "prediction_result",
    "HER2Predictor",
    "load_predictor",
]

#: Output keys of :func:`forward_stain_batch`.
PRED_KEY = "pred"
SCENARIO_KEY = "scenario"
STAINS_KEY = "detected_stains"
STAIN_PROB_KEY = "stain_confidence"
_NO_IMAGE = -1


def forward_stain_batch(
    network: nn.Module,
    batch: Mapping[str, Any],
    device: torch.device | str,
    inferer: Inferer | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """HER2 logits for a batch of declared-stain and unknown-stain samples.

    Declared stains are used as given (the selector is not allowed to override a user's statement); the selector
    still classifies every given image so that a mislabelled input shows up in ``detected_stains``. An unknown-stain
    sample (``stain_known == 0``, image in the H&E slot) is routed as the selector says, exactly as
    :class:`~her2_monai.networks.her2net.HER2DeployNet` does for a 3-channel input.

    Args:
        network: a deploy network with ``net`` (:class:`HER2FlexibleNet`) and ``selector`` submodules.
        batch: collated output of :func:`~her2_monai.inference.records.inference_transforms`.
        device: where to run.
        inferer: calls the classifier as ``inferer(he, net, ihc, mask)`` (default ``SimpleInferer``).
        amp: mixed precision.

    Returns:
        ``pred`` ``(B, 4)`` float logits; ``scenario`` ``(B,)`` long; ``detected_stains`` ``(B, 2)`` long: the
        selector's call (0 = H&E, 1 = IHC) for the image in the H&E slot and the IHC slot (``-1`` = no image; an
        unknown-stain image is reported in slot 0); ``stain_confidence`` ``(B, 2)`` the selector's probability of that
        call (``nan`` = no image); ``stain_known`` ``(B,)`` float.

    Raises:
        AttributeError: if ``network`` has no ``net``/``selector``.
    """
    inferer = inferer if inferer is not None else SimpleInferer()
    stain_batch = prepare_stain_batch(batch, device)
    he, ihc, mask = stain_batch[HE_KEY], stain_batch[IHC_KEY], stain_batch[MASK_KEY]
    n = mask.shape[0]
    known = torch.as_tensor(batch.get(STAIN_KNOWN_KEY, torch.ones(n))).as_subclass(torch.Tensor)
    known = known.to(device=mask.device, dtype=torch.float32).reshape(n) > 0.5
    network.eval()
    with torch.no_grad(), autocast(device, amp):
        stain_prob = [network.selector(img).float().softmax(dim=1) for img in (he, ihc)]
        calls = [p.argmax(dim=1) for p in stain_prob]
        # Unknown-stain images sit in the H&E slot; move those the selector calls IHC to the IHC slot.
        to_ihc = ~known & (calls[0] == 1)
        slot = to_ihc[:, None, None, None]
        he, ihc = torch.where(slot, torch.zeros_like(he), he), torch.where(slot, he, ihc)
        mask = torch.where(to_ihc[:, None], torch.tensor([0.0, 1.0], device=mask.device), mask)
        outputs = inferer(he, network.net, ihc, mask)
    present = stain_batch[MASK_KEY] > 0.5  # slots as given, before routing
    detected = torch.stack(calls, dim=1).where(present, torch.full_like(present, _NO_IMAGE, dtype=torch.long))
    confidence = torch.stack([p.amax(dim=1) for p in stain_prob], dim=1)
    confidence = confidence.where(present, torch.full_like(confidence, float("nan")))
    return {
        PRED_KEY: outputs["logits"].float(),
        SCENARIO_KEY: outputs["scenario"],
        STAINS_KEY: detected,
        STAIN_PROB_KEY: confidence,
        STAIN_KNOWN_KEY: known.float(),
    }


def _scalar(value: Any) -> float:
    return float(torch.as_tensor(value).reshape(-1)[0])


def prediction_result(item: Mapping[str, Any], refer_threshold: float = 0.5) -> dict[str, Any]:
    """The JSON answer for one sample after post-processing (``pred`` = 4 class probabilities).

    Args:
        item: one decollated sample: ``pred`` ``(4,)`` probabilities, ``scenario``, ``detected_stains`` ``(2,)``,
            ``stain_confidence`` ``(2,)``, ``stain_known`` and, optionally, ``id``, the source paths and ``label``.
        refer_threshold: confidence below which the case is flagged for a pathologist.

    Returns:
        ``score`` ("0".."3+"), ``probabilities`` (4 floats), ``confidence`` (max probability), ``refer`` (bool),
        ``refer_threshold``, ``scenario``, ``detected_stains`` (stain names of the given images: H&E slot then IHC
        slot, or the one unknown-stain image), ``warnings`` (declared stains the selector disagrees with), and when
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
    detected, warnings = [], []
    for slot, (declared, call) in enumerate(zip((HE_KEY, IHC_KEY), calls)):
        if call == _NO_IMAGE:
            continue
        detected.append(STAIN_CLASS_NAMES[call])
        if known and STAIN_CLASS_NAMES[call] != declared:
            warnings.append(
                f"the image given as {declared} looks like {STAIN_CLASS_NAMES[call]} to the branch selector "
                f"(p={stain_conf[slot]:.2f}); the declared stain was used"
            )
    result: dict[str, Any] = {}
    if item.get("id") is not None:
        result["id"] = str(item["id"])
    result.update(
        {
            "score": CLASS_NAMES[best],
            "probabilities": [round(float(p), 6) for p in probabilities],
            "confidence": round(confidence, 6),
            "refer": bool(confidence < refer_threshold),
            "refer_threshold": float(refer_threshold),
            "scenario": SCENARIOS[int(_scalar(item[SCENARIO_KEY]))],
            "detected_stains": detected,
            "stain_source": "declared" if known else "selector",
            "warnings": warnings,
        }
    )
    inputs = {k: str(item[v]) for k, v in SOURCE_KEYS.items() if item.get(v)}
    if inputs:
        result["inputs"] = inputs
    if LABEL_KEY in item and int(_scalar(item[LABEL_KEY])) >= 0:
        result["label"] = CLASS_NAMES[int(_scalar(item[LABEL_KEY]))]
    return result


class HER2Predictor:
    """Predict HER2 scores for files or records with the bundle's network, transforms and inferer.

    Args:
        network: the deploy network with weights loaded (see :func:`~her2_monai.inference.network.load_bundle_weights`).
        preprocessing: record -> model input (:func:`~her2_monai.inference.records.inference_transforms`).
        postprocessing: per-sample output transform turning ``pred`` logits into probabilities (the bundle's
            ``postprocessing``); ``None`` applies a softmax.
        device: where to run.
        inferer: calls the classifier (default ``SimpleInferer``).
        refer_threshold: confidence below which a case is flagged ``refer``.
        amp: mixed precision.

    Raises:
        ValueError: if ``refer_threshold`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Callable,
        postprocessing: Callable | None = None,
        device: torch.device | str = "cpu",
        inferer: Inferer | None = None,
        refer_threshold: float = 0.5,
        amp: bool = False,
    ) -> None:
        if not 0.0 <= refer_threshold <= 1.0:
            raise ValueError(f"refer_threshold must be in [0, 1], got {refer_threshold}")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.inferer = inferer
        self.refer_threshold = float(refer_threshold)
        self.amp = amp

    def _postprocess(self, item: dict[str, Any]) -> dict[str, Any]:
        if self.postprocessing is None:
            item[PRED_KEY] = torch.as_tensor(item[PRED_KEY]).softmax(dim=0)
            return item
        return apply_transform(self.postprocessing, item)

    def predict_records(self, records: Sequence[Mapping[str, Any]], batch_size: int = 8) -> list[dict[str, Any]]:
        """Predict every record (keys ``he``/``ihc`` or ``image``, optional ``id`` and ``label``).

        Args:
            records: inference records.
            batch_size: records per forward pass.

        Returns:
            One :func:`prediction_result` dict per record, in order.

        Raises:
            her2_monai.data.io.ImageReadError: naming the file, if an input is missing or unreadable.
        """
        for record in records:
            check_record_files(record)
        results = []
        for start in range(0, len(records), batch_size):
            items = [apply_transform(self.preprocessing, dict(r)) for r in records[start : start + batch_size]]
            batch = list_data_collate(items)
            outputs = forward_stain_batch(self.network, batch, self.device, self.inferer, self.amp)
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
            her2_monai.data.io.ImageReadError: naming the file, if it is missing or unreadable.
        """
        if image is not None and (he is not None or ihc is not None):
            raise ValueError("give either --image (stain unknown) or --he/--ihc (declared stains), not both")
        if image is None and he is None and ihc is None:
            raise ValueError("no input image: give --he FILE and/or --ihc FILE, or --image FILE")
        record = {IMAGE_KEY: image} if image is not None else {HE_KEY: he, IHC_KEY: ihc}
        record = {k: str(v) for k, v in record.items() if v is not None}
        return self.predict_records([record])[0]


def load_predictor(
    bundle_root: str | os.PathLike = "bundle",
    config_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    **overrides: Any,
) -> HER2Predictor:
    """Build a :class:`HER2Predictor` from the bundle's ``inference.json`` with the trained weights loaded.

    Args:
        bundle_root: bundle folder holding ``models/`` (and, by default, ``configs/inference.json``).
        config_file: inference config(s) (default ``<bundle_root>/configs/inference.json``).
        overrides: config values to override (``refer_threshold``, ``device``, ``profile``, architecture knobs...).

    Returns:
        The predictor.

    Raises:
        FileNotFoundError: if the config or a weight file is missing (naming the command that makes it).
        ValueError: if the weights do not fit the configured network.
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
        parts = {k: parser.get_parsed_content(k) for k in _PREDICTOR_PARTS}
        load_bundle_weights(
            parts["network"],
            parser.get_parsed_content("model_weights"),
            f"profile {parser.get_parsed_content('profile')!r}",
        )
    except RuntimeError as err:
        raise _root_cause(err) from None
    return HER2Predictor(
        network=parts["network"],
        preprocessing=parts["preprocessing"],
        postprocessing=parts["postprocessing"],
        device=parts["device"],
        inferer=parts["inferer"],
        refer_threshold=float(parts["refer_threshold"]),
        amp=bool(parts["amp"]),
    )


_PREDICTOR_PARTS = ("network", "preprocessing", "postprocessing", "device", "inferer", "refer_threshold", "amp")


def _root_cause(err: BaseException) -> BaseException:
    """The user-facing error inside MONAI's "Failed to evaluate ..." wrappers (missing file, bad weights...)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
        if isinstance(cause, (FileNotFoundError, ValueError, KeyError)):
            return cause
    return err
