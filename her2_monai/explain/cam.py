"""Class activation maps over each input stain: Grad-CAM and Grad-CAM++ (MONAI) and Score-CAM (on MONAI's CAM base).

The classifier encodes each stain separately up to its residual fusion (``encoder.fusion.he`` and
``encoder.fusion.ihc``: shared + specific features of that stain), so a CAM taken at a stain's fusion output says
where in *that* stain's image the evidence for the class lies. The maps are computed on the images the classifier
actually encoded -- for a single-stain case, the synthetic stain made by the CM-GAN -- through :class:`StainLogits`,
which presents the classifier to MONAI's CAM classes as a one-tensor network: ``(B, 2C, H, W)`` (H&E then IHC) to
logits. The feature maps have the network's output stride (32): 2x2 cells at the demo's 64 px, 16x16 at BCI's 512 px.

MONAI has no Score-CAM (Wang et al., CVPR-W 2020, the method of the HER2 explainability work this bundle follows),
so :class:`ScoreCAM` implements it on :class:`monai.visualize.class_activation_maps.CAMBase`: each activation channel,
upsampled and scaled to ``[0, 1]``, masks the stain's image; the class probability of each masked input weighs its
channel. It needs one forward pass per channel, so only the ``max_channels`` most active channels are used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp
from monai.visualize.class_activation_maps import CAMBase
from monai.visualize.visualizer import default_upsampler
from torch import Tensor, nn

from her2_monai.constants import STAINS

__all__ = ["CAM_METHODS", "normalize_maps", "StainLogits", "ScoreCAM", "StainCAM"]

#: CAM methods by name.
CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "scorecam")


def normalize_maps(maps: Tensor, rtol: float = 1e-4) -> Tensor:
    """Scale each map of a ``(B, 1, H, W)`` batch to ``[0, 1]`` (min to 0, max to 1).

    A flat map -- its range below ``rtol`` of its magnitude, e.g. a 1x1 feature map upsampled, whose rounding noise
    would otherwise be stretched into speckles -- becomes zeros: no localised evidence.
    """
    flat = maps.flatten(1).float()
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    spread = high - low
    varies = spread > rtol * torch.maximum(high.abs(), low.abs()).clamp_min(1e-12)
    scaled = (flat - low) / spread.clamp_min(1e-12)
    return torch.where(varies, scaled, torch.zeros_like(scaled)).reshape(maps.shape)


class StainLogits(nn.Module):
    """The classifier as a one-tensor network for CAMs: ``(B, 2C, H, W)`` (H&E then IHC) -> ``(B, K)`` logits.

    Args:
        net: a :class:`~her2_monai.networks.her2net.HER2FlexibleNet`.
        available: ``(2,)`` or ``(B, 2)`` availability of the stains in the input (all ones when the input holds the
            images the classifier encoded, synthetic ones included).
    """

    def __init__(self, net: nn.Module, available: Tensor | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("available", torch.ones(2, dtype=torch.bool) if available is None else available.bool())

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1] // 2
        available = self.available.to(x.device).reshape(-1, 2).expand(x.shape[0], 2)
        all_available = bool(available.all())
        return self.net.forward_available(x[:, :c], x[:, c:], available, all_available=all_available)["logits"]


class ScoreCAM(CAMBase):
    """Score-CAM on MONAI's CAM base (see the module docstring).

    Args:
        nn_module: one-tensor network (e.g. :class:`StainLogits`).
        target_layers: name of the layer whose activations are the candidate maps.
        input_channels: the input channels each mask multiplies (default: all), e.g. ``slice(0, 3)`` for the H&E
            half of a :class:`StainLogits` input.
        max_channels: most active channels used (one forward pass each).
        batch_size: masked inputs per forward pass.
        upsampler: MONAI upsampler factory (default: bilinear to the input size).
        postprocessing: applied to the upsampled map (default: :func:`normalize_maps`).
    """

    def __init__(
        self,
        nn_module: nn.Module,
        target_layers: str,
        input_channels: slice | None = None,
        max_channels: int = 64,
        batch_size: int = 16,
        upsampler: Callable = default_upsampler,
        postprocessing: Callable = normalize_maps,
    ) -> None:
        super().__init__(nn_module, target_layers, upsampler, postprocessing, register_backward=False)
        self.input_channels = input_channels if input_channels is not None else slice(None)
        self.max_channels = int(max_channels)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def compute_map(self, x: Tensor, class_idx: int | None = None, layer_idx: int = -1, **kwargs: Any) -> Tensor:
        logits, acti, _ = self.nn_module(x, **kwargs)
        activations = acti[layer_idx].float()
        b, c, *spatial = activations.shape
        classes = logits.argmax(dim=1) if class_idx is None else torch.full((b,), int(class_idx), device=x.device)
        maps = []
        for i in range(b):
            top = activations[i].flatten(1).mean(dim=1).topk(min(self.max_channels, c)).indices
            chosen = activations[i, top][:, None]  # (K, 1, h, w)
            masks = normalize_maps(F.interpolate(chosen, size=x.shape[2:], mode="bilinear", align_corners=False))
            scores = []
            for start in range(0, len(top), self.batch_size):
                part = masks[start : start + self.batch_size]
                masked = x[i : i + 1].repeat(len(part), 1, 1, 1)
                masked[:, self.input_channels] = masked[:, self.input_channels] * part
                probabilities = self.nn_module.model(masked, **kwargs).float().softmax(dim=1)
                scores.append(probabilities[:, classes[i]])
            weights = torch.cat(scores).softmax(dim=0)
            maps.append(F.relu((weights[:, None, None] * chosen[:, 0]).sum(dim=0, keepdim=True)))
        return torch.stack(maps).reshape(b, 1, *spatial)

    def __call__(self, x: Tensor, class_idx: int | None = None, layer_idx: int = -1, **kwargs: Any) -> Tensor:
        """Upsampled, normalised ``(B, 1, H, W)`` maps for class ``class_idx`` (default: the predicted class)."""
        return self._upsample_and_post_process(self.compute_map(x, class_idx, layer_idx, **kwargs), x)


class StainCAM:
    """Class activation maps of one classifier over each stain, by any of :data:`CAM_METHODS`.

    The classifier is copied (MONAI's hooks stay on the copy, not on a served model) and put in eval mode.

    Args:
        net: a :class:`~her2_monai.networks.her2net.HER2FlexibleNet`.
        methods: CAM methods to offer.
        score_cam_channels: channels used by Score-CAM.

    Raises:
        ValueError: for an unknown method.
    """

    def __init__(self, net: nn.Module, methods: Sequence[str] = CAM_METHODS, score_cam_channels: int = 64) -> None:
        unknown = [m for m in methods if m not in CAM_METHODS]
        if unknown:
            raise ValueError(f"unknown CAM method(s) {unknown}; expected {CAM_METHODS}")
        self.net = copy.deepcopy(net).eval()
        for parameter in self.net.encoder.fusion.parameters():
            parameter.requires_grad_(True)  # the backward hooks of Grad-CAM need gradients at the fusion outputs
        self.module = StainLogits(self.net).eval()  # MONAI's hooks restore this module's mode after each map
        self.layers = [f"net.encoder.fusion.{stain}" for stain in STAINS]
        self.methods = tuple(methods)
        self._cams: dict[str, Any] = {}
        channels = self.net.in_channels
        for method in self.methods:
            if method == "gradcam":
                self._cams[method] = GradCAM(self.module, self.layers, postprocessing=normalize_maps)
            elif method == "gradcampp":
                self._cams[method] = GradCAMpp(self.module, self.layers, postprocessing=normalize_maps)
            else:
                self._cams[method] = [
                    ScoreCAM(
                        self.module,
                        layer,
                        input_channels=slice(i * channels, (i + 1) * channels),
                        max_channels=score_cam_channels,
                    )
                    for i, layer in enumerate(self.layers)
                ]

    @torch.no_grad()
    def encoded_inputs(self, he: Tensor, ihc: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The classifier's view of a batch: the images it encoded (synthetic stains filled in), its logits and
        stain attention.

        Args:
            he: ``(B, C, H, W)`` in ``[-1, 1]``.
            ihc: ``(B, C, H, W)``.
            mask: ``(B, 2)`` availability.

        Returns:
            ``he``, ``ihc`` (encoded images), ``logits`` ``(B, K)``, ``stain_attention`` ``(B, 2)``, ``available``
            ``(B, 2)`` bool (the CAM network's availability: all ones for the CM-GAN path, the mask for feature
            substitution).
        """
        self.module.eval()
        out = self.net(he, ihc, mask)
        substitute = getattr(self.net, "missing_strategy", "cmgan") == "feature_substitution"
        available = (mask > 0.5) if substitute else torch.ones_like(mask, dtype=torch.bool)
        return {
            "he": out["he_input"] if not substitute else he,
            "ihc": out["ihc_input"] if not substitute else ihc,
            "logits": out["logits"].float(),
            "stain_attention": out["stain_attention"].float(),
            "available": available,
        }

    def maps(self, he: Tensor, ihc: Tensor, mask: Tensor, class_idx: int | None = None) -> dict[str, Any]:
        """CAMs of one case for every method and stain.

        Args:
            he: ``(1, C, H, W)`` in ``[-1, 1]``.
            ihc: ``(1, C, H, W)``.
            mask: ``(1, 2)``.
            class_idx: class to explain (default: the predicted one).

        Returns:
            ``{"class_idx", "probabilities" (K,), "stain_attention" (2,), "he", "ihc" (encoded images (C, H, W)),
            "cams": {method: {stain: (H, W) in [0, 1]}}}``.

        Raises:
            ValueError: for a batch of more than one case.
        """
        if he.shape[0] != 1:
            raise ValueError(f"explain one case at a time, got a batch of {he.shape[0]}")
        seen = self.encoded_inputs(he, ihc, mask)
        self.module.available = seen["available"][0]
        cls = int(seen["logits"].argmax(dim=1)[0]) if class_idx is None else int(class_idx)
        x = torch.cat([seen["he"], seen["ihc"]], dim=1).detach()
        cams: dict[str, dict[str, Tensor]] = {}
        for method in self.methods:
            cam = self._cams[method]
            if method == "scorecam":
                cams[method] = {s: cam[i](x, class_idx=cls)[0, 0].cpu() for i, s in enumerate(STAINS)}
            else:
                with torch.enable_grad():
                    cams[method] = {
                        s: cam(x, class_idx=cls, layer_idx=i)[0, 0].detach().cpu() for i, s in enumerate(STAINS)
                    }
        return {
            "class_idx": cls,
            "probabilities": seen["logits"].softmax(dim=1)[0].cpu(),
            "stain_attention": seen["stain_attention"][0].cpu(),
            "he": seen["he"][0].cpu(),
            "ihc": seen["ihc"][0].cpu(),
            "cams": cams,
        }
