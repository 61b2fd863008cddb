"""What a W&B run shows beyond scalars, and the logger that lets it keep checkpoints offline too.

- :class:`WandbLogger`: Lightning's, but an offline run is offline by its own ``wandb.init(mode="offline")``
  instead of a process-wide ``WANDB_MODE``, so ``log_model`` works offline as well as online (Lightning refuses
  the pair, assuming offline artifacts cannot exist; W&B 0.31 records them in the offline run's log, with a
  staged copy of each file, for ``wandb sync`` to upload).
- :class:`WandbMedia`: a callback that, on rank 0 and only when a W&B logger is configured, logs at every
  validation end and at test end the per-pattern table and bar chart, a fixed panel of samples (inputs with
  ground-truth / prediction masks and the robustness maps on one 0-1 scale), at test a confusion matrix per
  pattern, and over training what MAS does (line plots of the sampler's probabilities and the memory's rho).
- :func:`resume_options`: how a training run resumed from a checkpoint logs to W&B, online and offline.
- :func:`log_evaluation` and :func:`log_predictions`: the same media for ``eval.py`` and the predicted images
  for ``predict.py`` (``logger=wandb``), each in a run of its own named after the checkpoint's training run.

``wandb`` and matplotlib are imported only when a W&B run exists: CSV-only runs need neither.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

from sgma.metrics import IGNORE_INDEX

if TYPE_CHECKING:
    import lightning as L
    from matplotlib.figure import Figure

    from sgma.data.datamodule import IncompleteModalityDataset
    from sgma.metrics import PatternReport
    from sgma.module import SegmentationModule
    from sgma.panels import SamplePanel

log = logging.getLogger("sgma")

# the epoch-level MAS scalars that get a line plot with one line per modality: prefix -> plot title
MAS_PLOTS = {
    "mas/present_": "MAS sampler: P(a drawn pattern holds the modality)",
    "mas/fragile_": "MAS sampler: share of draws whose most fragile modality it is",
    "mas/rho_": "MAS memory: mean relative robustness rho (1 = average share)",
    "train/mas/drawn_": "MAS branch: share of samples trained on the modality alone",
}
MAX_IMAGE_SIDE = 1024  # predicted images are shown in W&B at most this big (nearest-neighbour), files stay full
# the id resume_options gives the k-th offline resume of run <root>: <root>-resume<k>-<random>
RESUMED_ID = re.compile(r"(?P<root>.+?)-resume(?P<count>\d+)-[0-9a-z]+")


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline=true`` passed to ``wandb.init(mode="offline")``.

    Lightning turns ``offline`` into a process-wide ``WANDB_MODE`` and refuses ``log_model`` with it. Here
    the run itself is offline, so later runs of the same process are not affected, and ``log_model=true``
    records the checkpoints as ``model`` artifacts in the offline run. W&B copies each file into its staging
    folder, ``$WANDB_DATA_DIR/artifacts/staging`` (default ``~/.local/share/wandb``), outside the run folder:
    ``wandb sync`` reads it from there, so sync on the same machine (or with the same folder). Offline, every
    logged ``wandb.Table`` is staged there too (a few KiB each). With ``offline=false`` the mode is left to
    W&B (``WANDB_MODE`` still wins, as in the tests).
    """

    def __init__(self, *, offline: bool = False, **kwargs: Any) -> None:
        if offline:
            mode = kwargs.get("mode")
            if mode not in (None, "offline"):
                raise ValueError(
                    f"logger.wandb.offline=true contradicts logger.wandb.mode={mode!r}: set offline=false to use "
                    f"mode={mode!r}, or drop mode"
                )
            kwargs["mode"] = "offline"
        super().__init__(offline=False, **kwargs)


def resume_options(node: Mapping, wandb_id: str, group: str | None = None) -> dict[str, Any]:
    """What the W&B logger ``node`` of a training run resumed from a checkpoint of W&B run ``wandb_id`` gets on top
    of its config.

    Online: that id with ``resume="allow"``: W&B continues the run, its history and step. Offline (``offline=true``,
    the default, ``mode=offline`` or ``WANDB_MODE=offline``) W&B cannot continue a run: an offline run with the
    same id starts again at step 0 with ``resumed`` false, and ``wandb sync`` of the two replaces the first one's
    history (wandb issues #5865, #3841). So offline the resumed run is a run of its own in the same group, id
    ``<original id>-resume<k>-<random>``, name ``<name>-resume<k>``, with ``resumed_from`` (``wandb_id``) and
    ``original_run_id`` in its config; its curves go on from the checkpoint's step on ``trainer/global_step``.
    Either way it keeps ``group``, the group of the run it follows (a resume that changes ``trainer.max_epochs``
    would otherwise name another group).
    """
    offline = node.get("offline") or (node.get("mode") or os.environ.get("WANDB_MODE")) in ("offline", "dryrun")
    if not offline:
        log.info("resuming W&B run %s", wandb_id)
        return {"id": wandb_id, "resume": "allow", **({"group": group} if group else {})}
    resumed = RESUMED_ID.fullmatch(wandb_id)
    root, count = (resumed["root"], int(resumed["count"]) + 1) if resumed else (wandb_id, 1)
    # random: the same checkpoint resumed twice must not give two offline runs one id
    options: dict[str, Any] = {"id": f"{root}-resume{count}-{secrets.token_hex(3)}"}
    if group:
        options["group"] = group
    options["config"] = {"resumed_from": wandb_id, "original_run_id": root}
    if node.get("name"):
        options["name"] = f"{node['name']}-resume{count}"
    log.info(
        "W&B is offline, where a run cannot be continued: the resumed run logs to offline run %s (%s), which "
        "follows %s in group %s",
        options["id"],
        options.get("name"),
        wandb_id,
        options.get("group", node.get("group")),
    )
    return options


def wandb_run(trainer: L.Trainer) -> Any:
    """The W&B run of the trainer's first W&B logger, on rank 0; None elsewhere or without one."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger):
            return logger.experiment
    return None


# -------------------------------------------------------------------------------------------- media builders
def _number(value: float) -> float | None:
    """NaN (a class never seen) as a missing cell: W&B tables are JSON, which has no NaN."""
    return None if value is None or math.isnan(value) else float(value)


def pattern_table(report: PatternReport) -> Any:
    """The per-pattern table as a ``wandb.Table``, with the columns of ``patterns.csv``."""
    import wandb

    columns = ["pattern", "miou", "mf1", "oa", *[f"iou_{c}" for c in report.class_names]]
    rows = [
        [r.pattern, _number(r.miou), _number(r.mf1), _number(r.oa), *[_number(r.iou[c]) for c in report.class_names]]
        for r in report.patterns
    ]
    return wandb.Table(columns=columns, data=rows)


def confusion_chart(confmat: Any, class_names: Sequence[str], *, title: str) -> Any:
    """W&B's own confusion-matrix chart (``wandb/confusion_matrix/v1``) from a (K, K) count matrix, rows true
    and columns predicted; ``wandb.plot.confusion_matrix`` wants one entry per pixel instead of the counts."""
    import wandb

    cm = np.asarray(confmat, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {k} classes ({', '.join(class_names)})")
    table = wandb.Table(
        columns=["Actual", "Predicted", "nPredictions"],
        data=[[class_names[i], class_names[j], int(cm[i, j])] for i in range(k) for j in range(k)],
    )
    fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
    return wandb.plot_table("wandb/confusion_matrix/v1", table, fields, {"title": title})


def figure_image(fig: Figure) -> np.ndarray:
    """A matplotlib figure rendered by Agg at its own dpi (``sgma.figures``: 100, as its PNGs) -> (H, W, 3) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def report_media(report: PatternReport, split: str, *, confusion: bool) -> dict[str, Any]:
    """``{split}/patterns`` (table), ``{split}/patterns_miou`` (bar chart) and, with ``confusion``, per pattern
    ``{split}_confusion/<pattern>`` (W&B chart of the pixel counts) and ``{split}_confusion/normalised`` (the
    row-normalised matrices as images, as in the run folder's plots)."""
    import wandb

    from sgma.figures import confusion_figure

    table = pattern_table(report)
    media: dict[str, Any] = {
        f"{split}/patterns": table,
        f"{split}/patterns_miou": wandb.plot.bar(table, "pattern", "miou", title=f"{split}: mIoU per pattern"),
    }
    if confusion:
        images = []
        for row in report.patterns:
            if not row.confusion:
                raise ValueError(f"the {split} report has no confusion matrix for pattern {row.pattern!r}")
            media[f"{split}_confusion/{row.pattern}"] = confusion_chart(
                row.confusion, report.class_names, title=f"{split}, {row.pattern}: pixels (rows: true class)"
            )
            fig = confusion_figure(np.asarray(row.confusion), report.class_names, f"{split}, {row.pattern}")
            images.append(wandb.Image(figure_image(fig), caption=row.pattern))
        media[f"{split}_confusion/normalised"] = images
    return media


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _mask(classes: np.ndarray, class_labels: Mapping[int, str]) -> dict[str, Any]:
    return {"mask_data": classes.astype(np.uint8), "class_labels": dict(class_labels)}


def panel_media(
    panels: Sequence[SamplePanel], split: str, class_names: Sequence[str], palette: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Per sample: ``{split}_samples/<index>``, each available input of each pattern as a ``wandb.Image`` with
    the ground truth and the prediction as masks (class labels named), and ``{split}_samples/<index>_maps``,
    the sample's panel figure (inputs, label, prediction, robustness maps on one shared 0-1 colour scale)."""
    import wandb

    from sgma.figures import panel_figure

    if len(class_names) >= IGNORE_INDEX:
        raise ValueError(f"{len(class_names)} classes do not fit W&B's 8-bit masks next to the ignore index 255")
    labels = {i: name for i, name in enumerate(class_names)}
    labels[IGNORE_INDEX] = "ignore"
    by_sample: dict[int, list[SamplePanel]] = {}
    for panel in panels:
        by_sample.setdefault(panel.index, []).append(panel)
    media: dict[str, Any] = {}
    for index, group in by_sample.items():
        media[f"{split}_samples/{index}"] = [
            wandb.Image(
                _uint8(p.inputs[m]),
                masks={"ground_truth": _mask(p.label, labels), "prediction": _mask(p.prediction, labels)},
                caption=f"sample {index}, {p.pattern}: {m}",
            )
            for p in group
            for m in p.available
        ]
        fig = panel_figure(group, class_names, palette)
        media[f"{split}_samples/{index}_maps"] = wandb.Image(
            figure_image(fig), caption=f"sample {index} under {', '.join(p.pattern for p in group)}"
        )
    return media


def sample_panels(
    module: SegmentationModule, data: IncompleteModalityDataset, report: PatternReport, *, samples: int, patterns: int
) -> list[SamplePanel]:
    """The fixed panel: ``samples`` evenly spaced samples under ``patterns`` of the report's patterns."""
    from sgma.panels import collect_panels, panel_indices, panel_patterns

    if len(data) == 0:
        log.warning("the split has no samples: no W&B sample panels")
        return []
    chosen = panel_patterns([r.pattern for r in report.patterns], patterns)
    return collect_panels(module, data, panel_indices(len(data), samples), chosen)


def mas_media(history: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, Any]:
    """One line plot per :data:`MAS_PLOTS` family present in ``history`` (key -> [[epoch, value], ...]), one
    line per modality, keyed ``<family>by_modality`` (e.g. ``mas/present_by_modality``)."""
    import wandb

    media = {}
    for prefix, title in MAS_PLOTS.items():
        keys = [k for k in history if k.startswith(prefix)]
        if not keys:
            continue
        media[f"{prefix}by_modality"] = wandb.plot.line_series(
            xs=[[int(e) for e, _ in history[k]] for k in keys],
            ys=[[float(v) for _, v in history[k]] for k in keys],
            keys=[k.removeprefix(prefix) for k in keys],
            title=title,
            xname="epoch",
        )
    return media


# ----------------------------------------------------------------------------------------------- callback
class WandbMedia(Callback):
    """W&B tables, charts and sample panels of a training run (see the module docstring); nothing without a
    W&B logger, and nothing on ranks other than 0 (the panels' few forward passes run there alone).

    ``panel_samples`` samples (evenly spaced over the split, the same every time) under ``panel_patterns``
    patterns (:func:`sgma.panels.panel_patterns`: the fullest, the first single, the first pair) are shown at
    the first validation and every ``panels_every_n_validations``-th after it (validations are counted, whatever
    ``trainer.check_val_every_n_epoch``; the count is kept in checkpoints), at the validation of the last epoch
    (``trainer.max_epochs``: the last one unless training stops early) and at test; ``panel_samples=0`` turns the
    panels off. The pattern table and bar chart come at every validation, confusion matrices at test.
    The MAS line plots are rebuilt from the recorded per-epoch values after each epoch; the record is kept in
    checkpoints so a resumed run continues the curves (up to the epoch before the checkpoint's: an epoch's values are
    recorded when the next one starts; they stay in the scalar charts).
    """

    def __init__(
        self, *, panel_samples: int = 4, panel_patterns: int = 3, panels_every_n_validations: int = 10
    ) -> None:
        for name, value, low in (
            ("panel_samples", panel_samples, 0),
            ("panel_patterns", panel_patterns, 1),
            ("panels_every_n_validations", panels_every_n_validations, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"callbacks.wandb_media.{name} must be an integer >= {low}, got {value!r}")
        self.panel_samples = panel_samples
        self.panel_patterns = panel_patterns
        self.panels_every_n_validations = panels_every_n_validations
        self.validations = 0  # finished so far, sanity check aside
        self.mas_history: dict[str, list[list[float]]] = {}

    def _panels(self, trainer: L.Trainer, pl_module: SegmentationModule, split: str, report: PatternReport) -> dict:
        if not self.panel_samples:
            return {}
        if trainer.datamodule is None:
            log.warning("W&B sample panels need the trainer's datamodule; none at %s end, so no panels", split)
            return {}
        dm = trainer.datamodule
        panels = sample_panels(
            pl_module, dm.dataset(split), report, samples=self.panel_samples, patterns=self.panel_patterns
        )
        return panel_media(panels, split, pl_module.class_names, dm.palette)

    def on_validation_end(self, trainer: L.Trainer, pl_module: SegmentationModule) -> None:
        if trainer.sanity_checking:
            return
        index, self.validations = self.validations, self.validations + 1
        run = wandb_run(trainer)
        report = pl_module.reports.get("val")
        if run is None or report is None or not report.patterns:
            return
        media = report_media(report, "val", confusion=False)
        # the last epoch's validation, or the last before it when validation skips epochs
        every = trainer.check_val_every_n_epoch or 1
        last = 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + every
        if index % self.panels_every_n_validations == 0 or last:
            media.update(self._panels(trainer, pl_module, "val", report))
        run.log({**media, "trainer/global_step": trainer.global_step})

    def on_test_end(self, trainer: L.Trainer, pl_module: SegmentationModule) -> None:
        run = wandb_run(trainer)
        split = pl_module.test_split
        report = pl_module.reports.get(split)
        if run is None or report is None or not report.patterns:
            return
        media = report_media(report, split, confusion=True)
        media.update(self._panels(trainer, pl_module, split, report))
        run.log({**media, "trainer/global_step": trainer.global_step})

    # MAS: its values of epoch e are logged at the end of epoch e, after every callback's on_train_epoch_end
    # hook (RobustnessFeedback and the module log them there), so they are read at the next epoch's start
    # and at the end of training.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_mas(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_mas(trainer)

    def _record_mas(self, trainer: L.Trainer) -> None:
        run = wandb_run(trainer)
        epoch = trainer.current_epoch - 1  # the epoch that just ended
        if run is None or epoch < 0:
            return
        prefixes = tuple(MAS_PLOTS)
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}
        recorded = [points[-1][0] for points in self.mas_history.values() if points]
        if not values or (recorded and max(recorded) >= epoch):
            return
        for key, value in values.items():
            self.mas_history.setdefault(key, []).append([epoch, value])
        run.log({**mas_media(self.mas_history), "trainer/global_step": trainer.global_step})

    def state_dict(self) -> dict[str, Any]:
        return {"mas_history": self.mas_history, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mas_history = {k: [list(p) for p in v] for k, v in state_dict.get("mas_history", {}).items()}
        self.validations = int(state_dict.get("validations", 0))  # checkpoints of before the count: from 0


# ------------------------------------------------------------------------------------ eval.py and predict.py
def wandb_logger_node(cfg: DictConfig, task: str) -> DictConfig | None:
    """The W&B logger node of an ``eval.py`` / ``predict.py`` config (``logger=wandb``), or None (the
    default: no logger). Any other logger is refused: these tasks write their results as files already."""
    found = []
    for key, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        target = str(node["_target_"])
        if not target.endswith("WandbLogger"):
            raise ValueError(
                f"{task} logs to W&B only (logger=wandb); logger.{key} is {target}: drop it (logger=null), its "
                f"results are written to files already"
            )
        found.append(node)
    if len(found) > 1:
        raise ValueError(f"{task} takes one W&B logger, the config has {len(found)}: keep logger=wandb")
    return found[0] if found else None


def training_run_name(run_cfg: DictConfig) -> tuple[str, str]:
    """(name, group) of the training run that wrote a checkpoint: its W&B name and group when it logged to
    W&B (stored resolved in the checkpoint's config); else ``<backbone>-<dataset>-<fusion>-s<seed>`` and that
    without the seed (a checkpoint's config keeps no preset or pattern names outside the logger's)."""
    stored = OmegaConf.select(run_cfg, "logger.wandb")
    if stored is not None and stored.get("name") and stored.get("group"):
        return str(stored.name), str(stored.group)
    group = f"{run_cfg.backbone.name}-{run_cfg.dataset.name}-{run_cfg.model.fusion}"
    return f"{group}-s{run_cfg.seed}", group


def task_logger(node: DictConfig, run_cfg: DictConfig, *, job: str, prefix: str, tags: Sequence[str]) -> Any:
    """The W&B logger of an eval / predict run: ``<prefix>-<training run name>`` in the training run's group
    (so a checkpoint's evaluations sit with its training runs), job type ``job``."""
    from sgma.utils import instantiate

    name, group = training_run_name(run_cfg)
    logger = instantiate(node, name=f"{prefix}-{name}", group=group, job_type=job, tags=list(tags))
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
    return logger


def _finish(run: Any, failed: bool) -> None:
    log.info("closing the W&B run (%s)", run.dir)
    run.finish(exit_code=1 if failed else 0)


def log_evaluation(
    cfg: DictConfig,
    *,
    run_cfg: DictConfig,
    module: SegmentationModule,
    datamodule: Any,
    panel_samples: int = 4,
    panel_patterns: int = 3,
) -> Path | None:
    """``eval.py logger=wandb``: one W&B run holding the evaluated split's metrics, pattern table, bar chart,
    confusion matrices and sample panels (``module.reports[cfg.split]``, as evaluate() left it; no panels with
    ``eval.full_tile=true``), named ``eval-<split>-<training run name>``. Returns the run's folder, or None
    without a W&B logger."""
    from sgma.builders import device_for

    node = wandb_logger_node(cfg, "eval.py")
    if node is None:
        return None
    split = str(cfg.split)
    report = module.reports[split]
    full_tile = bool(OmegaConf.select(cfg, "eval.full_tile", default=False))
    tags = [run_cfg.dataset.name, run_cfg.backbone.name, str(run_cfg.model.fusion), f"eval-{split}"]
    run = task_logger(node, run_cfg, job="eval", prefix=f"eval-{split}", tags=tags).experiment
    failed = True
    try:
        run.config.update(
            {
                "checkpoint": str(cfg.ckpt_path),
                "split": split,
                "full_tile": full_tile,
                "train": OmegaConf.to_container(run_cfg, resolve=True),
            },
            allow_val_change=True,
        )
        metrics = {k: v for k, v in report.metrics(split, per_class=True).items() if not math.isnan(v)}
        media = report_media(report, split, confusion=True)
        if full_tile:  # as in the run folder's plots: whole tiles are too large for a panel
            log.info("full-tile evaluation: the W&B run holds the table and charts, no sample panels")
        elif panel_samples:
            home = module.device  # evaluate() leaves the module on the CPU; the few forward passes use the device
            module.to(device_for(OmegaConf.select(cfg, "trainer.accelerator", default="auto")))
            try:
                panels = sample_panels(
                    module, datamodule.dataset(split), report, samples=panel_samples, patterns=panel_patterns
                )
            finally:
                module.to(home)
            media.update(panel_media(panels, split, module.class_names, datamodule.palette))
        run.log({**metrics, **media})
        failed = False
        return Path(run.dir).parent
    finally:
        _finish(run, failed)


def prediction_image(path: Path, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """A written ``prediction.tif`` / ``.png`` read back at most ``max_side`` px wide or high (nearest, so the
    palette colours stay exact): (H, W, 3) uint8, or (H, W, 4) with nodata pixels transparent."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        # prediction.png has no georeference by design (its input had none)
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            step = max(1, math.ceil(max(src.height, src.width) / max_side))
            shape = (max(1, src.height // step), max(1, src.width // step))
            rgb = src.read([1, 2, 3], out_shape=(3, *shape), resampling=Resampling.nearest)
            valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest)
    image = rgb.transpose(1, 2, 0)
    if (valid == 0).any():
        image = np.concatenate([image, valid[..., None].astype(np.uint8)], axis=-1)
    return np.ascontiguousarray(image)


def log_predictions(node: DictConfig | None, cfg: DictConfig, *, run_cfg: DictConfig, result: Mapping) -> Path | None:
    """``predict.py logger=wandb``: one W&B run named ``predict-<pattern>-<training run name>`` holding each
    scene's prediction as written (read back at most 1024 px per side) under ``predict/prediction``, one step per
    scene (the step slider browses the scenes), and the table ``predict/scenes`` (scene, pattern, nodata pixels,
    file). The images are not put in the table: W&B keeps a table's images only in its artifact, outside the
    offline run folder. ``node`` is :func:`wandb_logger_node`'s answer, taken before the inference so a bad
    logger fails first. Returns the run's folder, or None without a W&B logger."""
    if node is None:
        return None
    import wandb

    pattern = str(result["pattern"])
    scenes = result.get("scenes", {None: result})  # one scene: the result itself
    tags = [run_cfg.dataset.name, run_cfg.backbone.name, str(run_cfg.model.fusion), "predict"]
    run = task_logger(node, run_cfg, job="predict", prefix=f"predict-{pattern}", tags=tags).experiment
    failed = True
    try:
        run.config.update(
            {"checkpoint": str(cfg.ckpt_path), "input": str(cfg.input), "pattern": pattern}, allow_val_change=True
        )
        table = wandb.Table(columns=["scene", "pattern", "nodata_pixels", "file"])
        for stem, scene in scenes.items():
            path = Path(scene["files"]["prediction"])
            name = stem if stem is not None else Path(str(cfg.input)).name
            image = wandb.Image(prediction_image(path), caption=f"{name} ({pattern})")
            run.log({"predict/prediction": image})
            table.add_data(name, pattern, int(scene["nodata_pixels"]), str(path))
        run.log({"predict/scenes": table})
        failed = False
        return Path(run.dir).parent
    finally:
        _finish(run, failed)
