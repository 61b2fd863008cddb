"""Training callbacks."""

from __future__ import annotations

import lightning as L
from lightning.pytorch import Callback

from sgma.data.sharding import sum_over_ranks


class RobustnessFeedback(Callback):
    """Feeds each training step's robustness into the MAS sampler's memory and logs what MAS does.

    Per step: the per-sample, per-modality mean robustness that the module returns goes into the memory's
    epoch buffers, which stay on the training device (no per-step transfer, so the step never waits for the
    GPU). Per epoch: the law the epoch drew from is logged (``mas/present_<m>``: chance a drawn pattern holds
    m, ``mas/fragile_<m>``: share of draws whose most fragile modality is m; during warm-up, the ``missing``
    policy's), then the buffers are summed across DDP ranks and folded into the memory (EMA), so every rank
    draws the next epoch from the same memory, and its mean relative robustness (``mas/rho_<m>``) is logged.
    """

    @staticmethod
    def _sampler(trainer: L.Trainer):
        from sgma.data.mas import MASSampler

        sampler = getattr(trainer.datamodule, "train_sampler", None) if trainer.datamodule else None
        return sampler if isinstance(sampler, MASSampler) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sampler = self._sampler(trainer)
        robustness = outputs.get("robustness") if isinstance(outputs, dict) else None
        if sampler is not None and robustness is not None:
            sampler.memory.observe(batch["index"], batch["available"], robustness)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = self._sampler(trainer)
        if sampler is None:
            return
        names = [m.name for m in trainer.datamodule.modalities]
        values = {}
        for prefix, probs in (  # before the commit: the memory this epoch's draw read
            ("present", sampler.modality_probabilities()),
            ("fragile", sampler.fragile_modality_share()),
        ):
            values.update({f"mas/{prefix}_{n}": float(p) for n, p in zip(names, probs, strict=True)})
        sampler.memory.commit(all_reduce=lambda stacked: sum_over_ranks(stacked)[0])
        observed = sampler.memory.values
        values.update({f"mas/rho_{n}": float(observed[:, i].mean()) for i, n in enumerate(names)})
        pl_module.log_dict(values, on_step=False, on_epoch=True)
