"""SegFormer all-MLP head over the four fused scales (reuses smp's SegformerDecoder)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from torch import Tensor, nn


class SegFormerHead(nn.Module):
    """Per-scale linear embedding, upsampling to stride 4, concat + 1x1 fuse, classifier.

    smp's decoder takes the full encoder feature list (input image, stride 2, then the four scales) and
    reads the input size off its first element; we feed it two empty 0-channel placeholders so it sees
    exactly our four fused scales.
    """

    def __init__(
        self, *, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        assert len(in_channels) == 4, f"SegFormer head needs 4 scales, got {list(in_channels)}"
        self.decoder = SegformerDecoder(
            encoder_channels=[0, 0, *in_channels], encoder_depth=5, segmentation_channels=channels
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feats: Sequence[Tensor], *, out_size: tuple[int, int]) -> Tensor:
        first = feats[0]  # stride 4
        stub = first.new_empty(first.shape[0], 0, first.shape[-2] * 4, first.shape[-1] * 4)
        x = self.decoder([stub, stub[:, :, :1, :1], *feats])
        logits = self.classifier(self.dropout(x))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
