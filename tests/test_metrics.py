"""Metrics against confusion matrices computed by hand."""

import io
import math

import pytest
import torch

from sgma.metrics import PatternConfusion, build_report, class_scores, expected_miou

PATTERNS = ["rgb", "dsm", "rgb+dsm"]


def test_confusion_counts_ignore_and_patterns():
    metric = PatternConfusion(num_patterns=3, num_classes=3)
    target = torch.tensor([[[0, 0, 1, 255], [2, 2, 1, 1]]])  # (1, 2, 4)
    preds = torch.tensor([[[0, 1, 1, 2], [2, 0, 1, 2]]])
    metric.update(preds, target, torch.tensor([2]))
    confmat, samples = metric.compute()
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])  # rows: true, cols: predicted; 255 dropped
    assert torch.equal(confmat[2], expected)
    assert confmat[0].sum() == 0 and confmat[1].sum() == 0
    assert samples.tolist() == [0, 0, 1]


def test_labels_out_of_range_are_an_error():
    metric = PatternConfusion(num_patterns=1, num_classes=3)
    with pytest.raises(ValueError, match=r"\[7\].*outside 0..2"):
        metric.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[7, 0]]]), torch.tensor([0]))


def test_class_scores_by_hand():
    cm = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    s = class_scores(cm)
    # IoU = tp / (gt + pred - tp): c0 1/(2+2-1), c1 2/(3+3-2), c2 1/(2+2-1)
    assert torch.allclose(s["iou"], torch.tensor([1 / 3, 2 / 4, 1 / 3], dtype=torch.float64))
    # F1 = 2tp / (gt + pred)
    assert torch.allclose(s["f1"], torch.tensor([2 / 4, 4 / 6, 2 / 4], dtype=torch.float64))
    assert math.isclose(float(s["oa"]), 4 / 7)


def test_absent_class_is_nan_not_zero():
    cm = torch.tensor([[3, 0], [0, 0]])
    s = class_scores(cm)
    assert s["iou"][0] == 1 and math.isnan(s["iou"][1])


def _report(exclude=(), probs=()):
    confmat = torch.zeros(3, 3, 3, dtype=torch.long)
    confmat[0] = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])  # IoU 1/3, 1/2, 1/3
    confmat[1] = torch.tensor([[2, 0, 0], [0, 2, 0], [0, 0, 0]])  # IoU 1, 1, nan (class 2 absent)
    confmat[2] = torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 4]])  # IoU 2/3, 1/2, 1
    return build_report(
        confmat,
        torch.tensor([5, 5, 5]),
        all_patterns=PATTERNS,
        class_names=["road", "building", "clutter"],
        exclude_classes=list(exclude),
        missing_probs=list(probs),
    )


def test_report_means_and_summaries():
    report = _report()
    miou = {r.pattern: r.miou for r in report.patterns}
    assert miou["rgb"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert miou["dsm"] == pytest.approx(1.0)  # NaN class left out of the mean
    assert miou["rgb+dsm"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert report.summaries["avg"]["miou"] == pytest.approx(sum(miou.values()) / 3)
    assert report.summaries["top1"]["miou"] == pytest.approx(1.0)
    assert report.summaries["last1"]["miou"] == pytest.approx(miou["rgb"])
    keys = report.metrics("test")
    assert keys["test/rgb+dsm/miou"] == pytest.approx(miou["rgb+dsm"])
    assert keys["test/last1/miou"] == pytest.approx(miou["rgb"])


def test_excluded_classes_leave_means_but_not_oa():
    report = _report(exclude=["clutter"])
    row = next(r for r in report.patterns if r.pattern == "rgb+dsm")
    assert row.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert row.mf1 == pytest.approx((2 * 2 / (2 + 3) + 2 * 1 / (2 + 1)) / 2)
    assert row.oa == pytest.approx(7 / 8)  # clutter pixels still count
    with pytest.raises(ValueError, match="not classes"):
        _report(exclude=["water"])


def test_expected_miou_weights():
    report = _report(probs=[0.5])
    miou = {r.pattern: r.miou for r in report.patterns}
    # p = 0.5: each single pattern weight 0.25, the pair 0.25, renormalised over 0.75
    assert report.summaries["p0.5"]["miou"] == pytest.approx(sum(miou.values()) / 3)
    near_zero = expected_miou(report.patterns, 1e-9, 2)
    assert near_zero == pytest.approx(miou["rgb+dsm"])


def test_patterns_without_samples_are_not_reported():
    confmat = torch.zeros(3, 2, 2, dtype=torch.long)
    confmat[0] = torch.eye(2, dtype=torch.long)
    report = build_report(
        confmat, torch.tensor([1, 0, 0]), all_patterns=PATTERNS, class_names=["a", "b"], missing_probs=[0.5]
    )
    assert [r.pattern for r in report.patterns] == ["rgb"]
    assert "p0.5" not in report.summaries  # needs every pattern


def test_console_table_prints_every_label_as_written():
    """Labels with square brackets (``E[mIoU] p=0.1``, a class named ``car[parked]``) reach the console whole:
    rich must not read them as style markup."""
    from rich.console import Console

    from sgma.reporting import print_table, to_markdown

    report = build_report(
        torch.eye(3, dtype=torch.long).expand(3, 3, 3),
        torch.tensor([1, 1, 1]),
        all_patterns=PATTERNS,
        class_names=["road", "building", "clutter[misc]"],
        missing_probs=[0.1],
    )
    console = Console(width=200, record=True, file=io.StringIO())
    print_table(report, title="test [split]", console=console)
    printed = console.export_text()
    for label in ("E[mIoU] p=0.1", "IoU clutter[misc]", "test [split]", "Average", "rgb+dsm"):
        assert label in printed
    assert "E[mIoU] p=0.1" in to_markdown(report, title="test")
