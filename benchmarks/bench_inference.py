"""Inference speed of the whole deployed pipeline per scenario, image size and execution setting.

The pipeline is ``HER2Deploy.predict_batch`` -- what ``predict``, ``run inferring``, whole-slide inference and MONAI
Label call: the branch selector on every given image, the CM-GAN for a missing stain, the shared and specific
encoders, attention and head -- with the paper's architecture (``--profile bci``: ResNet50 + EfficientNet-B0, CM-GAN
ngf 64 with 9 blocks; random weights: speed does not depend on them).

Settings: fp32 NCHW (the baseline), fp32 channels-last, bf16 autocast + channels-last, ``torch.compile`` of the
classifier on the machine's default setting, and the default (``her2_monai.runtime``). Each (size, scenario,
setting) runs in a fresh subprocess so its peak resident memory is its own; ratios are against the baseline of the
same command; "1st call s" is the first batch, which includes the compilation of the compiled setting
(``HER2Deploy(compile_network=True)``, what ``--compile true`` turns on). FLOPs per patch are counted with
``torch.utils.flop_counter`` and set against the machine's measured fp32 and bf16 matrix-multiply rate, so the
distance to the hardware limit is a number.

Usage::

    python benchmarks/bench_inference.py                          # 256 and 512 px, H&E-only and dual
    python benchmarks/bench_inference.py --sizes 256 512 1024 --scenarios dual he_only ihc_only
    python benchmarks/bench_inference.py --sizes 512 --scenarios he_only --profile-ops   # where the time goes

``--profile-ops`` adds, per setting, the ``torch.profiler`` self time by kind of operator (see ``op_profile.py``):
it shows, for instance, whether bf16 loses its time in the convolutions themselves or in dtype casts around them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from op_profile import format_kinds, format_top, op_profile  # a sibling script: benchmarks/ is on sys.path

from her2_monai.runtime import execution_settings

SCENARIO_MASKS = {"dual": (1.0, 1.0), "he_only": (1.0, 0.0), "ihc_only": (0.0, 1.0)}
PROFILES = {
    "bci": {"shared_backbone": "resnet50", "specific_backbone": "efficientnet-b0", "ngf": 64, "n_blocks": 9},
    "demo": {"shared_backbone": "resnet50", "specific_backbone": "efficientnet-b0", "ngf": 32, "n_blocks": 6},
}


def settings() -> dict[str, dict]:
    """name -> worker options."""
    default = execution_settings("cpu")
    return {
        "fp32 NCHW (baseline)": {"amp": False, "channels_last": False, "compile": False},
        "fp32 channels-last": {"amp": False, "channels_last": True, "compile": False},
        "bf16 + channels-last": {"amp": True, "channels_last": True, "compile": False},
        "compiled (default setting)": {"amp": default.amp, "channels_last": default.channels_last, "compile": True},
    }


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """Measured GFLOP/s of an ``n x n`` matrix multiply in ``dtype`` on this CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def worker(args: argparse.Namespace) -> None:
    """Time one (size, scenario, setting) and print a JSON line."""
    from torch.utils.flop_counter import FlopCounterMode

    from her2_monai.inference import HER2Deploy
    from her2_monai.networks import BranchSelector, CrossModalGAN, HER2FlexibleNet

    profile = PROFILES[args.profile]
    torch.manual_seed(0)
    net = HER2FlexibleNet(
        shared_backbone=profile["shared_backbone"], specific_backbone=profile["specific_backbone"],
        cmgan=CrossModalGAN(ngf=profile["ngf"], n_blocks=profile["n_blocks"]), selector=BranchSelector(),
        channels_last=args.channels_last,
    ).eval()  # fmt: skip
    deploy = HER2Deploy(net, compile_network=args.compile).eval()
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    keep = torch.tensor(SCENARIO_MASKS[args.scenario])
    mask = keep.expand(args.batch, 2).contiguous()
    he = ((torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1) * keep[0]).to(memory_format=memory)
    ihc = ((torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1) * keep[1]).to(memory_format=memory)

    def run() -> None:
        deploy.predict_batch(he, ihc, mask, amp=args.amp)

    start = time.perf_counter()
    run()  # warm-up (and compilation)
    first = time.perf_counter() - start
    if args.compile and not deploy.compile_network:
        raise SystemExit("torch.compile failed (see the warning above): the compiled setting would time eager code")
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    flops = 0
    if args.count_flops:
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kinds, top = op_profile(run) if args.profile_ops else ({}, [])
    result = {"seconds": statistics.median(times), "first_seconds": first, "peak_mb": peak_mb, "flops": flops}
    result |= {"kinds": kinds, "top": top[:6]}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="bci", choices=sorted(PROFILES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--scenarios", nargs="+", default=["he_only", "dual"], choices=sorted(SCENARIO_MASKS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--settings", nargs="+", help="subset of the setting names (default: all)")
    parser.add_argument("--profile-ops", action="store_true", help="also profile by kind of operator (torch.profiler)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    fp32_rate, bf16_rate = matmul_rate(torch.float32), matmul_rate(torch.bfloat16, n=512, reps=1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {execution_settings('cpu').reason}; "
        f"measured matmul rate: fp32 {fp32_rate:.0f} GFLOP/s, bf16 {bf16_rate:.1f} GFLOP/s; "
        f"load average {os.getloadavg()[0]:.1f}; profile {args.profile}, batch {args.batch}"
    )
    header = f"{'size':>5} {'scenario':<9} {'setting':<28}{'patch/s':>9}{'vs base':>9}{'peak MB':>9}"
    print(header + f"{'GFLOP/patch':>13}{'GFLOP/s':>9}{'% fp32 mm':>10}{'1st call s':>11}")
    chosen = {k: v for k, v in settings().items() if not args.settings or k in args.settings}
    for size in args.sizes:
        for scenario in args.scenarios:
            baseline, flops, profiles = None, 0, {}
            for name, options in chosen.items():
                command = [
                    sys.executable, __file__, "--worker", "--profile", args.profile, "--size", str(size),
                    "--scenario", scenario, "--batch", str(args.batch), "--reps", str(args.reps),
                ]  # fmt: skip
                command += [f"--{k.replace('_', '-')}" for k, v in options.items() if v]
                command += ["--profile-ops"] if args.profile_ops else []
                if baseline is None:
                    command.append("--count-flops")
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{size:>5} {scenario:<9} {name:<28} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                baseline = baseline or result["seconds"]
                flops = flops or result["flops"]
                per_patch = flops / args.batch / 1e9
                rate = flops / result["seconds"] / 1e9
                print(
                    f"{size:>5} {scenario:<9} {name:<28}{args.batch / result['seconds']:>9.2f}"
                    f"{baseline / result['seconds']:>8.2f}x{result['peak_mb']:>9.0f}{per_patch:>13.1f}{rate:>9.1f}"
                    f"{100 * rate / fp32_rate:>9.0f}%{result['first_seconds']:>11.1f}",
                    flush=True,
                )
                if result["kinds"]:
                    profiles[name] = result
            if profiles:
                _print_profiles(size, scenario, profiles)


def _print_profiles(size: int, scenario: str, profiles: dict[str, dict]) -> None:
    """Seconds per call by kind of operator for each setting, then each setting's longest operators."""
    print(f"\n  {size} px {scenario}: where the time goes (torch.profiler self CPU time per call)")
    for line in format_kinds({name.split(" (")[0]: result["kinds"] for name, result in profiles.items()}):
        print(line)
    for name, result in profiles.items():
        print(f"  longest operators, {name}:")
        for line in format_top([tuple(op) for op in result["top"]]):
            print(line)
    print()


if __name__ == "__main__":
    main()
