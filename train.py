"""Train, then evaluate every modality pattern: ``python train.py [group=option ...] [key=value ...]``.

SIGINT (Ctrl-C) or SIGTERM saves ``<run>/checkpoints/last.ckpt`` and exits with 128 + the signal number
(130, 143) after logging the ``ckpt_path=...`` to resume from.
"""

import sys

import hydra
from omegaconf import DictConfig

from sgma.config import CONFIG_DIR, register_configs
from sgma.recovery import TrainingInterrupted
from sgma.tasks import train

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except TrainingInterrupted as err:  # already logged with the checkpoint to resume from; not a crash
        sys.exit(err.exit_code)
    # the value a Hydra sweeper optimises
    return metrics.get("test/avg/miou", metrics.get("val/avg/miou"))


if __name__ == "__main__":
    main()
