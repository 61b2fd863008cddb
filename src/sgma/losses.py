"""Segmentation losses (the ``loss`` config group): logits (B, C, H, W) and a mask (B, H, W) -> a scalar.

Every loss takes the module's ``ignore_index`` (the module builds it from the config's partial, so the two
cannot disagree) and reads no tensor value on the host: a training step is queued without waiting for the GPU.
A batch without labelled pixels gives 0 (a zero that depends on the logits, so backward runs and adds nothing), not the
NaN of a mean over nothing, which the training loss's finiteness check would report as divergence.
"""

from __future__ import annotations

import math
from fractions import Fraction

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossEntropy(nn.Module):
    """Mean cross-entropy over the labelled pixels: the paper's loss, and the default (``loss=ce``)."""

    def __init__(self, *, ignore_index: int) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        # F.cross_entropy's mean, except with no labelled pixel: its sum is then an exact 0 and the clamped count 1
        total = F.cross_entropy(logits, mask, ignore_index=self.ignore_index, reduction="sum")
        return total / (mask != self.ignore_index).sum().clamp(min=1)


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only (online hard example mining), the law of DELIVER/CMNeXt's
    ``OhemCrossEntropy`` (github.com/jamycheung/DELIVER, semseg/losses.py):

    keep the labelled pixels whose loss exceeds ``-log(thresh)`` (the true class's probability is below
    ``thresh``); if fewer than ``n_min = floor(min_kept * labelled pixels)`` are kept, keep the ``n_min``
    hardest instead; return the mean loss of the kept pixels. DELIVER: ``thresh=0.7``, ``min_kept=1/16``.

    Written without host reads: both means are computed (the n_min hardest from a sort of the per-pixel
    losses, unlabelled pixels sorted last) and ``torch.where`` picks one. With nothing kept (no hard pixel
    and n_min = 0, e.g. no labelled pixel) the loss is 0, where DELIVER's mean of nothing is NaN.
    """

    def __init__(self, *, ignore_index: int, thresh: float = 0.7, min_kept: float = 1 / 16) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"loss.thresh must be a probability in (0, 1], got {thresh}; DELIVER uses 0.7")
        if not 0.0 <= min_kept <= 1.0:
            raise ValueError(
                f"loss.min_kept must be a fraction of the labelled pixels in [0, 1], got {min_kept}; "
                f"DELIVER uses 0.0625 (1/16)"
            )
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = min_kept
        self.loss_thresh = -math.log(thresh)
        # n_min in exact integer arithmetic (DELIVER's n // 16 for 1/16), even for counts beyond float32's 2^24
        ratio = Fraction(min_kept).limit_denominator(1_000_000)
        self._kept_num, self._kept_den = ratio.numerator, ratio.denominator

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        per_pixel = F.cross_entropy(logits, mask, ignore_index=self.ignore_index, reduction="none").flatten()
        labelled = (mask != self.ignore_index).flatten()
        n_min = labelled.sum() * self._kept_num // self._kept_den
        hard = labelled & (per_pixel > self.loss_thresh)
        n_hard = hard.sum()
        mean_hard = torch.where(hard, per_pixel, 0.0).sum() / n_hard.clamp(min=1)
        # losses are >= 0, so -1 sends the unlabelled pixels behind every labelled one
        ranked = torch.where(labelled, per_pixel, -1.0).sort(descending=True).values
        top = torch.arange(ranked.numel(), device=ranked.device) < n_min
        mean_top = torch.where(top, ranked, 0.0).sum() / n_min.clamp(min=1)
        return torch.where(n_hard >= n_min, mean_hard, mean_top)

    def extra_repr(self) -> str:
        return f"thresh={self.thresh}, min_kept={self.min_kept}, ignore_index={self.ignore_index}"


class CrossEntropyDice(nn.Module):
    """``ce_weight * CE + dice_weight * Dice``, with segmentation-models-pytorch's multiclass ``DiceLoss``
    (soft Dice of the softmax per class over the whole batch, 1 - Dice averaged over the classes; classes
    absent from the batch's labels count 0, so a batch without labels gives 0). Dice counters class imbalance, CE keeps
    per-pixel calibration."""

    def __init__(self, *, ignore_index: int, ce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(
                f"loss.ce_weight and loss.dice_weight must be >= 0 and not both 0, got {ce_weight} and "
                f"{dice_weight}; the default is 1 and 1"
            )
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.ce = CrossEntropy(ignore_index=ignore_index)
        # smp zeroes the probabilities and one-hot labels of ignored pixels before its sums, and reads nothing
        # on the host (F.one_hot with num_classes given checks values only on the CPU)
        self.dice = smp.losses.DiceLoss(mode="multiclass", ignore_index=ignore_index)

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        return self.ce_weight * self.ce(logits, mask) + self.dice_weight * self.dice(logits, mask)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, dice_weight={self.dice_weight}"


def loss_on_rows(loss: nn.Module, logits: Tensor, mask: Tensor, rows: Tensor, ignore_index: int) -> Tensor:
    """``loss`` over the samples where ``rows`` (B,) is true: the others' labels become ``ignore_index`` (static
    shapes, no host read). For cross-entropy this is the per-pixel loss weighted by ``rows``. With no labelled
    pixel left the result is 0, as every loss here gives for a batch without labels, and so is its gradient."""
    return loss(logits, torch.where(rows.view(-1, 1, 1), mask, ignore_index))
