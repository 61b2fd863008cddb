"""Per-pattern segmentation metrics and the summaries over patterns.

Each modality pattern gets one confusion matrix accumulated over the whole split (never per-batch
means), from which per-class IoU, mIoU, mean F1 and OA follow. Summaries over patterns are the paper's
**Average** (``avg``), **Top-1** (``top1``, best pattern) and **Last-1** (``last1``, worst pattern), plus the
expected mIoU when every modality is missing independently with probability p (``p0.5``), conditioned on at
least one modality being present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchmetrics import Metric

from sgma.modalities import SEPARATOR

IGNORE_INDEX = 255


class PatternConfusion(Metric):
    """Confusion matrices (P, K, K) indexed [pattern, true, predicted], summed across DDP ranks.

    ``pattern_ids`` index the dataset's list of all non-empty patterns; ``samples`` counts the samples
    seen per pattern, so a report lists exactly the evaluated patterns.
    """

    full_state_update = False

    def __init__(self, *, num_patterns: int, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_patterns = num_patterns
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        k = num_classes
        self.add_state("confmat", torch.zeros(num_patterns, k, k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros(num_patterns, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, pattern_ids: Tensor) -> None:
        assert preds.shape == target.shape and preds.ndim == 3, (
            f"preds/target must both be (B, H, W), got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
        k = self.num_classes
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= k))
        if bool(bad.any()):
            raise ValueError(
                f"label values {sorted(set(target[bad].unique().tolist()))} are outside 0..{k - 1} and are not "
                f"the ignore index {self.ignore_index}"
            )
        pid = pattern_ids.view(-1, 1, 1).expand_as(target)
        flat = (pid * k + target.long()) * k + preds.long()
        counts = torch.bincount(flat[valid], minlength=self.num_patterns * k * k)
        self.confmat += counts.view(self.num_patterns, k, k)
        self.samples += torch.bincount(pattern_ids, minlength=self.num_patterns)

    def compute(self) -> tuple[Tensor, Tensor]:
        """(confmat, samples), synced across ranks."""
        return self.confmat, self.samples


def class_scores(confmat: Tensor) -> dict[str, Tensor]:
    """Per-class IoU and F1 (NaN for a class absent from both labels and predictions) and OA."""
    cm = confmat.double()
    tp = cm.diag()
    gt = cm.sum(dim=1)
    pred = cm.sum(dim=0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    f1 = torch.where(gt + pred > 0, 2 * tp / (gt + pred).clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    oa = tp.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
    return {"iou": iou, "f1": f1, "oa": oa}


@dataclass
class PatternScores:
    pattern: str
    miou: float
    mf1: float
    oa: float
    iou: dict[str, float]
    f1: dict[str, float]
    # the pattern's confusion matrix in pixels, [true][predicted], classes in the report's class_names order
    confusion: list[list[int]] = field(default_factory=list)


@dataclass
class PatternReport:
    """Everything one evaluation yields: per-pattern scores and confusion matrices, and the summaries over them."""

    patterns: list[PatternScores]
    class_names: list[str]
    excluded_classes: list[str]
    summaries: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self, prefix: str, *, per_class: bool = False) -> dict[str, float]:
        """Flat metric dict: ``{prefix}/{pattern}/miou``, ``{prefix}/avg/miou``, ... (and per-class IoU)."""
        out: dict[str, float] = {}
        for row in self.patterns:
            out[f"{prefix}/{row.pattern}/miou"] = row.miou
            out[f"{prefix}/{row.pattern}/mf1"] = row.mf1
            out[f"{prefix}/{row.pattern}/oa"] = row.oa
            if per_class:
                for name, value in row.iou.items():
                    out[f"{prefix}/{row.pattern}/iou_{name}"] = value
        for summary, values in self.summaries.items():
            for key, value in values.items():
                out[f"{prefix}/{summary}/{key}"] = value
        return out

    def to_dict(self) -> dict:
        return {
            "class_names": self.class_names,
            "confusion_axes": ["true", "predicted"],  # each pattern's `confusion`: rows true, columns predicted
            "excluded_classes": self.excluded_classes,
            "patterns": [row.__dict__ for row in self.patterns],
            "summaries": self.summaries,
        }


def _nanmean(values: Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else float("nan")


def build_report(
    confmat: Tensor,
    samples: Tensor,
    *,
    all_patterns: Sequence[str],
    class_names: Sequence[str],
    exclude_classes: Sequence[str] = (),
    missing_probs: Sequence[float] = (),
) -> PatternReport:
    """Scores for every pattern that received samples, plus ``avg``/``top1``/``last1`` and ``p<prob>``.

    ``exclude_classes`` are left out of mIoU and mF1 (ISPRS: clutter) but still count in OA.
    """
    unknown = [c for c in exclude_classes if c not in class_names]
    if unknown:
        raise ValueError(f"exclude_classes {unknown} are not classes of this dataset ({', '.join(class_names)})")
    keep = torch.tensor([c not in exclude_classes for c in class_names])
    rows = []
    for pid, pattern in enumerate(all_patterns):
        if int(samples[pid]) == 0:
            continue
        s = class_scores(confmat[pid])
        rows.append(
            PatternScores(
                pattern=pattern,
                miou=_nanmean(s["iou"][keep]),
                mf1=_nanmean(s["f1"][keep]),
                oa=float(s["oa"]),
                iou={n: float(v) for n, v in zip(class_names, s["iou"], strict=True)},
                f1={n: float(v) for n, v in zip(class_names, s["f1"], strict=True)},
                confusion=confmat[pid].long().tolist(),
            )
        )
    report = PatternReport(patterns=rows, class_names=list(class_names), excluded_classes=list(exclude_classes))
    if not rows:
        return report
    by_miou = sorted(rows, key=lambda r: r.miou)
    report.summaries["avg"] = {k: sum(getattr(r, k) for r in rows) / len(rows) for k in ("miou", "mf1", "oa")}
    report.summaries["top1"] = {"miou": by_miou[-1].miou}
    report.summaries["last1"] = {"miou": by_miou[0].miou}
    if len(rows) == len(all_patterns):  # the expectation needs every pattern
        num_modalities = max(len(p.split(SEPARATOR)) for p in all_patterns)
        for p in missing_probs:
            report.summaries[f"p{p:g}"] = {"miou": expected_miou(rows, p, num_modalities)}
    return report


def expected_miou(rows: Sequence[PatternScores], p: float, num_modalities: int) -> float:
    """E[mIoU] when each modality is missing independently with probability p, given >= 1 present."""
    if not 0 <= p < 1:
        raise ValueError(f"missing probability must be in [0, 1), got {p}")
    weights = []
    for row in rows:
        present = len(row.pattern.split(SEPARATOR))
        weights.append(p ** (num_modalities - present) * (1 - p) ** present)
    total = sum(weights)
    return sum(w * r.miou for w, r in zip(weights, rows, strict=True)) / total
