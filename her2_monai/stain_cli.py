"""``python -m her2_monai stain-reference``: fit and save a stain-normalisation reference.

Kept apart from :mod:`her2_monai.transforms.stain_normalization` so that the command line starts without importing
MONAI and torch; they are imported when the command runs.
"""

from __future__ import annotations

import json

__all__ = ["stain_reference"]


def stain_reference(
    images: str,
    *more_images: str,
    output: str | None = None,
    method: str = "macenko",
    stain: str = "he",
    aggregate: str = "median",
) -> None:
    """Fit a stain-normalisation reference on target images and save it as JSON.

    Example: ``python -m her2_monai stain-reference --images A.png B.png --method macenko --stain he --output ref.json``

    Args:
        images: a target image (more may follow, space separated).
        more_images: further target images.
        output: destination JSON file.
        method: macenko, reinhard, histogram or multitarget.
        stain: he or ihc.
        aggregate: median or mean of the per-image statistics (multitarget only).
    """
    if output is None or isinstance(output, bool):
        raise ValueError("--output FILE.json is required")
    paths = [str(p) for p in (images, *more_images) if not isinstance(p, bool)]
    if not paths:
        raise ValueError("--images needs at least one image file")
    from her2_monai.data.image_reader import ImageReadError
    from her2_monai.transforms.stain_normalization import StainReference

    try:
        reference = StainReference.fit(paths, method=str(method), stain=str(stain), aggregate=str(aggregate))
    except ImageReadError as err:
        raise ValueError(f"cannot read reference image {err}") from None
    path = reference.save(output)
    summary = {k: v for k, v in reference.statistics.items() if k not in ("per_image", "histograms")}
    print(f"{method} {stain} reference fitted on {len(paths)} image(s) written to {path}: {json.dumps(summary)}")
