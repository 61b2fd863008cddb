"""Train, then evaluate every modality pattern: ``python train.py [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from sgma.config import CONFIG_DIR, register_configs
from sgma.tasks import train

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    # the value a Hydra sweeper optimises
    return metrics.get("test/avg/miou", metrics.get("val/avg/miou"))


if __name__ == "__main__":
    main()
