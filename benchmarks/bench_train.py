"""Training speed of both stages: images/s of one CM-GAN step and one classifier step, per execution setting.

Each step is the real trainer iteration (``CrossModalGANTrainer`` / ``HER2Trainer``: forward, losses, backward and the
optimizer steps) on a synthetic batch. Settings: fp32 NCHW (the baseline), fp32 channels-last, bf16 autocast in NCHW
and with channels-last (so each stage's memory format can be chosen on its own), and the bundle's default for this
machine (``her2_monai.runtime``). Ratios are against the baseline measured in the same run. ``--sizes`` also shows
how the CM-GAN step grows with the image size (it should be close to linear in pixels: a fully convolutional network).

Usage::

    python benchmarks/bench_train.py                         # demo architecture, 64 px, batch 16 / GAN batch 4
    python benchmarks/bench_train.py --profile bci --sizes 128 256   # the paper's architecture
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from her2_monai.engines import CrossModalGANTrainer, HER2Trainer
from her2_monai.losses import GANLoss, HER2Loss, PyramidL1Loss
from her2_monai.networks import BranchSelector, CrossModalDiscriminators, CrossModalGAN, HER2FlexibleNet
from her2_monai.runtime import execution_settings

PROFILES = {
    "demo": {"ngf": 16, "n_blocks": 6, "ndf": 16, "gan_batch": 4, "batch": 16, "size": 64,
             "shared": "resnet18", "specific": "resnet10"},
    "bci": {"ngf": 64, "n_blocks": 9, "ndf": 64, "gan_batch": 2, "batch": 8, "size": 256,
            "shared": "resnet50", "specific": "efficientnet-b0"},
}  # fmt: skip


def settings_list() -> dict[str, tuple[bool, bool]]:
    """name -> (amp, channels_last); the training default for this machine last."""
    default = execution_settings("cpu")
    layout = default.memory_format_for(training=True)
    return {
        "fp32 NCHW (baseline)": (False, False),
        "fp32 channels-last": (False, True),
        "bf16 NCHW": (True, False),
        "bf16 + channels-last": (True, True),
        f"default: {'bf16' if default.amp else 'fp32'}{' + channels-last' if layout else ', NCHW'}": (
            default.amp,
            layout,
        ),
    }


def _batch(n: int, size: int, dual: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(n, 2) if dual else torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).repeat(n // 3 + 1, 1)[:n]
    return {
        "he": torch.rand(n, 3, size, size, generator=gen) * 2 - 1,
        "ihc": torch.rand(n, 3, size, size, generator=gen) * 2 - 1,
        "mask": mask,
        "label": torch.arange(n) % 4,
    }


def _time(step, batch, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gan_step(profile: dict, size: int, amp: bool, channels_last: bool):
    """The real stage-1 iteration as a callable on a batch."""
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    gan = CrossModalGAN(ngf=profile["ngf"], n_blocks=profile["n_blocks"]).to(memory_format=memory)
    discs = CrossModalDiscriminators(ndf=profile["ndf"]).to(memory_format=memory)
    trainer = CrossModalGANTrainer(
        "cpu", 1, [], gan, discs, torch.optim.Adam(gan.parameters(), 2e-4), torch.optim.Adam(discs.parameters(), 2e-4),
        pyramid_loss=PyramidL1Loss(), gan_loss=GANLoss(), amp=amp, channels_last=channels_last,
    )  # fmt: skip
    trainer.scaler = None
    return lambda batch: trainer._iteration(trainer, batch)


def classifier_step(profile: dict, size: int, amp: bool, channels_last: bool, backbone: str | None = None):
    """The real stage-2 iteration (frozen CM-GAN and selector inside) as a callable on a batch."""
    torch.manual_seed(0)
    net = HER2FlexibleNet(
        shared_backbone=backbone or profile["shared"], specific_backbone=profile["specific"],
        cmgan=CrossModalGAN(ngf=profile["ngf"], n_blocks=profile["n_blocks"]),
        selector=BranchSelector(), channels_last=channels_last,
    )  # fmt: skip
    trainer = HER2Trainer(
        "cpu", 1, [], net, torch.optim.AdamW(net.trainable_parameters(), 1e-4), loss_function=HER2Loss(),
        amp=amp, channels_last=channels_last,
    )  # fmt: skip
    trainer.scaler = None
    return lambda batch: trainer._iteration(trainer, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--sizes", type=int, nargs="+", help="CM-GAN step sizes for the scaling table")
    parser.add_argument("--backbone", default=None, help="shared backbone of the classifier (default: the profile's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-bf16", action="store_true", help="skip bf16 (emulated and slow without hardware)")
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    size = profile["size"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu bf16 hardware: "
        f"{execution_settings('cpu').reason}; load average {os.getloadavg()[0]:.1f}; profile {args.profile}, "
        f"{size} px; median of {args.reps} steps after {args.warmup} warm-up"
    )
    settings = {k: v for k, v in settings_list().items() if not (args.skip_bf16 and v[0] and "default" not in k)}
    for name, builder, batch_size, mixed in (
        ("CM-GAN step (both directions)", lambda a, c: gan_step(profile, size, a, c), profile["gan_batch"], False),
        ("classifier step (dual batch)", lambda a, c: classifier_step(profile, size, a, c, args.backbone),
         profile["batch"], False),
        ("classifier step (mixed scenarios)", lambda a, c: classifier_step(profile, size, a, c, args.backbone),
         profile["batch"], True),
    ):  # fmt: skip
        print(f"\n{name}, batch {batch_size}")
        print(f"  {'setting':<32}{'s/step':>9}{'img/s':>9}{'vs baseline':>13}")
        baseline = None
        batch = _batch(batch_size, size, dual=not mixed)
        for label, (amp, channels_last) in settings.items():
            seconds = _time(builder(amp, channels_last), batch, args.warmup, args.reps)
            baseline = baseline or seconds
            print(f"  {label:<32}{seconds:>9.3f}{batch_size / seconds:>9.1f}{baseline / seconds:>12.2f}x", flush=True)
    if args.sizes:
        default = execution_settings("cpu")
        print(f"\nCM-GAN step vs image size ({default.reason}), batch {profile['gan_batch']}")
        print(f"  {'size':>6}{'s/step':>9}{'s per Mpx':>11}")
        for s in args.sizes:
            seconds = _time(
                gan_step(profile, s, default.amp, default.memory_format_for(training=True)),
                _batch(profile["gan_batch"], s),
                args.warmup,
                args.reps,
            )
            print(f"  {s:>6}{seconds:>9.3f}{seconds / (profile['gan_batch'] * s * s / 1e6):>11.2f}", flush=True)


if __name__ == "__main__":
    main()
