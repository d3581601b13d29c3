"""Execution settings chosen from the hardware at run time: mixed precision and memory format.

Measured on the machines this project runs on (``docs/performance.md``): on CPUs with bfloat16 hardware (Intel AMX or
AVX-512 BF16) bf16 autocast with channels-last tensors is 2-4x faster than fp32; on CPUs without it (AVX2 only) bf16
is emulated and 6x *slower*, while fp32 with channels-last is the fastest for inference but *slower* than contiguous
tensors for training steps (the backward convolutions of the CM-GAN and the classifier lose 10-40% to the format
there); on CUDA, float16 autocast (AMP) with channels-last is the standard fast path. :func:`execution_settings` picks
accordingly, per use (training or inference), and logs the choice once.

The environment variable ``HER2_CPU_PRECISION`` overrides the CPU's choice for a whole process and its children:
``bf16`` takes the bfloat16 autocast path on any CPU (only slow, not wrong, where bf16 is emulated: CI uses it to
check the bf16 path on AVX2 machines), ``fp32`` the float32 path of CPUs without bf16 hardware, ``auto`` (or unset)
the hardware's choice. A ``--amp``/``--channels_last`` override of a bundle config still wins over all three.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ExecutionSettings",
    "bf16_flag_in",
    "cpu_bf16_support",
    "execution_settings",
    "default_amp",
    "default_channels_last",
    "PRECISION_ENV",
    "cpu_precision",
    "inductor_weight_prepack",
]

logger = logging.getLogger(__name__)

_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: Environment variable forcing the CPU arithmetic: ``auto`` (default), ``bf16`` or ``fp32``.
PRECISION_ENV = "HER2_CPU_PRECISION"
_PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class ExecutionSettings:
    """What a device runs best with.

    Attributes:
        amp: mixed precision (float16 on CUDA, bfloat16 on the CPU).
        channels_last: channels-last memory format for convolution inputs and weights at inference.
        reason: one line saying why.
        train_channels_last: the same for training steps (forward and backward); defaults to ``channels_last``.
    """

    amp: bool
    channels_last: bool
    reason: str
    train_channels_last: bool | None = None

    def memory_format_for(self, training: bool) -> bool:
        """Whether channels-last pays for training steps (``training=True``) or for inference."""
        if training and self.train_channels_last is not None:
            return self.train_channels_last
        return self.channels_last


def bf16_flag_in(cpuinfo: str) -> str | None:
    """The bfloat16 hardware flag on the first ``flags`` line of a ``/proc/cpuinfo`` text, or ``None``.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``.

    Returns:
        ``"amx_bf16"`` (preferred) or ``"avx512_bf16"`` when listed, else ``None``.
    """
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return next((flag for flag in _BF16_FLAGS if flag in flags), None)
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> str | None:
    """The bfloat16 hardware of this CPU: ``"amx_bf16"``, ``"avx512_bf16"`` or ``None`` (bf16 would be emulated).

    Read from ``/proc/cpuinfo`` (Linux); elsewhere from PyTorch's own CPU capability probes.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return bf16_flag_in(cpuinfo.read_text(errors="replace"))
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for flag, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        if callable(check) and check():
            return flag
    return None


def cpu_precision() -> str:
    """The CPU arithmetic asked for by ``$HER2_CPU_PRECISION``: ``"auto"``, ``"bf16"`` or ``"fp32"``.

    Raises:
        ValueError: naming the variable, for any other value.
    """
    value = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if value not in _PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={value!r} is not one of {', '.join(_PRECISIONS)}")
    return value


@functools.lru_cache(maxsize=8)
def _settings(device_type: str, precision: str = "auto") -> ExecutionSettings:
    if device_type == "cuda":
        settings = ExecutionSettings(True, True, "CUDA: float16 autocast (AMP) with channels-last")
    elif device_type == "cpu":
        hardware = cpu_bf16_support()
        if precision == "bf16":
            settings = ExecutionSettings(
                True,
                True,
                f"CPU ({hardware or 'no bf16 hardware: emulated, slow'}): bfloat16 autocast with "
                f"channels-last, forced by {PRECISION_ENV}=bf16",
            )
        elif hardware and precision == "auto":
            settings = ExecutionSettings(True, True, f"CPU with {hardware}: bfloat16 autocast with channels-last")
        else:
            why = (
                f"forced by {PRECISION_ENV}=fp32" if hardware else "CPU without bfloat16 hardware (no AMX/AVX-512 BF16)"
            )
            settings = ExecutionSettings(
                False,
                True,
                f"{why}: float32; channels-last for inference, contiguous tensors for training",
                train_channels_last=False,
            )
    else:
        settings = ExecutionSettings(False, False, f"{device_type}: float32, contiguous tensors")
    logger.info("execution settings: %s (override with --amp / --channels_last)", settings.reason)
    return settings


def execution_settings(device: torch.device | str) -> ExecutionSettings:
    """The fastest correct settings for ``device`` (logged once per process and device type).

    Args:
        device: the training or inference device.

    Returns:
        The settings.

    Raises:
        ValueError: for a bad ``$HER2_CPU_PRECISION``.
    """
    device_type = torch.device(device).type
    return _settings(device_type, cpu_precision() if device_type == "cpu" else "auto")


def default_amp(device: torch.device | str) -> bool:
    """Whether mixed precision pays on ``device`` (see :func:`execution_settings`)."""
    return execution_settings(device).amp


def default_channels_last(device: torch.device | str, training: bool = False) -> bool:
    """Whether channels-last tensors pay on ``device`` for training or inference (see :func:`execution_settings`)."""
    return execution_settings(device).memory_format_for(training)


def inductor_weight_prepack(device: torch.device | str) -> bool:
    """Whether frozen ``torch.compile`` may prepack the weights of convolutions and linear layers for oneDNN / MKL
    on ``device`` (``torch._inductor.config.cpp.weight_prepack``).

    On CPUs whose ATen kernels run AVX-512 (``torch.backends.cpu.get_cpu_capability()``) prepacking is what makes
    the compiled path fast. Where they run AVX2 (or older), the prepacked graph gave wrong logits for the paper's
    architecture (torch 2.13.0+cpu: 2 to 1e35 off), while the same graph without prepacking was right and still
    1.07-1.24x faster than eager (``docs/performance.md``).

    Args:
        device: the inference device.

    Returns:
        ``True`` on CUDA (where the setting does not apply) and on AVX-512 CPUs.
    """
    if torch.device(device).type != "cpu":
        return True
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
