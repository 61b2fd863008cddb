"""Small helpers shared by the train and eval tasks."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger("sgma")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """The single route from config to object (so conversion rules are set in one place).

    Hydra wraps errors raised by constructors; we re-raise the original (its message names the bad value
    and the fix) with a note saying which config node was being built.
    """
    try:
        return hydra.utils.instantiate(node, _convert_="partial", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if cause is None:
            raise
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        if hasattr(cause, "add_note"):  # Python >= 3.11
            cause.add_note(f"(raised while building {target} from the config)")
        raise cause from None


def instantiate_dict(nodes: DictConfig | None, **kwargs: Any) -> list[Any]:
    """Instantiate every named ``_target_`` node of a dict group (callbacks, loggers); skip null entries."""
    if not nodes:
        return []
    return [instantiate(node, **kwargs) for node in nodes.values() if node is not None and "_target_" in node]


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Always close the W&B run, even when the task fails: a multirun would otherwise reuse the open run
    for the next job."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as err:
            log.error("task %s failed: %s: %s", task.__name__, type(err).__name__, err)  # Hydra prints the trace
            raise
        finally:
            import wandb

            if wandb.run is not None:
                log.info("closing the W&B run (%s)", wandb.run.dir)
                wandb.finish()

    return wrapped


def callbacks_and_loggers(cfg: DictConfig) -> tuple[list[Callback], list[Logger]]:
    return instantiate_dict(cfg.get("callbacks")), instantiate_dict(cfg.get("logger"))
