"""The LightningModule: trains the segmentor with modality dropout and scores every modality pattern."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric

from sgma.metrics import IGNORE_INDEX, PatternConfusion, PatternReport, build_report
from sgma.models.segmentor import MultiModalSegmentor


class SegmentationModule(L.LightningModule):
    """Dataset facts (pattern names, class names) are passed in by the caller that built the datamodule.

    Training loss: ``lambda_main * CE(fused)``, plus ``lambda_mas * CE(single-modality branch)`` when the MAS
    branch is on (paper: 2 and 1). The MAS branch is training-only: validation, test and inference never run it.

    MAS branch: the step's robustness maps (mean over space and scales) give each available modality a
    relative robustness rho_m = k * r_m (k available modalities, so 1 means "average"); the paper's scores
    ``s_m = (1/rho_m) / sum_m' (1/rho_m')`` pick one modality, either one for the whole batch
    (``mas_draw=batch``, over the modalities present in the batch, rho averaged over the samples that have
    them) or one per sample (``mas_draw=sample``). That modality is fused and decoded *alone* from the
    cached encoder features (no second encoder pass) and supervised with its own cross-entropy. Fusions
    without robustness maps (mean, concat) use an EMA of each modality's own-branch loss as the fragility
    instead (higher loss = more fragile), so ``s_m`` is proportional to it.

    Logged metrics: ``train/loss`` (and ``train/loss_main``, ``train/loss_mas``, ``train/mas/drawn_<m>``,
    ``train/robustness/s<i>/<m>``); for ``val`` and ``test`` per pattern ``{split}/{pattern}/{miou,mf1,oa}``
    and the summaries ``{split}/avg/*``, ``{split}/top1/miou``, ``{split}/last1/miou``,
    ``{split}/p<prob>/miou``; ``val/avg/miou_best`` tracks the best validation Average.
    """

    def __init__(
        self,
        *,
        net: MultiModalSegmentor,
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
        self.missing_probs = list(missing_probs)
        self.ignore_index = ignore_index
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
        if mas_draw not in ("batch", "sample"):
            raise ValueError(f"mas.draw must be 'batch' or 'sample', got {mas_draw!r}")
        self.mas_branch = mas_branch
        self.lambda_main = lambda_main
        self.lambda_mas = lambda_mas
        self.mas_draw = mas_draw
        self.mas_loss_momentum = mas_loss_momentum
        # fragility from each modality's own-branch loss, for fusions without robustness maps
        self.register_buffer("mas_loss_ema", torch.ones(len(self.modality_names)))

    def forward(self, batch: dict[str, Tensor], *, return_robustness: bool = False):
        inputs = {name: batch[name] for name in self.modality_names}
        return self.net(inputs, batch["available"], return_robustness=return_robustness)

    def loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        return F.cross_entropy(logits, mask, ignore_index=self.ignore_index)

    # training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | None]:
        inputs = {name: batch[name] for name in self.modality_names}
        available, mask = batch["available"], batch["mask"]
        out_size = tuple(mask.shape[-2:])
        feats = self.net.encode(inputs, available)
        out = self.net.decode(feats, available, out_size, return_robustness=True)
        robustness = self._robustness_summary(out.robustness, available)  # (B, M) or None
        loss_main = self.loss(out.logits, mask)
        loss = self.lambda_main * loss_main
        bs = mask.shape[0]
        if self.mas_branch:
            loss_mas = self._mas_branch(feats, available, mask, out_size, robustness)
            loss = loss + self.lambda_mas * loss_mas
            self.log("train/loss_main", loss_main, on_step=False, on_epoch=True, batch_size=bs)
            self.log("train/loss_mas", loss_mas, on_step=False, on_epoch=True, batch_size=bs)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}; lower optimizer.lr or check the inputs"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        return {"loss": loss, "robustness": None if robustness is None else robustness.detach()}

    def _robustness_summary(self, maps: list[Tensor] | None, available: Tensor) -> Tensor | None:
        """Mean robustness per sample and modality over space and scales (B, M); logs per-scale means."""
        if maps is None:
            return None
        per_scale = torch.stack([m.float().mean(dim=(-2, -1)) for m in maps])  # (S, B, M)
        k = available.sum(dim=1, keepdim=True).float()  # (B, 1)
        relative = per_scale * k  # 1 = the average share of this sample's modalities
        seen = available.float()
        for scale in range(per_scale.shape[0]):
            for i, name in enumerate(self.modality_names):
                n = seen[:, i].sum()
                if n > 0:
                    value = (relative[scale, :, i] * seen[:, i]).sum() / n
                    self.log(
                        f"train/robustness/s{scale + 1}/{name}", value, on_step=False, on_epoch=True, batch_size=int(n)
                    )
        return per_scale.mean(dim=0)

    def _fragility(self, robustness: Tensor | None, available: Tensor) -> Tensor:
        """Per-sample fragility (B, M), 0 for missing: 1/rho from robustness maps, else the loss EMA."""
        if robustness is None:
            fragility = self.mas_loss_ema.expand_as(available).clone()
        elif self.mas_draw == "batch":  # rho of each modality averaged over the samples that have it
            relative = robustness * available.sum(dim=1, keepdim=True)
            count = available.sum(dim=0).clamp(min=1)
            batch_rho = (relative * available).sum(dim=0) / count
            fragility = (1.0 / batch_rho.clamp(min=1e-6)).expand_as(available).clone()
        else:
            relative = robustness * available.sum(dim=1, keepdim=True)
            fragility = 1.0 / relative.clamp(min=1e-6)
        return torch.where(available, fragility, torch.zeros_like(fragility))

    def _mas_branch(
        self,
        feats: list[Tensor],
        available: Tensor,
        mask: Tensor,
        out_size: tuple[int, int],
        robustness: Tensor | None,
    ) -> Tensor:
        """Fuse and decode one drawn modality alone from the cached features; return its cross-entropy."""
        fragility = self._fragility(None if robustness is None else robustness.detach(), available)
        num_modalities = available.shape[1]
        if self.mas_draw == "batch":
            # s_m = (1/rho_m) / sum over the modalities present in the batch
            scores = fragility.max(dim=0).values
            chosen = int(torch.multinomial(scores / scores.sum(), 1))
            rows = available[:, chosen]
            drawn = torch.full((int(rows.sum()),), chosen, device=mask.device)
            feats = [f[rows] for f in feats]
            mask = mask[rows]
        else:
            drawn = torch.multinomial(fragility / fragility.sum(dim=1, keepdim=True), 1).squeeze(1)
        alone = F.one_hot(drawn, num_modalities).bool()
        logits = self.net.decode(feats, alone, out_size).logits
        loss = self.loss(logits, mask)
        for i, name in enumerate(self.modality_names):
            self.log(
                f"train/mas/drawn_{name}",
                (drawn == i).float().mean(),
                on_step=False,
                on_epoch=True,
                batch_size=drawn.numel(),
            )
        if robustness is None:  # keep the loss-based fragility of the drawn modalities up to date
            with torch.no_grad():
                per_pixel = F.cross_entropy(logits.detach(), mask, ignore_index=self.ignore_index, reduction="none")
                valid = (mask != self.ignore_index).float()
                per_sample = (per_pixel * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1)
                for i in drawn.unique().tolist():
                    mean_loss = per_sample[drawn == i].mean()
                    self.mas_loss_ema[i].lerp_(mean_loss, self.mas_loss_momentum)
        return loss

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

    # optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
