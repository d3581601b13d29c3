"""The deployed path's inference rewrites against the old default, fp32 eager and ONNX Runtime, in one process.

Settings, each ``HER2Deploy.predict_batch`` on the same batch (paper architecture, ``--profile bci``, random weights):

* old default: bf16 autocast + channels-last, no rewrites (``HER2_INFERENCE_OPTIMIZE=off``) -- the base of the ratios;
* new default: the same autocast with the rewrites of :mod:`her2_monai.inference.optimize` (BatchNorm folded, the
  CM-GAN generators and encoder trunks as bf16 channels-last islands);
* compiled: the new default through ``torch.compile`` with frozen weights (``predict --compile true``; ``wsi``
  compiles on its own for slides of 1000 tiles or more); its first call, the compilation, is timed apart
  (``--no-compile`` skips it);
* fp32 eager, channels-last, no rewrites;
* ONNX Runtime fp32 (the ``export --format onnx`` graphs, as many intra-op threads as torch; ``--no-onnx`` skips it);
* with ``--implicit-bf16``: fp32 weights and activations with the rewrites, oneDNN's convolutions and matrix
  products rounding their inputs to bf16 inside the kernel (``torch.backends.mkldnn.*.fp32_precision = "bf16"``,
  :func:`implicit_bf16`): closer to fp32 than the bf16 islands, which also store activations in bf16;
* OpenVINO on the same graphs (``predict/wsi --runtime openvino``): bf16 where this CPU gets bf16, else fp32
  (``--no-openvino`` skips it; left out when the ``openvino`` extra is not installed).

The settings are timed interleaved (A, B, C, D, A, B, ...) so that a shared machine's load falls on all alike; the
median of ``--reps`` timed calls after one warm-up is reported. Then one CM-GAN generator at ``--gen-size`` px: bf16
autocast (old) against the bf16 island with folded BatchNorm (new), interleaved as well. The largest logit difference
against fp32 eager is printed for each setting.

Each row also gives its arithmetic rate: the pipeline's floating-point operations (``FlopCounterMode``, counted once
on the fp32 path: convolutions and matrix products) divided by its time, as a share of this CPU's measured
matrix-multiply rate (2048^3, same threads) in the default's arithmetic: bf16 where the CPU has bf16 hardware, fp32
where it has not (or with ``HER2_CPU_PRECISION=fp32``). The ceiling line is the patches/s the pipeline would reach if
every counted operation ran at that rate: no rewrite of the same arithmetic can go past it.

An AVX2-only CPU can be imitated on a newer one (``docs/performance.md``, "AVX2 kernels on an AVX-512 CPU")::

    HER2_CPU_PRECISION=fp32 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_deploy_opt.py --no-openvino

Usage::

    python benchmarks/bench_deploy_opt.py                       # 512 px H&E-only and dual, generator at 1024 px
    python benchmarks/bench_deploy_opt.py --size 256 --gen-size 512 --reps 3 --no-onnx
    python benchmarks/bench_deploy_opt.py --old-batch 8 --no-onnx --gen-size 0   # each as deployed at 512 px

``--old-batch`` times the old default on batches of its own size, the rest on ``--batch``, and compares patches/s:
until the batch rule (``her2_monai.inference.auto_batch_size``) the inference config ran batches of 8 whatever the
model's input side, and the rule now runs a 512 px model one patch at a time (``--batch 1``, the default).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from bench_inference import matmul_rate  # sibling scripts: benchmarks/ is on sys.path
from bench_onnx import SCENARIO_MASKS, build_network, scenario_batch
from torch.utils.flop_counter import FlopCounterMode

from her2_monai.inference.optimize import optimize_for_inference
from her2_monai.runtime import execution_settings
from her2_monai.stain_batch import autocast


def interleaved(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each run, timed in turn ``reps`` times after one warm-up call each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@contextlib.contextmanager
def implicit_bf16() -> Iterator[None]:
    """oneDNN convolutions and matrix products on fp32 tensors compute in bf16 (fp32 accumulation) inside the block."""
    backends = (torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "bf16"
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


#: The ``--implicit-bf16`` setting's name.
IMPLICIT = "fp32 + oneDNN implicit bf16"


def _run(deploy: torch.nn.Module, amp: bool, batch: tuple[torch.Tensor, ...], implicit: bool) -> Callable[[], object]:
    """One timed call of ``deploy.predict_batch`` on ``batch``; with ``implicit``, under :func:`implicit_bf16`."""

    def run() -> object:
        with implicit_bf16() if implicit else contextlib.nullcontext():
            return deploy.predict_batch(*batch, amp=amp)

    return run


def pipeline_gflop(deploy: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> float:
    """GFLOP of one fp32 ``predict_batch`` call on ``batch`` (convolutions and matrix products)."""
    with FlopCounterMode(display=False) as counter:
        deploy.predict_batch(*batch, amp=False)
    return counter.get_total_flops() / 1e9


def channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """A channels-last copy of ``net``."""
    net = copy.deepcopy(net)
    net.channels_last = True
    return net.to(memory_format=torch.channels_last)


def generator_rows(net: torch.nn.Module, size: int, reps: int, amp: bool = True) -> None:
    """Print one generator's seconds per image, old against new: with ``amp``, bf16 autocast against the optimised
    bf16 island; without, fp32 against fp32 with BatchNorm folded."""
    old = channels_last(net).cmgan.he_to_ihc
    new = optimize_for_inference(channels_last(net), bf16=amp).cmgan.he_to_ihc
    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )

    def old_run() -> torch.Tensor:
        with torch.no_grad(), autocast("cpu", amp):
            return old(x)

    def new_run() -> torch.Tensor:
        with torch.no_grad():
            return new(x)

    took = interleaved({"old": old_run, "new": new_run}, reps)
    diff = float((old_run().float() - new_run().float()).abs().max())
    names = ("bf16 autocast (old)", "bf16 island, BN folded (new)") if amp else ("fp32 (old)", "fp32, BN folded (new)")
    print(f"\ngenerator {size} px, 1 image (load average {os.getloadavg()[0]:.1f}):")
    print(f"  {names[0]:<32} {took['old']:>8.2f} s")
    print(f"  {names[1]:<32} {took['new']:>8.2f} s  {took['old'] / took['new']:.2f}x")
    print(f"  max |difference| of the outputs  {diff:.1e}")


def main() -> None:
    from her2_monai.inference import HER2Deploy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--gen-size", type=int, default=1024)
    parser.add_argument("--scenarios", nargs="+", default=["he_only", "dual"], choices=sorted(SCENARIO_MASKS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--old-batch",
        type=int,
        default=None,
        help="batch size of the old default alone (default: --batch); 8 times it as deployed before the batch rule",
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-onnx", action="store_true", help="leave ONNX Runtime out")
    parser.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out (also if not installed)")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile setting out")
    parser.add_argument("--implicit-bf16", action="store_true", help="add fp32 with oneDNN implicit bf16 arithmetic")
    args = parser.parse_args()
    old_batch = args.batch if args.old_batch is None else args.old_batch
    if min(args.batch, old_batch) < 1:
        parser.error(f"--batch and --old-batch must be at least 1, got {args.batch} and {old_batch}")

    default = execution_settings("cpu")
    net = build_network("bci", args.size)
    # without bf16 hardware (or with HER2_CPU_PRECISION=fp32) the default is fp32: the rewrites fold BatchNorm only,
    # and the old default is itself the fp32 reference
    arithmetic = "bf16" if default.amp else "fp32"
    old_name, new_name = (
        ("old default (bf16 autocast) (base)", "new default (bf16 islands)")
        if default.amp
        else ("old default (fp32) (base)", "new default (fp32, BN folded)")
    )
    settings = {
        old_name: (HER2Deploy(channels_last(net), optimize=False).eval(), default.amp),
        new_name: (HER2Deploy(channels_last(net), optimize=True).eval(), default.amp),
    }
    if not args.no_compile:
        compiled = HER2Deploy(channels_last(net), optimize=True, compile_network=True).eval()
        settings["compiled (frozen torch.compile)"] = (compiled, default.amp)
    reference_name = old_name
    if default.amp:
        reference_name = "fp32 eager channels-last"
        settings[reference_name] = (HER2Deploy(channels_last(net), optimize=False).eval(), False)
    if args.implicit_bf16:
        settings[IMPLICIT] = (HER2Deploy(channels_last(net), optimize=True).eval(), False)
    with tempfile.TemporaryDirectory() as folder:
        openvino = not args.no_openvino and importlib.util.find_spec("openvino") is not None
        if not args.no_onnx or openvino:
            from her2_monai.inference.onnx_export import export_deploy
            from her2_monai.inference.onnx_runtime import OnnxNetwork

            export = os.path.join(folder, "onnx")
            export_deploy(HER2Deploy(net, optimize=False).eval(), export, check_batch=1)
            if not args.no_onnx:
                settings["ONNX Runtime fp32"] = (HER2Deploy(OnnxNetwork(export)).eval(), False)
            if openvino:
                network = OnnxNetwork(export, runtime="openvino")
                settings[f"OpenVINO {arithmetic} (--runtime openvino)"] = (HER2Deploy(network).eval(), False)
        mm_rate = matmul_rate(torch.bfloat16 if default.amp else torch.float32)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {default.reason}; "
            f"ATen kernels {torch.backends.cpu.get_cpu_capability()}, oneDNN ISA cap "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}; "
            f"measured {arithmetic} matmul rate {mm_rate:.0f} GFLOP/s; "
            f"load average {os.getloadavg()[0]:.1f}; profile bci, {args.size} px, batch {args.batch}"
            f"{f' (old default: {old_batch})' if old_batch != args.batch else ''}, median of {args.reps} interleaved"
        )
        print(
            f"{'scenario':<9} {'setting':<38}{'patch/s':>9}{'vs base':>9}{'GFLOP/s':>9}{'% ' + arithmetic + ' mm':>10}"
            f"{'max |dlogit| vs fp32':>22}"
        )
        gen = torch.Generator().manual_seed(0)
        for scenario in args.scenarios:
            he, ihc, mask = scenario_batch(scenario, max(args.batch, old_batch), args.size, gen)
            # the old default may run its own batch size (--old-batch); every other setting runs the first --batch
            sizes = {name: old_batch if name == old_name else args.batch for name in settings}
            runs = {
                name: _run(deploy, amp, (he[: sizes[name]], ihc[: sizes[name]], mask[: sizes[name]]), name == IMPLICIT)
                for name, (deploy, amp) in settings.items()
            }
            for name in [n for n in runs if n.startswith("compiled")]:
                start = time.perf_counter()
                runs[name]()
                print(f"  {scenario}: first call of '{name}' (compilation) {time.perf_counter() - start:.1f} s")
            took = interleaved(runs, args.reps)
            patch_gflop = pipeline_gflop(settings[reference_name][0], (he[:1], ihc[:1], mask[:1]))
            reference = runs[reference_name]()["pred"]
            rates = {name: sizes[name] / seconds for name, seconds in took.items()}  # patches/s
            base = rates[old_name]
            for name, patches in rates.items():
                common = min(sizes[name], sizes[reference_name])
                diff = float((runs[name]()["pred"][:common] - reference[:common]).abs().max())
                rate = patch_gflop * patches
                print(
                    f"{scenario:<9} {name:<38}{patches:>9.3f}{patches / base:>8.2f}x{rate:>9.0f}"
                    f"{100 * rate / mm_rate:>9.0f}%{diff:>22.1e}",
                    flush=True,
                )
            ceiling = mm_rate / patch_gflop
            print(
                f"  {patch_gflop:.0f} GFLOP per patch; ceiling at the {arithmetic} matmul rate "
                f"{ceiling:.3f} patch/s = {ceiling / base:.2f}x base (load average {os.getloadavg()[0]:.1f})"
            )
    if args.gen_size:
        generator_rows(net, args.gen_size, args.reps, default.amp)


if __name__ == "__main__":
    main()
