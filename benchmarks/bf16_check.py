"""Numerical check of bf16 autocast against fp32 on a trained bundle's test split, per scenario.

The same trained model (``models/model.pt``) is run over the test split in every scenario (dual, H&E only, IHC only;
the hidden stain synthesised by the frozen CM-GAN) once in fp32 and once under bf16 autocast. Printed per scenario:
the largest and the mean absolute logit difference, the share of cases with the same argmax (the bundle's
acceptance bar: at least 99%) and the test accuracy of both. Run it on a machine with bf16 hardware before relying
on the bf16 default there; on a CPU without it bf16 is emulated (slow) but numerically the same.

Usage::

    python benchmarks/bf16_check.py --bundle_root bundle
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from eval_trust import preprocessing  # a sibling script: benchmarks/ is on sys.path
from monai.data import DataLoader, Dataset

from her2_monai.calibration import collect_scenario_outputs
from her2_monai.data.datalist import load_datalist_split
from her2_monai.networks.factory import build_model, model_image_size
from her2_monai.runtime import execution_settings

AGREEMENT_BAR = 0.99


def compare(fp32: dict, bf16: dict) -> dict[str, dict[str, float]]:
    """Per-scenario logit differences, argmax agreement and both accuracies.

    Args:
        fp32: ``collect_scenario_outputs`` of the fp32 run (``logits``, ``label`` per scenario).
        bf16: the same under bf16 autocast.

    Returns:
        ``{scenario: {"max_abs": ..., "mean_abs": ..., "agreement": ..., "acc_fp32": ..., "acc_bf16": ..., "n": ...}}``.
    """
    table = {}
    for scenario, ref in fp32.items():
        a, b = ref["logits"].astype(np.float64), bf16[scenario]["logits"].astype(np.float64)
        label = ref["label"]
        table[scenario] = {
            "n": int(len(label)),
            "max_abs": float(np.abs(a - b).max()),
            "mean_abs": float(np.abs(a - b).mean()),
            "agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "acc_fp32": float(np.mean(a.argmax(1) == label)),
            "acc_bf16": float(np.mean(b.argmax(1) == label)),
        }
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", default="bundle")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    root = Path(args.bundle_root)
    model_file, datalist = root / "models" / "model.pt", root / "eval" / "datalist.json"
    for path in (model_file, datalist):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; train the bundle first (README command 1)")
    net = build_model(model_file).eval()
    size = model_image_size(model_file, None)
    records = load_datalist_split(datalist, args.split, require_label=True)
    transform = preprocessing(size)  # the evaluation chain of eval_trust.py: load, resize, scale, fill
    loader = DataLoader(Dataset(records, transform), batch_size=args.batch_size, num_workers=0)
    print(f"{model_file}: {len(records)} {args.split} cases at {size} px; {execution_settings('cpu').reason}")
    timings = {}
    outputs = {}
    for name, amp in (("fp32", False), ("bf16", True)):
        start = time.perf_counter()
        outputs[name] = collect_scenario_outputs(net, loader, "cpu", amp=amp)  # CPU autocast is bf16
        timings[name] = time.perf_counter() - start
    table = compare(outputs["fp32"], outputs["bf16"])
    print(f"\n{'scenario':<10}{'n':>5}{'max |dlogit|':>14}{'mean |dlogit|':>15}{'same argmax':>13}{'acc fp32':>10}"
          f"{'acc bf16':>10}")  # fmt: skip
    for scenario, row in table.items():
        print(
            f"{scenario:<10}{row['n']:>5}{row['max_abs']:>14.4f}{row['mean_abs']:>15.4f}{row['agreement']:>12.1%}"
            f"{row['acc_fp32']:>10.1%}{row['acc_bf16']:>10.1%}"
        )
    ratio = timings["bf16"] / timings["fp32"]
    print(f"\nfp32 {timings['fp32']:.1f} s, bf16 {timings['bf16']:.1f} s (bf16 / fp32 time {ratio:.2f})")
    worst = min(row["agreement"] for row in table.values())
    if worst < AGREEMENT_BAR:
        print(f"FAIL: argmax agreement {worst:.1%} is below {AGREEMENT_BAR:.0%}")
        return 1
    print(f"PASS: argmax agreement at least {worst:.1%} in every scenario (bar {AGREEMENT_BAR:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
