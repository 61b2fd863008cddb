"""Objects built from a composed run config, in one place, so a checkpoint's stored config rebuilds exactly the
trained model (train, eval, predict and the notebook all build through here)."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

from sgma.data.datamodule import MultiModalDataModule
from sgma.losses import CrossEntropy
from sgma.module import SegmentationModule
from sgma.utils import instantiate


def build_datamodule(cfg: DictConfig, trainer: DictConfig | None = None) -> MultiModalDataModule:
    """The data module of ``cfg``; ``auto`` loader settings are resolved for ``trainer`` (default: ``cfg.trainer``),
    the trainer that will run it (eval.py passes its own)."""
    data = cfg.data
    num_workers, pin_memory = loader_settings(data, cfg.get("trainer") if trainer is None else trainer)
    return MultiModalDataModule(
        dataset=instantiate(cfg.dataset.builder),
        splits=OmegaConf.to_container(cfg.dataset.splits, resolve=True),
        missing=instantiate(cfg.missing),
        batch_size=data.batch_size,
        eval_batch_size=data.get("eval_batch_size"),
        num_workers=num_workers,
        pin_memory=pin_memory,
        val_patterns=data.val_patterns,
        test_patterns=data.test_patterns,
        seed=cfg.seed,
        sampler=data.get("sampler", "random"),
        mas_options=OmegaConf.to_container(data.mas, resolve=True) if data.get("mas") else None,
        # configs written before augmentation existed have no `augment`: they trained without it (none)
        augment=instantiate(cfg.augment) if cfg.get("augment") else None,
    )


# data.num_workers=auto on a GPU: at most this many per process (the synthetic scenes and tile decoding of one GPU's
# batches need a few cores; more workers mostly cost start-up time and memory)
MAX_AUTO_WORKERS = 8


def loader_settings(data: DictConfig, trainer: DictConfig | None) -> tuple[int, bool]:
    """``data.num_workers`` and ``data.pin_memory``, with ``auto`` resolved for the trainer's accelerator.

    ``auto`` workers: none when training on CPU (a worker process competes with torch's threads for the same cores:
    on the 2-core box one worker made the main job's epoch 75 -> 85 s), else one less than the CPU cores per device
    process, at most :data:`MAX_AUTO_WORKERS`, so that a GPU is not left waiting for the batches. ``auto`` pinning:
    on CUDA only (page-locked batches copy to the GPU asynchronously)."""
    accelerator = str((trainer or {}).get("accelerator", "auto"))
    cuda = runs_on_cuda(accelerator)
    workers, pin = data.get("num_workers", 0), data.get("pin_memory", False)
    if workers == "auto":
        workers = 0
        if cuda or accelerator not in ("cpu", "auto"):  # CUDA, or another accelerator named outright (mps, ...)
            workers = max(1, min(MAX_AUTO_WORKERS, usable_cores() // _processes_per_node(trainer) - 1))
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"data.num_workers={workers!r}: use auto or a whole number >= 0, e.g. data.num_workers=4")
    if pin == "auto":
        pin = cuda
    elif not isinstance(pin, bool):
        raise ValueError(f"data.pin_memory={pin!r}: use auto, true or false")
    return workers, pin


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _processes_per_node(trainer: DictConfig | None) -> int:
    """Device processes one machine runs for ``trainer.devices``, read as Lightning does: a count (2 or "2"), a list
    of ids ([0, 1] or "0,1"), or every visible GPU (auto, -1)."""
    devices = (trainer or {}).get("devices", 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    if isinstance(devices, str) and "," in devices:
        return max(1, len([d for d in devices.split(",") if d.strip()]))
    return max(1, torch.cuda.device_count())


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


def runs_on_cuda(accelerator: str | None) -> bool:
    """Whether a Lightning ``accelerator`` name means a CUDA GPU (``auto``: when one is available)."""
    name = str(accelerator or "auto")
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())


def device_for(accelerator: str | None) -> torch.device:
    """The torch device for a Lightning ``accelerator`` name (``auto``: CUDA when available)."""
    name = str(accelerator or "auto")
    if runs_on_cuda(name):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.accelerator={name} but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu" if name == "auto" else name)
