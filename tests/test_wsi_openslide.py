"""Whole slides through OpenSlide (the ``wsi`` extra) and through the project's own tiled-TIFF reader: the same pixels
and the same slide call on the real SVS, an OpenSlide-readable pyramidal TIFF written here, and the error that names
the extra when nothing installed reads a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from her2_monai.wsi import SlideOpenError, TilingSettings, open_slide, run_wsi
from her2_monai.wsi import reader as reader_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

openslide = pytest.importorskip("openslide", reason='the wsi extra is not installed (pip install "her2-monai[wsi]")')

SVS_REGIONS = ((0, 0, 256, 256), (1000, 700, 300, 200), (37, 91, 240, 240), (1900, 2700, 320, 260))


@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    path = shared_data / "wsi" / "cmu_small_region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_real_svs_reads_the_same_pixels_through_both_backends(svs: Path) -> None:
    """Pixel-equal: OpenSlide and tifffile (imagecodecs) both decode the Aperio JPEG tiles with libjpeg-turbo."""
    with open_slide(svs, "tifffile") as own, open_slide(svs, "openslide") as other, open_slide(svs) as auto:
        assert auto.backend == "tifffile"  # a TIFF the project's reader decodes stays with it
        assert other.backend == "openslide" and other.dimensions == own.dimensions == (2220, 2967)
        assert other.mpp == pytest.approx(own.mpp) == pytest.approx(0.499)
        # OpenSlide does not count Aperio's thumbnail page as a level; the project's reader keeps it as level 1.
        assert other.level_dimensions[0] == own.level_dimensions[0]
        for x, y, w, h in SVS_REGIONS:
            np.testing.assert_array_equal(other.read_region(x, y, w, h), own.read_region(x, y, w, h))


def test_real_svs_gives_the_same_slide_call_through_both_backends(trained_bundle: Path, svs: Path, tmp_path) -> None:
    config = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"
    settings = TilingSettings(tile_size=256, batch_size=8)
    summaries, tiles = {}, {}
    for backend in ("tifffile", "openslide"):
        out = tmp_path / backend
        summaries[backend] = run_wsi(
            svs, out, bundle=trained_bundle, config_file=config, settings=settings, backend=backend, progress=False
        )
        tiles[backend] = (out / "tiles.csv").read_text()
        assert json.loads((out / "slide.json").read_text())["score"] == summaries[backend]["score"]
    own, other = summaries["tifffile"], summaries["openslide"]
    assert own["tile_counts"] == other["tile_counts"] and own["tissue_tiles"] == other["tissue_tiles"] > 0
    assert (own["score"], own["refer"], own["equivocal"], own["call"]) == (
        other["score"],
        other["refer"],
        other["equivocal"],
        other["call"],
    )
    assert tiles["tifffile"] == tiles["openslide"]  # same tiles, same per-tile answers


def _pyramid(path: Path, image: np.ndarray, compression: str | None) -> Path:
    """A tiled pyramidal TIFF as OpenSlide's generic-TIFF reader wants it: one tiled page per level, halving, the
    reduced levels marked as such (NewSubfileType 1; without it OpenSlide sees level 0 only)."""
    with tifffile.TiffWriter(path) as writer:
        level = image
        for index in range(3):
            kind = {"subfiletype": 1} if index else {}
            writer.write(level, tile=(128, 128), photometric="rgb", compression=compression, **kind)
            level = level[::2, ::2].copy()
    return path


@pytest.mark.parametrize("compression", [None, "jpeg"])
def test_pyramidal_tiff_written_here_reads_the_same_through_openslide(tmp_path: Path, compression) -> None:
    rng = np.random.default_rng(0)
    # Smooth content with noise, so JPEG has something like tissue to compress.
    yy, xx = np.mgrid[0:600, 0:840]
    image = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 90 * np.cos(yy / 23.0), 160 + 0 * xx], axis=-1)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    path = _pyramid(tmp_path / f"pyramid_{compression}.tif", image, compression)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with open_slide(path, "tifffile") as own, open_slide(path, "openslide") as other:
        assert other.level_dimensions == own.level_dimensions == [(840, 600), (420, 300), (210, 150)]
        assert other.level_downsamples == pytest.approx(own.level_downsamples)
        for level, (x, y, w, h) in ((0, (50, 70, 300, 200)), (1, (100, 60, 200, 150)), (2, (0, 0, 210, 150))):
            mine, theirs = own.read_region(x, y, w, h, level), other.read_region(x, y, w, h, level)
            if compression is None:
                np.testing.assert_array_equal(theirs, mine)
                step = 2**level  # (x, y) are level-0 coordinates
                np.testing.assert_array_equal(
                    mine, image[::step, ::step][y // step : y // step + h, x // step :][:, :w]
                )
            else:  # two JPEG decoders: at most a few grey levels apart on a handful of pixels
                assert np.abs(theirs.astype(int) - mine.astype(int)).max() <= 2


def test_auto_falls_back_to_openslide_for_a_tiff_the_own_reader_cannot_decode(tmp_path: Path, monkeypatch) -> None:
    image = np.full((300, 400, 3), 180, np.uint8)
    path = _pyramid(tmp_path / "slide.tif", image, None)

    def cannot(self, path):
        raise SlideOpenError(f"slide '{path}': a codec tifffile lacks")

    monkeypatch.setattr(reader_module.TiffSlide, "__init__", cannot)
    with open_slide(path) as slide:
        assert slide.backend == "openslide" and slide.dimensions == (400, 300)
        assert (slide.read_region(10, 10, 32, 32) == 180).all()


def test_a_format_nothing_installed_reads_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "slide.mrxs"
    fake.write_bytes(b"\x00MIRAX-like index, not an image" * 8)
    # With OpenSlide installed: both reasons, no install hint.
    with pytest.raises(SlideOpenError, match="OpenSlide cannot read it") as err:
        open_slide(fake)
    assert "not a readable image" in str(err.value)
    # Without it (the extra not installed): the message says what to install.
    monkeypatch.setattr(reader_module, "_openslide_available", lambda: False)
    with pytest.raises(SlideOpenError, match=r'pip install "her2-monai\[wsi\]"'):
        open_slide(fake)
    with pytest.raises(SlideOpenError, match=r"OpenSlide is not installed.*her2-monai\[wsi\]"):
        open_slide(fake, backend="openslide")
    tiff = tmp_path / "broken.tif"
    tiff.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(SlideOpenError, match=r"not a readable TIFF.*her2-monai\[wsi\]"):
        open_slide(tiff)
