"""How many images go through the network per forward pass, chosen from the model's input side and the device.

On CPUs the deployed network does not run fastest at the largest batch: a 512 px activation is already a large matrix
for the oneDNN kernels, and a batch of them no longer fits in the caches. Eagerly on 2 cores the paper model ran
fastest near 512 x 512 model pixels per pass: batch 1 at 512 px (batch 4: 0.71x, batch 16: 0.52x), 4 at 256 px, 8-16
at 128 px; compiled, batch 1 and 4 at 512 px ran alike; ONNX Runtime alike. A whole slide at 512 px ran 1.78x faster
at batch 1 than at 16, and with OpenVINO batch 1 beat 4 as well (``benchmarks/bench_batch_size.py``, ``bench_wsi.py``;
docs/performance.md, "Tiles per batch"). A GPU is filled by large batches instead, so there the most is taken.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AUTO_BATCH_PIXELS", "AUTO_BATCH_MAX", "auto_batch_size"]

#: Model-input pixels per forward pass that the automatic batch size aims at on a CPU: one 512 px image, four of
#: 256 px.
AUTO_BATCH_PIXELS = 512**2
#: Most images per forward pass the automatic batch size picks, and what it picks on a GPU. ``wsi`` holds the tiles of
#: a batch (and of the next one, read meanwhile) at their read size, so a small model input must not make the batch
#: grow without bound.
AUTO_BATCH_MAX = 16


def auto_batch_size(side: int, device: Any = "cpu") -> int:
    """Images per forward pass for a model with ``side`` px input on ``device``.

    Args:
        side: the model's input side in pixels.
        device: where the network runs (``torch.device`` or its name): ``cuda`` devices get :data:`AUTO_BATCH_MAX`.

    Returns:
        On a CPU, ``AUTO_BATCH_PIXELS // side**2`` between 1 and :data:`AUTO_BATCH_MAX` (512 px: 1, 256 px: 4, 128 px
        and smaller: 16); on a GPU, :data:`AUTO_BATCH_MAX`.

    Raises:
        ValueError: if ``side`` is not a positive whole number.
    """
    if isinstance(side, bool) or int(side) != side or side < 1:
        raise ValueError(f"the model input side must be a positive whole number of pixels, got {side!r}")
    if str(getattr(device, "type", device)).split(":")[0] == "cuda":
        return AUTO_BATCH_MAX
    return max(1, min(AUTO_BATCH_MAX, AUTO_BATCH_PIXELS // int(side) ** 2))
