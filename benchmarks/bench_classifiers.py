"""Size and training-step speed of the HER2 classifiers: HER2FlexibleNet, and SimMLM / MoRA when importable.

For every registered model and scenario it prints the parameter count (total and trainable) and the time of one
training step (forward, the model's training objective from her2_monai.losses, backward; no optimizer step) on a batch
of 8 images of 256x256 per stain, in three configurations: fp32 NCHW (the baseline), fp32 channels_last, and bf16
autocast + channels_last. Ratios are baseline time / configuration time, measured in the same run (> 1 is faster).
Timings on a shared CPU are noisy: the load average before and after is printed with them.

Models plug in through :data:`REGISTRY`: a name, a builder returning the model (raising ``ImportError`` when its module
is not there) and the scenarios to time.

Usage::

    python benchmarks/bench_classifiers.py                       # everything, batch 8, 256 px, 1 warm-up + 2 timed
    python benchmarks/bench_classifiers.py --models her2net --size 128 --iters 3
    python benchmarks/bench_classifiers.py --device cuda         # AMP there is bf16 autocast on CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from her2_monai.constants import NUM_CLASSES

SCENARIO_MASKS: dict[str, tuple[float, float]] = {"dual": (1.0, 1.0), "he_only": (1.0, 0.0), "ihc_only": (0.0, 1.0)}
CONFIGS: dict[str, tuple[bool, bool]] = {  # name: (channels_last, bf16 autocast)
    "fp32 NCHW": (False, False),
    "fp32 channels_last": (True, False),
    "bf16 autocast + channels_last": (True, True),
}


@dataclass(frozen=True)
class ModelEntry:
    """A model to benchmark.

    Args:
        name: label printed in the table.
        build: no-argument builder; raises ``ImportError`` if the model's module is missing.
        scenarios: scenario names (keys of :data:`SCENARIO_MASKS`) to time.
        note: what the entry represents.
    """

    name: str
    build: Callable[[], nn.Module]
    scenarios: tuple[str, ...]
    note: str = ""
    loss: Callable[[], nn.Module] | None = None


def _her2net() -> nn.Module:
    from her2_monai.networks.her2net import HER2FlexibleNet

    return HER2FlexibleNet()


def _her2net_cmgan() -> nn.Module:
    from her2_monai.networks.cmgan import CrossModalGAN
    from her2_monai.networks.her2net import HER2FlexibleNet

    return HER2FlexibleNet(cmgan=CrossModalGAN())


def _simmlm() -> nn.Module:
    from her2_monai.networks.alternatives import SimMLMNet

    return SimMLMNet()


def _mora() -> nn.Module:
    from her2_monai.networks.alternatives import MoRANet

    return MoRANet()


def _her2_loss() -> nn.Module:
    from her2_monai.losses import HER2Loss

    return HER2Loss()


def _simmlm_loss() -> nn.Module:
    from her2_monai.losses import SimMLMLoss

    return SimMLMLoss()


def _ce_loss() -> nn.Module:
    from her2_monai.losses import ClassificationLoss

    return ClassificationLoss()


REGISTRY: dict[str, ModelEntry] = {
    "her2net": ModelEntry(
        "HER2FlexibleNet", _her2net, ("dual", "he_only"), "defaults: ResNet50 shared, EfficientNet-B0 specific, "
        "feature substitution (no GAN given)", _her2_loss
    ),
    "her2net_cmgan": ModelEntry(
        "HER2FlexibleNet+CM-GAN", _her2net_cmgan, ("he_only",), "defaults + frozen CM-GAN (ngf 64, 9 blocks) "
        "synthesising the IHC; a dual batch does not run the GAN, so equals HER2FlexibleNet dual", _her2_loss
    ),
    "simmlm": ModelEntry("SimMLM", _simmlm, ("dual", "he_only"), "defaults", _simmlm_loss),
    "mora": ModelEntry("MoRA", _mora, ("dual", "he_only"), "defaults", _ce_loss),
}  # fmt: skip


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(total, trainable)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def make_batch(
    scenario: str, batch: int, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(he, ihc, mask, label)`` batch of one scenario (missing stains are zeros)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor(SCENARIO_MASKS[scenario]).expand(batch, 2).contiguous()
    he = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1) * mask[:, :1, None, None]
    ihc = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1) * mask[:, 1:, None, None]
    label = torch.arange(batch) % NUM_CLASSES
    return he.to(device), ihc.to(device), mask.to(device), label.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(
    model: nn.Module,
    loss_function: nn.Module,
    batch: Sequence[torch.Tensor],
    channels_last: bool,
    bf16: bool,
    warmup: int,
    iters: int,
) -> float:
    """Mean seconds of forward + loss + backward over ``iters`` steps after ``warmup`` untimed ones."""
    he, ihc, mask, label = batch
    device = he.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    he, ihc = he.contiguous(memory_format=memory_format), ihc.contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for step in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        with autocast:
            out = model(he, ihc, mask)
        loss_function(out, label, mask)["loss"].backward()
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(REGISTRY), choices=list(REGISTRY))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"{args.size}x{args.size} per stain, {args.warmup} warm-up + {args.iters} timed training steps; "
        f"load average before: {load[0]:.1f}"
    )
    print(f"{'model':<24} {'scenario':<9} {'config':<30} {'s/step':>8} {'img/s':>7} {'vs fp32':>8}")
    for key in args.models:
        entry = REGISTRY[key]
        try:
            torch.manual_seed(0)
            model = entry.build().to(device).train()
        except ImportError as err:
            print(f"{entry.name:<24} skipped: not importable ({err})")
            continue
        total, trainable = count_parameters(model)
        print(
            f"{entry.name:<24} parameters: {total / 1e6:.2f} M total, {trainable / 1e6:.2f} M trainable; {entry.note}"
        )
        for scenario in entry.scenarios:
            batch = make_batch(scenario, args.batch, args.size, device)
            baseline = None
            for config, (channels_last, bf16) in CONFIGS.items():
                loss_function = entry.loss().to(device)
                seconds = time_training_step(model, loss_function, batch, channels_last, bf16, args.warmup, args.iters)
                baseline = baseline or seconds
                print(
                    f"{entry.name:<24} {scenario:<9} {config:<30} {seconds:8.2f} {args.batch / seconds:7.2f} "
                    f"{baseline / seconds:7.2f}x",
                    flush=True,
                )
            model.to(memory_format=torch.contiguous_format)
        del model
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average after: {load[0]:.1f} (on a shared CPU, compare ratios within one run only)")


if __name__ == "__main__":
    main()
