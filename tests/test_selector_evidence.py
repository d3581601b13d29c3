"""The branch selector's physical cue on synthetic stains: eosin says H&E, DAB (or hematoxylin alone) says IHC, pen ink
has no say, and the call is the same in fp32 and bf16 (issue: dense hematoxylin-rich H&E and a green-pen H&E called
IHC)."""

from __future__ import annotations

import math

import pytest
import torch

from her2_monai.data.stain_renders import StainRenderAppearance
from her2_monai.networks.selector import BranchSelector
from her2_monai.stain_features import (
    EVIDENCE_COLUMNS,
    HUE_BINS,
    RUIFROK_HED_VECTORS,
    StainFeatureExtractor,
    evidence_logit,
)
from her2_monai.transforms import LabAppearanceBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_VECTORS = torch.tensor(RUIFROK_HED_VECTORS) / torch.tensor(RUIFROK_HED_VECTORS).norm(dim=1, keepdim=True)

#: Synthetic fields: ``(share of the pixels, (hematoxylin, eosin, DAB) concentrations)``, the rest glass.
HE = [(0.3, (0.7, 0.3, 0.0)), (0.55, (0.05, 0.6, 0.0))]  # purple nuclei, pink stroma, no DAB
IHC = [(0.3, (0.5, 0.0, 0.0)), (0.25, (0.1, 0.0, 0.7)), (0.3, (0.06, 0.0, 0.05))]  # blue nuclei, brown membranes
IHC_0 = [(0.3, (0.5, 0.0, 0.0)), (0.55, (0.06, 0.0, 0.0))]  # HER2 0: counterstain only
DENSE_HE = [(0.8, (0.8, 0.3, 0.0)), (0.15, (0.05, 0.5, 0.0))]  # nuclei everywhere, a little eosin between them
#: Green-blue pen ink (absorbs red most, green least: a hue no stain mixture has), optical density at its densest.
GREEN_INK = (0.9, 0.2, 0.5)


def _field(parts: list[tuple[float, tuple[float, float, float]]], size: int = 64, seed: int = 0) -> torch.Tensor:
    """A ``(1, 3, size, size + 16)`` image in ``[-1, 1]``: random pixels of each stain mix, and a glass strip."""
    draw = torch.rand(size, size, generator=torch.Generator().manual_seed(seed))
    conc = torch.zeros(3, size, size + 16)
    low = 0.0
    for share, mix in parts:
        pick = (draw >= low) & (draw < low + share)
        conc[:, :, :size][:, pick] = torch.tensor(mix)[:, None]
        low += share
    od = torch.einsum("chw,cr->rhw", conc, _VECTORS)
    return torch.exp(-od)[None] * 2 - 1


def _with_ink(image: torch.Tensor, od: tuple[float, float, float], columns: slice) -> torch.Tensor:
    """Pen ink over some columns (ink lies on the coverslip: its optical density adds to the tissue's)."""
    rgb = (image + 1) * 0.5
    ink = torch.zeros_like(rgb)
    ink[..., columns] = torch.tensor(od).view(1, 3, 1, 1)
    return torch.exp(torch.log(rgb.clamp_min(1e-4)) - ink) * 2 - 1


def _evidence(image: torch.Tensor) -> dict[str, float]:
    extractor = StainFeatureExtractor()
    features = extractor.evidence_features(extractor.optical_density(image))
    shares = {name: float(features[0, EVIDENCE_COLUMNS.index(name)]) for name in ("hematoxylin", "eosin", "dab", "ink")}
    return {**shares, "rule": float(evidence_logit(features)[0])}


def _rule_only_selector(weight: float = 2.0) -> BranchSelector:
    """An evidence selector whose learnt head says nothing (zero weights): its call is the physical rule's."""
    selector = BranchSelector(channels=[], stain_features="evidence", evidence_weight=weight)
    torch.nn.init.zeros_(selector.classifier.weight)
    torch.nn.init.zeros_(selector.classifier.bias)
    return selector.eval()


def test_rule_reads_eosin_as_he_and_dab_or_bare_hematoxylin_as_ihc() -> None:
    he, ihc, ihc_0, dense = (_evidence(_field(parts)) for parts in (HE, IHC, IHC_0, DENSE_HE))
    assert he["eosin"] > 0.6 and he["dab"] < 0.01 and he["rule"] < -1.5
    assert ihc["dab"] > 0.4 and ihc["eosin"] < 0.02 and ihc["rule"] > 2.0
    assert ihc_0["hematoxylin"] > 0.95 and ihc_0["rule"] > 1.0
    # A dense, hematoxylin-rich H&E: most chroma is hematoxylin, and the little eosin there is still decides.
    assert dense["hematoxylin"] > 0.5 and dense["rule"] < -0.5
    for shares in (he, ihc, ihc_0, dense):
        assert shares["ink"] < 0.01
        assert shares["hematoxylin"] + shares["eosin"] + shares["dab"] == pytest.approx(1.0, abs=1e-3)


def test_green_ink_on_he_has_no_say() -> None:
    clean = _field(HE)
    inked = _with_ink(clean, GREEN_INK, slice(0, 32))
    before, after = _evidence(clean), _evidence(inked)
    assert after["ink"] > 0.4  # half the tissue is under the pen
    assert after["eosin"] == pytest.approx(before["eosin"], abs=0.1) and after["rule"] < -1.5
    extractor = StainFeatureExtractor()
    od = extractor.optical_density(inked)
    ink_bins = slice(7, 11)  # 210 to 330 degrees: green and blue-green
    assert float(extractor(inked)[0, 14 : 14 + HUE_BINS][ink_bins].sum()) > 0.15  # the plain hue histogram sees ink
    assert float(extractor.evidence_features(od)[0, :HUE_BINS][ink_bins].sum()) < 0.02  # the evidence does not
    selector = _rule_only_selector()
    assert selector.predict_stain(torch.cat([clean, inked])).tolist() == [0, 0]
    # A view that is all ink shows nothing of its stains: the call is damped to "uncertain", not made up.
    covered = _with_ink(clean, GREEN_INK, slice(0, 64))  # all the tissue; the glass strip stays clean
    with torch.no_grad():
        p = selector(covered).softmax(dim=1)[0]
    assert _evidence(covered)["ink"] > 0.9 and float(p.max()) < 0.6


def test_evidence_selector_calls_by_the_rule_and_ignores_autocast() -> None:
    images = torch.cat([_field(parts, seed=k) for k, parts in enumerate((HE, IHC, IHC_0, DENSE_HE))])
    selector = _rule_only_selector()
    with torch.no_grad():
        fp32 = selector(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = selector(images)
    assert fp32.argmax(dim=1).tolist() == [0, 1, 1, 0]
    assert bf16.dtype == torch.float32 and torch.equal(bf16, fp32)  # the selector turns autocast off
    # The logit difference is the rule's log-odds times the weight (damped by the share under ink, here < 1%).
    torch.testing.assert_close(fp32[:, 1] - fp32[:, 0], 2.0 * _all_rules(images), atol=0.02, rtol=0.01)
    # The learnt head trains without the rule: in train mode a silent head gives no call at all.
    with torch.no_grad():
        assert torch.count_nonzero(selector.train()(images)) == 0
    assert not torch.equal(_rule_only_selector(weight=0.0)(images), fp32)


def _all_rules(images: torch.Tensor) -> torch.Tensor:
    extractor = StainFeatureExtractor()
    return evidence_logit(extractor.evidence_features(extractor.optical_density(images)))


def test_evidence_selector_records_traces_and_validates() -> None:
    torch.manual_seed(0)
    selector = BranchSelector(channels=[], stain_features="evidence", evidence_weight=1.5).eval()
    assert selector.architecture["evidence_weight"] == 1.5 and selector.classifier.in_features == 32
    assert "evidence_weight" not in BranchSelector(channels=[], stain_features="hue").architecture
    example = torch.cat([_field(HE), _field(IHC)])
    traced = torch.jit.trace(selector, example)
    other = torch.cat([_field(DENSE_HE, seed=3), _field(IHC_0, seed=4), _with_ink(_field(HE), GREEN_INK, slice(8, 24))])
    torch.testing.assert_close(traced(other), selector(other))
    with pytest.raises(ValueError, match="evidence_weight"):
        BranchSelector(channels=[], stain_features="evidence", evidence_weight=-1.0)
    with pytest.raises(ValueError, match="evidence"):
        BranchSelector(channels=[], stain_features="colour")


def _hue(image: torch.Tensor) -> float:
    extractor = StainFeatureExtractor()
    chroma = torch.einsum("bchw,ck->bkhw", extractor.optical_density(image), extractor.chroma_basis)
    return math.degrees(float(torch.atan2(chroma[:, 1, 8, 8], chroma[:, 0, 8, 8]).mean()))


def test_stain_render_appearance_turns_hematoxylin_and_dab() -> None:
    batch = {"image": ((torch.cat([_field([(1.0, (0.0, 0.0, 0.8))]), _field([(1.0, (0.8, 0.0, 0.0))])]) + 1) * 127.5),
             "label": torch.tensor([1, 1])}  # fmt: skip
    plain, _ = StainRenderAppearance(strength=1e-6)(batch)
    turned, labels = StainRenderAppearance(strength=1e-6, dab_hue=(0.39, 0.4), hematoxylin_hue=(-0.5, -0.49))(batch)
    assert labels.tolist() == [1, 1]
    assert _hue(plain[:1]) == pytest.approx(137.8, abs=1.0) and _hue(turned[:1]) == pytest.approx(160.3, abs=1.5)
    assert _hue(plain[1:]) == pytest.approx(0.0, abs=1.0) and _hue(turned[1:]) == pytest.approx(-28.4, abs=1.5)
    # Without the new turns it is the lab simulation the selector had (same random draws).
    images = torch.rand(4, 3, 16, 16) * 255
    torch.testing.assert_close(
        StainRenderAppearance(seed=3, fade_prob=0.5, eosin_hue=(0.0, 1.0))({"image": images, "label": labels})[0],
        LabAppearanceBatch(seed=3, fade_prob=0.5, eosin_hue=(0.0, 1.0))({"image": images, "label": labels})[0],
    )
    with pytest.raises(ValueError, match="dab_hue"):
        StainRenderAppearance(dab_hue=(0.5, 0.1))
