"""Label maps of one scene folder (<modality>.tif per modality) or of a folder of scenes (<modality>/<stem>.tif).

``python predict.py ckpt_path=PATH input=FOLDER [pattern=rgb+dsm] [robustness=true] [overwrite=true]``
"""

import hydra
from omegaconf import DictConfig

from sgma.config import CONFIG_DIR, register_configs
from sgma.inference import predict

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
