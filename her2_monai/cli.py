"""``python -m her2_monai <command>``: the project's command line (see the README)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import fire

from her2_monai.constants import CLASS_NAMES

__all__ = ["demo_data", "datalist", "predict", "main"]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def demo_data(
    output: str,
    n_per_class: int = 48,
    image_size: int = 256,
    lab: str = "A",
    seed: int = 0,
    n_test_per_class: int | None = None,
    preview: str | None = None,
) -> None:
    """Write the procedural demo dataset in the BCI layout (HE/{train,test}, IHC/{train,test}).

    Args:
        output: destination folder (must not exist or be empty).
        n_per_class: training pairs per HER2 class.
        image_size: patch side in pixels.
        lab: simulated institution: A (default), B or C (different stain vectors, intensity, blur, JPEG).
        seed: base seed; the dataset is fully determined by the arguments.
        n_test_per_class: test pairs per class (default n_per_class // 4, at least 1).
        preview: also write a PNG contact sheet (one row per class, H&E/IHC pairs) to this path.
    """
    from her2_monai.data.demo import DemoPairGenerator, generate_demo_dataset, preview_grid

    counts = generate_demo_dataset(output, n_per_class, image_size, lab, seed, n_test_per_class)
    parts = [f"{split} " + " ".join(f"{score}:{n}" for score, n in per.items()) for split, per in counts.items()]
    print(f"demo dataset written to {Path(output).resolve()} (lab {lab}, {image_size}px): " + " | ".join(parts))
    if preview:
        from PIL import Image

        Image.fromarray(preview_grid(DemoPairGenerator(image_size, lab), per_class=2, seed=seed)).save(preview)
        print(f"preview written to {preview} (rows: HER2 {', '.join(CLASS_NAMES)}; columns: H&E, IHC, H&E, IHC)")


def datalist(
    dataset_dir: str,
    output: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    require_labels: bool = False,
    pairs_dir: str | None = None,
) -> None:
    """Scan a BCI-layout folder (or side-by-side AB images) into a MONAI datalist JSON.

    Args:
        dataset_dir: dataset root holding HE/ and IHC/ (optionally with train/ and test/), and/or AB/.
        output: datalist JSON to write.
        val_fraction: fraction of each class of the training set moved to validation (stratified, seeded).
        seed: seed of the validation draw.
        strict: fail on any problem, unpaired files included (default: skip and list them).
        require_labels: files without a HER2 score in their name are problems (default: kept with label null).
        pairs_dir: where halves of AB images are written (default: beside dataset_dir).
    """
    from her2_monai.data.datalist import build_datalist, write_datalist

    records, report = build_datalist(dataset_dir, val_fraction, seed, strict, require_labels, pairs_dir)
    path = write_datalist(records, output)
    print(report.summary(records))
    print(f"datalist written to {path}")


def predict(
    he: str | None = None,
    ihc: str | None = None,
    image: str | None = None,
    bundle: str = "bundle",
    config_file: str | None = None,
    refer_threshold: float = 0.5,
    **overrides: Any,
) -> None:
    """Predict the HER2 score of one patch with the trained bundle and print one JSON object.

    Give the H&E and/or the IHC image (declared stains), or one --image of unknown stain (the branch selector decides).
    The output holds score ("0", "1+", "2+", "3+"), probabilities (4 floats), confidence (the top probability), refer
    (confidence below --refer_threshold: refer to a pathologist), scenario (dual, he_only, ihc_only), detected_stains
    (the selector's call for each given image) and warnings (e.g. a declared stain the selector disagrees with).

    Args:
        he: H&E patch file.
        ihc: HER2-IHC patch file.
        image: one patch of unknown stain (not together with --he/--ihc).
        bundle: bundle folder holding models/model.pt and models/selector.pt (and configs/inference.json).
        config_file: inference config (default <bundle>/configs/inference.json).
        refer_threshold: confidence below which "refer" is true.
        overrides: further inference-config values, e.g. --profile bci for a model trained with --dataset_dir, or
            --device cpu.
    """
    from her2_monai.inference import check_record_files, load_predictor

    if image is not None and (he is not None or ihc is not None):
        raise CommandError("give either --image (stain unknown) or --he/--ihc (declared stains), not both")
    if image is None and he is None and ihc is None:
        raise CommandError("no input image: give --he FILE and/or --ihc FILE, or --image FILE")
    inputs = {"he": he, "ihc": ihc, "image": image}
    for name, value in inputs.items():
        if isinstance(value, bool):  # fire turns a flag given without a value into True
            raise CommandError(f"--{name} needs a file path")
    he, ihc, image = (None if v is None else str(v) for v in inputs.values())
    inputs = {"he": he, "ihc": ihc, "image": image}
    check_record_files({k: v for k, v in inputs.items() if v is not None})
    if "device" in overrides:
        device = str(overrides["device"])
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):  # it becomes a config expression: names only
            raise CommandError(f"--device must be cpu, cuda, cuda:N or mps, got '{device[:40]}'")
        overrides["device"] = f"$torch.device('{device}')"
    predictor = load_predictor(bundle, config_file, refer_threshold=float(refer_threshold), **overrides)
    print(json.dumps(predictor.predict(he=he, ihc=ihc, image=image)))


COMMANDS = {"demo-data": demo_data, "datalist": datalist, "predict": predict}

from her2_monai.registration.cli import register  # noqa: E402
from her2_monai.stain_cli import stain_reference  # noqa: E402

COMMANDS.update({"stain-reference": stain_reference, "register": register})


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors become one line on stderr and exit status 2."""
    from her2_monai.data.datalist import DatalistError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv and "--" not in argv:
        # A command that accepts extra flags (predict's config overrides) would otherwise take --help as one of them.
        argv = [a for a in argv if a != "--help"] + ["--", "--help"]
    try:
        fire.Fire(COMMANDS, command=argv, name="python -m her2_monai")
    except DatalistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, CommandError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except fire.core.FireExit as err:
        return int(err.code or 0)
    return 0
