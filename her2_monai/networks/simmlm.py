"""SimMLM-style dynamic mixture of modality experts (DMoME) for H&E / IHC with a missing stain.

After SimMLM (Li, Chen & Han, ICCV 2025): each stain has its own *expert* (a feature trunk and a classifier head), a
*gating network* looks at the available inputs and weighs the experts, and the final prediction is the weighted
mixture of the expert logits. Missing experts get weight exactly zero (a masked softmax), so the same network serves
dual, H&E-only and IHC-only cases without imputing the missing image. Trained with the class-weighted CE on the
mixture plus the MoFe ranking loss (:class:`her2_monai.losses.mofe.MoFeLoss`, weight 0.1), which asks the dual
prediction to be at least as good as either single-stain prediction.

This module also holds :class:`ResNetTrunk`, the MONAI ResNet feature extractor (with optional local pretrained
weights) used by the alternative missing-modality models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from her2_monai.constants import NUM_CLASSES, STAINS
from her2_monai.losses.mofe import MoFeLoss
from her2_monai.networks.selector import check_stain_inputs

__all__ = ["RESNET_ARCHS", "ResNetTrunk", "ModalityExpert", "masked_softmax", "mixture_logits", "SimMLMNet"]

#: MONAI ResNet variants: name -> (block type, blocks per stage).
RESNET_ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet10": (ResNetBlock, (1, 1, 1, 1)),
    "resnet18": (ResNetBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
    "resnet101": (ResNetBottleneck, (3, 4, 23, 3)),
}


class ResNetTrunk(nn.Module):
    """A 2D MONAI ResNet without its classifier: image -> feature map, with access to the four stages.

    Built with a stride-2 7x7 stem and bias-free downsampling shortcuts, so parameter names and shapes match
    torchvision's ImageNet ResNets and their state dicts load directly (MONAI's default stem has stride 1, which
    quadruples the compute of every later layer).

    Args:
        arch: a key of :data:`RESNET_ARCHS`.
        in_channels: input channels.
        block_inplanes: base widths of the four stages (default ``(64, 128, 256, 512)``; smaller for tests/demo).
        pretrained_weights: optional local path to a state dict (torchvision-style keys; ``fc.*`` and a leading
            ``module.``/``backbone.`` prefix are ignored). Nothing is ever downloaded.

    Raises:
        ValueError: on an unknown ``arch`` or a bad ``block_inplanes``.
        FileNotFoundError: if ``pretrained_weights`` does not exist.
        KeyError: if the weights miss parameters the trunk needs.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        in_channels: int = 3,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        pretrained_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown arch '{arch}'; expected one of {sorted(RESNET_ARCHS)}")
        if len(block_inplanes) != 4 or any(int(c) < 1 for c in block_inplanes):
            raise ValueError(f"block_inplanes must be four positive widths, got {tuple(block_inplanes)}")
        block, layers = RESNET_ARCHS[arch]
        self.arch = arch
        self.net = ResNet(
            block,
            list(layers),
            [int(c) for c in block_inplanes],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            bias_downsample=False,
            feed_forward=False,
        )
        expansion = block.expansion
        #: Output channels of stages 1-4.
        self.stage_channels: tuple[int, ...] = tuple(int(c) * expansion for c in block_inplanes)
        self.out_channels: int = self.stage_channels[-1]
        if pretrained_weights is not None:
            self.load_pretrained(pretrained_weights)

    @property
    def stages(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """The four residual stages (``layer1`` ... ``layer4``)."""
        return (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4)

    def stem(self, x: Tensor) -> Tensor:
        """Stem: 7x7 stride-2 convolution, BN, ReLU and max-pooling. ``(B, C, H, W) -> (B, 64', H/4, W/4)``."""
        net = self.net
        return net.maxpool(net.act(net.bn1(net.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Compute the last-stage feature map.

        Args:
            x: ``(B, in_channels, H, W)``.

        Returns:
            ``(B, out_channels, H/32, W/32)``.
        """
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a local state dict into the trunk (the classifier ``fc.*`` is skipped).

        Args:
            path: file saved with ``torch.save(state_dict)``; read with ``weights_only=True``.

        Raises:
            FileNotFoundError: if the file does not exist.
            KeyError: if trunk parameters are missing from the file.
            ValueError: if a tensor's shape does not match.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained_weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        cleaned = {}
        for key, value in state.items():
            for prefix in ("module.", "backbone.", "net."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
            if not key.startswith("fc."):
                cleaned[key] = value
        own = self.net.state_dict()
        missing = [k for k in own if k not in cleaned and not k.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(
                f"pretrained_weights {path} lacks {len(missing)} {self.arch} trunk entries, e.g. {missing[:5]}; "
                "expected a torchvision-style ResNet state dict"
            )
        for key, value in cleaned.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(
                    f"pretrained_weights {path}: '{key}' has shape {tuple(value.shape)}, "
                    f"the {self.arch} trunk expects {tuple(own[key].shape)}"
                )
        self.net.load_state_dict({k: v for k, v in cleaned.items() if k in own}, strict=False)


class ModalityExpert(nn.Module):
    """One stain's expert: a :class:`ResNetTrunk`, global average pooling and a linear classifier.

    Args:
        num_classes: output classes.
        dropout: dropout before the classifier.
        trunk_kwargs: arguments for :class:`ResNetTrunk`.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.0, **trunk_kwargs) -> None:
        super().__init__()
        self.trunk = ResNetTrunk(**trunk_kwargs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.trunk.out_channels, num_classes))

    @property
    def out_channels(self) -> int:
        """Width of the pooled feature."""
        return self.trunk.out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``(N, 3, H, W)``.

        Returns:
            ``(features (N, C), logits (N, num_classes))``.
        """
        features = self.pool(self.trunk(x)).flatten(1)
        return features, self.head(features)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dimension restricted to ``mask > 0``; masked entries get exactly zero.

    Args:
        logits: ``(B, M)``.
        mask: ``(B, M)``; every row needs at least one non-zero entry.

    Returns:
        ``(B, M)`` weights, each row summing to 1.
    """
    return logits.masked_fill(mask <= 0, float("-inf")).softmax(dim=-1)


def mixture_logits(expert_logits: Tensor, gate_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mix expert logits with gate weights restricted to the experts ``mask`` makes available.

    Evaluating this with a reduced mask (one expert masked out) gives the prediction the mixture would make with fewer
    stains; with a single available expert it reduces to that expert's logits, whatever the gate says.

    Args:
        expert_logits: ``(B, M, K)``.
        gate_logits: ``(B, M)``.
        mask: ``(B, M)`` availability.

    Returns:
        ``(logits (B, K), weights (B, M))``.
    """
    weights = masked_softmax(gate_logits, mask)
    # Zero the logits of unavailable experts first so a -inf/NaN there cannot leak into the sum as 0 * inf.
    expert_logits = expert_logits * (mask > 0).unsqueeze(-1).to(expert_logits.dtype)
    return (weights.unsqueeze(-1) * expert_logits).sum(dim=1), weights


class SimMLMNet(nn.Module):
    """Dynamic mixture of modality experts with a learnt, availability-masked gate.

    Design choices (where SimMLM leaves them open):

    - **Experts**: one :class:`ModalityExpert` per stain (no weight sharing), each seeing only its own stain. An
      expert runs only on the samples that have its stain, so single-stain batches cost one trunk pass.
    - **Gate input**: the concatenated pooled expert features (zeros for a missing stain) plus the availability mask,
      through a two-layer MLP -> one score per expert. Reusing the expert features keeps the gate cheap; the paper's
      gate sees "the same inputs" as the experts, which these features summarise.
    - **Mixture**: at the logit level, ``logits = sum_m w_m * expert_logits_m`` with ``w = masked_softmax(gate, mask)``.
    - **Single-stain predictions of a dual sample** (needed by MoFe) are the mixture re-evaluated with one expert
      masked (:func:`mixture_logits` with the reduced mask), which equals that expert's logits: no second forward pass.

    Args:
        num_classes: output classes (HER2 scores).
        arch: trunk architecture of each expert (a key of :data:`RESNET_ARCHS`; default ``"resnet50"``, the family
            of the main model, so comparisons are like for like; ``"resnet18"`` is a lighter option).
        block_inplanes: trunk stage widths (see :class:`ResNetTrunk`).
        gate_hidden: hidden width of the gating MLP.
        dropout: dropout before each expert's classifier.
        mofe_weight: weight of the MoFe ranking loss in :meth:`auxiliary_losses` (SimMLM/ our spec: 0.1).
        mofe_margin: margin of the MoFe hinge.
        pretrained_weights: local state dict loaded into both expert trunks.

    Raises:
        ValueError: on bad sizes (see :class:`ResNetTrunk`) or a negative ``mofe_weight``.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        arch: str = "resnet50",
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        gate_hidden: int = 128,
        dropout: float = 0.0,
        mofe_weight: float = 0.1,
        mofe_margin: float = 0.0,
        pretrained_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if mofe_weight < 0:
            raise ValueError(f"mofe_weight must be non-negative, got {mofe_weight}")
        self.num_classes = int(num_classes)
        self.experts = nn.ModuleList(
            [
                ModalityExpert(
                    num_classes,
                    dropout,
                    arch=arch,
                    block_inplanes=block_inplanes,
                    pretrained_weights=pretrained_weights,
                )
                for _ in STAINS
            ]
        )
        width = self.experts[0].out_channels
        self.gate = nn.Sequential(
            nn.Linear(len(STAINS) * width + len(STAINS), gate_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(gate_hidden, len(STAINS)),
        )
        self.mofe_weight = float(mofe_weight)
        self.mofe = MoFeLoss(margin=mofe_margin)

    def forward(self, he: Tensor | None, ihc: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
        """Classify a batch with any mix of available stains.

        Args:
            he: ``(B, 3, H, W)`` H&E in ``[-1, 1]`` (zeros where missing) or ``None``.
            ihc: ``(B, 3, H, W)`` IHC in ``[-1, 1]`` or ``None``.
            mask: ``(B, 2)`` availability (column 0 = H&E, column 1 = IHC).

        Returns:
            ``logits`` ``(B, K)`` (the mixture), ``scenario`` ``(B,)``, ``gate_weights`` ``(B, 2)`` (zero for a
            missing stain, rows sum to 1), ``gate_logits`` ``(B, 2)``, ``expert_logits`` ``(B, 2, K)`` (zeros for a
            missing stain) and ``features`` ``(B, 2, C)``.

        Raises:
            ValueError: on bad shapes or a bad mask (see :func:`check_stain_inputs`).
        """
        he, ihc, mask, scenario = check_stain_inputs(he, ihc, mask)
        batch = mask.shape[0]
        features, logits = [], []
        for column, (expert, image) in enumerate(zip(self.experts, (he, ihc))):
            available = mask[:, column] > 0
            feat = image.new_zeros(batch, expert.out_channels)
            logit = image.new_zeros(batch, self.num_classes)
            if bool(available.all()):
                feat, logit = expert(image)
            elif bool(available.any()):
                index = torch.nonzero(available).flatten()
                sub_feat, sub_logit = expert(image[index])
                feat = feat.index_copy(0, index, sub_feat)
                logit = logit.index_copy(0, index, sub_logit)
            features.append(feat)
            logits.append(logit)
        features_t = torch.stack(features, dim=1)
        expert_logits = torch.stack(logits, dim=1)
        gate_logits = self.gate(torch.cat([features_t.flatten(1), mask], dim=1))
        mixed, weights = mixture_logits(expert_logits, gate_logits, mask)
        return {
            "logits": mixed,
            "scenario": scenario,
            "gate_weights": weights,
            "gate_logits": gate_logits,
            "expert_logits": expert_logits,
            "features": features_t,
        }

    def auxiliary_losses(
        self, outputs: dict[str, Tensor], mask: Tensor, label: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Weighted MoFe ranking loss over the dual samples of the batch.

        For every sample with both stains, the single-stain predictions are the mixture with the other expert masked
        (:func:`mixture_logits`); MoFe penalises the dual loss exceeding either of them.

        Args:
            outputs: the dict returned by :meth:`forward`.
            mask: ``(B, 2)`` availability used for that forward pass.
            label: ``(B,)`` long class labels; MoFe needs them (``None`` gives a zero term).

        Returns:
            ``{"mofe": mofe_weight * loss}``, a scalar (zero when the batch has no dual sample or no labels).
        """
        logits = outputs["logits"]
        zero = logits.new_zeros(())
        if label is None or self.mofe_weight == 0:
            return {"mofe": zero}
        dual = (mask[:, 0] > 0) & (mask[:, 1] > 0)
        if not bool(dual.any()):
            return {"mofe": zero}
        expert_logits, gate_logits = outputs["expert_logits"][dual], outputs["gate_logits"][dual]
        singles = []
        for column in range(len(STAINS)):
            only = torch.zeros_like(mask[dual])
            only[:, column] = 1.0
            singles.append(mixture_logits(expert_logits, gate_logits, only)[0])
        loss = self.mofe(logits[dual], torch.stack(singles, dim=1), label[dual])
        return {"mofe": self.mofe_weight * loss}
