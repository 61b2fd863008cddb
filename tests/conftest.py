"""Shared fixtures: the real Hydra config composed once per session, copied per test into tmp_path."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from sgma.builders import usable_cores
from sgma.config import CONFIG_DIR, register_configs

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs one worker per core) the workers share the cores: each gets its share of torch
# threads, and so do the processes it starts (OMP_NUM_THREADS is inherited), or OpenMP's barriers spin against each
# other on an oversubscribed machine. A value set by the caller wins.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // _workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# W&B must never try the network in tests; offline runs still write real run files
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# offline W&B stages artifacts and tables under WANDB_DATA_DIR (default ~/.local/share/wandb): keep them in /tmp
os.environ.setdefault("WANDB_DATA_DIR", tempfile.mkdtemp(prefix="sgma-wandb-data-"))


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name=name, return_hydra_config=True, overrides=overrides or [])


def bind_to(cfg: DictConfig, out_dir: Path) -> DictConfig:
    """Point the run at ``out_dir`` and register the hydra node so ``${hydra:...}`` resolves."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)
    return cfg


def batch_of(dm, pattern_ids: list[int]) -> dict:
    """A training batch of the first len(pattern_ids) train samples, sample i under pattern pattern_ids[i]."""
    data = dm.dataset("train")
    samples = [data[(i, p)] for i, p in enumerate(pattern_ids)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@pytest.fixture(scope="session")
def cfg_train_global() -> DictConfig:
    return compose_config("train", ["debug=tiny", "logger=csv"])


@pytest.fixture
def cfg_train(cfg_train_global: DictConfig, tmp_path: Path) -> DictConfig:
    yield bind_to(cfg_train_global, tmp_path)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def sgma_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of one tiny SGMA run (synthetic scenes, no test), shared read-only: its fusion writes robustness
    maps and it carries everything a real checkpoint does."""
    from sgma.tasks import train

    run = tmp_path_factory.mktemp("sgma_run")
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", "model=sgma", "test=false"]), run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    GlobalHydra.instance().clear()
    return run / "checkpoints" / "last.ckpt"
