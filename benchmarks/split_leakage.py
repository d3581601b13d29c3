"""How much a patch-level validation split flatters validation accuracy when patches share slides.

BCI's patches come from 51 slides and carry the slide's score; BCI names carry no slide id. The demo dataset can be
made with slides (``patches_per_slide``: consecutive ids share a slide's staining, morphology and slide-level score;
``heterogeneity``: a fraction of a slide's patches look like a neighbouring score), so the effect can be measured:
the same classifier (stage 2 of the bundle, feature substitution for a missing stain so no CM-GAN is needed) is
trained with validation drawn

* patch by patch (the default, ``--split_by ""``),
* by blocks of consecutive ids (``--split_by id_block:N``, here exactly the demo's slides),
* by the slide column of ``slides.csv`` (``--split_by csv:PATH``),

and the best-validation model is scored on its validation split and on the test split (other slides). A split that
leaks shows validation accuracy above test accuracy; a slide-level split should not.

Usage::

    python benchmarks/split_leakage.py --work /tmp/leakage                 # 3 splits x 2 seeds, ~20-60 min on 2 CPUs
    python benchmarks/split_leakage.py --work /tmp/leakage --seeds 0 --epochs 2 --n_per_class 16   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SCENARIOS = {"dual": ("he", "ihc"), "he_only": ("he",), "ihc_only": ("ihc",)}


def _run(config_files: list[str], run_id: str, **overrides) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        run_id=run_id,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _accuracy(bundle: Path, records: list[dict]) -> dict[str, float]:
    from her2_monai.constants import CLASS_NAMES
    from her2_monai.inference import load_predictor

    predictor = load_predictor(bundle, CONFIGS / "inference.json", device="$torch.device('cpu')")
    scores = {}
    for scenario, stains in SCENARIOS.items():
        inputs = [{s: r[s] for s in stains} for r in records]
        answers = predictor.predict_records(inputs)
        hits = [a["score"] == CLASS_NAMES[r["label"]] for a, r in zip(answers, records)]
        scores[scenario] = sum(hits) / len(hits)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="working folder (dataset, runs, results.json)")
    parser.add_argument("--n_per_class", type=int, default=32, help="training patches per class")
    parser.add_argument("--n_test_per_class", type=int, default=16, help="test patches per class (other slides)")
    parser.add_argument("--patches_per_slide", type=int, default=8)
    parser.add_argument("--heterogeneity", type=float, default=0.3)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--val_fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shared_backbone", default="resnet10")
    parser.add_argument("--specific_backbone", default="resnet10")
    args = parser.parse_args(argv)

    from her2_monai.data.datalist import read_datalist_json
    from her2_monai.data.demo import generate_demo_dataset

    work = args.work.resolve()
    dataset = work / "demo"
    if not (dataset / "demo.json").is_file():
        shutil.rmtree(dataset, ignore_errors=True)
        generate_demo_dataset(
            dataset,
            n_per_class=args.n_per_class,
            image_size=args.image_size,
            n_test_per_class=args.n_test_per_class,
            patches_per_slide=args.patches_per_slide,
            heterogeneity=args.heterogeneity,
        )
    common = {
        "dataset_dir": str(dataset),
        "profile": "demo",
        "image_size": args.image_size,
        "missing_strategy": "feature_substitution",
        "shared_backbone": args.shared_backbone,
        "specific_backbone": args.specific_backbone,
        "cls_epochs": args.epochs,
        "val_fraction": args.val_fraction,
        "num_workers": 0,
        "tracker": "none",
    }
    selector = work / "selector"
    if not (selector / "models" / "selector.pt").is_file():  # stage 2 loads one; its quality does not matter here
        _run(["train.json"], "train_selector", **common, bundle_root=str(selector), selector_epochs=1,
             selector_steps_per_epoch=2)  # fmt: skip

    splits = {"patch": "", "id_block": f"id_block:{args.patches_per_slide}", "csv": f"csv:{dataset / 'slides.csv'}"}
    results = []
    load = os.getloadavg()[0]
    for seed in args.seeds:
        for name, split_by in splits.items():
            root = work / "runs" / f"{name}-seed{seed}"
            shutil.rmtree(root, ignore_errors=True)
            (root / "models").mkdir(parents=True)
            shutil.copy(selector / "models" / "selector.pt", root / "models" / "selector.pt")
            start = time.perf_counter()
            _run(["train.json"], "train_classifier", **common, bundle_root=str(root), split_by=split_by, seed=seed)
            datalist = read_datalist_json(root / "eval" / "datalist.json")
            row = {
                "split": name,
                "seed": seed,
                "n_val": len(datalist["validation"]),
                "val": _accuracy(root, datalist["validation"]),
                "test": _accuracy(root, datalist["test"]),
                "train_s": round(time.perf_counter() - start, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    (work / "results.json").write_text(
        json.dumps({"args": vars(args) | {"work": str(work)}, "results": results}, indent=2)
    )

    print(f"\nload average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"{'split':<9} {'scenario':<9} {'val acc':>8} {'test acc':>9} {'val - test':>11}  (mean, seeds {args.seeds})")
    for name in splits:
        rows = [r for r in results if r["split"] == name]
        for scenario in SCENARIOS:
            val = sum(r["val"][scenario] for r in rows) / len(rows)
            test = sum(r["test"][scenario] for r in rows) / len(rows)
            print(f"{name:<9} {scenario:<9} {val:>8.3f} {test:>9.3f} {val - test:>+11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
