"""This project's CM-GAN against the official BCI PyramidPix2pix code, in one process, one direction at a time.

Peer: ``PyramidPix2pix/models`` of the BCI repository (bupt-ai-cz/BCI), its ``Pix2PixModel`` with the paper's
settings (ResNet-9-blocks generator, ngf 64, BatchNorm, dropout; 70x70 PatchGAN; vanilla GAN loss; pattern
``L1_L2``: L1 at full resolution and at 1/2 with Gaussian-blurred pyramids, weights 25/25; Adam 2e-4), timed through
its own ``set_input`` + ``optimize_parameters`` (one direction) and ``netG`` in eval mode for inference. Nothing of it
is stubbed: it needs ``kornia`` (``pip install kornia``, only for this benchmark). The checkout is not part of this
repository: pass its folder with ``--peer-dir`` (e.g. ``git clone https://github.com/bupt-ai-cz/BCI``).

Ours: the bundle's ``CrossModalGANTrainer`` iteration with the same architecture, losses and batch; it trains BOTH
directions per iteration (the same networks twice), so its time per direction is half an iteration. Inference: one
generator, eval mode, ``no_grad``. Ours runs with the bundle's default execution settings for this machine
(``her2_monai.runtime``) and, for reference, with the peer's setting (fp32, NCHW).

Usage::

    python benchmarks/bench_peer.py --peer-dir /path/to/BCI              # 256 px training, 1024 px inference
    python benchmarks/bench_peer.py --peer-dir /path/to/BCI --profile-ops   # plus where the time goes, by operator

With ``--profile-ops`` it also prints, from ``torch.profiler``, the time per kind of operator for the peer and for
ours, and the "convolution floor": our time if everything but the convolutions took no time at all, i.e. the best
ratio against the peer that any change short of faster convolution kernels (or fewer convolution FLOPs) can reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_inference import matmul_rate  # a sibling script: benchmarks/ is on sys.path
from op_profile import format_kinds, format_top, op_profile
from torch.utils.flop_counter import FlopCounterMode

from her2_monai.engines import CrossModalGANTrainer
from her2_monai.inference.optimize import fold_batchnorm, make_bf16_island
from her2_monai.losses import GANLoss, PyramidL1Loss
from her2_monai.networks import CrossModalDiscriminators, CrossModalGAN
from her2_monai.runtime import execution_settings


def _median_time(step, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peer_model(peer_dir: Path):
    """The BCI ``Pix2PixModel`` on the CPU with the paper's options."""
    sys.path.insert(0, str(peer_dir / "PyramidPix2pix"))
    from models.pix2pix_model import Pix2PixModel  # noqa: PLC0415  (the peer's package, found through sys.path)

    options = SimpleNamespace(
        gpu_ids=[], isTrain=True, checkpoints_dir="/tmp", name="bench", preprocess="crop", pattern="L1_L2",
        netD="basic", input_nc=3, output_nc=3, ngf=64, netG="resnet_9blocks", norm="batch", no_dropout=False,
        init_type="normal", init_gain=0.02, ndf=64, n_layers_D=3, gan_mode="vanilla", lr=2e-4, beta1=0.5,
        lambda_L1=25.0, weight_L2=25.0, direction="AtoB",
    )  # fmt: skip
    return Pix2PixModel(options)


def our_trainer(amp: bool, channels_last: bool) -> CrossModalGANTrainer:
    """The bundle's stage-1 trainer with the paper's architecture."""
    memory = torch.channels_last if channels_last else torch.contiguous_format
    gan = CrossModalGAN(ngf=64, n_blocks=9).to(memory_format=memory)
    discs = CrossModalDiscriminators(ndf=64).to(memory_format=memory)
    trainer = CrossModalGANTrainer(
        "cpu", 1, [], gan, discs, torch.optim.Adam(gan.parameters(), 2e-4, betas=(0.5, 0.999)),
        torch.optim.Adam(discs.parameters(), 2e-4, betas=(0.5, 0.999)),
        pyramid_loss=PyramidL1Loss(levels=(1, 2), weights=(25.0, 25.0)), gan_loss=GANLoss("vanilla"),
        amp=amp, channels_last=channels_last,
    )  # fmt: skip
    trainer.scaler = None
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-dir", type=Path, required=True, help="a checkout of bupt-ai-cz/BCI")
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--infer-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile-ops", action="store_true", help="also profile by kind of operator (torch.profiler)")
    args = parser.parse_args()
    if not (args.peer_dir / "PyramidPix2pix" / "models" / "pix2pix_model.py").is_file():
        raise SystemExit(f"--peer-dir {args.peer_dir} is not a checkout of bupt-ai-cz/BCI (no PyramidPix2pix/models)")
    default = execution_settings("cpu")
    torch.manual_seed(0)
    peer = peer_model(args.peer_dir)
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(args.batch, 3, args.train_size, args.train_size, generator=gen) * 2 - 1
    b = torch.rand(args.batch, 3, args.train_size, args.train_size, generator=gen) * 2 - 1
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ours by default: {default.reason}; "
        f"load average {os.getloadavg()[0]:.1f}; training {args.train_size} px batch {args.batch}, "
        f"inference {args.infer_size} px batch 1; median of {args.reps} after {args.warmup} warm-up"
    )

    def peer_step() -> None:
        peer.set_input({"A": a, "B": b, "A_paths": [""] * args.batch})
        peer.optimize_parameters()

    rows = [("peer: BCI PyramidPix2pix (fp32, NCHW)", _median_time(peer_step, args.warmup, args.reps))]
    with FlopCounterMode(display=False) as counter:  # forward and backward of G and D, one direction
        peer_step()
    train_gflop = counter.get_total_flops() / 1e9
    batch = {"he": a, "ihc": b, "mask": torch.ones(args.batch, 2)}
    train_format = default.memory_format_for(training=True)
    precision, layout = ("bf16" if default.amp else "fp32"), ("channels-last" if train_format else "NCHW")
    default_label = f"ours, default ({precision}, {layout})"
    steps = {}
    for label, (amp, channels_last) in (
        (default_label, (default.amp, train_format)),
        ("ours, fp32 NCHW (the peer's setting)", (False, False)),
        ("ours, fp32 channels-last", (False, True)),
    ):
        trainer = our_trainer(amp, channels_last)
        steps[label] = lambda t=trainer: t._iteration(t, batch)
        rows.append((label, _median_time(steps[label], args.warmup, args.reps) / 2))
    fp32_rate = matmul_rate(torch.float32)
    print(
        f"\ntraining, seconds per direction per step ({args.train_size} px, batch {args.batch}; "
        f"{train_gflop:.0f} GFLOP per direction per step; measured fp32 matmul rate {fp32_rate:.0f} GFLOP/s)"
    )
    for label, seconds in rows:
        print(
            f"  {label:<62}{seconds:>8.2f} s{rows[0][1] / seconds:>8.2f}x vs peer{train_gflop / seconds:>8.1f} GFLOP/s"
        )
    ceiling = train_gflop / fp32_rate
    print(f"  ceiling at the full matmul rate: {ceiling:.2f} s ({rows[0][1] / ceiling:.2f}x vs peer)")
    if args.profile_ops:
        # Ours trains both directions per iteration: halve its profile to compare one direction with the peer's.
        ours = {k: v / 2 for k, v in op_profile(steps[default_label])[0].items()}
        _print_profile("training", rows[0][1], ours, dict(rows)[default_label], op_profile(peer_step), train_gflop)

    x = torch.rand(1, 3, args.infer_size, args.infer_size, generator=gen) * 2 - 1
    peer.netG.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        peer.netG(torch.rand(1, 3, 256, 256))
    gflop_1024 = counter.get_total_flops() * (args.infer_size / 256) ** 2 / 1e9
    with torch.no_grad():
        rows = [("peer: BCI netG (fp32, NCHW)", _median_time(lambda: peer.netG(x), args.warmup, args.reps))]
        steps = {}
        for label, channels_last in (("ours, default", default.channels_last), ("ours, fp32 NCHW", False)):
            gan = CrossModalGAN(ngf=64, n_blocks=9).freeze()
            memory = torch.channels_last if channels_last else torch.contiguous_format
            gan.to(memory_format=memory)
            xin = x.contiguous(memory_format=memory)
            # "default" is the deployed predictor's setting: bf16 autocast where the CPU has bf16, channels-last.
            amp = default.amp and label == "ours, default"

            def step(g=gan, i=xin, amp=amp):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    return g.he_to_ihc(i)

            steps[label] = step
            rows.append((label, _median_time(steps[label], args.warmup, args.reps)))
        # The deployed inference copy (her2_monai.inference.optimize): BatchNorm folded, and on bf16 hardware the
        # generator as a bf16 channels-last island.
        gan = CrossModalGAN(ngf=64, n_blocks=9).freeze().eval()
        fold_batchnorm(gan)
        if default.amp:
            make_bf16_island(gan.he_to_ihc)
        label = "ours, deployed (BN folded" + (", bf16 island)" if default.amp else ")")
        steps[label] = lambda g=gan: g.he_to_ihc(x)
        rows.append((label, _median_time(steps[label], args.warmup, args.reps)))
        if args.profile_ops:
            peer_profile, ours_profile = op_profile(lambda: peer.netG(x)), op_profile(steps["ours, default"])
    print(f"\ninference, seconds per {args.infer_size} px patch, one generator ({gflop_1024:.0f} GFLOP)")
    for label, seconds in rows:
        print(
            f"  {label:<62}{seconds:>8.2f} s{rows[0][1] / seconds:>8.2f}x vs peer{gflop_1024 / seconds:>8.1f} GFLOP/s"
        )
    ceiling = gflop_1024 / fp32_rate
    print(f"  ceiling at the full matmul rate: {ceiling:.2f} s ({rows[0][1] / ceiling:.2f}x vs peer)")
    if args.profile_ops:
        _print_profile("inference", rows[0][1], ours_profile[0], dict(rows)["ours, default"], peer_profile, gflop_1024)


def _print_profile(
    stage: str, peer_seconds: float, ours: dict[str, float], ours_seconds: float, peer: tuple, gflop: float
) -> None:
    """The by-kind table of the peer and ours, the peer's longest operators, and our convolution floor."""
    print(f"\n{stage}, where the time goes (torch.profiler self CPU time, seconds per direction per step)")
    for line in format_kinds({"peer": peer[0], "ours, default": ours}):
        print(line)
    print("  the peer's longest operators:")
    for line in format_top(peer[1]):
        print(line)
    # Profiling adds its own overhead: take the convolution share from the profile and the time from the timing.
    floor = ours_seconds * ours["convolution"] / ours["total"]
    print(
        f"  convolution floor of ours: {floor:.2f} s = {peer_seconds / floor:.2f}x vs peer at most without faster "
        f"convolutions; the convolutions run at {gflop / floor:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
