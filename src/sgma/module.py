"""The LightningModule: trains the segmentor with modality dropout and scores every modality pattern."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric

from sgma.checks import check_flag, is_number
from sgma.data.sharding import sum_over_ranks
from sgma.losses import loss_on_rows
from sgma.metrics import IGNORE_INDEX, PatternConfusion, PatternReport, build_report
from sgma.models.segmentor import MultiModalSegmentor

# Lightning warns whenever the LightningModule (not the DataModule) defines on_before_batch_transfer; ours is
# meant to be the module's (it plans the encoder's packing, a model concern) and the data module has none.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in"
)
# Under DDP Lightning recommends `sync_dist=True` for each unsynced epoch-level value, one line per name (over a
# hundred per evaluation). Ours are equal on every rank by construction: the pattern and summary metrics come from
# the all-reduced confusion matrices (`<split>/<pattern or summary>/<metric>`), the MAS and robustness means and
# `train/loss_main|mas` from all-reduced sums. The hint stays for any other name (`train/loss` is rank 0's mean).
RANK_EQUAL_NAMES = r"(?:(?:train|val|test)/[^'/]+/[^']+|mas/[^']+|train/loss_ma(?:in|s))'"
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('" + RANK_EQUAL_NAMES)


def rows_from(keep: Tensor) -> Tensor:
    """(B,) row indices: each row where ``keep`` is true itself, the others one of those rows in turn (on the
    device, no host sync). ``keep`` must hold at least one true row."""
    b = keep.shape[0]
    position = torch.arange(b, device=keep.device)
    kept_first = torch.argsort((~keep).to(torch.uint8), stable=True)
    return torch.where(keep, position, kept_first[position % keep.sum().clamp(min=1)])


def draw_categorical(scores: Tensor) -> Tensor:
    """One index per row of ``scores`` (..., M), drawn with probability proportional to the score.

    The exponential race, argmax(s_m / E_m) with E_m ~ Exp(1) from the device's global generator: the same
    law, and the same computation, as ``torch.multinomial(scores, 1)``, whose one-sample path first reads
    the scores on the host to validate them (a GPU sync per draw). Scores must be finite and >= 0 with a
    positive entry per row (:meth:`SegmentationModule._fragility` makes them so).
    """
    noise = torch.empty_like(scores).exponential_().clamp_min(torch.finfo(scores.dtype).tiny)
    return (scores / noise).argmax(dim=-1)


class SegmentationModule(L.LightningModule):
    """Dataset facts (pattern names, class names) are passed in by the caller that built the datamodule.

    ``loss`` builds the segmentation loss from the module's ``ignore_index`` (a ``conf/loss`` partial:
    cross-entropy, the paper's, by default; OHEM or CE + Dice as options). Training loss:
    ``lambda_main * loss(fused)``, plus ``lambda_mas * loss(single-modality branch)`` when the MAS branch is on
    (paper: 2 and 1, with cross-entropy); ``val/loss`` and ``test/loss`` are the same loss on the fused
    prediction. The MAS branch is training-only: validation, test and inference never run it.

    MAS branch: the step's robustness maps (mean over space and scales) give each available modality a
    relative robustness rho_m = k * r_m (k available modalities, so 1 means "average"); the paper's scores
    ``s_m = (1/rho_m) / sum_m' (1/rho_m')`` pick one modality, either one for the whole batch
    (``mas_draw=batch``, over the modalities present in the batch, rho averaged over the samples that have
    them) or one per sample (``mas_draw=sample``). That modality is fused and decoded *alone* from the
    main pass's prepared features (no second encoder pass, no second run of SGF's projectors) and supervised
    with its own loss. Fusions without robustness maps (mean, concat) use an EMA of each modality's
    own-branch cross-entropy (whatever the training loss) as the fragility instead (higher loss = more
    fragile), so ``s_m`` is proportional to it.

    Logged metrics: ``train/loss`` (and ``train/loss_main``, ``train/loss_mas``, ``train/mas/drawn_<m>``,
    ``train/robustness/s<i>/<m>``); for ``val`` and ``test`` per pattern ``{split}/{pattern}/{miou,mf1,oa}``
    and the summaries ``{split}/avg/*``, ``{split}/top1/miou``, ``{split}/last1/miou``,
    ``{split}/p<prob>/miou``; ``val/avg/miou_best`` tracks the best validation Average. The MAS and
    robustness means are accumulated on the device and logged once per epoch.

    A non-finite training loss raises ``FloatingPointError`` (the step and the loss, "lower optimizer.lr or
    check the inputs") at the next check: every ``trainer.log_every_n_steps`` batches, at the epoch's last
    batch (before its validation) and at the epoch's end.
    """

    def __init__(
        self,
        *,
        net: MultiModalSegmentor,
        loss: Callable[..., torch.nn.Module],
        optimizer: Callable,
        scheduler: Callable | None,
        patterns: Sequence[str],
        class_names: Sequence[str],
        exclude_classes: Sequence[str] = (),
        missing_probs: Sequence[float] = (0.1, 0.3, 0.5),
        ignore_index: int = IGNORE_INDEX,
        mas_branch: bool = False,
        lambda_main: float = 1.0,
        lambda_mas: float = 1.0,
        mas_draw: str = "batch",
        mas_loss_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.patterns = list(patterns)
        self.modality_names = [m.name for m in net.modalities]
        self.class_names = list(class_names)
        self.exclude_classes = list(exclude_classes)
        probs = missing_probs if isinstance(missing_probs, Sequence) and not isinstance(missing_probs, str) else None
        if probs is None or not all(is_number(p) and 0 <= p < 1 for p in probs):
            raise ValueError(
                f"eval.missing_probs={missing_probs!r} must be a list of numbers in [0, 1), e.g. [0.1, 0.3, 0.5]"
            )
        self.missing_probs = list(probs)
        self.ignore_index = ignore_index
        if not callable(loss):
            raise TypeError(
                f"loss must build a loss from ignore_index (a conf/loss option such as loss=ce), got {loss!r}"
            )
        # a partial's own ignore_index would be overridden by the module's below, while the config showed it
        own = (getattr(loss, "keywords", None) or {}).get("ignore_index", ignore_index)
        if own != ignore_index:
            raise ValueError(
                f"loss.ignore_index={own!r}: the ignore index is the dataset's, {ignore_index} (IGNORE_INDEX), not a "
                f"loss option: every dataset writes its unlabelled pixels as {ignore_index} (a folder dataset maps the "
                f"label value named by ignore_index in its dataset.yaml to it), and the metrics and the MAS branch "
                f"ignore the same; drop the loss.ignore_index override"
            )
        self.loss = loss(ignore_index=ignore_index)  # (B, C, H, W) logits, (B, H, W) mask -> scalar
        self.confusion = torch.nn.ModuleDict(  # one per Lightning loop
            {
                loop: PatternConfusion(
                    num_patterns=len(self.patterns),
                    num_classes=len(self.class_names),
                    ignore_index=ignore_index,
                )
                for loop in ("val", "test")
            }
        )
        self.val_best = MaxMetric()
        self.reports: dict[str, PatternReport] = {}
        self.test_split = "test"  # eval.py runs the test loop on any split and names the metrics after it
        check_flag("mas.branch", mas_branch)
        for key, value in (("mas.lambda_main", lambda_main), ("mas.lambda_mas", lambda_mas)):
            if not (is_number(value) and value >= 0):  # < 0 ascends that loss
                raise ValueError(f"{key}={value!r} must be a number >= 0 (the paper: lambda_main 2, lambda_mas 1)")
        if not (is_number(mas_loss_momentum) and 0 < mas_loss_momentum <= 1):
            raise ValueError(
                f"mas.loss_momentum={mas_loss_momentum!r} must be in (0, 1] (an EMA's weight of the new value)"
            )
        if mas_draw not in ("batch", "sample"):
            raise ValueError(f"mas.draw must be 'batch' or 'sample', got {mas_draw!r}")
        self.mas_branch = mas_branch
        self.lambda_main = lambda_main
        self.lambda_mas = lambda_mas
        self.mas_draw = mas_draw
        self.mas_loss_momentum = mas_loss_momentum
        # fragility from each modality's own-branch loss, for fusions without robustness maps
        self.register_buffer("mas_loss_ema", torch.ones(len(self.modality_names)))
        # device-side state of a training epoch (not saved): running sums of the logged means, and the
        # loss-finiteness guard's first bad step (-1: none yet) with its loss
        self._epoch_sums: dict[str, tuple[Tensor, Tensor]] = {}
        self._bad_step: Tensor | None = None
        self._bad_loss: Tensor | None = None

    def forward(self, batch: dict[str, Tensor], *, return_robustness: bool = False):
        inputs = {name: batch[name] for name in self.modality_names}
        return self.net(
            inputs, batch["available"], return_robustness=return_robustness, encode_index=batch.get("encode_index")
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Plan the encoder's packing on the host, where the batch's availability is before it moves to the
        device: with the plan in the batch, no step waits for the GPU to find the available slots."""
        if isinstance(batch, dict) and isinstance(batch.get("available"), Tensor) and "encode_index" not in batch:
            batch["encode_index"] = self.net.plan_encoding(batch["available"])
        return batch

    # training ----------------------------------------------------------------------------------------------
    # Nothing in a training step reads a tensor value on the host (no .item(), no boolean indexing, no Python
    # branch on a tensor): the host queues the whole step without waiting for the GPU. Logged MAS and
    # robustness means accumulate on the device and are read once per epoch; the loss-finiteness guard is a
    # device flag read every `trainer.log_every_n_steps` steps (see `_check_finite`).
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | None]:
        inputs = {name: batch[name] for name in self.modality_names}
        available, mask = batch["available"], batch["mask"]
        out_size = tuple(mask.shape[-2:])
        prepared = self.net.features(inputs, available, batch.get("encode_index"))
        out = self.net.fuse_decode(prepared, available, out_size, return_robustness=True)
        robustness = self._robustness_summary(out.robustness, available)  # (B, M) or None
        loss_main = self.loss(out.logits, mask)
        loss = self.lambda_main * loss_main
        bs = mask.shape[0]
        if self.mas_branch:
            loss_mas = self._mas_branch(prepared, available, mask, out_size, robustness)
            loss = loss + self.lambda_mas * loss_mas
            # epoch means with the others, over every DDP rank (not `sync_dist`: Lightning's progress bar computes
            # such a mean on rank 0 alone at the epoch end, and rank 0 then waits there for the other ranks)
            losses = torch.stack([loss_main.detach().float(), loss_mas.detach().float()])
            self._accumulate("losses", losses * bs, losses.new_full((), bs))
        self._watch_loss(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        return {"loss": loss, "robustness": None if robustness is None else robustness.detach()}

    def _accumulate(self, name: str, total: Tensor, count: Tensor) -> None:
        """Add a step's weighted sum and weight to the epoch's running totals (device tensors, no sync)."""
        if name in self._epoch_sums:
            self._epoch_sums[name] = (self._epoch_sums[name][0] + total, self._epoch_sums[name][1] + count)
        else:
            self._epoch_sums[name] = (total, count)

    def _robustness_summary(self, maps: list[Tensor] | None, available: Tensor) -> Tensor | None:
        """Mean robustness per sample and modality over space and scales (B, M); accumulates the per-scale
        means of the relative robustness for the epoch's ``train/robustness/s<i>/<m>`` logs."""
        if maps is None:
            return None
        per_scale = torch.stack([m.float().mean(dim=(-2, -1)) for m in maps])  # (S, B, M)
        seen = available.float()
        k = seen.sum(dim=1, keepdim=True)  # (B, 1)
        relative = per_scale.detach() * k  # 1 = the average share of this sample's modalities
        self._accumulate("robustness", (relative * seen).sum(dim=1), seen.sum(dim=0))  # (S, M), (M,)
        return per_scale.mean(dim=0)

    def _fragility(self, robustness: Tensor | None, available: Tensor) -> Tensor:
        """Per-sample fragility (B, M), 0 for missing: 1/rho from robustness maps, else the loss EMA.

        Sanitised so that the draw always sees a valid law: NaN (a diverging run, caught later by the
        finiteness guard with a clear message) counts as neutral, and every available modality keeps a score
        in [1e-6, 1e6].
        """
        if robustness is None:
            fragility = self.mas_loss_ema.expand_as(available)
        elif self.mas_draw == "batch":  # rho of each modality averaged over the samples that have it
            relative = robustness * available.sum(dim=1, keepdim=True)
            count = available.sum(dim=0).clamp(min=1)
            batch_rho = (relative * available).sum(dim=0) / count
            fragility = (1.0 / batch_rho.clamp(min=1e-6)).expand_as(available)
        else:
            relative = robustness * available.sum(dim=1, keepdim=True)
            fragility = 1.0 / relative.clamp(min=1e-6)
        fragility = torch.nan_to_num(fragility, nan=1.0).clamp(min=1e-6, max=1e6)
        return fragility.masked_fill(~available, 0)

    def _mas_branch(
        self,
        prepared: list[Tensor],
        available: Tensor,
        mask: Tensor,
        out_size: tuple[int, int],
        robustness: Tensor | None,
    ) -> Tensor:
        """Fuse and decode one drawn modality alone from the main pass's prepared features; return its loss.

        One modality per sample lets the fusion use its exact closed form (``single=True``; for SGF two 1x1 convs
        of the drawn token, see :meth:`~sgma.models.sgf.SemanticGuidedFusion.fuse_single`).

        Static shapes: with ``mas_draw=batch`` the whole batch is decoded under the drawn modality, and the
        labels of the samples that lack it are ignored in the loss (instead of cutting those samples out, which
        needs their count on the host); for cross-entropy that is weight 0. Those rows are decoded from copies
        of the rows that have the modality, so the head's BatchNorm (batch statistics, running averages) sees
        only real features, never the placeholder in a missing slot.
        """
        fragility = self._fragility(None if robustness is None else robustness.detach(), available)
        b, num_modalities = available.shape
        if self.mas_draw == "batch":
            # s_m = (1/rho_m) / sum over the modalities present in the batch
            drawn = draw_categorical(fragility.max(dim=0).values).expand(b)
        else:
            drawn = draw_categorical(fragility)
        alone = drawn.unsqueeze(1) == torch.arange(num_modalities, device=drawn.device)  # (B, M) one-hot
        has_drawn = (alone & available).any(dim=1)  # (B,) samples that have their drawn modality
        rows = has_drawn.float()
        if self.mas_draw == "batch":
            prepared = [p.index_select(0, rows_from(has_drawn)) for p in prepared]
        logits = self.net.fuse_decode(prepared, alone, out_size, single=True).logits
        if self.mas_draw == "batch":
            loss = loss_on_rows(self.loss, logits, mask, has_drawn, self.ignore_index)
        else:  # every sample drew one of its own modalities
            loss = self.loss(logits, mask)
        self._accumulate("mas_drawn", (alone.float() * rows[:, None]).sum(dim=0), rows.sum())
        if robustness is None:  # keep the loss-based fragility of the drawn modalities up to date
            # per-sample cross-entropy whatever the training loss: a per-sample measure that OHEM or the
            # batch-wide Dice do not give; a second CE over the logits, cheap next to the network
            with torch.no_grad():
                per_pixel = F.cross_entropy(logits.detach(), mask, ignore_index=self.ignore_index, reduction="none")
                valid = (mask != self.ignore_index).float()
                per_sample = (per_pixel * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1)
                weight = alone.float() * rows[:, None]  # (B, M)
                # every DDP rank's samples (DDP would otherwise keep rank 0's EMA: it broadcasts buffers)
                total, count = sum_over_ranks((weight * per_sample[:, None]).sum(dim=0), weight.sum(dim=0))
                mean_loss = total / count.clamp(min=1)
                update = (count > 0) & torch.isfinite(mean_loss)
                self.mas_loss_ema.copy_(
                    torch.where(update, self.mas_loss_ema.lerp(mean_loss, self.mas_loss_momentum), self.mas_loss_ema)
                )
        return loss

    # the loss-finiteness guard ------------------------------------------------------------------------------
    def _watch_loss(self, loss: Tensor) -> None:
        """Remember (on the device) the first step whose loss is not finite, and that loss."""
        loss = loss.detach().float()
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        bad = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, self.global_step, self._bad_step)
        self._bad_loss = torch.where(bad, loss, self._bad_loss)

    def _check_finite(self) -> None:
        """Raise if a training loss was not finite (one read of a device flag), on every DDP rank at once: a rank
        that raised alone would leave the others waiting for it in the next collective."""
        if self._bad_step is None:
            return
        if int(sum_over_ranks((self._bad_step >= 0).long())[0]) == 0:  # how many ranks saw one
            return
        step = int(self._bad_step)
        if step >= 0:
            raise FloatingPointError(
                f"training loss is {float(self._bad_loss)} at step {step}; lower optimizer.lr or check the inputs"
            )
        raise FloatingPointError(
            "training loss is not finite on another DDP rank (its log says at which step); lower optimizer.lr or "
            "check the inputs"
        )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # every log_every_n_steps batches and before the epoch's validation, so that a NaN is reported before
        # anything downstream (validation metrics, checkpoints, the MAS sampler) sees it
        every = max(1, int(self.trainer.log_every_n_steps or 1))
        if (batch_idx + 1) % every == 0 or self.trainer.is_last_batch:
            self._check_finite()

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = {}

    def on_train_epoch_end(self) -> None:
        self._check_finite()
        values = self._epoch_means()
        if values:
            self.log_dict(values, on_step=False, on_epoch=True)

    def _epoch_means(self) -> dict[str, float]:
        """The epoch's loss, MAS and robustness means over every DDP rank's samples (one all_reduce and one
        transfer from the device for all of them; every rank holds the same sums: the model decides which);
        the sums start again."""
        if not self._epoch_sums:
            return {}
        names = list(self._epoch_sums)
        flat = torch.cat([t.detach().float().reshape(-1) for name in names for t in self._epoch_sums[name]])
        flat = sum_over_ranks(flat)[0].tolist()
        values: dict[str, float] = {}
        for name in names:
            total, count = self._epoch_sums[name]
            totals, flat = flat[: total.numel()], flat[total.numel() :]
            counts, flat = flat[: count.numel()], flat[count.numel() :]
            if name == "robustness":  # totals (S, M), counts (M,)
                m = len(self.modality_names)
                for scale in range(len(totals) // m):
                    for i, modality in enumerate(self.modality_names):
                        if counts[i] > 0:
                            values[f"train/robustness/s{scale + 1}/{modality}"] = totals[scale * m + i] / counts[i]
            elif name == "mas_drawn" and counts[0] > 0:  # totals (M,), counts ()
                for i, modality in enumerate(self.modality_names):
                    values[f"train/mas/drawn_{modality}"] = totals[i] / counts[0]
            elif name == "losses":  # totals (2,) batch-size-weighted, counts () samples
                values["train/loss_main"], values["train/loss_mas"] = (t / counts[0] for t in totals)
        self._epoch_sums = {}
        return values

    # evaluation -----------------------------------------------------------------------------------------
    def _eval_step(self, loop: str, split: str, batch: dict[str, Tensor]) -> None:
        out = self(batch)
        loss = self.loss(out.logits, batch["mask"])
        self.log(f"{split}/loss", loss, on_epoch=True, batch_size=batch["mask"].shape[0], sync_dist=True)
        self.confusion[loop].update(out.logits.argmax(dim=1), batch["mask"], batch["pattern"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", "val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", self.test_split, batch)

    def _eval_epoch_end(self, loop: str, split: str) -> PatternReport:
        metric = self.confusion[loop]
        confmat, samples = metric.compute()
        report = build_report(
            confmat.cpu(),
            samples.cpu(),
            all_patterns=self.patterns,
            class_names=self.class_names,
            exclude_classes=self.exclude_classes,
            missing_probs=self.missing_probs,
        )
        metric.reset()
        values = report.metrics(split, per_class=loop == "test")
        # NaN (a class never seen) would poison checkpoint monitoring; such entries are simply not logged
        self.log_dict({k: v for k, v in values.items() if not math.isnan(v)}, sync_dist=False)
        self.reports[split] = report
        return report

    def on_validation_epoch_end(self) -> None:
        report = self._eval_epoch_end("val", "val")
        if self.trainer.sanity_checking or "avg" not in report.summaries:
            return
        self.val_best.update(torch.tensor(report.summaries["avg"]["miou"]))
        self.log("val/avg/miou_best", self.val_best.compute(), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_split)

    def validation_metric_names(self, val_patterns: Sequence[str]) -> set[str]:
        """Every name a validation epoch over ``val_patterns`` logs (what a checkpoint ``monitor`` may name)."""
        n, c = len(self.patterns), len(self.class_names)
        report = build_report(
            torch.eye(c).expand(n, c, c),  # perfect scores: no class is NaN, so no name is left out
            torch.tensor([int(p in val_patterns) for p in self.patterns]),
            all_patterns=self.patterns,
            class_names=self.class_names,
            exclude_classes=self.exclude_classes,
            missing_probs=self.missing_probs,
        )
        return {*report.metrics("val"), "val/loss", "val/avg/miou_best"}

    # optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
