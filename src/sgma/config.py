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

import hashlib
import warnings
from collections.abc import Sequence
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


# ------------------------------------------------------------------------------------------- W&B names, groups
# Task overrides that are no setting of a W&B name or group (conf/logger/wandb.yaml): the seed (a group gathers the
# seeds of one setting) and the choices the readable part shows already (exact keys: model.fusion=concat still
# counts); below, keys (and all under them) that say where things are, how a run executes or what it logs, so that
# a run resumed with ckpt_path=..., moved to other data paths or devices, or logging more, stays in its group.
WANDB_NAME_SHOWN = ("seed", "model", "backbone", "dataset", "missing", "missing.pattern")
# fmt: off
WANDB_NAME_IGNORED = (
    "ckpt_path", "resume_force", "train", "test", "task_name", "optimized_metric", "hparams_search", "eval",
    "paths", "logger", "callbacks", "slurm", "local", "data.num_workers", "data.pin_memory", "data.eval_batch_size",
    "model.compile", "model.compile_options", "model.channels_last", "model.pack_multiple", "trainer.accelerator",
    "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps",
)
# fmt: on
WANDB_NAME_IGNORED_LEAVES = ("root", "cache_dir", "progress", "num_workers")  # as a resumed run may change them
WANDB_SETTING_MAX = 56  # characters: names (with preset, ..., seed, -resume<k>) stay under the 128 W&B accepts


def _names_setting(key: str) -> bool:
    return not (
        key in WANDB_NAME_SHOWN
        or any(key == k or key.startswith(f"{k}.") for k in WANDB_NAME_IGNORED)
        or key.rsplit(".", 1)[-1] in WANDB_NAME_IGNORED_LEAVES
    )


def wandb_setting(overrides: Sequence[str]) -> str:
    """``-<key=value,...>``, the task overrides (``${hydra:overrides.task}``) that make a run's setting, sorted (the
    order on the command line does not matter), for its W&B name and group; empty when there are none. Longer than
    :data:`WANDB_SETTING_MAX`, it is cut and ends in a hash of the whole, so distinct settings keep distinct names.
    Resolver ``sgma.wandb_setting``."""
    setting = ",".join(sorted(o for o in overrides if _names_setting(o.split("=", 1)[0].lstrip("+~"))))
    if len(setting) > WANDB_SETTING_MAX:
        digest = hashlib.sha1(setting.encode()).hexdigest()[:8]
        setting = f"{setting[: WANDB_SETTING_MAX - len(digest) - 1]}~{digest}"
    return f"-{setting}" if setting else ""


RESOLVERS = {
    "sgma.slurm_partition": slurm_partition,
    "sgma.slurm_nodes": slurm_nodes,
    "sgma.slurm_tasks": slurm_tasks,
    "sgma.slurm_gpus": slurm_gpus,
    "sgma.local_gpus": local_gpus,
    "sgma.wandb_setting": wandb_setting,
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
