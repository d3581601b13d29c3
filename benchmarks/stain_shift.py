"""Stain-shift benchmark: a model trained on demo lab A, evaluated on labs A, B and C with and without normalisation.

Labs B and C of the demo generator (``her2_monai.data.demo.LAB_PROFILES``) stain and scan differently from lab A
(stain hue, stain strength, background tint, scanner blur, JPEG). The model is trained on lab A without
normalisation (or loaded with ``--bundle``); every test set is then evaluated by the bundle's own ``evaluating``
workflow (``evaluate.json``) with ``--stain_normalization`` set to each method, the references fitted on a few
*other* lab-A patches (the training lab's look, one H&E and one IHC reference per method). IHC is normalised too,
with the DAB amount kept by Macenko/multitarget (``docs/stain_normalisation.md``).

Prints accuracy and macro-F1 per lab, scenario (dual, H&E only, IHC only) and method, with the drop from lab A
(same method), and writes the table as Markdown with ``--markdown``.

Usage::

    python benchmarks/stain_shift.py --bundle /tmp/wsi_bundle                  # a trained demo bundle (lab A)
    python benchmarks/stain_shift.py --train /tmp/shift_bundle --cls-epochs 8 --gan-epochs 2
    python benchmarks/stain_shift.py --train /tmp/shift_macenko --train-normalization macenko   # normalised training
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from her2_monai.data.demo import generate_demo_dataset
from her2_monai.fileio import atomic_write, write_json_atomic
from her2_monai.transforms.stain_normalization import METHODS, StainReference
from her2_monai.transforms.stain_settings import DAB_ALTERING_METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
SCENARIOS = ("dual", "he_only", "ihc_only")


def _workflow(run_id: str, files: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files], logging_file=False, workflow_type="train", run_id=run_id,
        tracker="none", **overrides,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def train(bundle: Path, gan_epochs: int | None, cls_epochs: int | None, stain: dict | None = None) -> None:
    """The bundle's ``training`` on the default demo dataset (lab A), with the ``stain`` normalisation overrides."""
    extra = {k: v for k, v in (("gan_epochs", gan_epochs), ("cls_epochs", cls_epochs)) if v is not None}
    _workflow("training", ["train.json"], bundle_root=str(bundle), **extra, **(stain or {}))


def stain_overrides(method: str, refs: dict[str, dict[str, Path]], dab_safe_only: bool = False) -> dict:
    """Bundle overrides for one method: ``none``, ``recorded`` (what the model file recorded) or a method name.

    With ``dab_safe_only`` IHC is normalised only by the methods that keep the DAB amount (Macenko, multitarget);
    without it both stains are normalised whatever the method (the test-time protocol of the table).
    """
    if method == "none":
        return {"stain_normalization": "none"}
    if method == "recorded":
        return {}  # evaluate.json's null: as recorded in models/model.pt
    stain = {"stain_normalization": method, "stain_reference": str(refs[method]["he"])}
    if not (dab_safe_only and method in DAB_ALTERING_METHODS):
        stain["stain_reference_ihc"] = str(refs[method]["ihc"])
    return stain


def fit_references(folder: Path, image_size: int, seed: int, per_class: int) -> dict[str, dict[str, Path]]:
    """One H&E and one IHC reference per method, fitted on fresh lab-A renders (not the test images)."""
    data = folder / "lab_A_reference"
    generate_demo_dataset(data, n_per_class=per_class, image_size=image_size, lab="A", seed=seed, n_test_per_class=1)
    refs: dict[str, dict[str, Path]] = {}
    for method in METHODS:
        refs[method] = {}
        for stain, sub in (("he", "HE"), ("ihc", "IHC")):
            images = sorted((data / sub / "train").glob("*.png"))
            path = folder / f"{stain}_{method}.json"
            StainReference.fit([str(p) for p in images], method=method, stain=stain).save(path)
            refs[method][stain] = path
    return refs


def evaluate(bundle: Path, dataset: Path, output: Path, method: str, refs: dict[str, dict[str, Path]]) -> dict:
    """Run ``evaluating`` on ``dataset``'s test split with one normalisation method; return ``{scenario: report}``."""
    stain = stain_overrides(method, refs)
    _workflow(
        "evaluating", ["train.json", "evaluate.json"], bundle_root=str(bundle), dataset_dir=str(dataset),
        output_dir=str(output), profile="demo", num_workers=0, val_fraction=0.0, **stain,
    )  # fmt: skip
    return json.loads((output / "metrics.json").read_text())["scenarios"]


def table(results: dict, labs: list[str], methods: list[str]) -> str:
    """Markdown table: one row per (lab, method), accuracy / macro-F1 per scenario with the drop from lab A."""
    header = "| lab | method | " + " | ".join(f"{s} acc | {s} F1" for s in SCENARIOS) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(SCENARIOS))]
    for lab in labs:
        for method in methods:
            cells = []
            for scenario in SCENARIOS:
                report = results[lab][method][scenario]
                base = results[labs[0]][method][scenario]
                for key in ("accuracy", "macro_f1"):
                    value = report[key]
                    drop = "" if lab == labs[0] else f" ({100 * (value - base[key]):+.1f})"
                    cells.append(f"{100 * value:.1f}{drop}")
            lines.append(f"| {lab} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="a bundle folder with models/model.pt trained on demo lab A")
    source.add_argument("--train", type=Path, help="train the demo bundle into this folder first")
    parser.add_argument("--gan-epochs", type=int, help="with --train: gan_epochs (default: train.json's)")
    parser.add_argument("--cls-epochs", type=int, help="with --train: cls_epochs (default: train.json's)")
    parser.add_argument(
        "--train-normalization", choices=list(METHODS),
        help="with --train: train with this method (lab-A references; IHC only by Macenko/multitarget) and evaluate "
        "with what the model recorded ('recorded') and without normalisation ('none')",
    )  # fmt: skip
    parser.add_argument("--labs", nargs="+", default=["A", "B", "C"])
    parser.add_argument("--methods", nargs="+", default=["none", *METHODS])
    parser.add_argument("--n-test", type=int, default=50, help="test pairs per class and lab")
    parser.add_argument("--image-size", type=int, default=128, help="demo render side (the bundle's demo_image_size)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the test renders (training used seed 0)")
    parser.add_argument("--reference-per-class", type=int, default=2, help="lab-A pairs per class for the references")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--json", type=Path, help="also write every metrics report to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bundle = args.bundle or args.train
    if args.train_normalization and args.train is None:
        parser.error("--train-normalization needs --train")
    methods = ["recorded", "none"] if args.train_normalization else args.methods
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        refs = fit_references(work / "references", args.image_size, args.seed + 1, args.reference_per_class)
        if args.train is not None:
            start = time.perf_counter()
            stain = (
                stain_overrides(args.train_normalization, refs, dab_safe_only=True)
                if args.train_normalization
                else None
            )
            train(args.train, args.gan_epochs, args.cls_epochs, stain)
            print(f"trained the demo bundle in {time.perf_counter() - start:.0f} s ({stain or 'no normalisation'})")
        for lab in args.labs:
            dataset = work / f"lab_{lab}"
            generate_demo_dataset(dataset, 1, args.image_size, lab=lab, seed=args.seed, n_test_per_class=args.n_test)
            results[lab] = {}
            for method in methods:
                start = time.perf_counter()
                results[lab][method] = evaluate(bundle, dataset, work / f"eval_{lab}_{method}", method, refs)
                dual = results[lab][method]["dual"]
                print(f"lab {lab} {method:11s} dual acc {100 * dual['accuracy']:.1f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    text = table(results, args.labs, methods)
    note = (
        f"\n\nAccuracy and macro-F1 in %, {args.n_test} test pairs per class and lab (seed {args.seed}); in brackets: "
        f"the change from lab {args.labs[0]} with the same method, in points."
    )
    print("\n" + text + note)
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: tmp.write_text(text + note + "\n"))
    if args.json:
        write_json_atomic(results, args.json)


if __name__ == "__main__":
    main()
