"""Patches per second of the deployed network at several batch sizes and model input sizes, in one process.

What the automatic batch size is chosen from (:func:`her2_monai.inference.auto_batch_size`: ``wsi``, the inference
config, the ONNX predictor). For each input side, each batch size runs ``HER2Deploy.predict_batch`` as ``predict`` and
``wsi`` do by default (this CPU's arithmetic, the inference rewrites, eager; or the compiled network, or the ONNX
export in ``--runtime``), random weights, interleaved with the other batch sizes (``--reps`` timed calls after one
warm-up; median). The ratio column is against batch 1 of the same side and scenario; the ``auto`` column marks the
batch size the rule picks (one rule for every runtime: docs/performance.md says why).

Usage::

    python benchmarks/bench_batch_size.py                                   # paper architecture, 128/256/512 px
    python benchmarks/bench_batch_size.py --profile demo --sizes 64 --batches 1 4 16 64
    python benchmarks/bench_batch_size.py --compile --sizes 512 --batches 1 4  # the compiled network (slow to start)
    python benchmarks/bench_batch_size.py --runtime openvino --sizes 512          # the ONNX export run by OpenVINO
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from bench_deploy_opt import interleaved  # sibling scripts: benchmarks/ is on sys.path
from bench_onnx import PROFILES, SCENARIO_MASKS, build_network, scenario_batch

from her2_monai.inference import auto_batch_size
from her2_monai.runtime import execution_settings


def main() -> None:
    from her2_monai.inference import HER2Deploy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="bci", choices=sorted(PROFILES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--scenarios", nargs="+", default=["he_only", "dual"], choices=sorted(SCENARIO_MASKS))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="time the compiled network (frozen torch.compile)")
    parser.add_argument(
        "--runtime", default="torch", choices=["torch", "onnxruntime", "openvino"], help="the ONNX export's runtime"
    )
    args = parser.parse_args()
    if args.compile and args.runtime != "torch":
        parser.error("--compile is for --runtime torch")

    settings = execution_settings("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {settings.reason}; "
        f"ATen kernels {torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()[0]:.1f}; "
        f"profile {args.profile}, {args.runtime}{' compiled' if args.compile else ''}, "
        f"median of {args.reps} interleaved"
    )
    print(f"{'side':>5} {'scenario':<9}{'batch':>6}{'patch/s':>10}{'vs batch 1':>12}{'auto':>6}")
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        net = build_network(args.profile, size).to(memory_format=torch.channels_last)
        choice = auto_batch_size(size)
        folder = tempfile.TemporaryDirectory()
        if args.runtime != "torch":
            from her2_monai.inference.onnx_export import export_deploy
            from her2_monai.inference.onnx_runtime import OnnxNetwork

            export = os.path.join(folder.name, "onnx")
            export_deploy(HER2Deploy(net, optimize=False).eval(), export, check_batch=1)
            exported = OnnxNetwork(export, runtime=args.runtime)
        amp = settings.amp if args.runtime == "torch" else False  # an ONNX runtime picks its own precision
        shared = None if args.compile else HER2Deploy(net if args.runtime == "torch" else exported).eval()
        for scenario in args.scenarios:
            runs = {}
            for batch in args.batches:
                # one network serves every batch size, except compiled: a graph of its own per batch shape
                deploy = shared or HER2Deploy(net, optimize=True, compile_network=True).eval()
                inputs = scenario_batch(scenario, batch, size, gen)

                def run(deploy=deploy, inputs=inputs, amp=amp) -> object:
                    with torch.inference_mode():
                        return deploy.predict_batch(*inputs, amp=amp)

                runs[batch] = run
            took = interleaved(runs, args.reps)
            base = args.batches[0] / took[args.batches[0]]
            for batch, seconds in took.items():
                rate = batch / seconds
                mark = "<-" if batch == choice else ""
                print(f"{size:>5} {scenario:<9}{batch:>6}{rate:>10.3f}{rate / base:>11.2f}x{mark:>6}", flush=True)
        folder.cleanup()


if __name__ == "__main__":
    main()
