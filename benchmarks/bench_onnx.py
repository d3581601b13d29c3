"""ONNX Runtime against the eager deployed pipeline, in one process: patches/s and the largest logit difference.

The model has the paper's architecture (``--profile bci``: ResNet50 + EfficientNet-B0, CM-GAN ngf 64 with 9 blocks;
random weights, speed does not depend on them). It is exported as ``export --format onnx`` does
(:func:`~her2_monai.inference.onnx_export.export_deploy`, checked against eager fp32), then each setting runs
``HER2Deploy.predict_batch`` -- branch selector, CM-GAN for a missing stain, classifier, calibration and the
out-of-distribution statistics -- on the same batch:

* eager, the default of this CPU (``her2_monai.runtime``: bf16 autocast + channels-last where the CPU has bf16
  hardware) -- the baseline of the ratios;
* eager fp32 (channels-last, the fp32 inference default);
* ONNX Runtime, fp32 (CPU execution provider, as many intra-op threads as torch).

Usage::

    python benchmarks/bench_onnx.py                        # 512 px, H&E only and dual, batch 1
    python benchmarks/bench_onnx.py --size 256 --scenarios dual --batch 4 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from her2_monai.runtime import execution_settings

SCENARIO_MASKS = {"dual": (1.0, 1.0), "he_only": (1.0, 0.0), "ihc_only": (0.0, 1.0)}
PROFILES = {
    "bci": {"shared_backbone": "resnet50", "specific_backbone": "efficientnet-b0", "ngf": 64, "n_blocks": 9},
    "demo": {"shared_backbone": "resnet50", "specific_backbone": "efficientnet-b0", "ngf": 32, "n_blocks": 6},
}


def scenario_batch(scenario: str, batch: int, size: int, gen: torch.Generator) -> tuple:
    """Random ``(he, ihc, mask)`` inputs in ``[-1, 1]`` of one scenario (the missing stain zeroed)."""
    keep = torch.tensor(SCENARIO_MASKS[scenario])
    mask = keep.expand(batch, 2).contiguous()
    he = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1) * keep[0]
    ihc = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1) * keep[1]
    return he, ihc, mask


def build_network(profile: str, size: int):
    """The random-weight network of ``profile`` recording ``size`` as its image size."""
    from her2_monai.networks import BranchSelector, CrossModalGAN, HER2FlexibleNet

    spec = PROFILES[profile]
    torch.manual_seed(0)
    net = HER2FlexibleNet(
        shared_backbone=spec["shared_backbone"], specific_backbone=spec["specific_backbone"],
        cmgan=CrossModalGAN(ngf=spec["ngf"], n_blocks=spec["n_blocks"]), selector=BranchSelector(),
        metadata={"image_size": size},
    ).eval()  # fmt: skip
    return net


def seconds(run: Callable[[], object], reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from her2_monai.inference import HER2Deploy
    from her2_monai.inference.onnx_export import export_deploy
    from her2_monai.inference.onnx_runtime import OnnxNetwork

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="bci", choices=sorted(PROFILES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--scenarios", nargs="+", default=["he_only", "dual"], choices=sorted(SCENARIO_MASKS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    default = execution_settings("cpu")
    fp32_net = build_network(args.profile, args.size)
    default_net = copy.deepcopy(fp32_net)
    if default.channels_last:
        default_net.channels_last = True
        default_net.to(memory_format=torch.channels_last)
    fp32_cl = copy.deepcopy(fp32_net)
    fp32_cl.channels_last = True
    fp32_cl.to(memory_format=torch.channels_last)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        manifest = export_deploy(HER2Deploy(fp32_net).eval(), os.path.join(folder, "onnx"), check_batch=1)
        export_s = time.perf_counter() - start
        ort = HER2Deploy(OnnxNetwork(os.path.join(folder, "onnx"))).eval()
        check = ", ".join(f"{k} {v:.1e}" for k, v in manifest["check"]["max_abs_diff"].items())
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {default.reason}; "
            f"load average {os.getloadavg()[0]:.1f}; profile {args.profile}, {args.size} px, batch {args.batch}\n"
            f"export {export_s:.0f} s; ONNX Runtime vs eager fp32, max abs diff: {check}"
        )
        base_name = f"eager default ({'bf16' if default.amp else 'fp32'}) (base)"
        settings = {
            base_name: (HER2Deploy(default_net).eval(), default.amp),
            "eager fp32 channels-last": (HER2Deploy(fp32_cl).eval(), False),
            "ONNX Runtime fp32": (ort, False),
        }
        print(f"{'scenario':<9} {'setting':<34}{'patch/s':>9}{'vs base':>9}{'max |dlogit| vs fp32':>22}")
        gen = torch.Generator().manual_seed(0)
        for scenario in args.scenarios:
            he, ihc, mask = scenario_batch(scenario, args.batch, args.size, gen)
            reference = settings["eager fp32 channels-last"][0].predict_batch(he, ihc, mask)["pred"]
            base = None
            for name, (deploy, amp) in settings.items():
                inputs = (he, ihc, mask)
                took = seconds(lambda d=deploy, a=amp, x=inputs: d.predict_batch(*x, amp=a), args.reps)
                base = base or took
                diff = float((deploy.predict_batch(he, ihc, mask, amp=amp)["pred"] - reference).abs().max())
                print(f"{scenario:<9} {name:<34}{args.batch / took:>9.3f}{base / took:>8.2f}x{diff:>22.1e}", flush=True)


if __name__ == "__main__":
    main()
