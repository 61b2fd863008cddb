"""Hydra configuration: where the config tree lives and the config nodes generated in code.

Every non-empty pattern of every built-in dataset's modalities is registered as an option of the ``missing``
group (``missing=rgb+dsm``), so patterns sweep like any other option:
``python train.py -m missing=rgb,rgb+dsm``. Whether a pattern fits the chosen dataset is checked when the
data module binds the policy, with an error that lists the dataset's modalities.

Also here: the ``sgma.*`` resolvers of the submitit launcher configs (``conf/hydra/launcher/``), which size a
SLURM job from the trainer and the ``slurm`` node and refuse, when the sweep is launched, values that SLURM or
Lightning would reject only after the job waited in the queue.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sgma.modalities import all_patterns

# conf/ sits at the repository root next to train.py (src/sgma/config.py -> ../../conf)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

# the modality sets of the built-in datasets, canonical order
DATASET_MODALITIES: dict[str, tuple[str, ...]] = {
    "synthetic": ("rgb", "nir", "dsm", "sar"),
    "potsdam": ("rgb", "nir", "dsm"),
    "vaihingen": ("irrg", "dsm"),
    "dfc2023": ("rgb", "dsm", "sar"),
    "deliver": ("rgb", "depth", "event", "lidar"),
}

_registered = False

# conf/hydra/launcher/submitit_{slurm,local}.yaml carry the plugin's own names so that hydra/launcher=submitit_slurm
# picks them. Hydra 1.3 then checks each against the plugin's ConfigStore schema of the same name (which is what we
# want: a misspelt key fails) and warns on every composition that this matching is deprecated; the files are complete
# on their own, so they keep working when a later Hydra drops the matching.
warnings.filterwarnings(
    "ignore",
    message=r"(?s).*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema",
    category=UserWarning,
)


def _count(value: Any, error: str) -> int:
    """``value`` as a whole number >= 1 (not a bool, a string or a list), else ``ValueError(error)``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(error)
    return value


def slurm_partition(value: Any) -> str:
    if value is None or not str(value).strip():
        raise ValueError(
            f"slurm.partition={value!r}: hydra/launcher=submitit_slurm needs the partition to submit to. Set it once "
            "in conf/local/default.yaml (see conf/local/default.yaml.example) or per command, e.g. "
            "slurm.partition=gpu (`sinfo -s` lists the partitions; the cluster's default one is marked *)"
        )
    return str(value)


def slurm_nodes(value: Any) -> int:
    return _count(
        value,
        f"trainer.num_nodes={value!r}: the number of machines must be a whole number >= 1 (the SLURM launcher asks "
        "for that many nodes), e.g. trainer.num_nodes=2",
    )


def slurm_tasks(value: Any) -> int:
    return _count(
        value,
        f"trainer.devices={value!r}: the submitit launchers need the number of devices per node as a whole number "
        ">= 1 (SLURM starts one task per device; 'auto', -1 or a list of device ids cannot size a job), e.g. "
        "trainer.devices=4",
    )


def slurm_gpus(accelerator: Any, tasks: Any) -> int | None:
    """GPUs per node of a SLURM job: one per task, none (no --gpus-per-node) for a CPU run."""
    return None if str(accelerator) == "cpu" else slurm_tasks(tasks)


def local_gpus(accelerator: Any, devices: Any) -> int:
    """GPUs a local submitit job sees (CUDA_VISIBLE_DEVICES=0..n-1): none for a CPU run."""
    return 0 if str(accelerator) == "cpu" else slurm_tasks(devices)


RESOLVERS = {
    "sgma.slurm_partition": slurm_partition,
    "sgma.slurm_nodes": slurm_nodes,
    "sgma.slurm_tasks": slurm_tasks,
    "sgma.slurm_gpus": slurm_gpus,
    "sgma.local_gpus": local_gpus,
}


def register_resolvers() -> None:
    """The ``sgma.*`` OmegaConf resolvers (idempotent). Registered when this module is imported, so that every
    process that composes a config has them: train.py and eval.py, and the submitit jobs, which import this module
    when they unpickle the task."""
    for name, function in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, function, replace=True)


register_resolvers()


def register_configs() -> None:
    """Add generated options to Hydra's ConfigStore (idempotent; call before composing)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    patterns = {p for mods in DATASET_MODALITIES.values() for p in all_patterns(mods)}
    for pattern in sorted(patterns):
        store.store(
            group="missing",
            name=pattern,
            node={"_target_": "sgma.data.missing.FixedPattern", "pattern": pattern},
        )
    _registered = True
