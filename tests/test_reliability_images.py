"""Fault catalogue, image input (docs/reliability.md): every awkward or hostile file gives RGB pixels or an
``ImageReadError`` naming the file and the reason, never a traceback, a PIL warning or a huge allocation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hostile_files import animated, bomb_png, encoded, exif_rotated_jpeg, png_bytes, tissue, write
from PIL import Image

from her2_monai.cli import main
from her2_monai.data.image_reader import MAX_PIXELS, ImageReadError, probe_image, read_rgb


def _both_refuse(path: Path, match: str) -> None:
    for reader in (probe_image, read_rgb):
        with pytest.raises(ImageReadError, match=match) as err:
            reader(path)
        assert err.value.path == str(path)


def _no_warnings(call, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args)
    assert not [str(w.message) for w in caught]
    return result


# ------------------------------------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_files_are_refused_with_the_format_named(tmp_path, fmt):
    data = encoded(Image.fromarray(tissue(64, 64)), fmt)
    for keep in (len(data) // 3, 2 * len(data) // 3):
        path = write(tmp_path / f"cut_{keep}.png", data[:keep])
        _both_refuse(path, "corrupt or truncated|cannot open|not an image")


def test_corrupt_png_data_is_refused(tmp_path):
    data = bytearray(png_bytes(tissue(32, 32)))
    data[60:80] = bytes(20)  # inside the compressed pixel data
    _both_refuse(write(tmp_path / "corrupt.png", bytes(data)), "corrupt or truncated PNG")


def test_zero_byte_file_is_refused(tmp_path):
    _both_refuse(write(tmp_path / "empty.png", b""), r"empty file \(0 bytes\)")


def test_text_file_named_png_is_refused(tmp_path):
    _both_refuse(write(tmp_path / "notes.png", b"patient notes, not pixels\n" * 20), "not an image file")


def test_unsupported_float_rgb_tiff_is_refused(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "float_rgb.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((8, 8, 3), dtype=np.float32), photometric="rgb")
    _both_refuse(path, "unknown, unsupported or corrupt format")


# ------------------------------------------------------------------------------------------- pixel formats
def test_sixteen_bit_rgb_png_keeps_the_high_byte(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65535, (12, 10, 3), dtype=np.uint16)
    rgb = read_rgb(write(tmp_path / "rgb16.png", png_bytes(pixels, bit_depth=16)))
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 10, 3)
    np.testing.assert_array_equal(rgb, (pixels >> 8).astype(np.uint8))


def test_sixteen_bit_grey_tiff_uses_the_full_range(tmp_path):
    grey = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    rgb = read_rgb(tmp_path / "g16.tif")
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255], [127, 1]])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_float_tiff_with_nan_and_negative_int_tiff_become_valid_bytes(tmp_path):
    values = np.array([[np.nan, 0.5], [1.0, -np.inf]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "f.tif")[..., 0], [[0, 128], [255, 0]])
    signed = np.array([[-30000, 0], [70000, 255]], dtype=np.int32)
    Image.fromarray(signed, mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "i.tif")[..., 0], [[0, 0], [255, 0]])


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_files_become_rgb(tmp_path, fmt):
    path = write(tmp_path / f"cmyk.{fmt.lower()}", encoded(Image.fromarray(tissue()).convert("CMYK"), fmt))
    assert Image.open(path).mode == "CMYK"
    rgb = read_rgb(path)
    assert rgb.shape == (48, 64, 3) and np.abs(rgb.astype(int) - tissue().astype(int)).mean() < 25


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.fromarray(tissue(16, 16)).convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    image.save(tmp_path / "p.png", transparency=image.info["transparency"])
    rgb = read_rgb(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (255, 255, 255)


def test_exif_rotated_jpeg_is_read_upright_and_probed_with_the_same_size(tmp_path):
    pixels = tissue(40, 64)
    path = write(tmp_path / "rotated.jpg", exif_rotated_jpeg(pixels, orientation=6))
    assert Image.open(path).size == (64, 40)  # stored landscape
    rgb = read_rgb(path)
    assert rgb.shape == (64, 40, 3)  # shown portrait: rotated 90 degrees clockwise
    assert probe_image(path) == (40, 64)
    assert np.abs(rgb.astype(int) - np.rot90(pixels, k=-1).astype(int)).mean() < 6


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF"])
def test_animated_and_multi_page_files_give_their_first_frame(tmp_path, fmt):
    first, second = tissue(seed=1), 255 - tissue(seed=2)
    path = write(tmp_path / f"frames.{fmt.lower()}", animated([first, second], fmt))
    assert getattr(Image.open(path), "n_frames", 1) == 2
    rgb = read_rgb(path)
    assert rgb.shape == first.shape
    tolerance = 40 if fmt == "GIF" else 0  # GIF quantises to 256 colours
    assert np.abs(rgb.astype(int) - first.astype(int)).mean() <= tolerance
    assert np.abs(rgb.astype(int) - second.astype(int)).mean() > 60


def test_one_pixel_image_is_read(tmp_path):
    Image.new("RGB", (1, 1), (200, 100, 150)).save(tmp_path / "dot.png")
    assert read_rgb(tmp_path / "dot.png").tolist() == [[[200, 100, 150]]]
    assert probe_image(tmp_path / "dot.png") == (1, 1)


# ------------------------------------------------------------------------------------ decompression bombs
@pytest.mark.parametrize("side", [100_000, 10_000])
def test_bomb_headers_are_refused_before_decoding_without_pil_warnings(tmp_path, side):
    path = write(tmp_path / "bomb.png", bomb_png(side, side))
    assert path.stat().st_size < 100
    for reader in (probe_image, read_rgb):
        with pytest.raises(ImageReadError, match="too many pixels|claims .* pixels"):
            _no_warnings(reader, path)


def test_the_size_limit_is_a_parameter_and_applies_to_the_header(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 2)).save(path)
    with pytest.raises(ImageReadError, match="claims 300x2 pixels; patch readers accept at most 599 pixels"):
        read_rgb(path, max_pixels=599)
    assert read_rgb(path, max_pixels=600).shape == (2, 300, 3)
    assert MAX_PIXELS == 8192 * 8192


def test_predict_on_a_bomb_exits_2_with_one_line(capsys, tmp_path):
    path = write(tmp_path / "bomb.png", bomb_png(100_000, 100_000))
    code = main(["predict", "--image", str(path), "--bundle", str(tmp_path / "no_bundle")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(path) in err and "too many pixels" in err and "Traceback" not in err
