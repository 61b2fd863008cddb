"""``train(cfg)`` and ``evaluate(cfg)``: the tasks behind the root ``train.py`` and ``eval.py``.

Both are plain functions of a composed Hydra config, so tests call them directly. Objects are built in one
place (:mod:`sgma.builders`) so a checkpoint's stored config rebuilds exactly the trained model.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

import sgma
from sgma.builders import build_datamodule, build_module
from sgma.callbacks import RobustnessFeedback
from sgma.checkpoint import (
    CHECKPOINT_KEY,
    checkpoint_file,
    load_checkpoint,
    load_checkpoint_safely,
    rebuilding_from,
    stored_config,
)
from sgma.checks import is_number
from sgma.cluster import RESUME_LAST, check_shared_run_dir, lightning_plugins, resume_checkpoint, scheduler_job
from sgma.data.datamodule import MultiModalDataModule
from sgma.figures import MetricHistory, write_plots
from sgma.inference import evaluate_full_tiles, tiled_base
from sgma.metrics import PatternReport
from sgma.module import SegmentationModule
from sgma.optim import WarmupPolyLR
from sgma.panels import collect_panels, panel_indices, panel_patterns
from sgma.recovery import (
    AtomicCheckpointIO,
    CheckpointOnSignal,
    ResumeState,
    check_resume,
    resume_differences,
    stop_on_signal,
)
from sgma.reporting import print_table, write_report
from sgma.utils import add_note, callbacks_and_loggers, instantiate, task_wrapper
from sgma.wandb_media import log_evaluation, wandb_logger_node

log = logging.getLogger("sgma")

# Lightning 2.6 calls a pytree API that torch >= 2.10 deprecates; harmless, and fixed upstream in Lightning.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=Warning)


def resolved_dict(cfg: DictConfig) -> dict:
    """The run config as plain data, interpolations resolved, without Hydra's own ``hydra`` node."""
    return {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }


def dataset_facts(dm: MultiModalDataModule) -> dict:
    """What inference needs from the training data: modalities with their normalisation, classes, palette and
    the raw-value transforms the dataset applied (``input_transforms``: modality -> spec, see
    :mod:`sgma.data.preprocess`; ``{}`` for datasets without any), which predict.py applies to its rasters."""
    import json

    from sgma.data.preprocess import TRANSFORMS

    base = dm.dataset("train").base
    transforms = getattr(base, "input_transforms", None) or {}
    for name, spec in transforms.items():
        if spec.get("name") not in TRANSFORMS:
            raise ValueError(
                f"{type(base).__name__}.input_transforms[{name!r}] names {spec.get('name')!r}; known transforms: "
                f"{', '.join(TRANSFORMS)}"
            )

    def plain(value: Any) -> Any:  # numpy scalars -> Python: the checkpoint is read back with weights_only=True
        if hasattr(value, "item"):
            return value.item()
        raise TypeError(f"{type(base).__name__}.input_transforms holds {value!r}, which is not a plain number/string")

    return {
        "modalities": [
            {
                "name": m.name,
                "channels": m.channels,
                "mean": list(m.mean),
                "std": list(m.std),
                "kind": m.kind,
                "value_max": m.value_max,
            }
            for m in dm.modalities
        ],
        "classes": list(dm.classes),
        "palette": [list(c) for c in dm.palette],
        "input_transforms": json.loads(json.dumps({str(k): dict(v) for k, v in transforms.items()}, default=plain)),
    }


def check_facts_match(facts: dict | None, dm: MultiModalDataModule, *, ckpt_path: str, dataset: str) -> None:
    """Refuse to score a checkpoint on data whose modalities or classes (names, channels, order) differ from its
    training data's (its stored :func:`dataset_facts`): pattern ids, projector slots and class indices would be
    silently mismatched, or the weights would not load. No-op for checkpoints written before the facts were
    stored (their weights still have to fit)."""
    if not facts:
        return
    trained = [f"{m['name']}({m['channels']})" for m in facts["modalities"]]
    given = [f"{m.name}({m.channels})" for m in dm.modalities]
    problems = []
    if trained != given:
        problems.append(f"modalities (channels): checkpoint {', '.join(trained)}; dataset {', '.join(given)}")
    if list(facts["classes"]) != list(dm.classes):
        problems.append(f"classes: checkpoint {', '.join(facts['classes'])}; dataset {', '.join(dm.classes)}")
    if problems:
        raise ValueError(
            f"{ckpt_path} was trained on other modalities or classes than dataset={dataset} has:\n  "
            + "\n  ".join(problems)
            + "\nEvaluate it on data with the checkpoint's modalities and classes in the same order (for "
            "dataset=folder: `modalities` and `classes` in dataset.yaml), or train a model on this dataset."
        )


class StoreConfig(Callback):
    """Puts the resolved run config and the dataset facts into every checkpoint, so ``eval.py`` can rebuild
    the model and ``predict.py`` can run without the training data."""

    def __init__(self, config: dict, dataset: dict | None = None) -> None:
        self.config = config
        self.dataset = dataset

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.config, "dataset": self.dataset, "version": sgma.__version__}


def _check_checkpoint_path(path: str | None, *, what: str) -> Path | None:
    """None, or ``path`` as a readable file (errors say whether it is missing, a folder or unreadable)."""
    return None if path is None else checkpoint_file(path, what=what)


def _log_hyperparameters(loggers: list, cfg_dict: dict, dm: MultiModalDataModule, module: SegmentationModule) -> None:
    params = sum(p.numel() for p in module.net.parameters())
    for logger in loggers:
        logger.log_hyperparams({**cfg_dict, "model/params": params, "data/modalities": [m.name for m in dm.modalities]})


def _report(module: SegmentationModule, split: str, out_dir: Path, *, title: str, meta: dict) -> dict:
    report = module.reports[split]
    files = write_report(report, out_dir, title=title, meta=meta)
    print_table(report, title=title)
    log.info("pattern table written to %s", ", ".join(str(f) for f in files))
    return report.metrics(split)


def _write_run_plots(
    out_dir: Path,
    *,
    module: SegmentationModule,
    dm: MultiModalDataModule,
    split: str,
    report: PatternReport | None,
    panel_split: str | None,
    panel_split_patterns: list[str] | None = None,
    device: torch.device | None = None,
    history: dict | None = None,
    run_title: str = "",
) -> None:
    """Write ``out_dir/plots`` (:func:`sgma.figures.write_plots`) after the pattern table: a failure here raises
    with a note saying so, and the table stays. ``report`` was scored on ``split``; the panels are the fixed samples
    of ``panel_split`` (:func:`~sgma.panels.panel_indices`) under :func:`~sgma.panels.panel_patterns` of
    ``panel_split_patterns``, predicted on ``device`` (none when ``panel_split`` is None)."""
    plots = out_dir / "plots"
    try:
        plots.mkdir(parents=True, exist_ok=True)  # before any prediction: an unwritable folder fails at once
        panels = []
        data = dm.dataset(panel_split) if panel_split else None
        if data is not None and len(data) == 0:
            log.warning("the %s split has no samples: no sample panels in %s", panel_split, plots)
        elif data is not None:
            home = module.device
            module.to(device)
            try:
                panels = collect_panels(module, data, panel_indices(len(data)), panel_patterns(panel_split_patterns))
            finally:
                module.to(home)
        files = write_plots(
            plots,
            split=split,
            class_names=module.class_names,
            palette=dm.palette,
            report=report,
            panels=panels,
            panel_split=panel_split,
            history=history,
            run_title=run_title,
        )
    except Exception as err:
        add_note(err, f"(raised while writing the plots of {out_dir}; the pattern table there is complete)")
        raise
    log.info("%d plots written to %s", len(files), plots)


# command-line overrides that the run ignores: (key prefix, when it is ignored given the config and the key, why).
# Composed configs always carry these keys, so only what the user set on the command line (or a sweeper chose) is
# warned about; a key may match several entries, the first that applies is named.
INACTIVE_OVERRIDES: list[tuple[str, Callable[[DictConfig, str], bool], str]] = [
    ("data.mas.", lambda c, k: c.data.get("sampler") != "mas", "the MAS sampler is off (data.sampler=random)"),
    (
        "data.mas.",
        lambda c, k: c.model.get("fusion") != "sgf",
        "the MAS sampler's memory is fed by SGF's robustness maps, which this fusion has not (it stays uniform)",
    ),
    ("mas.draw", lambda c, k: not c.mas.branch, "the MAS branch is off (mas.branch=false)"),
    ("mas.lambda_mas", lambda c, k: not c.mas.branch, "the MAS branch is off (mas.branch=false)"),
    ("mas.loss_momentum", lambda c, k: not c.mas.branch, "the MAS branch is off (mas.branch=false)"),
    (
        "model.fusion_options.",
        lambda c, k: k.split(".")[2] != c.model.get("fusion"),
        "only the options of the fusion in use (model.fusion) reach the model",
    ),
    ("eval.window", lambda c, k: not c.eval.get("full_tile"), "it applies to eval.full_tile=true only"),
    ("eval.overlap", lambda c, k: not c.eval.get("full_tile"), "it applies to eval.full_tile=true only"),
    ("eval.blend", lambda c, k: not c.eval.get("full_tile"), "it applies to eval.full_tile=true only"),
]


def warn_inactive_overrides(cfg: DictConfig) -> None:
    """Warn about each command-line override of a setting that this run does not use (e.g. ``data.mas.floor``
    with ``model=baseline``): a sweep over it would compare identical runs."""
    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+~").split("=", 1)[0]
        for prefix, ignored, why in INACTIVE_OVERRIDES:
            if not key.startswith(prefix) or OmegaConf.select(cfg, prefix.rstrip("."), default=None) is None:
                continue
            if ignored(cfg, key):
                log.warning("%s has no effect in this run: %s", override, why)
                break


def warn_no_expected_miou(missing_probs: list[float], scored: int, patterns: int, setting: str) -> None:
    """The E[mIoU] rows need every pattern scored: say why a table over a subset has none."""
    if scored < patterns and missing_probs:
        log.warning(
            "no expected-mIoU rows for missing_probs=%s: they need every pattern, and %s scores %d of %d",
            list(missing_probs),
            setting,
            scored,
            patterns,
        )


def _check_train_settings(cfg: DictConfig) -> None:
    """Settings under which train.py would do nothing useful, write a table that looks valid but scores untrained
    weights, or fail deep inside torch or Lightning after the run folder was made."""
    if not cfg.get("train", True) and not cfg.get("test", True):
        raise ValueError("train=false test=false: nothing to do; use train=true to train, or test=true ckpt_path=PATH")
    # the optimizer and the schedule are only built once training starts: their values are checked now
    lr = OmegaConf.select(cfg, "optimizer.lr", default=None)
    if lr is not None and not (is_number(lr) and lr > 0):
        raise ValueError(f"optimizer.lr={lr!r} must be a number > 0")
    scheduler = cfg.get("scheduler")
    if scheduler and scheduler.get("_target_") == f"{WarmupPolyLR.__module__}.{WarmupPolyLR.__name__}":
        WarmupPolyLR.check_options(
            **{k: scheduler[k] for k in ("warmup_fraction", "start_factor", "power") if k in scheduler}
        )
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator} but torch sees no CUDA GPU here (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}): train on the CPU with trainer=cpu, or let it choose: trainer.accelerator=auto"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and str(trainer.get("precision")) in ("16", "16-mixed"):  # Lightning would train in bf16 instead
        raise ValueError(
            f"trainer.precision={trainer.precision} needs a GPU; on the CPU use trainer.precision=bf16-mixed or 32-true"
        )
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if cfg.get("train", True) and epochs is not None and epochs < 0 and not (steps is not None and steps >= 1):
        raise ValueError(
            f"trainer.max_epochs={epochs} with trainer.max_steps={steps}: the learning-rate schedule needs a known "
            "length; set trainer.max_epochs >= 1 or trainer.max_steps >= 1"
        )
    if cfg.get("train", True) and (trainer.get("max_epochs") == 0 or trainer.get("max_steps") == 0):
        key = "trainer.max_epochs" if trainer.get("max_epochs") == 0 else "trainer.max_steps"
        raise ValueError(
            f"{key}=0 with train=true trains nothing, and the test table would score untrained weights: set "
            f"{key} >= 1, or train=false ckpt_path=PATH to only test a checkpoint"
        )
    ckpt_path = cfg.get("ckpt_path")
    if not cfg.get("train", True) and cfg.get("test", True) and ckpt_path in (None, RESUME_LAST):
        last = f" (ckpt_path={RESUME_LAST} only resumes training)" if ckpt_path == RESUME_LAST else ""
        raise ValueError(
            f"train=false tests a checkpoint: give it with ckpt_path=PATH (or use eval.py ckpt_path=PATH){last}; "
            "without one the test table would score untrained weights"
        )


def check_monitored_names(cfg: DictConfig, module: SegmentationModule, dm: MultiModalDataModule) -> None:
    """Refuse a ``monitor`` or ``optimized_metric`` that names no validation metric of this run (a typo, or
    ``val/p0.3/miou`` with a pattern subset): Lightning would fail only after the first epoch's validation."""
    names = module.validation_metric_names(dm.eval_patterns("val"))
    settings = [(f"callbacks.{k}.monitor", c.get("monitor")) for k, c in (cfg.get("callbacks") or {}).items() if c]
    settings.append(("optimized_metric", cfg.get("optimized_metric")))
    for setting, name in settings:
        # training-loss and learning-rate names depend on callbacks and the MAS branch; test names exist after fit
        if not isinstance(name, str) or name.startswith(("train/", "lr-", "test/")) or name in names:
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"{setting}={name} is not a metric this run logs at validation{hint}: it logs val/avg/miou (the Average "
            f"over the validation patterns), val/<pattern>/miou for one of {', '.join(dm.eval_patterns('val'))}, ..."
        )


def check_weights_fit(module: SegmentationModule, ckpt: dict, *, path: Path, config: dict) -> None:
    """Refuse a ``ckpt_path`` whose weights do not fit the model this config builds (another preset, backbone or
    dataset; with ``resume_force=true`` or ``train=false``), naming what differs, instead of Lightning's dump of
    every state-dict key."""
    own, saved = module.state_dict(), ckpt.get("state_dict") or {}
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    stored = stored_config(ckpt)
    compared = resume_differences(stored, config) if stored else []
    diffs = [d for d in compared if d.startswith(("model.", "backbone.", "dataset."))]
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("unexpected", unexpected),
             ("of another shape", reshaped)) if v]  # fmt: skip
    raise ValueError(
        f"ckpt_path={str(path)!r}: its weights do not fit the model this config builds: {'; '.join(parts)}. "
        + (f"The config differs from the checkpoint's in: {', '.join(diffs[:6])}. " if diffs else "")
        + "Use the checkpoint's model, backbone and dataset, or eval.py ckpt_path=PATH, which rebuilds them from it"
    )


def _resume_info(cfg: DictConfig, path: Path, cfg_dict: dict, ckpt: dict) -> dict:
    """Refuse to resume a checkpoint trained with another config."""
    stored = stored_config(ckpt)
    info = check_resume(stored, cfg_dict, ckpt, path=path, force=bool(cfg.get("resume_force", False)))
    log.info(
        "resuming %s from epoch %d, step %d (trainer.max_epochs=%s)",
        path,
        info["epoch"],
        info["global_step"],
        cfg.trainer.get("max_epochs"),
    )
    return info


def objective(metrics: dict[str, Any], name: str) -> float:
    """The value a Hydra sweeper optimises (``optimized_metric``, e.g. ``val/avg/miou_best``), as a float."""
    if name not in metrics:
        logged = ", ".join(sorted(k for k in metrics if k.startswith("val/") and k.count("/") == 2)) or "none"
        raise KeyError(
            f"optimized_metric={name} was not logged by this run (its validation metrics: {logged}); validation must "
            "run (trainer.limit_val_batches > 0, trainer.check_val_every_n_epoch <= trainer.max_epochs), or choose "
            "a logged metric, e.g. optimized_metric=val/avg/miou_best"
        )
    value = float(metrics[name])
    if not math.isfinite(value):
        raise ValueError(f"optimized_metric={name} is {value} (no labelled validation pixels?): nothing to optimise")
    return value


def _best_checkpoint(trainer: L.Trainer) -> str:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            return callback.best_model_path
    return ""


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on the train split (validating every pattern), then test the best checkpoint on every pattern.

    ``ckpt_path=PATH`` resumes a run exactly (same weights, MAS memory and metrics as if it had not stopped;
    :mod:`sgma.recovery`); a config that trains something else is refused unless ``resume_force=true``.
    ``ckpt_path=last``, and a job that SLURM or submitit restarted, resume from this run folder's ``last.ckpt``
    (:func:`sgma.cluster.resume_checkpoint`). SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 saves ``checkpoints/last.ckpt``
    and raises :class:`~sgma.recovery.TrainingInterrupted`; outside training (setup, test, plots) such a signal
    raises it at once (:func:`~sgma.recovery.stop_on_signal`).
    """
    with stop_on_signal(Path(cfg.paths.output_dir) / "checkpoints"):
        return _train(cfg)


def _train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    _check_train_settings(cfg)
    warn_inactive_overrides(cfg)
    check_shared_run_dir()
    L.seed_everything(cfg.seed, workers=True)
    fit = bool(cfg.get("train", True))
    out_dir = Path(cfg.paths.output_dir)
    resume = _check_checkpoint_path(resume_checkpoint(cfg.get("ckpt_path"), out_dir, fit=fit), what="ckpt_path")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = resolved_dict(cfg)
    # a crafted or damaged file is refused here, with a clear message, before Lightning unpickles it
    ckpt = load_checkpoint_safely(resume, what="ckpt_path") if resume else None
    resumed = _resume_info(cfg, resume, cfg_dict, ckpt) if resume and fit else {}

    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    if ckpt is not None:
        check_weights_fit(module, ckpt, path=resume, config=cfg_dict)
        del ckpt
    if fit:
        check_monitored_names(cfg, module, dm)
    if cfg.get("test", True):
        warn_no_expected_miou(
            module.missing_probs, len(dm.eval_patterns("test")), len(dm.patterns), "data.test_patterns"
        )
    # written once the data and the model are built: a setting they refuse leaves no config of a run that never ran
    OmegaConf.save(OmegaConf.create(cfg_dict), out_dir / "config.yaml")
    callbacks, loggers = callbacks_and_loggers(
        cfg, wandb_id=resumed.get("wandb_id"), wandb_group=resumed.get("wandb_group")
    )
    callbacks.append(StoreConfig(cfg_dict, dataset_facts(dm)))
    if dm.sampler == "mas":
        callbacks.append(RobustnessFeedback())
    history = MetricHistory()  # after RobustnessFeedback: it records the MAS values that one logs
    callbacks.append(history)
    callbacks.append(ResumeState(job=scheduler_job()))
    interrupt = CheckpointOnSignal(out_dir / "checkpoints")
    checkpointing = cfg.trainer.get("enable_checkpointing", True)
    if checkpointing:  # Lightning refuses Checkpoint callbacks otherwise; without it stop_on_signal stops at once
        callbacks.append(interrupt)
    # every checkpoint is written atomically, whatever the trainer config; under srun, Lightning's SLURM environment
    # without its auto-requeue (CheckpointOnSignal saves at a consistent point; sgma.cluster)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *lightning_plugins()]
    )
    _log_hyperparameters(loggers, cfg_dict, dm, module)

    run_title = f"{cfg.dataset.name}, {cfg.backbone.name}, fusion={cfg.model.fusion}"
    metrics: dict[str, Any] = {}
    if fit:
        with interrupt.handling_signals() if checkpointing else contextlib.nullcontext():
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
        interrupt.raise_if_stopped()  # a signal stopped training at an epoch end: no test
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", True):
        best = _best_checkpoint(trainer) if fit else str(resume)
        if best:
            log.info("testing the %scheckpoint %s", "best " if fit else "", best)
        else:
            log.warning("no best checkpoint (validation disabled?): testing the current weights")
        trainer.test(module, datamodule=dm, ckpt_path=best or None, weights_only=True, verbose=False)
        if trainer.is_global_zero:
            metrics.update(
                _report(
                    module,
                    "test",
                    out_dir,
                    title=f"test split, {run_title}",
                    meta={"split": "test", "checkpoint": best or None, "config": cfg_dict},
                )
            )
    if trainer.is_global_zero:
        # charts of the test table; with test=false of the last validation's (none if validation never ran). The
        # panels show the weights in the module: the tested (best) checkpoint's, else the last epoch's.
        chart = "test" if cfg.get("test", True) else "val"
        _write_run_plots(
            out_dir,
            module=module,
            dm=dm,
            split=chart,
            report=module.reports.get(chart),
            panel_split="val",
            panel_split_patterns=dm.eval_patterns("val"),
            device=trainer.strategy.root_device,
            history=history.history,
            run_title=run_title,
        )
    return metrics, {"cfg": cfg, "datamodule": dm, "module": module, "trainer": trainer}


def _full_tile_report(
    cfg: DictConfig, dm: MultiModalDataModule, module: SegmentationModule, split: str, patterns
) -> bool:
    """``eval.full_tile=true``: score every pattern on whole tiles by sliding window (see :mod:`sgma.inference`).

    Runs on the devices of ``cfg.trainer`` through Lightning Fabric: with ``trainer.devices`` > 1 (or several
    ``trainer.num_nodes``, or under ``srun``) every process evaluates its share of the tiles and the confusion
    matrices are summed once. Fabric's launcher starts the other local processes by running eval.py again with the
    same arguments (they rebuild everything up to here, then join); under ``srun`` they exist already. Returns
    whether this process is rank 0 (the one that writes the outputs)."""
    base = tiled_base(dm.dataset(split))
    if base is None:
        raise ValueError(
            f"eval.full_tile=true needs a dataset made of whole tiles (potsdam, vaihingen); "
            f"{type(dm.dataset(split).base).__name__} serves fixed-size samples only: "
            f"evaluate it without eval.full_tile"
        )
    fabric = L.Fabric(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.get("num_nodes", 1),
        strategy=cfg.trainer.get("strategy", "auto"),
        plugins=lightning_plugins(),
    )
    fabric.launch()
    net = module.net.to(fabric.device).eval()
    batch_size = dm.eval_batch_size if cfg.get("batch_size") is None else cfg.batch_size
    if fabric.is_global_zero:
        log.info(
            "full-tile evaluation of %d %s tile(s) x %d pattern(s) on %d process(es): window=%s overlap=%s blend=%s",
            len(base.tiles),
            split,
            len(patterns),
            fabric.world_size,
            cfg.eval.window,
            cfg.eval.overlap,
            cfg.eval.blend,
        )
    module.reports[split] = evaluate_full_tiles(
        net,
        base,
        split=split,
        patterns=patterns,
        all_patterns=module.patterns,
        class_names=module.class_names,
        exclude_classes=module.exclude_classes,
        missing_probs=module.missing_probs,
        window=int(cfg.eval.window),
        overlap=float(cfg.eval.overlap),
        blend=str(cfg.eval.blend),
        batch_size=int(batch_size),
        ignore_index=module.ignore_index,
        progress_every_s=float(cfg.eval.get("progress_every_s", 60)),
    )
    return fabric.is_global_zero


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rebuild the model from the checkpoint's stored config and score every requested pattern of a split.

    ``eval.full_tile=true`` scores whole tiles by sliding window (``eval.window``, ``eval.overlap``,
    ``eval.blend``) instead of the dataset's crops (tiled datasets only). With ``trainer.devices`` > 1 or several
    ``trainer.num_nodes`` (or under ``srun``) the evaluation is shared out across the processes; rank 0 writes the
    table, the plots and the W&B run, the other ranks only return the metrics.
    """
    check_shared_run_dir()
    warn_inactive_overrides(cfg)
    wandb_logger_node(cfg, "eval.py")  # a wrong logger= fails before the evaluation, not after it
    ckpt = load_checkpoint(cfg.get("ckpt_path"))
    run_cfg = OmegaConf.create(ckpt[CHECKPOINT_KEY]["config"])
    with open_dict(run_cfg):
        if cfg.get("dataset"):
            chosen = cfg.dataset.copy()
            # the checkpoint's own dataset named again: keep its data root unless a new one is given
            same = chosen.get("name") == run_cfg.dataset.get("name") and "root" in run_cfg.dataset.get("builder", {})
            if same and OmegaConf.is_missing(chosen.builder, "root"):
                chosen.builder.root = run_cfg.dataset.builder.root
            run_cfg.dataset = chosen
        if cfg.get("batch_size") is not None and not (type(cfg.batch_size) is int and cfg.batch_size >= 1):
            raise ValueError(f"batch_size={cfg.batch_size!r} must be a whole number >= 1 (null: the training run's)")
        for key in ("batch_size", "num_workers"):
            if cfg.get(key) is not None:
                run_cfg.data[key if key != "batch_size" else "eval_batch_size"] = cfg[key]
        if cfg.get("missing_probs") is not None:
            run_cfg.eval.missing_probs = cfg.missing_probs
    L.seed_everything(run_cfg.seed, workers=True)
    with rebuilding_from(ckpt, str(cfg.ckpt_path)):
        dm = build_datamodule(run_cfg, trainer=cfg.trainer)  # loaders sized for this evaluation's device
    facts = ckpt[CHECKPOINT_KEY].get("dataset")
    check_facts_match(facts, dm, ckpt_path=str(cfg.ckpt_path), dataset=str(run_cfg.dataset.get("name", "?")))
    if facts:  # other data (a new area, another root) is scaled with the statistics the model was trained with
        trained = {m["name"]: (m["mean"], m["std"]) for m in facts["modalities"]}
        own = {m.name: (list(m.mean), list(m.std)) for m in dm.modalities}
        differ = [n for n in trained if not np.allclose(np.r_[trained[n]], np.r_[own[n]], rtol=1e-5, atol=0)]
        if differ:
            log.info(
                "normalising with the checkpoint's training statistics, as in training; this dataset's own differ "
                "for %s (%s)",
                ", ".join(differ),
                "; ".join(f"{n}: mean {own[n][0]} std {own[n][1]} vs {trained[n][0]} {trained[n][1]}" for n in differ),
            )
        dm.normalise_with(trained)
    with rebuilding_from(ckpt, str(cfg.ckpt_path)):
        module = build_module(run_cfg, dm)
        module.load_state_dict(ckpt["state_dict"])
    split = cfg.split
    patterns = dm.eval_patterns(split, cfg.get("patterns"))
    warn_no_expected_miou(module.missing_probs, len(patterns), len(dm.patterns), "patterns=")
    module.test_split = split  # metric keys and the report are named after the evaluated split
    full_tile = bool(cfg.eval.full_tile)
    trainer = None
    if full_tile:
        is_zero = _full_tile_report(cfg, dm, module, split, patterns)
    else:
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            num_nodes=cfg.trainer.get("num_nodes", 1),
            strategy=cfg.trainer.get("strategy", "auto"),
            precision=cfg.trainer.precision,
            logger=False,
            enable_checkpointing=False,
            default_root_dir=cfg.paths.output_dir,
            use_distributed_sampler=False,  # the evaluation sampler shards itself across ranks, without padding
            plugins=lightning_plugins(),
        )
        trainer.test(module, dataloaders=dm.eval_dataloader(split, patterns), verbose=False)
        is_zero = trainer.is_global_zero
    objects = {"cfg": run_cfg, "datamodule": dm, "module": module, "trainer": trainer}
    if not is_zero:  # every rank holds the summed report; rank 0 alone writes it
        return module.reports[split].metrics(split), objects
    out_dir = Path(cfg.paths.output_dir)
    how = (
        f", full tiles (window={cfg.eval.window}, overlap={cfg.eval.overlap}, blend={cfg.eval.blend})"
        if full_tile
        else ""
    )
    meta = {"split": split, "checkpoint": str(cfg.ckpt_path), "config": OmegaConf.to_container(run_cfg)}
    if full_tile:
        meta["full_tile"] = {
            "window": int(cfg.eval.window),
            "overlap": float(cfg.eval.overlap),
            "blend": str(cfg.eval.blend),
        }
    metrics = _report(
        module,
        split,
        out_dir,
        title=f"{split} split, {run_cfg.dataset.name}, {run_cfg.backbone.name}, fusion={run_cfg.model.fusion}{how}",
        meta=meta,
    )
    if full_tile:
        log.info("full-tile evaluation: plots/ holds the pattern chart and confusion matrices, no sample panels")
    _write_run_plots(
        out_dir,
        module=module,
        dm=dm,
        split=split,
        report=module.reports[split],
        panel_split=None if full_tile else split,  # whole tiles are too large for a panel
        panel_split_patterns=patterns,
        device=None if full_tile else trainer.strategy.root_device,
        run_title=f"{run_cfg.dataset.name}, {run_cfg.backbone.name}, fusion={run_cfg.model.fusion}",
    )
    nan = [k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)]
    if nan:
        log.warning("metrics without labelled pixels (NaN): %s", ", ".join(nan))
    log_evaluation(cfg, run_cfg=run_cfg, module=module, datamodule=dm)  # eval.py logger=wandb; else nothing
    return metrics, objects
