"""Hydra configuration: where the config tree lives and the config nodes generated in code.

Every non-empty pattern of every built-in dataset's modalities is registered as an option of the ``missing``
group (``missing=rgb+dsm``), so patterns sweep like any other option:
``python train.py -m missing=rgb,rgb+dsm``. Whether a pattern fits the chosen dataset is checked when the
data module binds the policy, with an error that lists the dataset's modalities.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

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
