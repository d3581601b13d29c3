"""Missing-modality methods side by side on the same demo split, budget and harness: the comparison the literature
asked for.

Variants (each one bundle override of ``train.json``):

=====================  ===============================================================================
variant                override
=====================  ===============================================================================
cmgan                  (the paper: CM-GAN synthesis of the missing stain) -- ``--model her2net``
substitution           ShaSpec feature substitution -- ``--missing_strategy feature_substitution``
simmlm                 SimMLM-style experts with MoFe -- ``--model simmlm``
mora                   MoRA-style low-rank adaptation -- ``--model mora``
specialists            one network per stain -- ``--model specialists``
no_disentangle         ablation: the paper's model without DCO/DAO -- ``--dao_weight 0 --dco_weight 0``
no_attention           ablation: without modality attention -- ``--modality_attention false``
=====================  ===============================================================================

The branch selector and the CM-GAN (stages 0 and 1) are trained once and shared; every variant then trains stage 2
for the same number of epochs in its own process (so its peak memory is its own), is evaluated on the test split in
every scenario by the bundle's ``evaluating`` workflow, and is timed at inference (batch 1, per scenario). The table
is printed as Markdown and every variant is logged to MLflow as one run of the ``comparison`` experiment.

Usage::

    python benchmarks/compare_methods.py                          # default size: about 25 min on 2 CPU cores
    python benchmarks/compare_methods.py --cls_epochs 20 --demo_n_per_class 80 --shared_backbone resnet50 \
        --specific_backbone efficientnet-b0                       # the paper's encoders, several hours
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SCENARIOS = ("dual", "he_only", "ihc_only")

VARIANTS: dict[str, dict] = {
    "cmgan": {},
    "substitution": {"missing_strategy": "feature_substitution"},
    "simmlm": {"model": "simmlm"},
    "mora": {"model": "mora"},
    "specialists": {"model": "specialists"},
    "no_disentangle": {"dao_weight": 0.0, "dco_weight": 0.0},
    "no_attention": {"modality_attention": False},
}


def child(argv: list[str]) -> None:
    """Run one bundle workflow in this process and write its wall time and peak memory as JSON."""
    out, run_id, configs, overrides = argv[0], argv[1], json.loads(argv[2]), json.loads(argv[3])
    from monai.bundle import ConfigWorkflow

    start = time.perf_counter()
    kind = "infer" if run_id == "evaluating" else "train"
    workflow = ConfigWorkflow(config_file=configs, logging_file=False, workflow_type=kind, run_id=run_id, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak}))


def run_stage(run_id: str, overrides: dict, configs: list[str], scratch: Path) -> dict:
    """Run a workflow id in a child process; return its time and peak memory."""
    report = scratch / f"{run_id}-{os.getpid()}-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--child", str(report), run_id, json.dumps(configs), json.dumps(overrides)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{run_id} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(report.read_text())


def latency(model_file: Path, size: int, reps: int = 5) -> dict[str, float]:
    """Median seconds per patch (batch 1) of the trained classifier in each scenario, eval mode, no gradients."""
    from her2_monai.networks.factory import build_model
    from her2_monai.runtime import execution_settings

    settings = execution_settings("cpu")
    net = build_model(model_file)
    memory = torch.channels_last if settings.channels_last else torch.contiguous_format
    net.to(memory_format=memory)
    out = {}
    for scenario, keep in zip(SCENARIOS, ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0))):
        mask = torch.tensor([keep])
        he = (torch.rand(1, 3, size, size) * 2 - 1).contiguous(memory_format=memory) * keep[0]
        ihc = (torch.rand(1, 3, size, size) * 2 - 1).contiguous(memory_format=memory) * keep[1]
        times = []
        with torch.no_grad():
            for _ in range(reps + 1):
                start = time.perf_counter()
                net(he, ihc, mask)
                times.append(time.perf_counter() - start)
        out[scenario] = statistics.median(times[1:])
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, default=Path("/tmp/her2_compare"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    # the demo profile's networks and schedule on 48 training pairs per class (the bundle's demo has 80), so that
    # seven variants fit in 30 minutes on 2 CPU cores
    parser.add_argument("--demo_n_per_class", type=int, default=48)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--gan_epochs", type=int, default=3)
    parser.add_argument("--cls_epochs", type=int, default=8)
    parser.add_argument("--shared_backbone", default="resnet18")
    parser.add_argument("--specific_backbone", default="resnet10")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default: sqlite in --bundle_root)")
    args = parser.parse_args()

    root = args.bundle_root
    shared = root / "shared"
    scratch = root / "reports"
    scratch.mkdir(parents=True, exist_ok=True)
    tracking = args.tracking_uri or f"sqlite:///{(root / 'comparison.db').resolve()}"
    common = {
        "demo_n_per_class": args.demo_n_per_class, "image_size": args.image_size, "gan_epochs": args.gan_epochs,
        "cls_epochs": args.cls_epochs, "shared_backbone": args.shared_backbone,
        "specific_backbone": args.specific_backbone, "demo_cache_dir": str(root / "cache"), "seed": 0,
        "early_stop_patience": 0,  # the same budget for every variant
    }  # fmt: skip
    train_cfg = [str(CONFIGS / "train.json")]
    eval_cfg = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    print(f"shared stages (selector, CM-GAN) into {shared} ...", flush=True)
    for stage in ("train_selector", "train_gan"):
        info = run_stage(stage, {**common, "bundle_root": str(shared), "tracker": "none"}, train_cfg, scratch)
        print(f"  {stage}: {info['seconds']:.0f} s, peak {info['peak_mb']:.0f} MB", flush=True)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("comparison") or client.get_experiment(
        client.create_experiment("comparison")
    )
    rows = []
    for name in args.variants:
        folder = root / name
        (folder / "models").mkdir(parents=True, exist_ok=True)
        for weights in ("selector.pt", "cmgan.pt"):
            shutil.copy2(shared / "models" / weights, folder / "models" / weights)
        overrides = {**common, **VARIANTS[name], "bundle_root": str(folder), "tracker": "none"}
        trained = run_stage("train_classifier", overrides, train_cfg, scratch)
        data = {k: v for k, v in common.items() if k in ("demo_n_per_class", "demo_cache_dir", "seed")}
        run_stage("evaluating", {**data, "bundle_root": str(folder)}, eval_cfg, scratch)
        report = json.loads((folder / "eval" / "metrics.json").read_text())
        from her2_monai.networks.factory import build_model

        net = build_model(folder / "models" / "model.pt")
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
        row = {
            "variant": name,
            "override": " ".join(f"--{k} {v}" for k, v in VARIANTS[name].items()) or "(default)",
            "trainable_M": trainable / 1e6,
            "frozen_M": frozen / 1e6,
            "s_per_epoch": trained["seconds"] / args.cls_epochs,
            "peak_train_mb": trained["peak_mb"],
            "latency_ms": {k: 1000 * v for k, v in latency(folder / "models" / "model.pt", args.image_size).items()},
        }
        for scenario in SCENARIOS:
            r = report["scenarios"][scenario]
            row[f"acc_{scenario}"], row[f"f1_{scenario}"] = r["accuracy"], r["macro_f1"]
        rows.append(row)
        run = client.create_run(experiment.experiment_id, run_name=name, tags={"override": row["override"]})
        for key, value in {**VARIANTS[name], **{k: v for k, v in common.items() if k != "demo_cache_dir"}}.items():
            client.log_param(run.info.run_id, key, value)
        metrics = {k: v for k, v in row.items() if isinstance(v, float)}
        metrics.update({f"latency_ms_{k}": v for k, v in row["latency_ms"].items()})
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        print(f"  {name}: done ({trained['seconds']:.0f} s training)", flush=True)

    print(
        f"\nSame demo split (n_per_class {args.demo_n_per_class}, {args.image_size} px), {args.cls_epochs} classifier "
        f"epochs each, shared backbone {args.shared_backbone}; CPU threads {torch.get_num_threads()}; test accuracy / "
        "macro-F1 per scenario\n"
    )
    print(
        "| variant | override | dual acc / F1 | H&E-only acc / F1 | IHC-only acc / F1 | trainable (M) | frozen (M) "
        "| s/epoch | peak train MB | latency ms dual / H&E / IHC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'acc_{s}']:.1%} / {r[f'f1_{s}']:.2f}" for s in SCENARIOS]
        lat = " / ".join(f"{r['latency_ms'][s]:.0f}" for s in SCENARIOS)
        print(
            f"| {r['variant']} | `{r['override']}` | {' | '.join(cells)} | {r['trainable_M']:.2f} | "
            f"{r['frozen_M']:.2f} | {r['s_per_epoch']:.0f} | {r['peak_train_mb']:.0f} | {lat} |"
        )
    print(f"\nMLflow: mlflow ui --backend-store-uri {tracking} --host 127.0.0.1  (experiment 'comparison')")


if __name__ == "__main__":
    main()
