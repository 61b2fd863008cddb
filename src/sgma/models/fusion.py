"""Per-scale fusion of modality features: the one pluggable interface every fusion implements.

A fusion module fuses **one encoder scale**. It receives the features of every modality stacked on a
modality axis, ``feats`` of shape (B, M, C, H, W), and the per-sample availability ``available`` (B, M)
bool. The slots of missing modalities may hold anything (zeros, garbage): a fusion must not let them
influence its output. It returns a :class:`FusionOutput` with the fused map (B, out_channels, H, W) and,
for fusions that estimate it and only when asked, robustness maps (B, M, H, W) that are 0 on missing
modalities and sum to 1 over the available ones.

Fusions are listed by name in :data:`sgma.models.FUSIONS`; ``model.fusion=<name>`` picks one and
``model.fusion_options`` passes keyword arguments to its constructor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class FusionOutput:
    fused: Tensor  # (B, out_channels, H, W)
    robustness: Tensor | None = None  # (B, M, H, W); None when the fusion has none or it was not requested


class Fusion(nn.Module):
    """Base class: stores the sizes and checks the inputs. Subclasses implement :meth:`fuse`."""

    def __init__(self, *, in_channels: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_modalities = num_modalities
        self.num_classes = num_classes
        self.out_channels = in_channels

    def forward(self, feats: Tensor, available: Tensor, *, return_robustness: bool = False) -> FusionOutput:
        b, m, c = feats.shape[:3]
        assert feats.ndim == 5, f"feats must be (B, M, C, H, W), got {tuple(feats.shape)}"
        assert m == self.num_modalities and c == self.in_channels, (
            f"expected {self.num_modalities} modalities x {self.in_channels} channels, got {tuple(feats.shape)}"
        )
        assert available.shape == (b, m) and available.dtype == torch.bool, (
            f"available must be bool (B, M) = ({b}, {m}), got {available.dtype} {tuple(available.shape)}"
        )
        assert bool(available.any(dim=1).all()), "every sample needs at least one available modality"
        return self.fuse(feats, available, return_robustness=return_robustness)

    def fuse(self, feats: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        raise NotImplementedError


def zero_missing(feats: Tensor, available: Tensor) -> Tensor:
    """Replace missing modalities' features by exact zeros (``where``, so NaN/inf garbage cannot leak)."""
    keep = available[:, :, None, None, None]
    return torch.where(keep, feats, torch.zeros((), dtype=feats.dtype, device=feats.device))


class MeanFusion(Fusion):
    """Average of the available modalities' features (the paper's plain-fusion ablation baseline)."""

    def fuse(self, feats: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        count = available.sum(dim=1).to(feats.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        return FusionOutput(fused=zero_missing(feats, available).sum(dim=1) / count)


class ConcatFusion(Fusion):
    """MuSS-style fusion: concatenate every modality's channels (zeros for missing ones), project with 1x1.

    It cannot tell a missing modality from a zero feature map, as in MuSS; that is the point of the baseline.
    """

    def __init__(self, *, in_channels: int, num_modalities: int, num_classes: int) -> None:
        super().__init__(in_channels=in_channels, num_modalities=num_modalities, num_classes=num_classes)
        self.project = nn.Sequential(
            nn.Conv2d(num_modalities * in_channels, in_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.GELU(),
        )

    def fuse(self, feats: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        stacked = zero_missing(feats, available).flatten(1, 2)  # (B, M*C, H, W)
        return FusionOutput(fused=self.project(stacked))
