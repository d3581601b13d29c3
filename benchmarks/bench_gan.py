"""Speed of the CM-GAN networks: forward + backward time per batch for fp32, channels_last and bf16 autocast.

Times one training-style step (forward, mean of the output as loss, backward) of the Pyramid-Pix2Pix generator and of
the conditional PatchGAN discriminator in train mode (or, with ``--forward-only``, an eval-mode inference forward),
and prints each configuration's time and its speed-up against the fp32 NCHW baseline measured in the same run
(ratios > 1 are faster).

Usage::

    python benchmarks/bench_gan.py                      # batch 2, 256x256, 2 warm-up + 3 timed steps
    python benchmarks/bench_gan.py --forward-only --only generator   # frozen-generator inference (stage 2)
    python benchmarks/bench_gan.py --size 128 --reps 5 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn as nn

from her2_monai.networks.pix2pix import PatchGANDiscriminator, PyramidPix2PixGenerator

CONFIGS: dict[str, tuple[bool, bool]] = {
    # name: (bf16 autocast, channels_last)
    "fp32": (False, False),
    "fp32+channels_last": (False, True),
    "bf16 autocast": (True, False),
    "bf16 autocast+channels_last": (True, True),
}


def time_step(
    model: nn.Module,
    x: torch.Tensor,
    bf16: bool,
    channels_last: bool,
    warmup: int,
    reps: int,
    device: str,
    forward_only: bool = False,
) -> float:
    """Return the mean seconds of ``reps`` steps after ``warmup`` untimed ones.

    A step is forward + backward in train mode, or an eval-mode ``no_grad`` forward with ``forward_only`` (how the
    frozen generators run in stage 2).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train(not forward_only)
    x = x.to(device=device).contiguous(memory_format=fmt)
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        if forward_only:
            with torch.no_grad(), ctx:
                model(x)
            return
        model.zero_grad(set_to_none=True)
        with ctx:
            out = model(x)
        out.float().mean().backward()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--batch", type=int, default=2, help="batch size (paper: 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--forward-only", action="store_true", help="time eval-mode no_grad forwards instead")
    parser.add_argument("--only", choices=("generator", "discriminator"), help="benchmark one network only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    models = {
        "generator (ResNet-9, ngf 64)": (PyramidPix2PixGenerator(), 3),
        "discriminator (PatchGAN 70x70, ndf 64)": (PatchGANDiscriminator(), 6),
    }
    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} size={args.size} "
        f"warmup={args.warmup} reps={args.reps} step={'forward' if args.forward_only else 'forward+backward'} "
        f"torch={torch.__version__}"
    )
    for name, (model, channels) in models.items():
        if args.only and not name.startswith(args.only):
            continue
        n_params = sum(p.numel() for p in model.parameters())
        x = torch.rand(args.batch, channels, args.size, args.size) * 2 - 1
        print(f"\n{name}: {n_params:,} parameters")
        print(f"  {'config':<30}{'s/batch':>10}{'img/s':>9}{'vs fp32':>9}")
        baseline = None
        for cfg, (bf16, cl) in CONFIGS.items():
            seconds = time_step(model, x, bf16, cl, args.warmup, args.reps, args.device, args.forward_only)
            baseline = baseline or seconds
            print(f"  {cfg:<30}{seconds:>10.3f}{args.batch / seconds:>9.2f}{baseline / seconds:>8.2f}x")


if __name__ == "__main__":
    main()
