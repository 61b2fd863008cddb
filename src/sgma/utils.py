"""Small helpers shared by the train and eval tasks."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

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
        add_note(cause, f"(raised while building {target} from the config)")
        raise cause from None


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` where Python has it (3.11+); Python 3.10 has no notes, so there the note is logged
    as an error just before the exception propagates."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:
        log.error("%s: %s", type(err).__name__, note)


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
        from sgma.recovery import TrainingInterrupted

        try:
            return task(cfg)
        except TrainingInterrupted as err:  # not a failure: the checkpoint to resume from was saved
            log.warning("%s", err)
            raise
        except Exception as err:
            log.error("task %s failed: %s: %s", task.__name__, type(err).__name__, err)  # Hydra prints the trace
            raise
        finally:
            # a W&B run can only be open if wandb was imported; importing it here would make wandb a
            # requirement of csv-only runs (the lent GPU machines have no wandb)
            wandb = sys.modules.get("wandb")
            if wandb is not None and wandb.run is not None:
                log.info("closing the W&B run (%s)", wandb.run.dir)
                wandb.finish()

    return wrapped


def callbacks_and_loggers(
    cfg: DictConfig, *, wandb_id: str | None = None, wandb_group: str | None = None
) -> tuple[list[Callback], list[Logger]]:
    """The configured callbacks and loggers; ``wandb_id``: the W&B run of the checkpoint a training run resumes
    (continued online, followed by a run of its own offline: :func:`sgma.wandb_media.resume_options`)."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        if wandb_id and str(node["_target_"]).endswith("WandbLogger"):
            from sgma.wandb_media import resume_options

            # merged, not passed as keywords: one of them is wandb.init's `config`, a name instantiate() takes itself
            node = {**OmegaConf.to_container(node, resolve=True), **resume_options(node, wandb_id, wandb_group)}
        loggers.append(instantiate(node))
    return instantiate_dict(cfg.get("callbacks")), loggers
