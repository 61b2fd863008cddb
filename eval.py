"""Score a checkpoint on every modality pattern: ``python eval.py ckpt_path=PATH [split=val] [patterns=[rgb]]``."""

import hydra
from omegaconf import DictConfig

from sgma.config import CONFIG_DIR, register_configs
from sgma.tasks import evaluate

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = evaluate(cfg)
    return metrics.get(f"{cfg.split}/avg/miou")


if __name__ == "__main__":
    main()
