"""The stain-normalisation setting of the bundle: one method key and a reference per stain in train.json,
evaluate.json and inference.json, recorded in the model file so that evaluation and inference apply the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING, bundle_component

from her2_monai.data.image_reader import read_rgb
from her2_monai.inference import model_stain_references
from her2_monai.inference.records import AssignUnknownStaind
from her2_monai.transforms import NormalizeStaind, StainReference, normalization_record, stain_references
from her2_monai.transforms.stain_normalization import METHODS
from her2_monai.transforms.stain_settings import references_from_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ARCHITECTURE = {k: TINY_TRAINING[k] for k in ("image_size", "shared_backbone", "specific_backbone")}
_ARCHITECTURE.update(gan_ngf=TINY_TRAINING["gan_ngf"], gan_n_blocks=TINY_TRAINING["gan_n_blocks"])


@pytest.fixture(scope="module")
def target(shared_data: Path) -> Path:
    return shared_data / "stain_reference" / "he_target_tiatoolbox.png"


@pytest.fixture(scope="module")
def bci_pair(shared_data: Path) -> dict[str, str]:
    name = "00052_test_3+.png"
    return {
        "he": str(shared_data / "bci" / "HE" / "test" / name),
        "ihc": str(shared_data / "bci" / "IHC" / "test" / name),
    }


def _normalisers(chain) -> list[NormalizeStaind]:
    transforms = chain.transforms if hasattr(chain, "transforms") else chain
    return [t for t in transforms if isinstance(t, NormalizeStaind)]


def test_one_key_selects_the_method_and_each_stain_needs_its_own_target(target: Path, tmp_path: Path) -> None:
    assert stain_references("none") == {"he": None, "ihc": None}
    assert stain_references("") == {"he": None, "ihc": None}
    with pytest.raises(ValueError, match="unknown method 'vahadane'"):
        stain_references("vahadane", target)
    with pytest.raises(ValueError, match="needs a target: --stain_reference"):
        stain_references("macenko")
    for method in METHODS:
        refs = stain_references(method, str(target))
        assert refs["he"].method == method and refs["he"].stain == "he" and refs["ihc"] is None
    # A saved reference file works too; a file of another method is refused, naming both.
    saved = StainReference.fit([str(target)], method="reinhard").save(tmp_path / "he_reinhard.json")
    assert stain_references("reinhard", str(saved))["he"].to_dict() == StainReference.load(saved).to_dict()
    with pytest.raises(ValueError, match="'macenko' was asked for"):
        stain_references("macenko", str(saved))


@pytest.mark.parametrize("method", METHODS)
def test_colour_statistics_methods_on_ihc_are_warned_about(method: str, bci_pair, caplog) -> None:
    with caplog.at_level("WARNING", logger="her2_monai.transforms.stain_settings"):
        refs = stain_references(method, "", bci_pair["ihc"])
    assert refs["ihc"].stain == "ihc" and refs["he"] is None
    warned = [r.getMessage() for r in caplog.records if "DAB amount" in r.getMessage()]
    if method in ("reinhard", "histogram"):  # they rescale the DAB amount, the HER2 signal itself
        assert len(warned) == 1 and f"'{method}' on IHC" in warned[0] and "macenko" in warned[0]
    else:
        assert warned == []


def test_the_record_round_trips_and_overrides_are_explicit(target: Path, shared_data: Path) -> None:
    ihc_target = str(shared_data / "bci" / "IHC" / "test" / "00052_test_3+.png")
    refs = stain_references("macenko", str(target), ihc_target)
    record = normalization_record(refs)
    assert record["method"] == "macenko" and record["ihc"]["stain"] == "ihc"
    assert normalization_record(stain_references("none")) is None
    back = references_from_record(record)
    for stain in ("he", "ihc"):
        assert back[stain].to_dict() == refs[stain].to_dict()
    assert references_from_record(record, "none") == {"he": None, "ihc": None}
    assert references_from_record(None) == {"he": None, "ihc": None}
    assert references_from_record(record, "reinhard", str(target))["he"].method == "reinhard"
    with pytest.raises(ValueError, match="without stain_normalization"):
        references_from_record(record, None, str(target))


def test_train_json_normalises_he_only_unless_given_an_ihc_target(target: Path, bci_pair) -> None:
    assert _normalisers(bundle_component("train.json", "load_stains")) == []
    chain = bundle_component("train.json", "load_stains", stain_normalization="macenko", stain_reference=str(target))
    (normaliser,) = _normalisers(chain)
    assert list(normaliser.keys) == ["he"]
    plain = bundle_component("train.json", "stain_preprocessing")
    normalised = bundle_component(
        "train.json", "stain_preprocessing", stain_normalization="macenko", stain_reference=str(target)
    )
    a, b = plain(dict(bci_pair)), normalised(dict(bci_pair))
    assert not torch.allclose(a["he"], b["he"], atol=0.05)  # H&E moved to the target's stain
    torch.testing.assert_close(a["ihc"], b["ihc"])  # IHC untouched: no IHC target was given


def test_model_file_records_the_reference_and_inference_applies_it(target: Path, bci_pair, tmp_path: Path) -> None:
    network = bundle_component(  # a bundle root of its own: the network's provenance reads <bundle_root>/eval
        "train.json",
        "network_def",
        stain_normalization="reinhard",
        stain_reference=str(target),
        bundle_root=str(tmp_path / "bundle"),
        **_ARCHITECTURE,
    )
    model_file = tmp_path / "model.pt"
    torch.save(network.state_dict(), model_file)
    recorded = model_stain_references(model_file)
    assert recorded["he"].method == "reinhard" and recorded["ihc"] is None
    expected = StainReference.fit([str(target)], method="reinhard").statistics
    np.testing.assert_allclose(recorded["he"].statistics["lab_mean"], expected["lab_mean"])

    # inference.json: null = as recorded; "none" = off.
    chain = bundle_component("inference.json", "preprocessing", model_weights=str(model_file))
    (normaliser,) = _normalisers(chain)
    assert normaliser.normalizer.reference.to_dict() == recorded["he"].to_dict()
    assert _normalisers(bundle_component("inference.json", "preprocessing", model_weights=str(model_file),
                                         stain_normalization="none")) == []  # fmt: skip
    # evaluate.json (merged over train.json): as recorded too, in the test chain and the translation chain.
    for component in ("evaluate#preprocessing", "evaluate#translation_preprocessing"):
        chain = bundle_component(["train.json", "evaluate.json"], component, model_weights=str(model_file))
        assert [list(n.keys) for n in _normalisers(chain)] == [["he"]]

    # A declared H&E is normalised; an image of unknown stain is not (the selector routes it later).
    with_norm = bundle_component("inference.json", "preprocessing", model_weights=str(model_file))
    without = bundle_component(
        "inference.json", "preprocessing", model_weights=str(model_file), stain_normalization="none"
    )
    declared = {"he": bci_pair["he"], "id": "a"}
    assert not torch.allclose(with_norm(dict(declared))["he"], without(dict(declared))["he"], atol=0.05)
    unknown = {"image": bci_pair["he"], "id": "b"}
    torch.testing.assert_close(with_norm(dict(unknown))["he"], without(dict(unknown))["he"])
    assert AssignUnknownStaind()(dict(unknown))["stain_known"] == 0.0


def test_normalised_pixels_move_toward_the_target(target: Path, bci_pair) -> None:
    """The transform the configs insert changes the colour statistics toward the reference (LAB mean, Reinhard)."""
    from skimage.color import rgb2lab

    reference = StainReference.fit([str(target)], method="reinhard")
    image = torch.from_numpy(read_rgb(bci_pair["he"]).transpose(2, 0, 1).copy()).float()
    out = NormalizeStaind(keys="he", reference=reference)({"he": image})["he"]

    def lab_mean(x: torch.Tensor) -> np.ndarray:
        return rgb2lab(x.numpy().transpose(1, 2, 0) / 255.0).reshape(-1, 3).mean(axis=0)

    goal = np.asarray(reference.statistics["lab_mean"])
    assert np.linalg.norm(lab_mean(out) - goal) < 0.2 * np.linalg.norm(lab_mean(image) - goal)
