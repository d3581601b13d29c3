"""Images a pathologist can look at: CAM overlays per stain, the stain-attention weights, and a gallery of cases."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from her2_monai.constants import CLASS_NAMES, STAINS
from her2_monai.figures import pyplot, save_png
from her2_monai.metrics.translation import to_uint8_images

__all__ = ["to_rgb", "overlay", "save_explanation", "save_cam_gallery"]

_STAIN_NAMES = {"he": "H&E", "ihc": "HER2-IHC"}
_METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM"}


def to_rgb(image: Any) -> np.ndarray:
    """One image of :func:`~her2_monai.metrics.translation.to_uint8_images`.

    Args:
        image: ``(3, H, W)`` in ``[-1, 1]``, tensor or array.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    return to_uint8_images(torch.as_tensor(image)[None])[0]


def overlay(rgb: np.ndarray, cam: Any, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """Blend a ``[0, 1]`` activation map over an RGB image with a colour map.

    Args:
        rgb: ``(H, W, 3)`` uint8.
        cam: ``(H, W)`` in ``[0, 1]``.
        alpha: weight of the map.
        colormap: matplotlib colour map name.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    import matplotlib

    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam, dtype=float)
    heat = matplotlib.colormaps[colormap](np.clip(cam, 0.0, 1.0))[..., :3]
    return np.clip((1 - alpha) * rgb / 255.0 + alpha * heat, 0, 1).__mul__(255).round().astype(np.uint8)


def save_explanation(
    path: str | os.PathLike,
    explanation: Mapping[str, Any],
    synthetic: Mapping[str, bool] | None = None,
    title: str = "",
) -> Path:
    """One case: rows H&E and IHC; columns the image the classifier saw, then one overlay per CAM method; and a bar
    chart of the stain-attention weights.

    Args:
        path: PNG to write.
        explanation: :meth:`~her2_monai.explain.cam.StainCAM.maps` output.
        synthetic: which stains were synthesised by the CM-GAN (labelled in the figure).
        title: figure title (e.g. the call and its confidence).

    Returns:
        The PNG path.
    """
    plt = pyplot()
    synthetic = dict(synthetic or {})
    methods = list(explanation["cams"])
    columns = 1 + len(methods)
    fig = plt.figure(figsize=(2.6 * columns + 2.4, 5.6))
    grid = fig.add_gridspec(2, columns + 1, width_ratios=[1] * columns + [0.8])
    for row, stain in enumerate(STAINS):
        rgb = to_rgb(explanation[stain])
        label = ("synthetic " if synthetic.get(stain) else "") + _STAIN_NAMES[stain]
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(rgb)
        ax.set_title(label + (" (CM-GAN)" if synthetic.get(stain) else ""), fontsize=9)
        ax.axis("off")
        for col, method in enumerate(methods, start=1):
            ax = fig.add_subplot(grid[row, col])
            cam = explanation["cams"][method][stain]
            flat = float(np.asarray(cam).max()) <= 0.0
            ax.imshow(rgb if flat else overlay(rgb, cam))
            ax.set_title(
                f"{_METHOD_NAMES[method]} on {label}" + ("\n(flat map: no localised evidence)" if flat else ""),
                fontsize=9,
            )
            ax.axis("off")
    ax = fig.add_subplot(grid[:, columns])
    weights = [float(w) for w in explanation["stain_attention"]]
    ax.bar([_STAIN_NAMES[s] for s in STAINS], weights, color=["#c06c84", "#8d6e63"])
    ax.set_ylim(0, 1)
    ax.set_title("stain attention\n(mean CBAM channel weight)", fontsize=9)
    for i, w in enumerate(weights):
        ax.text(i, w + 0.02, f"{w:.3f}", ha="center", fontsize=9)
    fig.suptitle(title or f"HER2 {CLASS_NAMES[int(explanation['class_idx'])]}", fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def save_cam_gallery(
    path: str | os.PathLike,
    cases: Sequence[Mapping[str, Any]],
    method: str = "gradcam",
    class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
    """A gallery of right and wrong cases per true class: for each case the H&E and IHC overlays.

    Args:
        path: PNG to write.
        cases: dicts with ``label``, ``pred``, ``confidence``, ``scenario``, ``stain_attention`` (2,) and
            ``explanation`` (:meth:`~her2_monai.explain.cam.StainCAM.maps` output holding ``method``).
        method: the CAM method shown.
        class_names: class names.

    Returns:
        The PNG path.
    """
    plt = pyplot()
    rows = [c for c in range(len(class_names)) if any(case["label"] == c for case in cases)] or [0]
    kinds = (True, False)
    fig, axes = plt.subplots(len(rows), 4, figsize=(10.4, 2.9 * len(rows)), squeeze=False)
    for r, cls in enumerate(rows):
        for k, right in enumerate(kinds):
            chosen = [c for c in cases if c["label"] == cls and (c["pred"] == c["label"]) == right]
            for s, stain in enumerate(STAINS):
                ax = axes[r, 2 * k + s]
                ax.axis("off")
                if not chosen:
                    ax.text(
                        0.5,
                        0.5,
                        f"no {'right' if right else 'wrong'} case\nof true {class_names[cls]}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        transform=ax.transAxes,
                    )
                    continue
                case = chosen[0]
                explanation = case["explanation"]
                rgb = to_rgb(explanation[stain])
                cam = explanation["cams"][method][stain]
                flat = float(np.asarray(cam).max()) <= 0.0
                ax.imshow(rgb if flat else overlay(rgb, cam))
                mark = ("right" if right else "WRONG") + (" (flat map)" if flat else "")
                weight = float(case["stain_attention"][s])
                ax.set_title(
                    f"true {class_names[cls]}, called {class_names[case['pred']]} ({case['confidence']:.2f}) {mark}\n"
                    f"{case['scenario']}: {_STAIN_NAMES[stain]}, attention {weight:.3f}",
                    fontsize=7.5,
                    color="black" if right else "#b00020",
                )
    fig.suptitle(f"{_METHOD_NAMES[method]} over each stain: a right and a wrong case per true HER2 score", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
