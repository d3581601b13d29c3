"""Stain-labelled demo renders: the training and validation data of the branch selector (H&E vs IHC).

The selector learns only from procedural renders of the demo generator (every lab it simulates), so its accuracy
on real slides from ``../shared/data`` is an honest transfer check.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from her2_monai.constants import NUM_CLASSES, STAIN_CLASS_NAMES
from her2_monai.data.demo import DemoPairGenerator
from her2_monai.stain_features import lab_appearance

__all__ = ["stain_render_records"]


def stain_render_records(
    labs: Sequence[str] = ("A", "B", "C"),
    per_class: int = 2,
    image_size: int = 128,
    seed: int = 0,
    appearance_strength: float = 0.0,
) -> list[dict]:
    """Render pairs of every HER2 class in every lab and return one record per image with its stain as label.

    Args:
        labs: simulated institutions (keys of :data:`~her2_monai.data.demo.LAB_PROFILES`).
        per_class: pairs per HER2 class and lab.
        image_size: render side in pixels.
        seed: render seed; disjoint seeds give disjoint images (use another seed for held-out validation).
        appearance_strength: when positive, each image gets one fixed random lab appearance
            (:func:`~her2_monai.stain_features.lab_appearance` seeded by the record), so a validation set is hard
            and the same at every epoch.

    Returns:
        Records ``{"image": (3, S, S) float32 tensor in [0, 255], "label": 0 (H&E) or 1 (IHC), "lab", "id"}``.

    Raises:
        ValueError: for ``per_class < 1`` or no lab.
    """
    if per_class < 1 or not labs:
        raise ValueError(f"need per_class >= 1 and at least one lab, got {per_class} and {list(labs)}")
    records = []
    for lab in labs:
        renderer = DemoPairGenerator(image_size=image_size, lab=lab)
        for label in range(NUM_CLASSES):
            for k in range(per_class):
                pair = renderer.render(label, seed=seed * 100_003 + k * 1009 + label)
                for stain, pixels in enumerate(pair):
                    name = f"{lab}_{label}_{k}_{STAIN_CLASS_NAMES[stain]}"
                    image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float()
                    if appearance_strength > 0:
                        rng = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{name}".encode()))
                        image = lab_appearance(image[None] / 255.0, rng, appearance_strength)[0] * 255.0
                    records.append({"image": image, "label": stain, "lab": lab, "id": name})
    return records
