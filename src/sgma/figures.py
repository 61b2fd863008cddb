"""Figures of a run, drawn with matplotlib's object API on an Agg canvas (no pyplot: no global state shared
between figures, no display needed), and the ``plots/`` folder of a run made of them.

Every figure function returns a :class:`~matplotlib.figure.Figure`; :func:`save_figure` writes one as a PNG
atomically. Figures use constrained layout and no tight bounding box, so a PNG is exactly the figure's size in
inches times :data:`DPI` pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
from lightning.pytorch import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from sgma.metrics import IGNORE_INDEX
from sgma.reporting import write_file_set

if TYPE_CHECKING:
    from sgma.metrics import PatternReport
    from sgma.panels import SamplePanel

DPI = 100
METRICS = {"miou": "mIoU", "mf1": "mF1", "oa": "OA"}
ROBUSTNESS_CMAP = "viridis"
IGNORE_COLOUR = (0.0, 0.0, 0.0)  # label pixels without a class (255)
MISSING_GREY = 0.5


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI` to ``path`` (a temporary sibling renamed into place: a reader never
    sees half a file); creates the folder. Returns ``path``."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files: give a path ending in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_set({path: png_bytes(fig)})
    return path


def png_bytes(fig: Figure) -> bytes:
    """``fig`` encoded as a PNG at :data:`DPI` (for files, W&B and notebooks alike)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# pattern table -------------------------------------------------------------------------------------------------
def pattern_bars(report: PatternReport, metric: str = "miou", *, title: str | None = None) -> Figure:
    """One bar per evaluated pattern (in the report's order) with its value in %, and the Average as a dashed
    line. Patterns without labelled pixels (NaN) get an empty bar marked n/a."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not report.patterns:
        raise ValueError("the report has no evaluated pattern: nothing to chart")
    name = METRICS[metric]
    names = [row.pattern for row in report.patterns]
    values = [100 * getattr(row, metric) for row in report.patterns]
    fig = new_figure(max(4.0, 0.7 * len(names) + 2.0), 4.0)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), [0 if math.isnan(v) else v for v in values], color="tab:blue")
    ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.1f}" for v in values], fontsize=8)
    average = report.summaries.get("avg", {}).get(metric)
    if average is not None and not math.isnan(average):
        ax.axhline(100 * average, color="black", linestyle="--", linewidth=1, label=f"Average {100 * average:.1f}")
        ax.legend(loc="upper left", fontsize=8)
    slanted = len(names) > 3  # long pattern names would overlap
    ax.set_xticks(range(len(names)), names, rotation=35 if slanted else 0, ha="right" if slanted else "center")
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"{name} (%)")
    ax.set_xlabel("available modalities")
    ax.set_title(title or f"{name} per modality pattern")
    return fig


def confusion_figure(confmat: np.ndarray, class_names: Sequence[str], title: str, normalise: bool = True) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted). ``normalise``: each row as shares of that
    true class (its recall on the diagonal; rows without labelled pixels stay blank), on a fixed 0-1 scale;
    otherwise pixel counts."""
    cm = np.asarray(confmat, dtype=np.float64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match the {k} class names ({k} x {k})")
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError("a confusion matrix holds pixel counts (>= 0); this one has negative or non-finite values")
    if normalise:
        totals = cm.sum(axis=1, keepdims=True)
        shown = np.where(totals > 0, cm / np.maximum(totals, 1), np.nan)
        vmax, label = 1.0, "share of the true class's pixels (cells: % of the row)"
    else:
        shown, vmax, label = cm, max(float(cm.max()), 1.0), "pixels"
    side = max(4.0, 0.55 * k + 2.5)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
    if k <= 30:  # cell numbers stay legible up to about this many classes
        for (i, j), value in np.ndenumerate(shown):
            if np.isnan(value):
                continue
            text = f"{100 * value:.0f}" if normalise else f"{int(value)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if value > 0.6 * vmax else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return fig


# sample panels -------------------------------------------------------------------------------------------------
def palette_colours(palette: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(256, 3) float lookup table: class id -> its palette colour in [0, 1], 255 -> :data:`IGNORE_COLOUR`."""
    colours = np.asarray(palette, dtype=np.float64)
    if colours.shape != (num_classes, 3):
        raise ValueError(
            f"palette must give one RGB triple (0-255) per class: {num_classes} classes, got shape {colours.shape}"
        )
    table = np.full((256, 3), np.nan)
    table[:num_classes] = colours / 255.0
    table[IGNORE_INDEX] = IGNORE_COLOUR
    return table


def colourise(mask: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours from :func:`palette_colours`; an id without a colour is an error."""
    mask = np.asarray(mask)
    bad = (mask < 0) | (mask > 255) | np.isnan(table[mask.clip(0, 255), 0])
    if bad.any():
        values = sorted(set(mask[bad].tolist()))[:10]
        classes = int(np.isfinite(table[:IGNORE_INDEX, 0]).sum())
        raise ValueError(
            f"class ids {values} have no palette colour (classes 0..{classes - 1}, {IGNORE_INDEX} = ignore)"
        )
    return table[mask]


def _blank(ax, text: str, shape: tuple[int, ...]) -> None:
    """A light grey image of the sample's shape (so the axes match their row's images) with ``text`` on it."""
    ax.imshow(np.full((*shape[:2], 3), 0.85))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.3")


def panel_figure(
    panels: Sequence[SamplePanel],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    *,
    title: str | None = None,
) -> Figure:
    """One sample under several patterns, one row per panel. Columns: every modality's input (the withheld ones
    faded and hatched), the label, the prediction (palette colours, class legend below), then the robustness map
    of each modality on ONE 0-1 colour scale shared by every map of the figure, with its colour bar (no robustness
    columns when no panel has maps)."""
    panels = list(panels)
    if not panels:
        raise ValueError("no panels to draw: give the panels of one sample (see sgma.panels.collect_panels)")
    indices = sorted({p.index for p in panels})
    if len(indices) > 1:
        raise ValueError(f"panel_figure draws one sample; these panels are of samples {indices}: draw each separately")
    modalities = list(panels[0].inputs)
    for p in panels:
        if list(p.inputs) != modalities:
            raise ValueError(f"panels show different modalities: {list(p.inputs)} vs {modalities}")
    table = palette_colours(palette, len(class_names))
    with_maps = any(p.robustness for p in panels)
    cols = 2 * len(modalities) + 2 if with_maps else len(modalities) + 2
    cell = 2.0
    fig = new_figure(cell * cols + (0.9 if with_maps else 0.0), cell * len(panels) + 1.2)
    axes = fig.subplots(len(panels), cols, squeeze=False)
    mappable = None
    for row, p in zip(axes, panels, strict=True):
        for ax, name in zip(row, modalities, strict=False):
            image = p.inputs[name]
            if name in p.available:
                ax.imshow(image)
                ax.set_title(name, fontsize=9)
            else:  # what the model did not get: faded towards grey and hatched
                ax.imshow(0.35 * image + 0.65 * MISSING_GREY)
                ax.add_patch(
                    Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, hatch="//", edgecolor="0.3", lw=0)
                )
                ax.set_title(f"{name} (missing)", fontsize=9, color="0.4")
        label_ax, pred_ax = row[len(modalities)], row[len(modalities) + 1]
        label_ax.imshow(colourise(p.label, table), interpolation="nearest")
        label_ax.set_title("label", fontsize=9)
        pred_ax.imshow(colourise(p.prediction, table), interpolation="nearest")
        pred_ax.set_title("prediction", fontsize=9)
        if with_maps:
            for ax, name in zip(row[len(modalities) + 2 :], modalities, strict=True):
                if name in p.robustness:
                    r = p.robustness[name]
                    mappable = ax.imshow(r, cmap=ROBUSTNESS_CMAP, vmin=0.0, vmax=1.0)
                    ax.set_title(f"robustness {name} (mean {float(np.mean(r)):.2f})", fontsize=8)
                else:
                    _blank(ax, "missing" if name not in p.available else "no map", p.label.shape)
                    ax.set_title(f"robustness {name}", fontsize=8, color="0.4")
        row[0].set_ylabel(p.pattern, fontsize=10, fontweight="bold")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(mappable, ax=axes[:, -len(modalities) :], label="robustness (shared 0-1 scale)", shrink=0.9)
    handles = [Patch(facecolor=table[i], edgecolor="0.5", label=name) for i, name in enumerate(class_names)]
    if any((p.label == IGNORE_INDEX).any() for p in panels):
        handles.append(Patch(facecolor=IGNORE_COLOUR, label="ignored"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(title or f"sample {indices[0]}: inputs, label, prediction and robustness per pattern", fontsize=11)
    return fig


# curves --------------------------------------------------------------------------------------------------------
CURVE_TITLES = {
    "loss": "loss",
    "miou": "mIoU",
    "present": "MAS sampler: P(drawn pattern holds m)",
    "rho": "MAS memory: relative robustness rho (1 = average)",
}


def curve_group(name: str) -> str:
    """The panel a series is drawn in: its last path segment up to the first ``_`` (``train/loss`` and
    ``val/loss`` -> ``loss``; ``mas/rho_rgb`` and ``mas/rho_dsm`` -> ``rho``)."""
    return name.rsplit("/", 1)[-1].split("_", 1)[0]


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]], title: str, *, xlabel: str = "epoch") -> Figure:
    """One panel per group of series (:func:`curve_group`), each series a line over its (step, value) points."""
    series = {name: sorted(points) for name, points in history.items() if len(points)}
    if not series:
        raise ValueError("no curves to draw: every series of the history is empty (was anything logged?)")
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(curve_group(name), []).append(name)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = new_figure(4.5 * ncols, 3.2 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (group, names) in zip(axes, groups.items(), strict=False):
        for name in names:
            steps, values = zip(*series[name], strict=True)
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=name)
        ax.set_title(CURVE_TITLES.get(group, group), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)  # plain values, not "+1" and offsets from it
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(groups) :]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


class MetricHistory(Callback):
    """Records the curves of a training run on rank 0: ``train/loss`` (the epoch mean) and the MAS sampler's
    ``mas/present_<m>`` and ``mas/rho_<m>`` at each training epoch's end, ``val/loss`` and ``val/avg/miou`` at each
    validation's end (not the sanity check). Steps are 1-based epochs. Read from ``trainer.callback_metrics``, so
    it works with any logger (or none); kept in checkpoints, so a resumed run draws its whole history (testing a
    checkpoint leaves the history as it is).

    Put it after :class:`~sgma.callbacks.RobustnessFeedback` in the callback list: Lightning runs the callbacks'
    ``on_train_epoch_end`` in list order, and the MAS values are logged by that one.
    """

    TRAIN = ("train/loss_epoch", "mas/present_", "mas/rho_")
    VAL = ("val/loss", "val/avg/miou")

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._restore = True

    def _record(self, trainer: L.Trainer, wanted: tuple[str, ...], *, exact: bool) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.current_epoch + 1
        for key, value in trainer.callback_metrics.items():
            hit = key in wanted if exact else key.startswith(wanted)
            if not hit:
                continue
            value = float(value)
            if math.isfinite(value):
                name = "train/loss" if key == "train/loss_epoch" else key
                self.history.setdefault(name, []).append((step, value))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, self.TRAIN, exact=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, self.VAL, exact=True)

    def state_dict(self) -> dict:
        return {"history": {name: [list(p) for p in points] for name, points in self.history.items()}}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning restores callback states for trainer.test(ckpt_path=best) too: that must not cut the history
        # back to the best epoch's; only a resumed fit takes it (load_state_dict comes right after this hook)
        self._restore = trainer.state.fn == "fit"

    def load_state_dict(self, state_dict: dict) -> None:
        if self._restore:
            history = state_dict["history"].items()
            self.history = {name: [(int(s), float(v)) for s, v in points] for name, points in history}
        self._restore = True


# the plots/ folder of a run ------------------------------------------------------------------------------------
def write_plots(
    plots_dir: Path,
    *,
    split: str,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    report: PatternReport | None = None,
    panels: Sequence[SamplePanel] = (),
    panel_split: str | None = None,
    history: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    run_title: str = "",
) -> list[Path]:
    """Write a run's ``plots/``: ``patterns_miou.png`` and ``confusion_<pattern>.png`` of ``report`` (scored on
    ``split``), ``samples_<index>.png`` for the panels of each sample (of ``panel_split``, default ``split``), and
    ``curves.png`` when ``history`` has values. Returns the written paths."""
    plots_dir = Path(plots_dir)
    suffix = f" ({run_title})" if run_title else ""
    written = []

    def save(fig: Figure, name: str) -> None:
        written.append(save_figure(fig, plots_dir / name))

    if report is not None:
        save(pattern_bars(report, title=f"{split}: mIoU per modality pattern{suffix}"), "patterns_miou.png")
        for row in report.patterns:
            if not row.confusion:
                raise ValueError(f"the report's pattern {row.pattern!r} carries no confusion matrix to draw")
            title = f"{split}, available: {row.pattern} (mIoU {100 * row.miou:.1f}){suffix}"
            save(confusion_figure(np.asarray(row.confusion), report.class_names, title), f"confusion_{row.pattern}.png")
    by_index: dict[int, list[SamplePanel]] = {}
    for p in panels:
        by_index.setdefault(p.index, []).append(p)
    for index, group in by_index.items():
        title = f"{panel_split or split} sample {index}: inputs, label, prediction and robustness per pattern{suffix}"
        save(panel_figure(group, class_names, palette, title=title), f"samples_{index}.png")
    if history and any(len(points) for points in history.values()):
        save(curves_figure(history, f"training curves{suffix}"), "curves.png")
    return written
