"""Tissue-layout augmentation for the branch selector: glass gaps and fat lobules cut into demo renders.

The demo generator fills nearly every pixel of an H&E render with pink stroma and leaves IHC renders pale, so a
selector trained on them alone learns "mostly white means IHC" -- and then calls real H&E crops of fat or of a tissue
edge (mostly glass with thin pink septa) IHC. :class:`RandGlassAndFatd` breaks that shortcut: it replaces parts of
a render with the render's own glass colour, either as large smooth gaps (tissue edges, tears) or as fat lobules
(large polygonal cells of glass separated by thin septa of the original tissue), in both stains alike, so only the
colour of what remains tells the stains apart.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

__all__ = ["RandGlassAndFatd", "glass_colour"]


def glass_colour(image: np.ndarray) -> np.ndarray:
    """The glass (background) colour of a ``(3, H, W)`` image: the mean of its brightest 1% of pixels.

    Returns:
        ``(3,)`` float.
    """
    pixels = image.reshape(3, -1)
    brightness = pixels.sum(axis=0)
    count = max(1, brightness.size // 100)
    return pixels[:, np.argpartition(brightness, -count)[-count:]].mean(axis=1)


class RandGlassAndFatd(RandomizableTransform, MapTransform):
    """Replace random parts of an image with its glass colour: smooth gaps, or fat lobules with thin septa.

    Args:
        keys: image keys; ``(3, H, W)`` in ``[0, 255]`` (numpy or torch; torch float32 is returned).
        prob: chance of changing an image.
        fat_prob: of the changed images, the share given fat lobules (the others get gaps).
        max_cover: largest share of the image turned to glass.
        lobule_size: ``(low, high)`` fat-cell diameter as a share of the image side.

    Raises:
        ValueError: for shares outside ``[0, 1]`` or an empty size range.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image",),
        prob: float = 0.5,
        fat_prob: float = 0.5,
        max_cover: float = 0.8,
        lobule_size: tuple[float, float] = (0.1, 0.35),
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        if not 0.0 <= fat_prob <= 1.0 or not 0.0 < max_cover <= 1.0:
            raise ValueError(f"fat_prob must be in [0, 1] and max_cover in (0, 1], got {fat_prob} and {max_cover}")
        if not 0.0 < lobule_size[0] <= lobule_size[1] <= 1.0:
            raise ValueError(f"lobule_size must be 0 < low <= high <= 1, got {lobule_size}")
        self.fat_prob = float(fat_prob)
        self.max_cover = float(max_cover)
        self.lobule_size = (float(lobule_size[0]), float(lobule_size[1]))

    def _gaps(self, shape: tuple[int, int]) -> np.ndarray:
        sigma = self.R.uniform(0.06, 0.2) * max(shape)
        field = ndimage.gaussian_filter(self.R.standard_normal(shape), sigma, mode="wrap")
        cover = self.R.uniform(0.15, self.max_cover)
        return field > np.quantile(field, 1.0 - cover)

    def _fat(self, shape: tuple[int, int]) -> np.ndarray:
        height, width = shape
        diameter = self.R.uniform(*self.lobule_size) * max(shape)
        count = max(2, int(round(height * width / (diameter * diameter))))
        seeds = np.zeros(shape, np.int32)
        seeds[self.R.randint(0, height, count), self.R.randint(0, width, count)] = np.arange(1, count + 1)
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        cells = seeds[iy, ix]
        edges = (np.diff(cells, axis=0, prepend=cells[:1]) != 0) | (np.diff(cells, axis=1, prepend=cells[:, :1]) != 0)
        septa = ndimage.binary_dilation(edges, iterations=int(self.R.randint(1, max(2, max(shape) // 64) + 1)))
        region = self._gaps(shape) if self.R.uniform() < 0.5 else np.ones(shape, bool)  # fat in part or all of it
        return ~septa & region

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            if not self._do_transform:
                continue
            image = np.asarray(torch.as_tensor(d[key]).detach().cpu(), dtype=np.float32)
            shape = image.shape[-2:]
            glass = self._fat(shape) if self.R.uniform() < self.fat_prob else self._gaps(shape)
            soft = ndimage.gaussian_filter(glass.astype(np.float32), 0.7)[None]  # no razor-sharp edges
            colour = glass_colour(image)[:, None, None]
            d[key] = torch.from_numpy(image * (1.0 - soft) + colour * soft)
        return d
