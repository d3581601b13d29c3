from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from her2_monai.data.image_reader import ImageReadError, probe_image, read_rgb


def test_bci_jpeg_bytes_under_png_name_are_read(shared_data):
    path = shared_data / "bci" / "HE" / "test" / "00118_test_0.png"
    assert path.read_bytes()[:2] == b"\xff\xd8"  # JPEG magic under a .png name
    image = read_rgb(path)
    assert image.shape == (1024, 1024, 3) and image.dtype == np.uint8
    assert probe_image(path) == (1024, 1024)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_non_rgb_modes_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, (16, 20))).astype(np.uint16))
    elif mode == "RGBA":
        pixels = rng.integers(0, 255, (16, 20, 4), dtype=np.uint8)
        pixels[..., 3] = 0  # fully transparent: must composite to white, like empty glass
        image = Image.fromarray(pixels, "RGBA")
    else:
        image = Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "img.png"
    image.save(path)
    rgb = read_rgb(path)
    assert rgb.shape == (16, 20, 3) and rgb.dtype == np.uint8
    if mode == "RGBA":
        assert (rgb == 255).all()
    if mode == "L":
        assert (rgb[..., 0] == rgb[..., 1]).all()


def test_missing_corrupt_and_truncated_files_name_path_and_reason(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_rgb(tmp_path / "absent.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match="not an image file") as err:
        probe_image(garbage)
    assert err.value.path == str(garbage)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for reader in (probe_image, read_rgb):
        with pytest.raises(ImageReadError, match="corrupt or truncated JPEG"):
            reader(truncated)
