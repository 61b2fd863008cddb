"""The ``loss`` config group: OHEM against DELIVER's law, Dice's ignored pixels, the MAS branch's row masking, and
every option training a real tiny step."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from conftest import batch_of, bind_to, compose_config
from sgma.config import CONFIG_DIR
from sgma.losses import CrossEntropy, CrossEntropyDice, OhemCrossEntropy, loss_on_rows
from sgma.opcount import OpCounter
from sgma.tasks import build_datamodule, build_module

# training_step is called without a Trainer here, so Lightning says once per module that self.log() has none
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`:UserWarning")

IGNORE = 255
LOSS_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))


def _case(seed: int, *, b=2, c=5, h=12, w=10, ignored=0.2):
    """Random logits and labels, a share of them ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g).requires_grad_()
    mask = torch.randint(0, c, (b, h, w), generator=g)
    mask[torch.rand(b, h, w, generator=g) < ignored] = IGNORE
    return logits, mask


def _ohem_reference(logits, mask, thresh=0.7, divisor=16):
    """DELIVER's OhemCrossEntropy, written the straightforward way (host reads, boolean indexing)."""
    n_min = int((mask != IGNORE).sum()) // divisor
    loss = F.cross_entropy(logits, mask, ignore_index=IGNORE, reduction="none").flatten()
    hard = loss[loss > -torch.log(torch.tensor(thresh))]
    branch = "hard"
    if hard.numel() < n_min:
        hard, branch = loss.topk(n_min).values, "top"
    return hard.mean(), branch


@pytest.mark.parametrize("min_kept,divisor", [(1 / 16, 16), (0.25, 4)])
def test_ohem_matches_the_reference_law_in_both_branches(min_kept, divisor):
    ohem = OhemCrossEntropy(ignore_index=IGNORE, min_kept=min_kept)
    branches = set()
    # flat logits: many hard pixels; a boosted true class makes most pixels easy: few hard ones (top-n_min)
    for seed, boost in [(0, 0.0), (1, 0.0), (2, 1.0), (3, 6.0), (4, 6.0), (5, 8.0)]:
        logits, mask = _case(seed, ignored=0.1 * seed)
        with torch.no_grad():
            logits += boost * F.one_hot(mask.clamp(max=4), 5).permute(0, 3, 1, 2)
        ours = ohem(logits, mask)
        (grad,) = torch.autograd.grad(ours, logits)
        ref, branch = _ohem_reference(logits, mask, divisor=divisor)
        (ref_grad,) = torch.autograd.grad(ref, logits)
        branches.add(branch)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grad, ref_grad)
    assert branches == {"hard", "top"}


def test_ohem_without_labelled_pixels_is_zero_not_nan():
    logits, mask = _case(0)
    mask[:] = IGNORE
    loss = OhemCrossEntropy(ignore_index=IGNORE)(logits, mask)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("loss", [CrossEntropy, CrossEntropyDice, OhemCrossEntropy], ids=lambda c: c.__name__)
def test_every_loss_without_labelled_pixels_is_zero_with_a_gradient_graph(loss):
    """A batch whose labels are all ignored gives 0 (CE's and CE + Dice's mean over nothing was NaN, which the
    training loss's finiteness check reports as "lower optimizer.lr"), with a graph that backward runs through."""
    fn = loss(ignore_index=IGNORE)
    logits, mask = _case(0)
    mask[:] = IGNORE
    value = fn(logits, mask)
    (grad,) = torch.autograd.grad(value, logits)
    assert float(value.detach()) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    rows = torch.tensor([True, False])  # the MAS branch's kept row has no label either
    assert float(loss_on_rows(fn, logits, mask, rows, IGNORE).detach()) == 0.0


def test_cross_entropy_with_labels_is_torchs_mean():
    logits, mask = _case(5, ignored=0.4)
    ours, ref = CrossEntropy(ignore_index=IGNORE)(logits, mask), F.cross_entropy(logits, mask, ignore_index=IGNORE)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_bad_knobs_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"loss.thresh .* got 1.5; DELIVER uses 0.7"):
        OhemCrossEntropy(ignore_index=IGNORE, thresh=1.5)
    with pytest.raises(ValueError, match=r"loss.min_kept .* got -0.1"):
        OhemCrossEntropy(ignore_index=IGNORE, min_kept=-0.1)
    with pytest.raises(ValueError, match=r"got -1.0 and 1.0; the default is 1 and 1"):
        CrossEntropyDice(ignore_index=IGNORE, ce_weight=-1.0)


def test_dice_ignores_ignored_pixels():
    logits, mask = _case(7, ignored=0.3)
    loss = CrossEntropyDice(ignore_index=IGNORE, ce_weight=0.0).dice
    value = loss(logits, mask)
    (grad,) = torch.autograd.grad(value, logits)
    ignored = (mask == IGNORE).unsqueeze(1).expand_as(logits)
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits.detach())
    assert torch.equal(loss(changed, mask), value.detach())


def test_ce_dice_is_the_weighted_sum():
    logits, mask = _case(3)
    combined = CrossEntropyDice(ignore_index=IGNORE, ce_weight=0.5, dice_weight=2.0)(logits, mask)
    ce = F.cross_entropy(logits, mask, ignore_index=IGNORE)
    dice = smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE)(logits, mask)
    torch.testing.assert_close(combined, 0.5 * ce + 2.0 * dice)


def test_rows_masking_equals_the_row_weighted_cross_entropy():
    """The MAS branch (mas.draw=batch) ignores the labels of samples without the drawn modality; for CE this is
    the per-pixel loss weighted by the rows, the formula it used before the loss group existed."""
    ce = CrossEntropy(ignore_index=IGNORE)
    for seed in range(4):
        logits, mask = _case(seed, b=4)
        rows = torch.rand(4, generator=torch.Generator().manual_seed(seed)) < 0.5
        rows[seed % 4] = True
        per_pixel = F.cross_entropy(logits, mask, ignore_index=IGNORE, reduction="none")
        weight = (mask != IGNORE).float() * rows.float().view(-1, 1, 1)
        old = (per_pixel * weight).sum() / weight.sum().clamp(min=1)
        new = loss_on_rows(ce, logits, mask, rows, IGNORE)
        torch.testing.assert_close(new, old)
        torch.testing.assert_close(torch.autograd.grad(new, logits)[0], torch.autograd.grad(old, logits)[0])
    # kept rows with no labelled pixel: 0 as before (not CE's NaN), and a zero gradient
    mask[0] = IGNORE
    rows = torch.tensor([True, False, False, False])
    value = loss_on_rows(ce, logits, mask, rows, IGNORE)
    (grad,) = torch.autograd.grad(value, logits)
    assert float(value.detach()) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def _module(tmp_path: Path, *overrides: str):
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", *overrides]), tmp_path)
    dm = build_datamodule(cfg)
    return cfg, dm, build_module(cfg, dm)


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_every_loss_option_composes_and_trains_a_step_with_the_mas_branch(option, tmp_path):
    assert {"ce", "ohem", "ce_dice"} <= set(LOSS_OPTIONS)
    cfg, dm, module = _module(tmp_path, "model=sgma", f"loss={option}")
    assert cfg.hydra.runtime.choices["loss"] == option and module.mas_branch
    expected = {"ce": CrossEntropy, "ohem": OhemCrossEntropy, "ce_dice": CrossEntropyDice}[option]
    assert type(module.loss) is expected and module.loss.ignore_index == module.ignore_index
    module.train()
    # mixed patterns, so the MAS branch ignores some samples' labels under mas.draw=batch
    batch = module.on_before_batch_transfer(batch_of(dm, [6, 0, 3, 1]), 0)  # the host-side packing plan
    step = OpCounter()
    with step:  # nothing read on the host (counted on CPU, as tests/test_speed.py does)
        loss = module.training_step(batch, 0)["loss"]
        loss.backward()
    expected = collections.Counter()
    if option == "ce_dice":  # smp's F.one_hot checks the label range on the host on CPU only (not on CUDA)
        with OpCounter() as one_hot:
            F.one_hot(batch["mask"].clamp(max=0), dm.num_classes)
        expected = collections.Counter({k: 2 * v for k, v in one_hot.syncs.items()})  # main pass + MAS branch
    assert step.syncs == expected
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_a_training_step_without_labelled_pixels_is_zero_not_nan(option, tmp_path):
    """With the MAS branch on, a batch whose labels are all ignored trains nothing and keeps the loss finite, so the
    finiteness guard does not stop the run with a misleading "lower optimizer.lr"."""
    _, dm, module = _module(tmp_path, "model=sgma", f"loss={option}")
    module.train()
    batch = module.on_before_batch_transfer(batch_of(dm, [6, 0, 3, 1]), 0)
    batch["mask"][:] = IGNORE
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    module._check_finite()  # the guard's flag stayed clear


def test_the_loss_partial_cannot_set_its_own_ignore_index(tmp_path):
    """The module's ignore index (the datasets' 255, which metrics and the MAS branch use) overrode the partial's
    silently: the config showed loss.ignore_index=0 while the loss ignored 255."""
    with pytest.raises(ValueError, match=r"loss\.ignore_index=0: the ignore index is the dataset's, 255"):
        _module(tmp_path, "+loss.ignore_index=0")
    assert _module(tmp_path, "+loss.ignore_index=255")[2].loss.ignore_index == IGNORE  # the same value is harmless


def test_a_stored_config_without_loss_rebuilds_cross_entropy(tmp_path):
    """Runs trained before the loss group existed trained with cross-entropy; eval/predict rebuild them so."""
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv"]), tmp_path)
    with open_dict(cfg):
        del cfg["loss"]
    dm = build_datamodule(cfg)
    assert type(build_module(cfg, dm).loss) is CrossEntropy
