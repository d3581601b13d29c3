"""Accuracy and calibrated probabilities of the deployed predictor's settings against fp32, per scenario.

A trained bundle's test split is scored through ``load_predictor(...).predict_records`` -- the path ``predict``,
``run inferring`` and ``wsi`` take -- in each scenario (dual; H&E only and IHC only, the other stain dropped) with:

* fp32: ``amp`` off, the eager network (the reference);
* default: the bundle's choice for this CPU (bf16 autocast where the CPU has bf16 hardware), eager;
* compiled: the default through ``torch.compile`` with frozen weights (``--compile true``; ``wsi`` on large slides);
* implicit bf16 (with ``--implicit-bf16``): fp32 weights and activations, oneDNN's convolutions and matrix products
  rounding their inputs to bf16 inside the kernel (``bench_deploy_opt.implicit_bf16``);
* openvino (with ``--onnx FOLDER``, the bundle's ``export --format onnx``): ``--runtime openvino``, bf16 where the
  CPU has bf16 hardware.

Printed per scenario and setting: test accuracy, the largest absolute difference of the calibrated probabilities
from fp32, the number of cases whose largest difference is over 0.01, and the share of cases with the same score as
fp32. Issue 21's bar: accuracy within 0.5 points of fp32 and probabilities within 0.01.

Usage::

    python benchmarks/deploy_accuracy.py --bundle_root bundle [--datalist bundle/eval/datalist.json] [--onnx FOLDER] \
        [--implicit-bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
from bench_deploy_opt import implicit_bf16  # sibling script: benchmarks/ is on sys.path

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY
from her2_monai.inference import load_predictor
from her2_monai.inference.onnx_runtime import load_onnx_predictor

SCENARIOS = {"dual": (HE_KEY, IHC_KEY), "he_only": (HE_KEY,), "ihc_only": (IHC_KEY,)}
CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"


def score(predictor, records: list[dict], stains: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (N, K), predicted class (N,))`` of the records with only ``stains`` given."""
    answers = predictor.predict_records([{k: r[k] for k in (*stains, "id")} for r in records])
    probabilities = np.array([a["probabilities"] for a in answers], dtype=np.float64)
    return probabilities, probabilities.argmax(axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", default="bundle")
    parser.add_argument("--datalist", default=None, help="default: BUNDLE_ROOT/eval/datalist.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--implicit-bf16", action="store_true", help="add fp32 with oneDNN implicit bf16 arithmetic")
    parser.add_argument("--onnx", default=None, help="an `export --format onnx` folder of the bundle: adds OpenVINO")
    args = parser.parse_args()
    datalist = Path(args.datalist or Path(args.bundle_root) / "eval" / "datalist.json")
    records = json.loads(datalist.read_text())[args.split]
    labels = np.array([int(r["label"]) for r in records])
    settings = {
        "fp32": load_predictor(args.bundle_root, CONFIG, amp=False),
        "default": load_predictor(args.bundle_root, CONFIG),
        "compiled": load_predictor(args.bundle_root, CONFIG, compile=True),
    }
    if args.implicit_bf16:
        settings["implicit"] = load_predictor(args.bundle_root, CONFIG, amp=False)
    if args.onnx:
        settings["openvino"] = load_onnx_predictor(args.onnx, runtime="openvino")
    print(f"{len(records)} '{args.split}' cases of {datalist}; default amp={settings['default'].amp}")
    print(
        f"{'scenario':<9} {'setting':<9}{'accuracy':>10}{'max |dp| vs fp32':>18}{'> 0.01':>8}{'same score':>12}{'s':>8}"
    )
    failed = False
    for scenario, stains in SCENARIOS.items():
        reference = None
        for name, predictor in settings.items():
            start = time.perf_counter()
            with implicit_bf16() if name == "implicit" else contextlib.nullcontext():
                probabilities, predicted = score(predictor, records, stains)
            seconds = time.perf_counter() - start
            if reference is None:
                reference = (probabilities, predicted)
            per_case = np.abs(probabilities - reference[0]).max(axis=1)
            diff, over = float(per_case.max()), int((per_case > 0.01).sum())
            same = float((predicted == reference[1]).mean())
            accuracy = float((predicted == labels).mean())
            row = f"{scenario:<9} {name:<9}{accuracy:>9.2%}{diff:>18.4f}{over:>8d}{same:>11.1%}{seconds:>8.1f}"
            print(row, flush=True)
            if name == "compiled" and not predictor.network.compile_network:
                print("  compilation failed: the compiled row ran the eager network")
                failed = True
    assert len(CLASS_NAMES) == reference[0].shape[1]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
