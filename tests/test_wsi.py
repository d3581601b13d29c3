"""Whole-slide inference: slide reading (tiles only, never a whole level), tissue tiles, the slide-level rule, and
``python -m her2_monai wsi`` on the real SVS and on a large PNG made from real BCI patches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from her2_monai.cli import main
from her2_monai.constants import CLASS_NAMES
from her2_monai.data.image_reader import read_rgb
from her2_monai.data.provenance import DEMO_WARNING
from her2_monai.wsi import SlideOpenError, TilingSettings, open_slide, plan_tiles, run_wsi, slide_call, tissue_mask
from her2_monai.wsi.reader import _block_mean

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUMMARY_KEYS = {
    "slide",
    "score",
    "refer",
    "equivocal",
    "tile_counts",
    "referred_tiles",
    "tissue_tiles",
    "call",
    "tiling",
}


@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    path = shared_data / "wsi" / "cmu_small_region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def bci_mosaic(shared_data: Path, tmp_path_factory) -> tuple[Path, Path, tuple[int, int, int, int]]:
    """A 2304 x 1792 H&E PNG and its IHC twin: a 3 x 2 mosaic of real BCI pairs (512 px each) on white glass with a
    256 px margin; returns (H&E, IHC, tissue box)."""
    names = sorted(p.name for p in (shared_data / "bci" / "HE" / "test").iterdir())[:6]
    folder = tmp_path_factory.mktemp("mosaic")
    paths = []
    for stain in ("HE", "IHC"):
        canvas = np.full((1792, 2304, 3), 243, np.uint8)
        for k, name in enumerate(names):
            patch = Image.fromarray(read_rgb(shared_data / "bci" / stain / "test" / name)).resize((512, 512))
            y, x = 256 + (k // 3) * 512, 256 + (k % 3) * 512
            canvas[y : y + 512, x : x + 512] = np.asarray(patch)
        paths.append(folder / f"mosaic_{stain.lower()}.png")
        Image.fromarray(canvas).save(paths[-1])
    return paths[0], paths[1], (256, 256, 1536, 1024)


def _tiled_tiff(path: Path, image: np.ndarray, tile: int = 64) -> Path:
    """A pyramidal tiled TIFF (levels 1, 1/2) written like slide scanners do (one page per level)."""
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(tile, tile), photometric="rgb")
        writer.write(image[::2, ::2].copy(), tile=(tile, tile), photometric="rgb")
    return path


# ---------------------------------------------------------------------------------------------------------------- rule


def test_slide_call_follows_the_asco_cap_style_rule() -> None:
    # 100 tiles: 85 scored 0, 12 scored 3+ (> 10%), 3 referred 3+ tiles that must not count.
    scores = ["0"] * 85 + ["3+"] * 12 + ["3+"] * 3
    refer = [False] * 97 + [True] * 3
    call = slide_call(scores, refer)
    assert call["score"] == "3+" and call["referred"] == 3 and call["scored"] == 97
    assert call["counts"] == {"0": 85, "1+": 0, "2+": 0, "3+": 12}
    assert call["referred_counts"]["3+"] == 3 and not call["refer"]
    # 8% 3+ and 5% 2+: no score alone passes 10%, but 13% show at least 2+ -> 2+ (equivocal).
    call = slide_call(["0"] * 87 + ["2+"] * 5 + ["3+"] * 8, [False] * 100)
    assert call["score"] == "2+" and call["equivocal"] and call["at_least"]["2+"] == pytest.approx(0.13)
    # Exactly 10% is not "more than 10%".
    assert slide_call(["0"] * 90 + ["1+"] * 10, [False] * 100)["score"] == "0"
    # Everything referred: no call, and the slide is referred with the reasons.
    call = slide_call(["1+"] * 20, [True] * 20)
    assert call["score"] is None and call["refer"] and len(call["refer_reasons"]) == 2
    with pytest.raises(ValueError, match="unknown tile scores"):
        slide_call(["4+"], [False])
    with pytest.raises(ValueError, match="2 scores and 1"):
        slide_call(["0", "0"], [False])


# -------------------------------------------------------------------------------------------------------------- reader


def test_svs_regions_match_tifffile_and_levels_skip_label_and_macro(svs: Path) -> None:
    full = tifffile.imread(svs)  # the small test slide fits in memory; real slides never are read like this
    with open_slide(svs) as slide:
        assert slide.backend == "tifffile" and slide.dimensions == (2220, 2967)
        assert slide.level_count == 2  # baseline + thumbnail; Aperio's label and macro images are not levels
        assert slide.mpp == pytest.approx(0.499)
        for x, y, w, h in ((0, 0, 256, 256), (100, 37, 700, 333), (2000, 2800, 400, 400)):
            region = slide.read_region(x, y, w, h)
            expected = np.full((h, w, 3), 255, np.uint8)
            x1, y1 = min(x + w, 2220), min(y + h, 2967)
            expected[: y1 - y, : x1 - x] = full[y:y1, x:x1]
            np.testing.assert_array_equal(region, expected)
        outside = slide.read_region(-64, -64, 64, 64)
        assert (outside == 255).all()
        with pytest.raises(SlideOpenError, match="no level 5"):
            slide.read_region(0, 0, 8, 8, level=5)


def test_tiled_tiff_is_read_tile_by_tile_never_whole(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    path = _tiled_tiff(tmp_path / "slide.tif", image)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole TIFF level was decoded")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    with open_slide(path) as slide:
        assert slide.level_dimensions == [(420, 300), (210, 150)]
        np.testing.assert_array_equal(slide.read_region(50, 70, 130, 90), image[70:160, 50:180])
        np.testing.assert_array_equal(slide.read_region(100, 60, 40, 30, level=1), image[::2, ::2][30:60, 50:90])
        thumbnail, downsample = slide.thumbnail(105, strip_pixels=2000)  # strips of a few rows at a time
    assert thumbnail.shape == (75, 105, 3) and downsample == pytest.approx(4.0)
    expected = image[::2, ::2].astype(np.float32).reshape(75, 2, 105, 2, 3).mean(axis=(1, 3))
    assert np.abs(thumbnail.astype(np.float32) - expected).max() <= 0.5


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 7])
def test_thumbnail_block_means_round_as_the_float_mean(factor: int) -> None:
    # The thumbnail's integer block sums give the float32 mean rounded half to even, bit for bit (ties included:
    # with factor 2, a block sum of 2 mod 4 is a tie).
    rng = np.random.default_rng(factor)
    pixels = rng.integers(0, 256, (9 * factor + factor - 1, 5 * factor + 1, 3), dtype=np.uint8)
    pixels[:factor, :factor] = [[[0, 1, 255]]]  # whole-block extremes
    height, width = pixels.shape[0] // factor, pixels.shape[1] // factor
    blocks = pixels[: height * factor, : width * factor].astype(np.float32)
    expected = np.round(blocks.reshape(height, factor, width, factor, 3).mean(axis=(1, 3))).astype(np.uint8)
    np.testing.assert_array_equal(_block_mean(pixels, factor), expected)


def test_plain_images_and_bad_files(tmp_path: Path) -> None:
    image = np.full((40, 60, 3), 200, np.uint8)
    Image.fromarray(image).save(tmp_path / "plain.png")
    with open_slide(tmp_path / "plain.png") as slide:
        assert slide.backend == "pil" and slide.dimensions == (60, 40)
    with pytest.raises(SlideOpenError, match="exceeds 1,000 pixels"):
        open_slide(tmp_path / "plain.png", max_plain_pixels=1000)
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideOpenError, match="not a readable image"):
        open_slide(tmp_path / "notes.txt")
    with pytest.raises(SlideOpenError, match="not found"):
        open_slide(tmp_path / "missing.svs")


# -------------------------------------------------------------------------------------------------------------- tissue


def test_tissue_mask_and_tiles_on_the_real_svs(svs: Path) -> None:
    with open_slide(svs) as slide:
        plan = plan_tiles(slide, TilingSettings(tile_size=256, thumbnail_size=1024))
        assert 0.2 < plan.mask.mean() < 0.6  # a strip of skin on glass
        assert 20 <= len(plan.tiles) < plan.grid_tiles
        assert all(t.tissue >= 0.5 and t.size == 256 for t in plan.tiles)
        tissue = [slide.read_region(t.x, t.y, 256, 256).mean() for t in plan.tiles[:5]]
        assert max(tissue) < 225  # tissue tiles are not glass
        # A region: only tiles inside it, on the region's own grid.
        region = plan_tiles(slide, TilingSettings(tile_size=256, thumbnail_size=1024), region=(700, 1000, 900, 800))
        assert region.tiles and all(700 <= t.x and t.x + 256 <= 1600 and 1000 <= t.y <= 1544 for t in region.tiles)
        with pytest.raises(ValueError, match="not inside the slide"):
            plan_tiles(slide, TilingSettings(tile_size=256), region=(2000, 0, 900, 100))
    assert not tissue_mask(np.full((64, 64, 3), 245, np.uint8)).any()


def test_thumbnail_saturation_is_foreground_masks_hsv_threshold_bit_for_bit(svs: Path) -> None:
    # The thumbnail's saturation comes from a (max, min) lookup table instead of a full HSV conversion.
    from monai.transforms import ForegroundMask

    from her2_monai.wsi import tissue as wsi_tissue

    reference = ForegroundMask(threshold=None, hsv_threshold={"S": wsi_tissue._bounded_otsu(0.04, 0.15)})
    with open_slide(svs) as slide:
        images = [slide.thumbnail(2048)[0], slide.thumbnail(300)[0]]
    rng = np.random.default_rng(0)
    images += [rng.integers(0, 256, (97, 131, 3)).astype(np.uint8), np.full((40, 40, 3), 243, np.uint8)]
    images += [np.zeros((40, 40, 3), np.uint8)]
    for image in images:
        expected = np.asarray(reference(np.moveaxis(image, -1, 0)))[0].astype(bool)
        assert np.array_equal(wsi_tissue._saturated(image), expected)


class _OverlapRecorder:
    """A stand-in predictor that records which threads prepare and which predict the tiles, and whether the next
    batch was being prepared while the current one was in the network."""

    def __init__(self, expected_batches: int, batch_size: int = 8) -> None:
        import threading

        self.expected_batches, self.batch_size = expected_batches, batch_size
        self.batches = 0
        self.started: set[int] = set()  # batches whose preparation has begun
        self.prepare_threads: list[str] = []
        self.predict_threads: list[str] = []
        self.overlapped: list[bool] = []
        self._threading = threading

    def prepare(self, records: list[dict]) -> list[dict]:
        self.prepare_threads.append(self._threading.current_thread().name)
        self.started.update(int(r["id"].split("_")[1]) // self.batch_size for r in records)
        return [{"id": r["id"], "pixels": r["he"].shape} for r in records]

    def predict_prepared(self, items: list[dict], batch_size: int | None = None) -> list[dict]:
        index, self.batches = self.batches, self.batches + 1
        self.predict_threads.append(self._threading.current_thread().name)
        deadline = 10.0 if index + 1 < self.expected_batches else 0.0
        while index + 1 not in self.started and deadline > 0:  # wait for the next batch's preparation to begin
            self._threading.Event().wait(0.01)
            deadline -= 0.01
        self.overlapped.append(index + 1 in self.started)
        answer = {"score": "1+", "confidence": 0.9, "refer": False, "refer_reasons": [], "scenario": "he_only"}
        return [{**answer, "probabilities": [0.05, 0.8, 0.1, 0.05]} for _ in items]


def test_tiles_are_read_and_checked_in_the_reader_thread_while_the_network_runs(svs: Path) -> None:
    from her2_monai.wsi import WholeSlideScorer

    settings = TilingSettings(tile_size=256, batch_size=8)
    with open_slide(svs) as slide:
        recorder = _OverlapRecorder(-(-len(plan_tiles(slide, settings).tiles) // settings.batch_size))
        result = WholeSlideScorer(recorder, settings, progress=False).score(slide)
    batches = recorder.batches
    assert batches >= 3 and len(result["rows"]) == len(result["plan"].tiles)
    assert "MainThread" not in recorder.prepare_threads and set(recorder.predict_threads) == {"MainThread"}
    # Every batch but the last was in the network while the next one was being read and checked.
    assert recorder.overlapped == [True] * (batches - 1) + [False]


class _SizeRecorder(_OverlapRecorder):
    """Records the batch sizes the network gets; has a network with a ``compile_network`` switch like HER2Deploy's."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        super().__init__(expected_batches=0)
        self.network = SimpleNamespace(compile_network=False, net=SimpleNamespace(metadata={"image_size": 512}))
        self.sizes: list[tuple[int, bool]] = []

    def predict_prepared(self, items: list[dict], batch_size: int | None = None) -> list[dict]:
        assert batch_size is not None and len(items) <= batch_size  # the scorer sets the network's batch size
        self.sizes.append((len(items), self.network.compile_network))
        return super().predict_prepared(items, batch_size)


@pytest.mark.parametrize("threshold", [10, 1000, None])
def test_large_slides_are_scored_compiled_with_one_batch_shape(svs: Path, threshold: int | None) -> None:
    # compile_min_tiles (wsi --compile auto): a slide of that many tiles switches the network's compilation on, and
    # its last, partial batch is padded to the batch size so that no second graph gets compiled.
    from her2_monai.wsi import WholeSlideScorer

    recorder = _SizeRecorder()
    settings = TilingSettings(tile_size=256, batch_size=8, compile_min_tiles=threshold)
    with open_slide(svs) as slide:
        result = WholeSlideScorer(recorder, settings, progress=False).score(slide)
    tiles = len(result["plan"].tiles)
    assert tiles % 8 and len(result["rows"]) == tiles  # the padding is scored but never reported
    compiled = threshold is not None and tiles >= threshold
    assert recorder.network.compile_network is compiled
    sizes = [size for size, _ in recorder.sizes]
    assert sizes == ([8] * len(sizes) if compiled else [8] * (len(sizes) - 1) + [tiles % 8])
    assert all(flag is compiled for _, flag in recorder.sizes)
    with pytest.raises(ValueError, match="compile_min_tiles"):
        TilingSettings(compile_min_tiles=0)
    # A model with a 4x smaller input needs 16x the tiles: its forward pass is that much cheaper to run eagerly.
    small = _SizeRecorder()
    small.network.net.metadata["image_size"] = 128
    with open_slide(svs) as slide:
        WholeSlideScorer(small, TilingSettings(tile_size=256, batch_size=8, compile_min_tiles=3), progress=False).score(
            slide
        )
    assert small.network.compile_network is (tiles >= 3 * 16)


def test_the_default_batch_size_follows_the_model_input_side(svs: Path) -> None:
    # wsi --batch_size auto (the default): about 512 x 512 model pixels per forward pass, where the paper model ran
    # fastest (docs/performance.md), at most AUTO_BATCH_MAX tiles; a size given is kept whatever the model.
    import torch

    from her2_monai.inference.batching import AUTO_BATCH_MAX, auto_batch_size
    from her2_monai.wsi import WholeSlideScorer

    assert [auto_batch_size(side) for side in (1024, 512, 384, 256, 128, 64)] == [1, 1, 1, 4, 16, 16]
    for bad in (0, -512, 2.5, True):
        with pytest.raises(ValueError, match="model input side must be a positive whole number"):
            auto_batch_size(bad)
    # The rule is the CPU's; a GPU is filled by large batches, so it gets the most.
    assert auto_batch_size(512, torch.device("cpu")) == 1
    assert auto_batch_size(512, "cuda") == auto_batch_size(512, torch.device("cuda", 1)) == AUTO_BATCH_MAX
    assert AUTO_BATCH_MAX == 16 and TilingSettings().batch_size is None
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TilingSettings(batch_size=0)
    seen = {}
    for side, given, device in (
        (512, None, "cpu"),
        (256, None, "cpu"),
        (64, None, "cpu"),
        (512, 8, "cpu"),
        (None, None, "cpu"),
        (512, None, "cuda:0"),
    ):
        recorder = _SizeRecorder()
        recorder.network.net.metadata["image_size"] = side
        recorder.device = torch.device(device)  # the predictor's device (a HER2Predictor has one)
        settings = TilingSettings(tile_size=256, batch_size=given, compile_min_tiles=None)
        with open_slide(svs) as slide:
            result = WholeSlideScorer(recorder, settings, progress=False).score(slide)
        tiles = len(result["plan"].tiles)
        expected = given or (auto_batch_size(side, device) if side else AUTO_BATCH_MAX)
        assert result["batch_size"] == expected and len(result["rows"]) == tiles > 16
        assert [n for n, _ in recorder.sizes] == [expected] * (tiles // expected) + [tiles % expected] * bool(
            tiles % expected
        )
        seen[(side, given, device)] = expected
    assert list(seen.values()) == [1, 4, 16, 8, 16, 16]


def test_heatmap_shows_each_tile_in_its_score_colour(tmp_path: Path) -> None:
    from her2_monai.wsi.outputs import SCORE_COLOURS, save_heatmap

    thumbnail = np.full((100, 150, 3), 255, np.uint8)
    rows = [
        {"x": 0, "y": 0, "size": 400, "refer": False, "score": "3+", "confidence": 1.0},
        {"x": 800, "y": 400, "size": 400, "refer": False, "score": "0", "confidence": 1.0},
    ]
    call = {"score": "3+", "equivocal": False, "refer": False, "tiles": 2, "referred": 0}
    call["counts"] = {"0": 1, "1+": 0, "2+": 0, "3+": 1}
    path = save_heatmap(tmp_path / "heatmap.png", thumbnail, 8.0, rows, call, title="a slide")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert 480 <= max(image.shape[:2]) <= 1200  # a small thumbnail is enlarged to a readable picture

    def pixels_of(score: str) -> int:  # tile fill: the score colour at half opacity over white glass
        blended = 0.5 * 255 + 0.5 * np.array(SCORE_COLOURS[score])
        return int((np.abs(image - blended).max(axis=-1) <= 3).sum())

    assert pixels_of("3+") > 5000 and pixels_of("0") > 5000  # each tile ~ (50 px x 3.2)^2 in the picture
    assert pixels_of("1+") == 0 and pixels_of("2+") == 0  # only in the legend, unblended


# ------------------------------------------------------------------------------------------------------- end to end


def _check_outputs(folder: Path, summary: dict) -> list[dict]:
    assert SUMMARY_KEYS <= set(json.loads((folder / "slide.json").read_text()))
    assert summary["provenance"]["source"] == "demo" and DEMO_WARNING in summary["warnings"]  # the tiny demo model
    assert summary["tissue_tiles"] > 0
    # Every tissue tile is scored (counted or referred) or turned away by the per-image tissue check.
    scored = summary["tissue_tiles"] - summary["no_tissue_tiles"]
    assert 0 <= summary["no_tissue_tiles"] <= summary["tissue_tiles"] // 10
    assert sum(summary["tile_counts"].values()) + summary["referred_tiles"] == scored
    assert summary["score"] in (*CLASS_NAMES, None)
    with open(folder / "tiles.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == scored
    assert all(r["score"] in CLASS_NAMES and 0.0 <= float(r["confidence"]) <= 1.0 for r in rows)
    geo = json.loads((folder / "tiles.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(rows)
    ring = geo["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[2][0] - ring[0][0] == int(rows[0]["size"])
    heatmap = np.asarray(Image.open(folder / "heatmap.png").convert("RGB"))
    assert min(heatmap.shape[:2]) > 200 and heatmap.std() > 20  # a picture, not a blank canvas
    return rows


@pytest.mark.slow
def test_wsi_command_on_the_real_svs(trained_bundle: Path, svs: Path, tmp_path: Path, capsys) -> None:
    config = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"
    args = ["wsi", "--slide", str(svs), "--output", str(tmp_path / "out"), "--bundle", str(trained_bundle)]
    args += ["--config_file", str(config), "--tile_size", "256", "--batch_size", "8", "--progress", "false"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "slide.json").read_text())
    rows = _check_outputs(tmp_path / "out", summary)
    assert summary["tiling"]["tile_um"] == pytest.approx(256 * 0.499, abs=0.01)
    assert summary["timing"]["batch_size"] == 8
    assert all(r["scenario"] == "he_only" for r in rows)  # declared H&E (the default)
    assert "cmu_small_region.svs" in capsys.readouterr().out
    # --batch_size is a whole number of tiles or auto: anything else is refused before the slide is read.
    for bad_size, message in (("0", "at least 1 tile"), ("many", "whole number of tiles"), ("2.5", "whole number")):
        out = tmp_path / f"size_{bad_size}"
        assert main([*args[:4], str(out), *args[5:-6], "--batch_size", bad_size]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    # A file that is not a slide: one line, exit 2, no outputs.
    (tmp_path / "notes.txt").write_text("hello")
    bad = ["wsi", "--slide", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "bad"), "--bundle", "x"]
    assert main([*bad, "--config_file", str(config)]) == 2
    assert not (tmp_path / "bad" / "slide.json").exists()


@pytest.mark.slow
def test_wsi_on_a_large_png_of_real_patches_alone_and_as_a_pair(trained_bundle: Path, bci_mosaic, tmp_path) -> None:
    from her2_monai.inference import load_predictor

    he, ihc, (bx, by, bw, bh) = bci_mosaic
    config = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"
    predictor = load_predictor(trained_bundle, config)
    settings = TilingSettings(tile_size=256, batch_size=8)
    summary = run_wsi(he, tmp_path / "he", predictor=predictor, settings=settings, progress=False)
    rows = _check_outputs(tmp_path / "he", summary)
    # Tissue tiles lie on the mosaic, not on the glass margin, and cover most of it (24 of 24 possible).
    corners = [(int(r["x"]), int(r["y"])) for r in rows]
    assert all(bx <= x and x + 256 <= bx + bw and by <= y and y + 256 <= by + bh for x, y in corners)
    assert summary["tissue_tiles"] >= 20
    # The registered IHC twin: both stains per tile (scenario dual).
    pair = run_wsi(he, tmp_path / "pair", predictor=predictor, ihc_slide=ihc, settings=settings, progress=False)
    assert pair["stain"] == "pair" and pair["tissue_tiles"] == summary["tissue_tiles"]
    pair_rows = _check_outputs(tmp_path / "pair", pair)
    assert {r["scenario"] for r in pair_rows} == {"dual"}
    # Unknown stain: the selector routes each tile; its calls are counted.
    auto = run_wsi(ihc, tmp_path / "auto", predictor=predictor, stain="auto", settings=settings, progress=False)
    # (a tile the input checks refuse, e.g. a quarter of dim BCI glass, gets no score and no stain call)
    assert sum(auto["stain_calls"].values()) == auto["tissue_tiles"] - auto["no_tissue_tiles"] > 0
    # A pair that is not registered to the same frame is refused.
    small = tmp_path / "small.png"
    Image.open(ihc).crop((0, 0, 1000, 1000)).save(small)
    with pytest.raises(ValueError, match="does not match the H&E slide"):
        run_wsi(he, tmp_path / "x", predictor=predictor, ihc_slide=small, settings=settings, progress=False)
