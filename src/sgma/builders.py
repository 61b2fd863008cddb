"""Objects built from a composed run config, in one place, so a checkpoint's stored config rebuilds exactly the
trained model (train, eval, predict and the notebook all build through here)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from sgma.data.datamodule import MultiModalDataModule
from sgma.losses import CrossEntropy
from sgma.module import SegmentationModule
from sgma.utils import instantiate


def build_datamodule(cfg: DictConfig) -> MultiModalDataModule:
    data = cfg.data
    return MultiModalDataModule(
        dataset=instantiate(cfg.dataset.builder),
        splits=OmegaConf.to_container(cfg.dataset.splits, resolve=True),
        missing=instantiate(cfg.missing),
        batch_size=data.batch_size,
        eval_batch_size=data.get("eval_batch_size"),
        num_workers=data.num_workers,
        pin_memory=data.get("pin_memory", False),
        val_patterns=data.val_patterns,
        test_patterns=data.test_patterns,
        seed=cfg.seed,
        sampler=data.get("sampler", "random"),
        mas_options=OmegaConf.to_container(data.mas, resolve=True) if data.get("mas") else None,
        # configs written before augmentation existed have no `augment`: they trained without it (none)
        augment=instantiate(cfg.augment) if cfg.get("augment") else None,
    )


def build_module(cfg: DictConfig, dm: MultiModalDataModule) -> SegmentationModule:
    # dataset facts flow to the model here, never as literals in configs
    net = instantiate(cfg.model, modalities=dm.modalities, num_classes=dm.num_classes)
    # a config stored before the `loss` group existed has no `loss` node: those runs trained with cross-entropy,
    # so that is what rebuilds them (not a fallback: it is their loss, and eval/predict rebuild through here)
    loss = instantiate(cfg.loss) if "loss" in cfg else CrossEntropy
    return SegmentationModule(
        net=net,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        patterns=dm.patterns,
        class_names=dm.classes,
        exclude_classes=cfg.dataset.get("exclude_classes") or [],
        missing_probs=cfg.eval.missing_probs,
        mas_branch=cfg.mas.branch,
        lambda_main=cfg.mas.lambda_main,
        lambda_mas=cfg.mas.lambda_mas,
        mas_draw=cfg.mas.draw,
        mas_loss_momentum=cfg.mas.loss_momentum,
    )


def device_for(accelerator: str | None) -> torch.device:
    """The torch device for a Lightning ``accelerator`` name (``auto``: CUDA when available)."""
    name = str(accelerator or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.accelerator={name} but no CUDA device is available")
        return torch.device("cuda")
    return torch.device(name)
