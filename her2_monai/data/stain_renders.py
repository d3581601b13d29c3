"""Stain-labelled demo renders: the training and validation data of the branch selector (H&E vs IHC).

The selector learns only from procedural renders of the demo generator (every lab it simulates), so its accuracy
on real slides from ``../shared/data`` is an honest transfer check. :class:`StainRenderAppearance` is its training
augmentation: the lab simulation of :func:`~her2_monai.stain_features.lab_appearance`, with every stain's hue turned
over the range real labs show (the renders use one hematoxylin for H&E nuclei and the IHC counterstain, and a DAB
that sits nearer eosin than real DAB does).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from her2_monai.constants import NUM_CLASSES, STAIN_CLASS_NAMES
from her2_monai.data.demo import DemoPairGenerator
from her2_monai.stain_features import lab_appearance
from her2_monai.transforms.augment import LabAppearanceBatch, hue_range

__all__ = ["stain_render_records", "StainRenderAppearance"]


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


class StainRenderAppearance(LabAppearanceBatch):
    """The branch selector's ``prepare_batch``: :class:`~her2_monai.transforms.LabAppearanceBatch` with the hue of
    hematoxylin and DAB turned as well as eosin's.

    The demo renders stain the IHC counterstain with the H&E's hematoxylin and put DAB (mixed with it) at 90 to 135
    degrees in the chroma plane; real IHC counterstain is bluer (-30 to 15 degrees), real H&E nuclei purpler (15 to 30)
    and real DAB browner (115 to 175). Turning each stain's vector per image over those ranges keeps the learnt head
    from reading the stain off the hematoxylin's hue, and shows it DAB where real DAB is.

    Args:
        strength: augmentation strength.
        seed: seed of the augmentation's random generator.
        fade_prob: share of images whose stains are also faded.
        eosin_hue: ``(low, high)`` turn of the eosin vector, radians.
        hematoxylin_hue: ``(low, high)`` turn of the hematoxylin vector, radians.
        dab_hue: ``(low, high)`` turn of the DAB vector, radians.
        image_key: batch key of the images (``(B, 3, H, W)`` in ``[0, 255]``).
        label_key: batch key of the labels.

    Raises:
        ValueError: for a probability outside ``[0, 1]`` or a hue range that is not ``low <= high`` within
            ``[-pi/2, pi/2]``.
    """

    def __init__(
        self,
        strength: float = 1.0,
        seed: int = 0,
        fade_prob: float = 0.0,
        eosin_hue: Sequence[float] | None = None,
        hematoxylin_hue: Sequence[float] | None = None,
        dab_hue: Sequence[float] | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        super().__init__(strength, seed, image_key, label_key, fade_prob, eosin_hue)
        self.hematoxylin_hue = hue_range("hematoxylin_hue", hematoxylin_hue)
        self.dab_hue = hue_range("dab_hue", dab_hue)

    def appearance(self, image: torch.Tensor) -> torch.Tensor:
        """The lab simulation of a batch, with the hematoxylin and DAB hues turned too.

        Args:
            image: ``(B, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(B, 3, H, W)`` in ``[0, 1]``.
        """
        return lab_appearance(
            image,
            self.generator,
            self.strength,
            self.fade_prob,
            self.eosin_hue,
            hematoxylin_hue=self.hematoxylin_hue,
            dab_hue=self.dab_hue,
        )
