"""The evaluation report: trust sections and figures for ``metrics.json``, and the self-contained ``report.html``.

:class:`EvaluationReport` is the ``evaluate#report`` component of ``evaluate.json``. After the evaluator has run, it
adds to each scenario's classification report the calibration (ECE before and after temperature scaling, overall and
per class), referral, out-of-distribution and MC-dropout sections (:mod:`her2_monai.calibration.analysis`), the
stain-attention comparison of real and synthetic stains (:mod:`her2_monai.explain.attention`), draws the figures
(reliability diagrams, coverage-accuracy curves, a CAM gallery of right and wrong cases per class) and writes the
HTML page that embeds them with the confusion matrices and the translation grid.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from her2_monai.calibration.analysis import calibration_section, scenario_trust
from her2_monai.calibration.scorer import TrustScorer
from her2_monai.calibration.uncertainty import dropout_head
from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY, SCENARIOS
from her2_monai.data.provenance import TRAINING_DATA_KEY, model_provenance, provenance_warnings
from her2_monai.explain.attention import attention_summary
from her2_monai.explain.cam import StainCAM
from her2_monai.explain.figures import save_cam_gallery
from her2_monai.fileio import atomic_write
from her2_monai.metrics.figures import save_coverage_curves, save_reliability_diagrams
from her2_monai.networks.her2net import HER2FlexibleNet

__all__ = ["EvaluationReport", "write_html_report"]

logger = logging.getLogger(__name__)

_SCENARIO_NEEDS = {"dual": (HE_KEY, IHC_KEY), "he_only": (HE_KEY,), "ihc_only": (IHC_KEY,)}


class EvaluationReport:
    """Trust analysis and figures of one evaluation run (see the module docstring).

    Args:
        output_dir: folder of the figures.
        collector: the evaluator's :class:`~her2_monai.handlers.probabilities.ScenarioProbabilityCollector` (with
            ``embedding`` and ``stain_attention`` collected).
        network: the evaluated :class:`~her2_monai.networks.her2net.HER2FlexibleNet` (its metadata holds the
            calibration record).
        dataset: the test dataset (preprocessed records, same order as the evaluator saw them), for the CAM gallery.
        records: the test records.
        device: where CAMs are computed.
        mc_dropout_passes: MC-dropout samples (0 = off).
        cam_method: CAM method of the gallery.
        gallery_scenario: scenario whose cases fill the gallery.
        seed: seed of the MC-dropout masks.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        collector: Any,
        network: nn.Module,
        dataset: Any = None,
        records: Sequence[Mapping[str, Any]] = (),
        device: torch.device | str = "cpu",
        mc_dropout_passes: int = 20,
        cam_method: str = "gradcam",
        gallery_scenario: str = "dual",
        seed: int = 0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.collector = collector
        self.network = network
        self.dataset = dataset
        self.records = list(records)
        self.device = torch.device(device)
        self.mc_dropout_passes = int(mc_dropout_passes)
        self.cam_method = cam_method
        self.gallery_scenario = gallery_scenario
        self.seed = int(seed)
        self.scorer = TrustScorer.from_metadata(getattr(network, "metadata", None))
        self.figures: dict[str, Path] = {}
        self.report: dict[str, Any] = {}
        self._scenarios: dict[str, dict[str, Any]] | None = None
        self._sections: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ analysis
    def _collected(self, key: str) -> dict[str, np.ndarray] | None:
        try:
            return self.collector.output(key)
        except KeyError:
            return None

    def scenarios(self) -> dict[str, dict[str, Any]]:
        """Per-scenario reports: the collector's classification report plus the trust sections (computed once)."""
        if self._scenarios is not None:
            return self._scenarios
        reports = self.collector.reports()
        logits, labels = self.collector.logits, self.collector.labels
        embedding = self._collected("embedding")
        # The further inputs the model's OOD score reads (e.g. image statistics), as the evaluator collected them.
        extra = {name: self._collected(name) for name in self.scorer.ood_inputs if name not in ("logits", "embedding")}
        head = dropout_head(self.network)
        for scenario, report in reports.items():
            if not report.get("n"):
                continue
            emb = embedding[scenario] if embedding is not None else None
            ood_inputs = {k: v[scenario] for k, v in extra.items() if v is not None and scenario in v}
            report.update(
                scenario_trust(
                    scenario,
                    logits[scenario],
                    labels[scenario],
                    emb,
                    self.scorer,
                    head,
                    self.mc_dropout_passes,
                    self.seed,
                    ood_inputs,
                )
            )
        attention = self._collected("stain_attention")
        self._sections = {
            "calibration": calibration_section(logits, labels, self.scorer),
            "provenance": self.provenance(),
        }
        if attention is not None:
            self._sections["stain_attention"] = attention_summary(attention)
        self._scenarios = reports
        return reports

    def provenance(self) -> dict[str, Any]:
        """What the evaluated model was trained on: :func:`~her2_monai.data.provenance.model_provenance`, its
        ``warnings`` and the full ``training_data`` record (null for a model file without one)."""
        metadata = getattr(self.network, "metadata", None) or {}
        summary = model_provenance(metadata)
        record = metadata.get(TRAINING_DATA_KEY)
        return {**summary, "warnings": provenance_warnings(summary), "training_data": record}

    def sections(self) -> dict[str, Any]:
        """Top-level report entries besides the scenarios: ``calibration``, ``provenance`` and ``stain_attention``."""
        self.scenarios()
        return dict(self._sections)

    # ------------------------------------------------------------------------------------------------- figures
    def _gallery_cases(self) -> list[dict[str, Any]]:
        scenario = self.gallery_scenario
        if self.dataset is None or not self.records:
            return []
        if not isinstance(self.network, HER2FlexibleNet):  # the maps are taken on HER2FlexibleNet's encoders
            logger.info("CAM gallery skipped: %s has no stain encoders to explain", type(self.network).__name__)
            return []
        probabilities = self.collector.probabilities.get(scenario)
        labels = self.collector.labels.get(scenario)
        if probabilities is None or not len(labels):
            return []
        needed = _SCENARIO_NEEDS[scenario]
        indices = [i for i, r in enumerate(self.records) if all(r.get(k) for k in needed)]
        if len(indices) != len(labels):
            logger.warning(
                "CAM gallery skipped: %d %s cases collected, %d records", len(labels), scenario, len(indices)
            )
            return []
        calibrated = np.log(np.clip(probabilities, 1e-12, None)) / self.scorer.temperature
        calibrated = np.exp(calibrated - calibrated.max(axis=1, keepdims=True))
        calibrated /= calibrated.sum(axis=1, keepdims=True)
        predictions = calibrated.argmax(axis=1)
        chosen = []
        for cls in range(len(CLASS_NAMES)):
            for right in (True, False):
                rows = np.nonzero((labels == cls) & ((predictions == labels) == right))[0]
                if rows.size:  # the most confident case of the kind
                    chosen.append(int(rows[np.argmax(calibrated[rows].max(axis=1))]))
        if not chosen:
            return []
        cam = StainCAM(self.network, (self.cam_method,))
        cases = []
        keep = torch.tensor([1.0 if k in needed else 0.0 for k in (HE_KEY, IHC_KEY)])
        for row in chosen:
            item = self.dataset[indices[row]]
            he = torch.as_tensor(item[HE_KEY]).as_subclass(torch.Tensor)[None].float().to(self.device)
            ihc = torch.as_tensor(item[IHC_KEY]).as_subclass(torch.Tensor)[None].float().to(self.device)
            he, ihc = he * keep[0], ihc * keep[1]
            explanation = cam.maps(he, ihc, keep[None].to(self.device))
            cases.append(
                {
                    "label": int(labels[row]),
                    "pred": int(predictions[row]),
                    "confidence": float(calibrated[row].max()),
                    "scenario": scenario,
                    "stain_attention": explanation["stain_attention"].tolist(),
                    "explanation": explanation,
                }
            )
        return cases

    def draw(self) -> dict[str, Path]:
        """Reliability diagrams, coverage-accuracy curves and the CAM gallery, as PNGs in ``output_dir``.

        Returns:
            ``{name: path}`` of the figures drawn.
        """
        scenarios = {s: r for s, r in self.scenarios().items() if r.get("n")}
        if scenarios:
            self.figures["reliability"] = save_reliability_diagrams(
                scenarios, self.output_dir / "reliability_diagrams.png"
            )
            self.figures["coverage"] = save_coverage_curves(scenarios, self.output_dir / "coverage_accuracy.png")
        cases = self._gallery_cases()
        if cases:
            self.figures["cam_gallery"] = save_cam_gallery(
                self.output_dir / "cam_gallery.png", cases, method=self.cam_method
            )
        return dict(self.figures)

    def keep(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Remember the written ``metrics.json`` content for :meth:`write_html` and the MLflow run.

        Returns:
            The report.
        """
        self.report = dict(report)
        return self.report

    def write_html(
        self,
        path: str | os.PathLike,
        extra_figures: Mapping[str, str | os.PathLike | None] | None = None,
        report: Mapping[str, Any] | None = None,
    ) -> Path:
        """Draw the figures (if not yet drawn) and write ``report.html``.

        Args:
            path: HTML file.
            extra_figures: more PNGs by name (``confusion``, ``translation``); missing files are left out.
            report: the ``metrics.json`` content (default: the one given to :meth:`keep`).

        Returns:
            The HTML path.
        """
        if not self.figures:
            self.draw()
        figures = {**{k: v for k, v in (extra_figures or {}).items() if v}, **self.figures}
        return write_html_report(path, report if report is not None else self.report, figures)


# ---------------------------------------------------------------------------------------------------------- HTML
def _fmt(value: Any, percent: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.1%}" if percent else f"{value:.{digits}f}"
    return html.escape(str(value))


def _threshold(value: Any) -> str:
    if value is None or value != value:
        return "&ndash;"
    return "refer all (target not reachable)" if value > 1.0 else f"{value:.3f}"


def _img(path: str | os.PathLike | None, alt: str) -> str:
    if not path or not Path(path).is_file():
        return f"<p class='missing'>({html.escape(alt)}: not available)</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _scenario_rows(scenarios: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name in SCENARIOS:
        r = scenarios.get(name) or {}
        if not r.get("n"):
            continue
        referral, ood = r.get("referral") or {}, r.get("ood") or {}
        per_class = r.get("ece_per_class") or {}
        rows.append(
            "<tr>"
            f"<td>{name}</td><td>{r['n']}</td><td>{_fmt(r.get('accuracy'), True)}</td>"
            f"<td>{_fmt(r.get('macro_f1'))}</td>"
            f"<td>{_fmt(r.get('auc_0_vs_1plus'))}</td>"
            f"<td>{_fmt(r.get('ece_uncalibrated'))} &rarr; {_fmt(r.get('ece'))}</td>"
            f"<td>{_fmt(per_class.get('1+'))}</td>"
            f"<td>{_threshold(referral.get('threshold'))}</td>"
            f"<td>{_fmt(referral.get('coverage'), True)}</td><td>{_fmt(referral.get('accuracy_kept'), True)}</td>"
            f"<td>{_fmt(ood.get('pass_rate'), True)}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def _per_class_table(scenarios: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name in SCENARIOS:
        r = scenarios.get(name) or {}
        if not r.get("n"):
            continue
        rows = "".join(
            f"<tr><td>{html.escape(c)}</td><td>{_fmt(v.get('precision'))}</td><td>{_fmt(v.get('recall'))}</td>"
            f"<td>{_fmt(v.get('f1'))}</td><td>{_fmt(v.get('auc'))}</td><td>{v.get('support', 0)}</td>"
            f"<td>{_fmt((r.get('ece_per_class_uncalibrated') or {}).get(c))} &rarr; "
            f"{_fmt((r.get('ece_per_class') or {}).get(c))}</td></tr>"
            for c, v in (r.get("per_class") or {}).items()
        )
        parts.append(
            f"<h3>{name}</h3><table><tr><th>HER2</th><th>precision</th><th>recall</th><th>F1</th><th>AUC</th>"
            f"<th>n</th><th>class-wise ECE (raw &rarr; calibrated)</th></tr>{rows}</table>"
        )
    return "\n".join(parts)


def _attention_text(attention: Mapping[str, Any] | None) -> str:
    if not attention:
        return "<p>No stain-attention weights were collected.</p>"
    per = attention.get("per_scenario") or {}
    rows = "".join(
        f"<tr><td>{s}</td><td>{_fmt(v.get('he'))}</td><td>{_fmt(v.get('ihc'))}</td></tr>" for s, v in per.items()
    )
    lines = []
    for stain, key in (("IHC", "ihc_real_vs_synthetic"), ("H&amp;E", "he_real_vs_synthetic")):
        c = attention.get(key) or {}
        if c.get("n_real"):
            verdict = "more" if (c.get("difference") or 0) > 0 else "less"
            lines.append(
                f"<li>{stain}: real {_fmt(c.get('real_mean'), digits=4)} vs synthetic "
                f"{_fmt(c.get('synthetic_mean'), digits=4)} (difference {_fmt(c.get('difference'), digits=4)}; real "
                f"weighted higher in {_fmt(c.get('real_higher_share'), True)} of cases; "
                f"{html.escape(str(c.get('test')))}"
                f" p = {_fmt(c.get('p_value'), digits=3)}): real {stain} gets {verdict} weight.</li>"
            )
    return (
        "<table><tr><th>scenario</th><th>H&amp;E weight</th><th>IHC weight</th></tr>" + rows + "</table>"
        "<p>Mean CBAM channel weight of each stain's channel block. Real against synthetic (the same test cases):</p>"
        "<ul>" + "".join(lines) + "</ul>"
    )


def _provenance_text(provenance: Mapping[str, Any] | None) -> tuple[str, str]:
    """The warning notes (top of the page) and the "Training data" section of the report's ``provenance``."""
    if not provenance:
        return "", "<p>Not recorded in this report.</p>"
    notes = "".join(f"<p class='warning'>{html.escape(str(w))}</p>" for w in provenance.get("warnings") or [])
    record = provenance.get("training_data") or {}
    folder = record.get("dataset_dir") or "(built-in synthetic demo data)"
    lines = (
        f"<p>Source <b>{_fmt(provenance.get('source'))}</b>, dataset {_fmt(provenance.get('dataset'))} (folder "
        f"<code>{_fmt(folder)}</code>), datalist SHA-256 <code>{_fmt(record.get('datalist_sha256'))}</code>.</p>"
    )
    splits = record.get("splits") or {}
    if not splits:
        return notes, lines
    header = "".join(f"<th>{html.escape(c)}</th>" for c in (*CLASS_NAMES, "unlabelled", *SCENARIOS))
    rows = "".join(
        f"<tr><td>{html.escape(str(split))}</td><td>{counts.get('records', 0)}</td>"
        + "".join(f"<td>{v}</td>" for v in (counts.get("classes") or {}).values())
        + "".join(f"<td>{v}</td>" for v in (counts.get("stains") or {}).values())
        + "</tr>"
        for split, counts in splits.items()
    )
    return notes, f"{lines}<table><tr><th>split</th><th>records</th>{header}</tr>{rows}</table>"


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: .4em 0; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: .5em 1em; }
.warning { background: #fde8e8; border-left: 4px solid #c62828; padding: .5em 1em; font-weight: bold; }
.missing { color: #888; font-style: italic; }
"""


def write_html_report(
    path: str | os.PathLike, report: Mapping[str, Any], figures: Mapping[str, str | os.PathLike]
) -> Path:
    """A self-contained HTML page (PNGs embedded as data URIs) of an evaluation report.

    Args:
        path: HTML file.
        report: ``metrics.json`` content.
        figures: PNGs by name: ``confusion``, ``reliability``, ``coverage``, ``cam_gallery``, ``translation``.

    Returns:
        The HTML path.
    """
    scenarios = report.get("scenarios") or {}
    calibration = report.get("calibration") or {}
    translation = report.get("translation") or {}
    uncertainty_rows = "".join(
        f"<tr><td>{s}</td><td>{(r.get('uncertainty') or {}).get('mc_dropout_passes', 0)}</td>"
        f"<td>{_fmt((r.get('uncertainty') or {}).get('predictive_entropy_mean'))}</td>"
        f"<td>{_fmt((r.get('uncertainty') or {}).get('mutual_information_mean'), digits=4)}</td>"
        f"<td>{_fmt((r.get('uncertainty') or {}).get('error_auroc_entropy'))}</td>"
        f"<td>{_fmt((r.get('uncertainty') or {}).get('error_auroc_mutual_information'))}</td>"
        f"<td>{_fmt((r.get('uncertainty') or {}).get('error_auroc_confidence'))}</td></tr>"
        for s, r in scenarios.items()
        if r.get("n")
    )
    translation_text = "<p>Not evaluated (no test pairs with both stains, or no CM-GAN).</p>"
    if translation.get("available"):
        translation_text = (
            f"<p>{html.escape(str(translation.get('convention', '')))}, at "
            f"{translation.get('resolution', ['?'])[0]} px, {translation.get('n_pairs')} test pairs: "
            f"H&amp;E &rarr; IHC PSNR {_fmt(translation['he_to_ihc']['psnr'], digits=2)} dB, SSIM "
            f"{_fmt(translation['he_to_ihc']['ssim'])}; IHC &rarr; H&amp;E PSNR "
            f"{_fmt(translation['ihc_to_he']['psnr'], digits=2)} dB, SSIM {_fmt(translation['ihc_to_he']['ssim'])}.</p>"
        )
    note = f"<p class='note'>{html.escape(calibration['note'])}</p>" if calibration.get("note") else ""
    provenance_notes, provenance_text = _provenance_text(report.get("provenance"))
    validation = calibration.get("validation") or {}
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>HER2 evaluation report</title><style>{_STYLE}</style></head>
<body>
<h1>HER2 scoring: evaluation report</h1>
{provenance_notes}
<p>Model <code>{html.escape(str(report.get("checkpoint", "")))}</code>
(profile {html.escape(str(report.get("profile")))},
{report.get("image_size")} px), test split of <code>{html.escape(str(report.get("datalist", "")))}</code>:
{report.get("n_test")} labelled cases, each evaluated in every scenario (the hidden stain synthesised by the
CM-GAN).</p>
<p class="note">Research use only: not a medical device, not validated for diagnosis or treatment decisions.
A case is referred to a pathologist when its calibrated confidence is below the scenario's threshold, when it is
out of distribution, when a declared stain looks like the other stain, or when it has no stained tissue.</p>
{note}
<h2>Training data</h2>
{provenance_text}
<h2>Summary per scenario</h2>
<table><tr><th>scenario</th><th>n</th><th>accuracy</th><th>macro-F1</th><th>AUC 0 vs 1+</th>
<th>ECE raw &rarr; calibrated</th><th>class-wise ECE 1+</th><th>refer threshold</th><th>coverage</th>
<th>accuracy not referred</th><th>OOD pass rate</th></tr>
{_scenario_rows(scenarios)}</table>
<h2>Confusion matrices</h2>{_img(figures.get("confusion"), "confusion matrices")}
<h2>Calibration</h2>
<p>Temperature {_fmt(calibration.get("temperature"))} (fitted on validation: ECE {_fmt(validation.get("ece_before"))}
&rarr; {_fmt(validation.get("ece_after"))}). Test split, all scenarios: ECE {_fmt(calibration.get("ece_before"))} &rarr;
{_fmt(calibration.get("ece_after"))}; NLL {_fmt(calibration.get("nll_before"))} &rarr;
{_fmt(calibration.get("nll_after"))}.
Targets from the literature: ECE &lt; 5% overall, &lt; 8% for 1+.</p>
{_img(figures.get("reliability"), "reliability diagrams")}
{_per_class_table(scenarios)}
<h2>Referral: coverage and accuracy</h2>
<p>Target accuracy of the cases not referred: {_fmt(calibration.get("refer_target_accuracy"), True)}, thresholds chosen
on validation per scenario and stored with the model.</p>
{_img(figures.get("coverage"), "coverage-accuracy curves")}
<h2>Uncertainty (MC dropout)</h2>
<table><tr><th>scenario</th><th>passes</th><th>mean predictive entropy</th><th>mean mutual information</th>
<th>error AUROC (entropy)</th><th>error AUROC (MI)</th><th>error AUROC (1 - confidence)</th></tr>
{uncertainty_rows}</table>
<h2>Explanations</h2>
<p>Class activation maps over each stain (the fused features of that stain), for the most confident right and wrong
case of each true class; the title gives the stain-attention weight of the stain.</p>
{_img(figures.get("cam_gallery"), "CAM gallery")}
<h3>Stain attention: real versus synthetic</h3>{_attention_text(report.get("stain_attention"))}
<h2>Stain translation (CM-GAN)</h2>{translation_text}
<p>Columns: H&amp;E, synthetic H&amp;E, IHC, synthetic IHC.</p>
{_img(figures.get("translation"), "translation grid")}
</body></html>
"""
    return atomic_write(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
