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

    Logged metrics: ``train/loss``; for ``val`` and ``test`` per pattern ``{split}/{pattern}/{miou,mf1,oa}``
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

    def forward(self, batch: dict[str, Tensor], *, return_robustness: bool = False):
        inputs = {name: batch[name] for name in self.modality_names}
        return self.net(inputs, batch["available"], return_robustness=return_robustness)

    def loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        return F.cross_entropy(logits, mask, ignore_index=self.ignore_index)

    # training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch)
        loss = self.loss(out.logits, batch["mask"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}; lower optimizer.lr or check the inputs"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["mask"].shape[0])
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
