"""How many images go through the network per forward pass, chosen from the model's input side.

On CPUs the deployed network does not run fastest at the largest batch: a 512 px activation is already a large matrix
for the oneDNN kernels, and a batch of them no longer fits in the caches. Eagerly on 2 cores the paper model ran
fastest near 512 x 512 model pixels per pass: batch 1 at 512 px (batch 4: 0.71x, batch 16: 0.52x), 4 at 256 px, 8-16
at 128 px; compiled, batch 1 and 4 at 512 px ran alike (``benchmarks/bench_batch_size.py``; docs/performance.md,
"Tiles per batch").
"""

from __future__ import annotations

__all__ = ["AUTO_BATCH_PIXELS", "AUTO_BATCH_MAX", "auto_batch_size"]

#: Model-input pixels per forward pass that the automatic batch size aims at: one 512 px image, four of 256 px.
AUTO_BATCH_PIXELS = 512**2
#: Most images per forward pass the automatic batch size picks. ``wsi`` holds the tiles of a batch (and of the next
#: one, read meanwhile) at their read size, so a small model input must not make the batch grow without bound.
AUTO_BATCH_MAX = 16


def auto_batch_size(side: int) -> int:
    """Images per forward pass for a model with ``side`` px input.

    Args:
        side: the model's input side in pixels.

    Returns:
        ``AUTO_BATCH_PIXELS // side**2``, between 1 and :data:`AUTO_BATCH_MAX` (512 px: 1, 256 px: 4, 128 px and
        smaller: 16).

    Raises:
        ValueError: if ``side`` is not a positive whole number.
    """
    if isinstance(side, bool) or int(side) != side or side < 1:
        raise ValueError(f"the model input side must be a positive whole number of pixels, got {side!r}")
    return max(1, min(AUTO_BATCH_MAX, AUTO_BATCH_PIXELS // int(side) ** 2))
