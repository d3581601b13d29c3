"""Files of a whole-slide run: ``slide.json``, ``tiles.csv``, ``tiles.geojson`` (QuPath) and ``heatmap.png``.

All are written atomically (:mod:`her2_monai.fileio`). Tile coordinates are level-0 pixels, ``(x, y)`` = (column,
row) of the top-left corner, as QuPath and OpenSlide use them, so the GeoJSON overlays the slide when imported into
QuPath (File > Import objects from file, or drag and drop).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from her2_monai.constants import CLASS_NAMES
from her2_monai.data.provenance import DEMO_SOURCE
from her2_monai.fileio import atomic_write, write_json_atomic

__all__ = [
    "SCORE_COLOURS",
    "REFERRED_COLOUR",
    "OUTPUT_FILES",
    "tiles_csv",
    "tiles_geojson",
    "tiles_asap_xml",
    "heatmap_overlay",
    "save_heatmap",
    "write_outputs",
]

#: RGB colour of each HER2 score in the heatmap and the GeoJSON classifications.
SCORE_COLOURS: dict[str, tuple[int, int, int]] = {
    "0": (66, 133, 244),
    "1+": (251, 192, 45),
    "2+": (245, 124, 0),
    "3+": (211, 47, 47),
}
#: Colour of referred tiles.
REFERRED_COLOUR = (140, 140, 140)
#: File names written in the output folder.
OUTPUT_FILES = {"slide": "slide.json", "tiles_csv": "tiles.csv", "geojson": "tiles.geojson", "heatmap": "heatmap.png"}

_CSV_FIELDS = ["tile", "x", "y", "size", "level", "read_size", "tissue", "score", "confidence", "refer"]


def tiles_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The per-tile table as CSV text: geometry, tissue share, score, confidence, refer (+ reasons), probabilities,
    scenario and the selector's stain call."""
    buffer = io.StringIO()
    fields = _CSV_FIELDS + ["refer_reasons"] + [f"p_{name}" for name in CLASS_NAMES]
    fields += ["scenario", "detected_stains", "stain_confidence"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row[k] for k in _CSV_FIELDS}
        out["refer_reasons"] = ";".join(row.get("refer_reasons", []))
        out.update({f"p_{name}": round(p, 6) for name, p in row["probabilities"].items()})
        out["scenario"] = row["scenario"]
        out["detected_stains"] = ";".join(row.get("detected_stains", []))
        confidence = row.get("stain_confidence")
        out["stain_confidence"] = "" if confidence is None else ";".join(f"{c:.4f}" for c in np.ravel(confidence))
        writer.writerow(out)
    return buffer.getvalue()


def tiles_geojson(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of tile squares, one QuPath tile object per scored tile.

    Each feature's ``properties`` has ``objectType: "tile"``, a ``classification`` (``HER2 <score>`` or
    ``Referred``, with its colour) and ``measurements`` (confidence, tissue share and the class probabilities).
    """
    features = []
    for row in rows:
        x, y, size = row["x"], row["y"], row["size"]
        name, colour = ("Referred", REFERRED_COLOUR) if row["refer"] else (f"HER2 {row['score']}", None)
        colour = colour or SCORE_COLOURS[row["score"]]
        measurements = {"confidence": row["confidence"], "tissue": row["tissue"]}
        measurements.update({f"p({k})": round(v, 6) for k, v in row["probabilities"].items()})
        features.append(
            {
                "type": "Feature",
                "id": f"tile-{row['tile']}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": f"HER2 {row['score']}",
                    "classification": {"name": name, "color": list(colour)},
                    "isLocked": True,
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _hex(colour: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02X}" for c in colour)


def tiles_asap_xml(rows: Sequence[dict[str, Any]]) -> str:
    """The tiles as ASAP annotation XML (what MONAI Label's QuPath extension reads from the whole-slide routes): one
    square polygon per tile in the group ``HER2 <score>`` or ``Referred``, coordinates in level-0 pixels."""
    from xml.etree import ElementTree

    root = ElementTree.Element("ASAP_Annotations")
    annotations = ElementTree.SubElement(root, "Annotations")
    groups = {f"HER2 {name}": SCORE_COLOURS[name] for name in CLASS_NAMES} | {"Referred": REFERRED_COLOUR}
    for row in rows:
        group = "Referred" if row["refer"] else f"HER2 {row['score']}"
        attributes = {"Name": f"tile {row['tile']}: HER2 {row['score']} ({row['confidence']:.2f})", "Type": "Polygon"}
        annotation = ElementTree.SubElement(
            annotations, "Annotation", {**attributes, "PartOfGroup": group, "Color": _hex(groups[group])}
        )
        coordinates = ElementTree.SubElement(annotation, "Coordinates")
        x, y, size = row["x"], row["y"], row["size"]
        for order, (px, py) in enumerate(((x, y), (x + size, y), (x + size, y + size), (x, y + size))):
            ElementTree.SubElement(coordinates, "Coordinate", {"Order": str(order), "X": str(px), "Y": str(py)})
    listing = ElementTree.SubElement(root, "AnnotationGroups")
    for name, colour in groups.items():
        group = ElementTree.SubElement(listing, "Group", {"Name": name, "PartOfGroup": "None", "Color": _hex(colour)})
        ElementTree.SubElement(group, "Attributes")
    return ElementTree.tostring(root, encoding="unicode")


def heatmap_overlay(
    shape: tuple[int, int], downsample: float, rows: Sequence[dict[str, Any]], alpha: float = 0.5
) -> np.ndarray:
    """RGBA overlay ``(h, w, 4)`` float in ``[0, 1]``: each tile filled with its score's colour (grey if referred),
    opacity ``alpha`` scaled by the tile's confidence (at least half of ``alpha``), and outlined opaquely so that
    neighbouring tiles and the covered area stay visible."""
    overlay = np.zeros((*shape, 4), np.float32)
    outline = np.zeros(shape, bool)
    height, width = shape
    for row in rows:
        x0, y0 = int(row["x"] / downsample), int(row["y"] / downsample)
        x1 = min(width, max(x0 + 1, int(round((row["x"] + row["size"]) / downsample))))
        y1 = min(height, max(y0 + 1, int(round((row["y"] + row["size"]) / downsample))))
        colour = REFERRED_COLOUR if row["refer"] else SCORE_COLOURS[row["score"]]
        opacity = alpha * (0.5 + 0.5 * float(row["confidence"]))
        overlay[y0:y1, x0:x1] = [*(c / 255.0 for c in colour), opacity]
        outline[y0:y1, x0:x1] = False
        outline[y0:y1, [x0, x1 - 1]] = True
        outline[[y0, y1 - 1], x0:x1] = True
    overlay[outline, 3] = np.maximum(overlay[outline, 3], 0.9)
    return overlay


#: Longest side of the slide picture in ``heatmap.png`` (smaller thumbnails are enlarged to ``HEATMAP_MIN_SIDE``).
HEATMAP_SIDE = 1000
HEATMAP_MIN_SIDE = 480


def _composite(thumbnail: np.ndarray, overlay: np.ndarray, max_side: int, min_side: int = 0) -> np.ndarray:
    """The overlay laid over the thumbnail (``alpha`` blending), shrunk to at most ``max_side`` px (area average) or
    enlarged to ``min_side`` px (nearest neighbour, so tile edges stay sharp).

    Args:
        thumbnail: ``(h, w, 3)`` uint8.
        overlay: ``(h, w, 4)`` float RGBA in ``[0, 1]`` (:func:`heatmap_overlay`).
        max_side: longest side of the result.
        min_side: smallest longest side of the result.

    Returns:
        ``(h', w', 3)`` uint8.
    """
    from PIL import Image

    alpha = overlay[..., 3:]
    blended = thumbnail.astype(np.float32) * (1.0 - alpha) + overlay[..., :3] * (255.0 * alpha)
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    longest = max(picture.size)
    if longest > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.BOX)
    elif longest < min_side:
        factor = min_side / longest
        size = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
        picture = picture.resize(size, Image.Resampling.NEAREST)
    return np.asarray(picture)


def save_heatmap(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    downsample: float,
    rows: Sequence[dict[str, Any]],
    call: dict[str, Any],
    title: str = "",
) -> Path:
    """Draw the tiles' scores over the thumbnail with a legend and the slide-level call, as a PNG.

    Drawn with Pillow alone (a whole-slide run on a small slide spent most of its output time importing and running
    a plotting library for this one picture).

    Returns:
        The written path.
    """
    from PIL import Image, ImageDraw, ImageFont

    height, width = thumbnail.shape[:2]
    overlay = heatmap_overlay((height, width), downsample, rows)
    picture = Image.fromarray(_composite(thumbnail, overlay, HEATMAP_SIDE, HEATMAP_MIN_SIDE))
    font = ImageFont.load_default(size=14)
    verdict = "no call" if call["score"] is None else f"HER2 {call['score']}"
    if call["equivocal"]:
        verdict += " (equivocal)"
    if call["refer"]:
        verdict += " - refer"
    lines = [line for line in (title, f"{verdict}; {call['tiles']} tissue tiles") if line]
    counts = call["counts"]
    legend = [(SCORE_COLOURS[n], f"{n}: {counts[n]}") for n in CLASS_NAMES]
    legend.append((REFERRED_COLOUR, f"referred: {call['referred']}"))
    swatch, gap, margin, line_height = 14, 18, 12, 20
    legend_width = sum(swatch + 6 + font.getlength(text) for _, text in legend) + gap * (len(legend) - 1)
    title_width = max(font.getlength(line) for line in lines)
    canvas_width = int(max(picture.width, legend_width, title_width) + 2 * margin)
    top = margin + line_height * len(lines) + 6
    canvas = Image.new("RGB", (canvas_width, top + picture.height + 2 * line_height + margin), "white")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        x = (canvas_width - font.getlength(line)) / 2
        draw.text((x, margin + index * line_height), line, fill="black", font=font)
    canvas.paste(picture, ((canvas_width - picture.width) // 2, top))
    x, y = (canvas_width - legend_width) / 2, top + picture.height + line_height / 2
    for colour, text in legend:
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(colour), outline="black")
        draw.text((x + swatch + 6, y), text, fill="black", font=font)
        x += swatch + 6 + font.getlength(text) + gap
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_outputs(output_dir: str | os.PathLike, summary: dict[str, Any], result: dict[str, Any]) -> dict[str, Path]:
    """Write the four files of a run.

    Args:
        output_dir: destination folder (created).
        summary: the ``slide.json`` content.
        result: :meth:`~her2_monai.wsi.inference.WholeSlideScorer.score`'s result.

    Returns:
        ``{name: path}`` of the written files (keys of :data:`OUTPUT_FILES`).
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    plan, rows, call = result["plan"], result["rows"], result["call"]
    paths = {key: folder / name for key, name in OUTPUT_FILES.items()}
    text = tiles_csv(rows)
    atomic_write(paths["tiles_csv"], lambda tmp: tmp.write_text(text))
    write_json_atomic(tiles_geojson(rows), paths["geojson"], indent=None)
    title = str(summary.get("slide", ""))
    if (summary.get("provenance") or {}).get("source") == DEMO_SOURCE:  # the picture travels without slide.json
        title += " - DEMO MODEL: not valid for real tissue"
    save_heatmap(paths["heatmap"], plan.thumbnail, plan.downsample, rows, call, title=title)
    write_json_atomic(summary, paths["slide"])
    return paths
