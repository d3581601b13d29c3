"""The bundle's stain-normalisation setting: one method key, one reference per stain, recorded in the model file.

``stain_normalization`` (``none``, ``macenko``, ``reinhard``, ``histogram`` or ``multitarget``) selects the method;
``stain_reference`` gives the H&E target and ``stain_reference_ihc`` the IHC target (a ``.json`` written by
``python -m her2_monai stain-reference``, or one or more images fitted on the spot). An H&E target is never applied to
IHC: without ``stain_reference_ihc`` IHC images are left as they are. Training records the fitted references in the
model file's metadata (:func:`normalization_record`), so that evaluation and inference apply exactly the same
normalisation unless told otherwise (:func:`references_from_record`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from her2_monai.constants import HE_KEY, IHC_KEY
from her2_monai.transforms.stain_normalization import METHODS, StainReference

__all__ = ["NO_NORMALIZATION", "RECORD_KEY", "stain_references", "normalization_record", "references_from_record"]

#: The ``stain_normalization`` value that turns normalisation off.
NO_NORMALIZATION = "none"
#: Key of the normalisation record in a model file's metadata.
RECORD_KEY = "stain_normalization"
_STAINS = (HE_KEY, IHC_KEY)

logger = logging.getLogger(__name__)

#: Methods that match whole-image colour statistics; on IHC they rescale the DAB amount, which is the HER2 signal.
DAB_ALTERING_METHODS = ("reinhard", "histogram")


def _given(value: Any) -> bool:
    return value is not None and value != "" and value != []


def stain_references(
    method: str | None, reference: Any = "", reference_ihc: Any = ""
) -> dict[str, StainReference | None]:
    """Resolve the configured method and references into one fitted reference per stain.

    Args:
        method: ``none`` (or empty/``None``) or one of :data:`~her2_monai.transforms.stain_normalization.METHODS`.
        reference: the H&E target: a reference ``.json``, an image path, or a list of image paths.
        reference_ihc: the IHC target, as ``reference`` (empty: IHC images are not normalised).

    Returns:
        ``{"he": reference or None, "ihc": reference or None}``; both ``None`` when the method is ``none``.

    Raises:
        ValueError: for an unknown method, a method without any reference, or an unusable reference (naming it).
    """
    method = NO_NORMALIZATION if not method else str(method).strip().lower()
    if method == NO_NORMALIZATION:
        return {HE_KEY: None, IHC_KEY: None}
    if method not in METHODS:
        raise ValueError(
            f"stain_normalization: unknown method '{method}'; expected '{NO_NORMALIZATION}' or one of {list(METHODS)}"
        )
    if not _given(reference) and not _given(reference_ihc):
        raise ValueError(
            f"stain_normalization '{method}' needs a target: --stain_reference (H&E) and/or --stain_reference_ihc, "
            "each a .json from `python -m her2_monai stain-reference` or an image file"
        )
    out: dict[str, StainReference | None] = {}
    for stain, value in zip(_STAINS, (reference, reference_ihc)):
        out[stain] = StainReference.resolve(value, method=method, stain=stain) if _given(value) else None
    if out[IHC_KEY] is not None and method in DAB_ALTERING_METHODS:
        logger.warning(
            "stain_normalization '%s' on IHC (--stain_reference_ihc) rescales the DAB amount, which is the HER2 "
            "signal: in benchmarks/stain_shift.py it brought the demo model to chance level even on its own lab; "
            "normalise IHC with 'macenko' or 'multitarget' (they keep each pixel's DAB amount), or leave it out",
            method,
        )
    return out


def normalization_record(references: Mapping[str, StainReference | None]) -> dict[str, Any] | None:
    """What a model file records about the normalisation it was trained with (plain data, no paths needed later).

    Args:
        references: :func:`stain_references`'s result.

    Returns:
        ``None`` without normalisation, else ``{"method": ..., "he": document or None, "ihc": document or None}``,
        each document being :meth:`StainReference.to_dict`.
    """
    used = {stain: ref for stain, ref in references.items() if ref is not None}
    if not used:
        return None
    method = next(iter(used.values())).method
    return {"method": method, **{s: (references[s].to_dict() if references.get(s) else None) for s in _STAINS}}


def references_from_record(
    record: Mapping[str, Any] | None,
    method: str | None = None,
    reference: Any = None,
    reference_ihc: Any = None,
) -> dict[str, StainReference | None]:
    """The references to apply at evaluation or inference time.

    Args:
        record: the model file's :func:`normalization_record` (``None``: trained without normalisation).
        method: ``None`` = as recorded; ``none`` = off; a method = use ``reference``/``reference_ihc`` instead.
        reference: the H&E target when ``method`` is a method.
        reference_ihc: the IHC target when ``method`` is a method.

    Returns:
        ``{"he": reference or None, "ihc": reference or None}``.

    Raises:
        ValueError: for a damaged record or an unusable override.
    """
    if method is not None and method != "":
        return stain_references(method, reference or "", reference_ihc or "")
    if _given(reference) or _given(reference_ihc):
        raise ValueError(
            "stain_reference was given without stain_normalization: set --stain_normalization too (null means 'as "
            "recorded in the model file', which uses the recorded references)"
        )
    if not record:
        return {HE_KEY: None, IHC_KEY: None}
    return {
        stain: StainReference.from_dict(record[stain], f"the model file's {stain} stain reference")
        if record.get(stain)
        else None
        for stain in _STAINS
    }
