"""Branch selector: tells whether an input patch is H&E or HER2-IHC.

The MM'25 framework routes each incoming image to the right path (H&E encoder, IHC encoder, or CM-GAN synthesis of
the missing stain). :class:`BranchSelector` is the small CNN that makes that call. Because it is trained on the
procedural demo data but must label slides from other laboratories, it fuses the CNN with stain statistics computed
in-graph by colour deconvolution (:class:`~her2_monai.stain_features.StainFeatureExtractor`): eosin (pink) is present
in H&E and absent in IHC, DAB (brown) the other way round, and those facts do not depend on the lab. The bundle
trains it without the CNN, on the stain evidence (``stain_features="evidence"``): a small head learns from the
ink-free stain-hue histogram of demo renders, and a fixed physical rule (:func:`~her2_monai.stain_features.
evidence_logit`: eosin says H&E, DAB or hematoxylin alone says IHC) is added to its logit at inference. Texture
learned from renders did not transfer to real slides at other magnifications, colour did; the rule keeps the call
on the stains' physics where the renders' colours differ from real ones. Its training is a bundle stage
(``run train_selector``); the routing of the images it labels is :func:`~her2_monai.stain_batch.route_unknown_stains`.
The stain statistics, the head and the rule always run in float32 (bf16 autocast is turned off around them), so the
call does not depend on the CPU's arithmetic.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from her2_monai.constants import STAIN_CLASS_NAMES
from her2_monai.networks.record import RecordedNetwork
from her2_monai.stain_features import (
    EVIDENCE_COLUMNS,
    HUE_BINS,
    STAIN_FEATURE_SETS,
    TISSUE_INDEX,
    StainFeatureExtractor,
    evidence_logit,
)

__all__ = ["BranchSelector"]

_NUM_STAINS = len(STAIN_CLASS_NAMES)

#: ``stain_features`` value of the stain-evidence selector (not a column subset of the pooled statistics).
EVIDENCE = "evidence"
#: Columns of the evidence features the head reads: the ink-free hue histogram and its saturation.
_EVIDENCE_HEAD_COLUMNS = HUE_BINS + 1
_INK_COLUMN = EVIDENCE_COLUMNS.index("ink")


class BranchSelector(RecordedNetwork, nn.Module):
    """Small CNN that classifies one patch as H&E (class 0) or HER2-IHC (class 1).

    A stack of stride-2 ``Conv-BN-ReLU`` blocks with global average pooling; when ``use_stain_features`` is on, the
    :class:`~her2_monai.stain_features.StainFeatureExtractor` statistics pass through a small MLP and are
    concatenated with the CNN embedding before the linear classifier. The CNN can read either the raw image or its
    white-balanced optical density (``cnn_input="od"``), which removes the scanner's background tint and brightness
    before any learning happens.

    Training only on synthetic renders invites the CNN to learn render-specific texture; ``branch_dropout`` zeroes the
    whole CNN embedding for a random subset of training samples so the classifier also learns to decide from the
    lab-independent stain statistics alone. Any input size of at least ``2 ** len(channels)`` pixels works.

    Args:
        channels: output channels of the convolution blocks (each halves the resolution); empty for no CNN, so the
            stain statistics alone decide (needs ``use_stain_features``; what ``train.json`` trains by default).
        use_stain_features: fuse the stain statistics (recommended for images from other labs).
        stain_features: which statistics to fuse, a key of :data:`~her2_monai.stain_features.STAIN_FEATURE_SETS`, or
            ``"evidence"``: the ink-free hue histogram and saturation of
            :meth:`~her2_monai.stain_features.StainFeatureExtractor.evidence_features`, with the physical rule
            added at inference (``evidence_weight``).
        stain_hidden: width of the stain-feature MLP.
        cnn_input: ``"rgb"`` (the ``[-1, 1]`` image) or ``"od"`` (white-balanced optical density).
        dropout: dropout before the classifier.
        branch_dropout: probability of zeroing the CNN embedding of a training sample (needs ``use_stain_features``).
        max_input_size: inputs whose longer side exceeds this are first downsampled (antialiased) to it, keeping the
            aspect ratio; ``None`` disables. The CNN then sees texture at the scale it was trained on: whole real
            1024 px, 0.46 um/px patches were labelled correctly when given at 96 to 256 px, but not always at 64 px
            (see ``benchmarks/eval_selector_transfer.py``). A traced model keeps the decision for its example size.
        stain_kwargs: extra arguments for :class:`~her2_monai.stain_features.StainFeatureExtractor`.
        evidence_weight: with ``stain_features="evidence"``, the weight of the physical rule
            (:func:`~her2_monai.stain_features.evidence_logit`, log-odds of IHC) added to the logit difference in
            eval mode; 0 leaves the learnt head alone. The head trains without it (in train mode), so it learns what
            the renders teach and the rule is not learnt around.
        metadata: facts about the training run saved with the weights.

    Raises:
        ValueError: on an unknown ``cnn_input`` or ``stain_features``, empty ``channels``, a probability outside
            ``[0, 1)``, a negative ``evidence_weight`` or a ``max_input_size`` too small for the network.

    Example::

        selector = BranchSelector().eval()
        stain = selector.predict_stain(x)  # (B,) long, 0 = H&E, 1 = IHC
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 64),
        use_stain_features: bool = True,
        stain_features: str = "eosin",
        stain_hidden: int = 32,
        cnn_input: str = "od",
        dropout: float = 0.1,
        branch_dropout: float = 0.3,
        max_input_size: int | None = 128,
        stain_kwargs: Mapping[str, Any] | None = None,
        evidence_weight: float = 2.0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if cnn_input not in ("rgb", "od"):
            raise ValueError(f"cnn_input must be 'rgb' or 'od', got '{cnn_input}'")
        if stain_features not in STAIN_FEATURE_SETS and stain_features != EVIDENCE:
            choices = sorted([*STAIN_FEATURE_SETS, EVIDENCE])
            raise ValueError(f"stain_features must be one of {choices}, got '{stain_features}'")
        if evidence_weight < 0:
            raise ValueError(f"evidence_weight must be non-negative, got {evidence_weight}")
        if len(channels) == 0 and not use_stain_features:
            raise ValueError("channels must list at least one convolution block unless use_stain_features is on")
        for name, p in (("dropout", dropout), ("branch_dropout", branch_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if max_input_size is not None and max_input_size < 2 ** len(channels):
            raise ValueError(f"max_input_size must be at least {2 ** len(channels)} pixels, got {max_input_size}")
        self.max_input_size = max_input_size
        self.cnn_input = cnn_input
        self.use_stain_features = bool(use_stain_features)
        self.branch_dropout = float(branch_dropout) if self.use_stain_features else 0.0
        # The OD view needs the deconvolution module even when its pooled features are not fused.
        self.stain = StainFeatureExtractor(**(stain_kwargs or {}))
        blocks: list[nn.Module] = []
        in_ch = 3
        for out_ch in channels:
            blocks.append(Convolution(2, in_ch, out_ch, strides=2, kernel_size=3, act="RELU", norm="BATCH"))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        embed = in_ch if blocks else 0
        self.evidence = stain_features == EVIDENCE
        self.evidence_weight = float(evidence_weight) if self.evidence else 0.0
        columns = tuple(range(_EVIDENCE_HEAD_COLUMNS)) if self.evidence else STAIN_FEATURE_SETS[stain_features]
        self.register_buffer("feature_index", torch.tensor(columns, dtype=torch.long), persistent=False)
        # The hue histogram is most of the statistics' cost; sets that do not read it skip it.
        self.uses_hue = max(columns) >= TISSUE_INDEX + 1
        if self.use_stain_features:
            n_features = len(columns)
            self.stain_mlp = nn.Sequential(
                nn.BatchNorm1d(n_features),
                nn.Linear(n_features, stain_hidden),
                nn.ReLU(inplace=True),
            )
            embed += stain_hidden
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed, _NUM_STAINS)
        self.record_architecture(
            metadata,
            channels=channels,
            use_stain_features=use_stain_features,
            stain_features=stain_features,
            stain_hidden=stain_hidden,
            cnn_input=cnn_input,
            dropout=dropout,
            branch_dropout=branch_dropout,
            max_input_size=max_input_size,
            stain_kwargs=dict(stain_kwargs or {}),
            **({"evidence_weight": float(evidence_weight)} if self.evidence else {}),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Classify each image.

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B, 2)`` logits; index 0 = H&E, 1 = IHC (``STAIN_CLASS_NAMES``).
        """
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != 3):
            raise ValueError(f"BranchSelector expects (B, 3, H, W) RGB in [-1, 1], got {tuple(x.shape)}")
        if self.max_input_size is not None:
            with warnings.catch_warnings():
                # A traced selector keeps the resize decision made for its example size; that is intended.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                height, width = int(x.shape[-2]), int(x.shape[-1])
                if max(height, width) > self.max_input_size:
                    scale = self.max_input_size / max(height, width)
                    size = (max(1, round(height * scale)), max(1, round(width * scale)))
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        with torch.autocast(x.device.type, enabled=False):
            od = self.stain.optical_density(x.float())
        parts = []
        if len(self.features) > 0:
            embedding = self.pool(self.features(x if self.cnn_input == "rgb" else od)).flatten(1)
            if self.use_stain_features and self.training and self.branch_dropout > 0:
                keep = (torch.rand(embedding.shape[0], 1, device=x.device) >= self.branch_dropout).to(embedding.dtype)
                embedding = embedding * keep
            parts.append(embedding.float())
        # The statistics (logs, angles, ratios of small sums), the head and the rule in float32 whatever the autocast.
        with torch.autocast(x.device.type, enabled=False):
            evidence = None
            if self.use_stain_features:
                if self.evidence:
                    evidence = self.stain.evidence_features(od)
                    stats = evidence.index_select(1, self.feature_index)
                else:
                    stats = self.stain.pool_features(od, hue=self.uses_hue).index_select(1, self.feature_index)
                parts.append(self.stain_mlp(stats))
            logits = self.classifier(self.dropout(torch.cat(parts, dim=1)))
            if evidence is not None:
                if not self.training and self.evidence_weight > 0:
                    rule = 0.5 * self.evidence_weight * evidence_logit(evidence)
                    logits = logits + torch.stack([-rule, rule], dim=1)
                # A view that is mostly pen ink shows little of its stains: its call is damped toward "uncertain".
                logits = logits * (1.0 - evidence[:, _INK_COLUMN : _INK_COLUMN + 1])
        return logits

    @torch.no_grad()
    def predict_stain(self, x: Tensor) -> Tensor:
        """Predicted stain per image (call ``eval()`` first for deterministic results).

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B,)`` long: 0 = H&E, 1 = IHC.
        """
        return self(x).argmax(dim=1)
