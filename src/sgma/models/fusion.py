"""Per-scale fusion of modality features: the one pluggable interface every fusion implements.

A fusion module fuses **one encoder scale**. It receives the features of every modality stacked on a
modality axis, ``feats`` of shape (B, M, C, H, W), and the per-sample availability ``available`` (B, M)
bool. The slots of missing modalities may hold anything (zeros, garbage): a fusion must not let them
influence its output. It returns a :class:`FusionOutput` with the fused map (B, out_channels, H, W) and,
for fusions that estimate it and only when asked, robustness maps (B, M, H, W) that are 0 on missing
modalities and sum to 1 over the available ones.

A fusion runs in two stages: :meth:`Fusion.prepare` (per-modality work, e.g. SGF's projectors) and
:meth:`Fusion.fuse`. ``prepare`` treats every (sample, modality) slot on its own, so what it returns for an
available slot does not depend on which other modalities are available. The MAS training branch relies on
this: it re-fuses the main pass's prepared inputs under another availability instead of preparing them again.

Fusions run with static shapes and never read tensor values on the host (no ``.item()``, no boolean
indexing), so a training step does not wait for the GPU and ``torch.compile`` sees one graph.

Fusions are listed by name in :data:`sgma.models.FUSIONS`; ``model.fusion=<name>`` picks one and
``model.fusion_options.<name>`` passes keyword arguments to its constructor.
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
    """Base class: stores the sizes and checks the inputs. Subclasses implement :meth:`fuse` and may
    override :meth:`prepare`."""

    # run the fusion's own convolutions channels-last (set from ``model.channels_last`` by the segmentor)
    channels_last: bool = False

    def __init__(self, *, in_channels: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_modalities = num_modalities
        self.num_classes = num_classes
        self.out_channels = in_channels

    def forward(self, feats: Tensor, available: Tensor, *, return_robustness: bool = False) -> FusionOutput:
        check_inputs(feats, available, num_modalities=self.num_modalities, channels=self.in_channels)
        assert_any_available(available)
        return self.fuse(self.prepare(feats, available), available, return_robustness=return_robustness)

    def prepare(self, feats: Tensor, available: Tensor) -> Tensor:
        """Per-slot work before fusing. The default passes the features through unchanged."""
        return feats

    def fuse(self, feats: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        """Fuse what :meth:`prepare` returned; whatever the missing slots hold must not matter."""
        raise NotImplementedError

    def fuse_single(self, feats: Tensor, available: Tensor) -> FusionOutput:
        """:meth:`fuse` for an availability with exactly one modality per sample (the MAS branch), without
        robustness maps. Not checked (that would wait for the device). A fusion with a cheaper exact form for
        this case overrides it."""
        return self.fuse(feats, available, return_robustness=False)


def check_inputs(feats: Tensor, available: Tensor, *, num_modalities: int, channels: int) -> None:
    """Shape and dtype checks: metadata only, no device sync."""
    assert feats.ndim == 5, f"feats must be (B, M, C, H, W), got {tuple(feats.shape)}"
    b, m, c = feats.shape[:3]
    assert m == num_modalities and c == channels, (
        f"expected {num_modalities} modalities x {channels} channels, got {tuple(feats.shape)}"
    )
    assert available.shape == (b, m) and available.dtype == torch.bool, (
        f"available must be bool (B, M) = ({b}, {m}), got {available.dtype} {tuple(available.shape)}"
    )


def assert_any_available(available: Tensor) -> None:
    """Every sample needs one available modality, checked on the device with ``torch._assert_async``.

    A host-side ``bool(...)`` would wait for the GPU at every call and break a ``torch.compile`` graph. On
    CPU this raises at once (RuntimeError); on CUDA a violation is a device-side assert. The training module
    and the segmentor check the same on the host, where the availability is known before it reaches the GPU.
    """
    torch._assert_async(available.any(dim=1).all(), "every sample needs at least one available modality")


def zero_missing(feats: Tensor, available: Tensor) -> Tensor:
    """Replace missing modalities' features by exact zeros (a fill, so NaN/inf garbage cannot leak)."""
    return feats.masked_fill(~available.view(*available.shape, 1, 1, 1), 0)


class MeanFusion(Fusion):
    """Average of the available modalities' features (the paper's plain-fusion ablation baseline)."""

    def fuse(self, feats: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        count = available.sum(dim=1).to(feats.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
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
