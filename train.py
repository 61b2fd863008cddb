"""Train, then evaluate every modality pattern: ``python train.py [group=option ...] [key=value ...]``.

SIGINT (Ctrl-C), SIGTERM, or SLURM's time-limit warning (SIGUSR1 / SIGUSR2) during training saves
``<run>/checkpoints/last.ckpt`` and exits with 128 + the signal number (130, 143, 138, 140) after logging the
``ckpt_path=...`` to resume from; outside training (data preparation, the test, the plots) it stops at once with the
same status, naming the existing ``last.ckpt``. A SLURM job stopped by the time-limit warning is requeued first and
resumes by itself (README "Clusters and sweeps").
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sgma.cluster import requeue
from sgma.config import CONFIG_DIR, register_configs
from sgma.recovery import TrainingInterrupted
from sgma.tasks import objective, train

register_configs()
log = logging.getLogger("sgma")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    name = cfg.get("optimized_metric")
    if not name and str(HydraConfig.get().sweeper.get("_target_", "")).endswith("OptunaSweeper"):
        raise ValueError(
            "hydra/sweeper=optuna maximises what train.py returns, optimized_metric, which is null: use "
            "hparams_search=optuna (it sets optimized_metric=val/avg/miou_best) or set optimized_metric=<a val/ metric>"
        )
    try:
        metrics, _ = train(cfg)
    except TrainingInterrupted as err:  # already logged with the checkpoint to resume from; not a crash
        requeue(err)
        sys.exit(err.exit_code)
    if not name:
        return None
    value = objective(metrics, name)  # what a Hydra sweeper optimises (hparams_search=optuna)
    log.info("objective %s = %r", name, value)
    return value


if __name__ == "__main__":
    main()
