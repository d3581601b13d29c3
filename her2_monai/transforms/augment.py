"""Colour augmentations of stained images, built on the optical-density jitter of :mod:`her2_monai.stain_features`.

* :class:`RandStainJitterd` -- per-stain staining-strength jitter for the HER2 classifier and the CM-GAN;
* :func:`~her2_monai.stain_features.lab_appearance` (:class:`RandLabAppearanced` per image,
  :class:`LabAppearanceBatch` per batch) -- a strong
  simulation of another lab's staining and scanning, for the branch selector, which is trained on demo renders but
  must label any lab's slides.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import MapTransform, RandomizableTransform

from her2_monai.constants import HE_KEY, IHC_KEY
from her2_monai.optical_density import BLACK_OFFSET, intensity_from_optical_density, optical_density
from her2_monai.stain_features import jitter_optical_density, lab_appearance

__all__ = ["RandStainJitterd", "RandLabAppearanced", "LabAppearanceBatch", "hue_range"]


def hue_range(name: str, value: Sequence[float] | None) -> tuple[float, float] | None:
    """Check a ``(low, high)`` turn of a stain's hue for :func:`~her2_monai.stain_features.lab_appearance`.

    Args:
        name: the option's name, for the message.
        value: ``(low, high)`` radians, or ``None`` (no turn).

    Returns:
        ``(low, high)`` as floats, or ``None``.

    Raises:
        ValueError: unless ``-pi/2 <= low <= high <= pi/2``.
    """
    if value is None:
        return None
    turn = tuple(float(v) for v in value)
    if len(turn) != 2 or not -math.pi / 2 <= turn[0] <= turn[1] <= math.pi / 2:
        raise ValueError(f"{name} must be (low, high) radians within [-pi/2, pi/2], got {turn}")
    return turn


class RandStainJitterd(RandomizableTransform, MapTransform):
    """Independent random stain-strength jitter for each stain, in optical-density space.

    Each present key is perturbed on its own draw (H&E and IHC come from different slides and staining runs): the
    optical density of every RGB channel is scaled by ``U(1 - scale, 1 + scale)`` and shifted by
    ``U(-shift, shift)`` (:func:`~her2_monai.stain_features.jitter_optical_density` with a diagonal map). Scaling OD
    rather than intensity keeps glass white and changes the stain, as staining time and reagent batches do.

    Args:
        keys: stain keys; images ``(3, H, W)`` in ``[0, 255]``.
        prob: chance of jittering each stain.
        scale: half-width of the per-channel OD multiplier.
        shift: half-width of the per-channel OD offset.
    """

    def __init__(
        self, keys: Sequence[str] = (HE_KEY, IHC_KEY), prob: float = 0.5, scale: float = 0.1, shift: float = 0.03
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.scale = scale
        self.shift = shift

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            super().randomize(None)
            if not self._do_transform:
                continue
            image = torch.as_tensor(d[key], dtype=torch.float32)
            channels = image.shape[0]
            alpha = torch.as_tensor(self.R.uniform(1 - self.scale, 1 + self.scale, channels), dtype=torch.float32)
            beta = torch.as_tensor(self.R.uniform(-self.shift, self.shift, channels), dtype=torch.float32)
            od = optical_density(image, offset=BLACK_OFFSET, floor=0.0)  # the ``+1`` keeps black finite
            jittered = jitter_optical_density(od, torch.diag(alpha), beta)
            d[key] = intensity_from_optical_density(jittered, offset=BLACK_OFFSET).clamp(0, 255)
        return d


class RandLabAppearanced(RandomizableTransform, MapTransform):
    """The lab simulation :func:`~her2_monai.stain_features.lab_appearance` per image ``(3, H, W)`` in ``[0, 255]``.

    For training batches :class:`LabAppearanceBatch` applies the same augmentation to a whole batch at once
    (vectorised, and on the training device).

    Args:
        keys: image keys.
        strength: scales every perturbation range (0 leaves images unchanged).
        prob: chance of augmenting an image.

    Raises:
        ValueError: for a negative strength.
    """

    def __init__(self, keys: Sequence[str] = ("image",), strength: float = 1.0, prob: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        if strength < 0:
            raise ValueError(f"strength must be non-negative, got {strength}")
        self.strength = float(strength)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            if not self._do_transform or self.strength == 0:
                continue
            generator = torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))
            image = torch.as_tensor(d[key], dtype=torch.float32).as_subclass(torch.Tensor) / 255.0
            d[key] = lab_appearance(image[None], generator, self.strength)[0] * 255.0
        return d


class LabAppearanceBatch:
    """A ``prepare_batch`` for MONAI trainers: the lab simulation on the whole image batch, then ``[-1, 1]``.

    Args:
        strength: augmentation strength.
        seed: seed of the augmentation's random generator (the run is deterministic for a given seed).
        fade_prob: share of images whose stains are also faded (:func:`~her2_monai.stain_features.lab_appearance`).
        eosin_hue: ``(low, high)`` turn of the eosin hue, radians (:func:`~her2_monai.stain_features.lab_appearance`).
        image_key: batch key of the images (``(B, 3, H, W)`` in ``[0, 255]``).
        label_key: batch key of the labels.
    """

    def __init__(
        self,
        strength: float = 1.0,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        fade_prob: float = 0.0,
        eosin_hue: Sequence[float] | None = None,
    ) -> None:
        if not 0.0 <= fade_prob <= 1.0:
            raise ValueError(f"fade_prob must be in [0, 1], got {fade_prob}")
        self.eosin_hue = hue_range("eosin_hue", eosin_hue)
        self.strength = float(strength)
        self.fade_prob = float(fade_prob)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.image_key = image_key
        self.label_key = label_key

    def appearance(self, image: torch.Tensor) -> torch.Tensor:
        """The lab simulation of a batch.

        Args:
            image: ``(B, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(B, 3, H, W)`` in ``[0, 1]``.
        """
        return lab_appearance(image, self.generator, self.strength, self.fade_prob, self.eosin_hue)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment and scale the images to ``[-1, 1]``; return ``(images, labels)`` on ``device``."""
        image = torch.as_tensor(batchdata[self.image_key]).as_subclass(torch.Tensor).float() / 255.0
        image = self.appearance(image) * 2.0 - 1.0
        label = torch.as_tensor(batchdata[self.label_key]).as_subclass(torch.Tensor)
        return image.to(device, non_blocking=non_blocking), label.to(device, non_blocking=non_blocking)
