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

__all__ = ["demo_data", "datalist", "predict", "export", "main"]


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
    patches_per_slide: int = 1,
    heterogeneity: float = 0.0,
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
        patches_per_slide: consecutive patches that come from one simulated slide (shared staining, morphology and
            slide-level score; ids s*N ... s*N+N-1 form slide s); writes slides.csv (columns id, slide) too.
        heterogeneity: fraction of a slide's patches rendered with a neighbouring score (labels stay slide-level).
    """
    from her2_monai.data.demo import DemoPairGenerator, generate_demo_dataset, preview_grid

    counts = generate_demo_dataset(
        output, n_per_class, image_size, lab, seed, n_test_per_class, patches_per_slide, heterogeneity
    )
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
    register: bool = False,
    register_dir: str | None = None,
    register_transform: str = "similarity",
    register_keep_flagged: bool = False,
    register_method: str = "itk",
    split_by: str = "",
) -> None:
    """Scan a BCI-layout folder (or side-by-side AB images) into a MONAI datalist JSON.

    With --register, the pairs are first registered (each IHC aligned to its H&E) into a copy of the folder, and the
    datalist points at the registered copy. Pairs whose registration is marked uncertain or failed are set aside
    (under <copy>/flagged/, listed with the reason) and left out of the datalist unless --register_keep_flagged true.
    Nobody looks at each pair here, so the default method is the one whose verdict caught every large error on the
    tune part (itk: 20 of 20, at the cost of flagging good pairs too); the register command's default (ncc) aligns
    better on tune but its verdict caught 5 of 10 (docs/registration.md).

    Args:
        dataset_dir: dataset root holding HE/ and IHC/ (optionally with train/ and test/), and/or AB/.
        output: datalist JSON to write.
        val_fraction: fraction of each class of the training set moved to validation (stratified, seeded).
        seed: seed of the validation draw.
        strict: fail on any problem, unpaired files included (default: skip and list them).
        require_labels: files without a HER2 score in their name are problems (default: kept with label null).
        pairs_dir: where halves of AB images are written (default: beside dataset_dir).
        register: register every IHC to its H&E first (BCI layout: HE/ and IHC/ with the same file names).
        register_dir: where the registered copy goes (default: <dataset_dir>-registered beside it; must be empty).
        register_transform: rigid, similarity or affine.
        register_keep_flagged: keep pairs whose registration is marked uncertain or failed in the datalist.
        register_method: itk (default: the cautious verdict) or ncc (see the register command).
        split_by: how validation is drawn: "" (patch by patch), id_block:N (blocks of N consecutive ids stay
            together, e.g. id_block:8) or csv:PATH (a CSV with columns id and slide).
    """
    from her2_monai.data.datalist import build_datalist, write_datalist
    from her2_monai.utils import as_bool

    if as_bool(register, "--register"):
        from her2_monai.registration import register_folder

        source = Path(dataset_dir).expanduser()
        target = Path(register_dir) if register_dir else source.parent / f"{source.name}-registered"
        keep_flagged = as_bool(register_keep_flagged, "--register_keep_flagged")
        summary = register_folder(
            source,
            target,
            transform=str(register_transform),
            method=str(register_method),
            set_aside_flagged=not keep_flagged,
        )
        q, counts = summary["quality"], summary["counts"]
        quality = ""
        if q["ncc_before"] is not None:
            quality = f"; mean NCC {q['ncc_before']:.3f} -> {q['ncc_after']:.3f}, NMI {q['nmi_before']:.4f} -> "
            quality += f"{q['nmi_after']:.4f}"
        verdicts = ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())
        print(
            f"registered copy written to {target}: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + quality
            + f"; verdicts: {verdicts}"
        )
        for problem in summary["problems"]:
            print(f"  skipped {problem['file']}: {problem['reason']}")
        for pair in summary["flagged"]:
            action = "kept (--register_keep_flagged)" if keep_flagged else "left out, set aside in flagged/"
            print(f"  {pair['verdict']} {pair['file']}: {action}; {'; '.join(pair['reasons'])}")
        if summary["flagged"] and not keep_flagged and not summary["verdicts"]["registered"]:
            raise CommandError(
                f"every registered pair was marked uncertain or failed (set aside in {target / 'flagged'}); check "
                "them and rerun with --register_keep_flagged true to keep them"
            )
        dataset_dir = str(target)
    records, report = build_datalist(dataset_dir, val_fraction, seed, strict, require_labels, pairs_dir, split_by)
    path = write_datalist(records, output)
    print(report.summary(records))
    print(f"datalist written to {path}")


def predict(
    he: str | None = None,
    ihc: str | None = None,
    image: str | None = None,
    bundle: str = "bundle",
    config_file: str | None = None,
    refer_threshold: float | None = None,
    torchscript: str | None = None,
    explain: str | None = None,
    cam: str = "all",
    stain_normalization: str | None = None,
    stain_reference: str | None = None,
    stain_reference_ihc: str | None = None,
    runtime: str = "torch",
    onnx: str | None = None,
    **overrides: Any,
) -> None:
    """Predict the HER2 score of one patch with the trained bundle and print one JSON object.

    Give the H&E and/or the IHC image (declared stains), or one --image of unknown stain (the branch selector decides).
    The output holds score ("0", "1+", "2+", "3+"), probabilities (4 floats, calibrated with the model's temperature),
    confidence (the top probability), refer (true: refer to a pathologist) with refer_reasons (no_tissue,
    insufficient_tissue, pen_ink, wrong_marker, out_of_distribution, stain_mismatch, stain_uncertain,
    low_confidence), ood_score, scenario (dual, he_only, ihc_only),
    detected_stains (the selector's call for each given image), warnings and provenance (what the model was trained
    on: a model trained on the synthetic demo data warns on every answer that its scores are not valid for real
    tissue). An image without stained tissue (blank, background, transparent, greyscale, too small), with too little
    tissue, marked with pen ink, or an IHC of another marker than HER2 gets no score: score null, refer_reasons
    ["no_tissue"], ["insufficient_tissue"], ["pen_ink"] or ["wrong_marker"] (docs/input_checks.md).

    Args:
        he: H&E patch file.
        ihc: HER2-IHC patch file.
        image: one patch of unknown stain (not together with --he/--ihc).
        bundle: bundle folder holding models/model.pt (and configs/inference.json).
        config_file: inference config (default <bundle>/configs/inference.json).
        refer_threshold: confidence below which "refer" is true (default: the threshold stored with the model).
        torchscript: predict with this exported TorchScript file instead of the bundle (see ckpt_export).
        explain: also write a PNG explanation of the call to this path (class activation maps over each stain as
            overlays, and the stain-attention weights).
        cam: maps in the explanation: gradcam, gradcampp, scorecam or all.
        stain_normalization: default: as recorded in the model file; "none" turns it off; macenko, reinhard,
            histogram or multitarget with --stain_reference (H&E) and/or --stain_reference_ihc uses that target.
        stain_reference: H&E target: a .json from `stain-reference`, or an image.
        stain_reference_ihc: IHC target, as --stain_reference (without it IHC images are not normalised).
        runtime: torch (the bundle's model), onnxruntime (the ONNX export of `export --format onnx`, run in fp32
            with the same answers, calibrated probabilities within 1e-3) or openvino (the ONNX export run by OpenVINO,
            `pip install -e ".[openvino]"`, in bf16 on CPUs with bf16 hardware, the fastest CPU path measured, else
            fp32). Neither export runtime gives --explain or MC dropout.
        onnx: the ONNX export folder for --runtime onnxruntime/openvino (default <bundle>/models/onnx).
        overrides: further inference-config values, e.g. --mc_dropout_passes 20 (uncertainty), --profile bci for a
            model trained with --dataset_dir, or --device cpu.
    """
    from her2_monai.inference import TorchScriptPredictor, check_record_files, load_predictor
    from her2_monai.inference.onnx_runtime import check_runtime

    if image is not None and (he is not None or ihc is not None):
        raise CommandError("give either --image (stain unknown) or --he/--ihc (declared stains), not both")
    if image is None and he is None and ihc is None:
        raise CommandError("no input image: give --he FILE and/or --ihc FILE, or --image FILE")
    inputs = {"he": he, "ihc": ihc, "image": image, "explain": explain}
    for name, value in inputs.items():
        if isinstance(value, bool):  # fire turns a flag given without a value into True
            raise CommandError(f"--{name} needs a file path")
    he, ihc, image = (None if v is None else str(v) for v in (he, ihc, image))
    inputs = {"he": he, "ihc": ihc, "image": image}
    check_record_files({k: v for k, v in inputs.items() if v is not None})
    if check_runtime(runtime, onnx):
        if torchscript is not None or explain is not None or config_file is not None:
            raise CommandError(
                f"--runtime {runtime} runs the ONNX export with the inference config inside it: drop --torchscript, "
                "--explain (it takes gradients) and --config_file"
            )
        folder = onnx or str(Path(bundle) / "models" / "onnx")
        _predict_onnx(folder, (he, ihc, image), refer_threshold, overrides, runtime)
        return
    if torchscript is not None:
        if explain is not None:
            raise CommandError("--explain needs the bundle's model (it takes gradients); drop --torchscript")
        device = str(overrides.pop("device", "cpu"))
        if overrides:
            raise CommandError(f"--torchscript takes no config overrides, got {sorted(overrides)}")
        threshold = None if refer_threshold is None else float(refer_threshold)
        predictor = TorchScriptPredictor(torchscript, device=device, refer_threshold=threshold)
        print(json.dumps(predictor.predict(he=he, ihc=ihc, image=image)))
        return
    if explain is not None:
        from her2_monai.explain import CAM_METHODS

        if cam not in (*CAM_METHODS, "all"):
            raise CommandError(f"--cam must be one of {', '.join((*CAM_METHODS, 'all'))}, got '{cam}'")
    if "device" in overrides:
        device = str(overrides["device"])
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):  # it becomes a config expression: names only
            raise CommandError(f"--device must be cpu, cuda, cuda:N or mps, got '{device[:40]}'")
        overrides["device"] = f"$torch.device('{device}')"
    stain = {"stain_normalization": stain_normalization, "stain_reference": stain_reference}
    stain["stain_reference_ihc"] = stain_reference_ihc
    overrides.update({k: str(v) for k, v in stain.items() if v is not None})
    threshold = None if refer_threshold is None else float(refer_threshold)
    predictor = load_predictor(bundle, config_file, refer_threshold=threshold, **overrides)
    result = predictor.predict(he=he, ihc=ihc, image=image)
    print(json.dumps(result))
    if result["score"] is None:
        print(f"warning: no HER2 score: {'; '.join(result['warnings'])}", file=sys.stderr)
    if explain is not None:
        if result["score"] is None:
            reasons = ", ".join(result["refer_reasons"])
            raise CommandError(
                f"no explanation written to {explain}: the input was refused ({reasons}), no stained tissue to explain"
            )
        path = predictor.explain(he=he, ihc=ihc, image=image, output=explain, methods=cam)
        print(f"explanation written to {path}", file=sys.stderr)


def _predict_onnx(
    folder: str, images: tuple, refer_threshold: float | None, overrides: dict[str, Any], runtime: str = "onnxruntime"
) -> None:
    """``predict --runtime onnxruntime|openvino``: the same JSON answer from the ONNX export."""
    from her2_monai.inference.onnx_runtime import load_onnx_predictor

    if str(overrides.pop("device", "cpu")) != "cpu":
        raise CommandError(f"--runtime {runtime} runs on the CPU; drop --device")
    threshold = None if refer_threshold is None else float(refer_threshold)
    try:
        predictor = load_onnx_predictor(folder, refer_threshold=threshold, runtime=runtime, **overrides)
    except ImportError as err:
        raise CommandError(str(err)) from None
    result = predictor.predict(*images)
    print(json.dumps(result))
    if result["score"] is None:
        print(f"warning: no HER2 score: {'; '.join(result['warnings'])}", file=sys.stderr)


def export(
    format: str = "torchscript",  # noqa: A002  (the command-line flag is --format)
    bundle: str = "bundle",
    output: str | None = None,
    config_file: str | None = None,
    meta_file: str | None = None,
    tolerance: float | None = None,
) -> None:
    """Export the trained model for deployment: TorchScript (default) or ONNX.

    TorchScript writes one file, as `python -m monai.bundle ckpt_export network_def ...` does (bundle/docs/README.md).
    ONNX writes a folder of graphs (branch selector, the two CM-GAN generators, classifier; dynamic batch) and
    export.json, the manifest with the calibration, stain-normalisation and provenance records, class names and the
    inference config (docs/deployment.md). Each graph is checked against the eager fp32 model on a sample batch and
    the largest absolute difference is printed; the export fails, writing nothing, above the tolerance. Predict with
    it by `predict --runtime onnxruntime`.

    Args:
        format: torchscript or onnx.
        bundle: bundle folder holding models/model.pt.
        output: destination (default <bundle>/models/model.ts, or the folder <bundle>/models/onnx).
        config_file: inference config stored with the export (default <bundle>/configs/inference.json).
        meta_file: bundle metadata stored with the export (default <bundle>/configs/metadata.json).
        tolerance: ONNX only: the largest accepted absolute difference from eager fp32 (default 1e-3).
    """
    from her2_monai.networks.factory import require_model_file

    root = Path(bundle)
    model = require_model_file(root / "models" / "model.pt")
    config = config_file or str(root / "configs" / "inference.json")
    meta = meta_file or str(root / "configs" / "metadata.json")
    for path in (config, meta):
        if not Path(path).is_file():
            raise CommandError(f"'{path}' not found; pass --config_file / --meta_file")
    if format == "torchscript":
        if tolerance is not None:
            raise CommandError("--tolerance applies to --format onnx only")
        from monai.bundle import ckpt_export

        target = output or str(root / "models" / "model.ts")
        ckpt_export(
            net_id="network_def",
            filepath=target,
            ckpt_file=model,
            meta_file=meta,
            config_file=config,
            bundle_root=bundle,
        )
        print(f"TorchScript written to {target}")
        return
    if format != "onnx":
        raise CommandError(f"--format must be torchscript or onnx, got '{format}'")
    from her2_monai.inference.onnx_export import ONNX_TOLERANCE, OnnxExportError, export_onnx

    target = output or str(root / "models" / "onnx")
    try:
        manifest = export_onnx(model, target, config, meta, ONNX_TOLERANCE if tolerance is None else float(tolerance))
    except (ImportError, OnnxExportError) as err:
        raise CommandError(str(err)) from None
    check = manifest["check"]
    diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in check["max_abs_diff"].items())
    print(f"ONNX Runtime against eager fp32, max abs diff: {diffs} (tolerance {check['tolerance']:g})")
    print(f"ONNX export written to {target}: {', '.join(g['file'] for g in manifest['graphs'].values())}, export.json")


COMMANDS = {"demo-data": demo_data, "datalist": datalist, "predict": predict, "export": export}

from her2_monai.registration.cli import register  # noqa: E402
from her2_monai.stain_cli import stain_reference  # noqa: E402
from her2_monai.wsi.cli import wsi  # noqa: E402

COMMANDS.update({"stain-reference": stain_reference, "register": register, "wsi": wsi})


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors become one line on stderr and exit status 2 (1: a cohort with failed slides)."""
    from her2_monai.data.datalist import DatalistError
    from her2_monai.wsi.cohort import CohortIncompleteError

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
    except CohortIncompleteError as err:  # the table is written; the line says how many slides failed
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, CommandError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except fire.core.FireExit as err:
        return int(err.code or 0)
    return 0
