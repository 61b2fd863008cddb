"""Encoder, fusion, head and the segmentor that assembles them."""

from torch import nn

from sgma.models.fusion import ConcatFusion, Fusion, MeanFusion
from sgma.models.sgf import SemanticGuidedFusion

# model.fusion=<name>: every fusion implements the per-scale interface of sgma.models.fusion.Fusion
FUSIONS: dict[str, type[Fusion]] = {
    "mean": MeanFusion,
    "concat": ConcatFusion,
    "sgf": SemanticGuidedFusion,
}


def build_fusion(
    name: str, *, in_channels: list[int], num_modalities: int, num_classes: int, **options
) -> nn.ModuleList:
    """One fusion module per encoder scale."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {', '.join(FUSIONS)} (model.fusion=...)")
    cls = FUSIONS[name]
    return nn.ModuleList(
        cls(in_channels=c, num_modalities=num_modalities, num_classes=num_classes, **options) for c in in_channels
    )
