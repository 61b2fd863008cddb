"""The incomplete-modality segmentor: shared encoder -> per-scale fusion -> SegFormer head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from sgma.modalities import Modality
from sgma.models import build_fusion
from sgma.models.encoder import MultiModalEncoder
from sgma.models.head import SegFormerHead


@dataclass
class SegmentorOutput:
    logits: Tensor  # (B, K, H, W)
    robustness: list[Tensor] | None = None  # per scale (B, M, H_i, W_i); only when requested and supported


class MultiModalSegmentor(nn.Module):
    """Modalities and classes come from the dataset at the call site; everything else from ``model``
    and ``backbone`` configs.

    :meth:`encode` and :meth:`decode` are separate so a training branch can re-fuse cached encoder
    features under another availability mask without a second encoder pass.
    """

    def __init__(
        self,
        *,
        modalities: Sequence[Modality],
        num_classes: int,
        backbone: str,
        pretrained: bool | str | Path = False,
        fusion: str = "mean",
        fusion_options: Mapping | None = None,
        shared_encoder: bool = True,
        input_adapter: str = "replicate",
        decoder_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.encoder = MultiModalEncoder(
            name=backbone,
            modalities=self.modalities,
            pretrained=pretrained,
            shared=shared_encoder,
            input_adapter=input_adapter,
        )
        self.fusion = build_fusion(
            fusion,
            in_channels=self.encoder.out_channels,
            num_modalities=len(self.modalities),
            num_classes=num_classes,
            **dict(fusion_options or {}),
        )
        self.head = SegFormerHead(
            in_channels=[f.out_channels for f in self.fusion],
            num_classes=num_classes,
            channels=decoder_channels,
            dropout=dropout,
        )

    def forward(
        self, inputs: Mapping[str, Tensor], available: Tensor, *, return_robustness: bool = False
    ) -> SegmentorOutput:
        out_size = tuple(inputs[self.modalities[0].name].shape[-2:])
        return self.decode(self.encode(inputs, available), available, out_size, return_robustness=return_robustness)

    def encode(self, inputs: Mapping[str, Tensor], available: Tensor) -> list[Tensor]:
        return self.encoder(inputs, available)

    def decode(
        self,
        feats: Sequence[Tensor],
        available: Tensor,
        out_size: tuple[int, int],
        *,
        return_robustness: bool = False,
    ) -> SegmentorOutput:
        fused, robustness = [], []
        for fusion, f in zip(self.fusion, feats, strict=True):
            out = fusion(f, available, return_robustness=return_robustness)
            fused.append(out.fused)
            robustness.append(out.robustness)
        logits = self.head(fused, out_size=out_size)
        has_maps = return_robustness and all(r is not None for r in robustness)
        return SegmentorOutput(logits=logits, robustness=robustness if has_maps else None)
