"""Sweep summary: one table, mean and standard deviation over seeds, from a Hydra multirun folder.

``python -m sgma.summary logs/train/multiruns/<time>`` reads every job folder ``<n>/`` of the multirun (Hydra's
``<n>/.hydra/overrides.yaml`` and the ``<n>/patterns.json`` that train.py / eval.py write at test end), groups
the jobs by their overrides minus ``seed`` (one *setting* per group, e.g. ``model=sgma`` vs ``model=baseline``)
and writes, into the multirun folder, as one set (all or none):

- ``summary.md``: mIoU (%) per setting (rows) and pattern + Average / Top-1 / Last-1 (columns), ``mean ± std``;
- ``summary.csv``: every metric of ``patterns.json`` (fractions in [0, 1]), one row per (setting, pattern or
  summary, metric) with ``n``, ``mean`` and ``std``;
- ``summary.png``: a grouped bar chart of the markdown table, with one-std error bars.

``std`` is the sample standard deviation (ddof=1), undefined (empty, no error bar) for n = 1. ``n`` counts the
jobs whose value is a number: a pattern without labelled pixels scores NaN in its job and is left out of that
cell only. Jobs that have not written ``patterns.json`` (still running, failed, ``test=false``) are listed in a
warning and skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig

from sgma.cluster import refuse
from sgma.figures import DPI, png_bytes
from sgma.reporting import SUMMARY_LABELS, write_file_set

log = logging.getLogger("sgma")

SEED_KEYS = ("seed",)  # overrides that repeat a setting rather than define one
TABLE_SUMMARIES = ("avg", "top1", "last1")  # the summary columns of summary.md and summary.png
FILES = ("summary.md", "summary.csv", "summary.png")


@dataclass(frozen=True)
class Job:
    """One finished job of the sweep: its number, setting (overrides minus seed) and scores."""

    number: int
    folder: Path
    overrides: tuple[str, ...]  # without the seed
    seed: int | None  # from the run config stored in patterns.json
    split: str
    values: dict[tuple[str, str], float]  # (pattern or summary key, metric) -> value in [0, 1] or NaN


@dataclass(frozen=True)
class Cell:
    n: int  # jobs with a numeric value
    mean: float
    std: float  # ddof=1; NaN for n < 2


@dataclass
class SweepSummary:
    folder: Path
    split: str
    settings: list[str]  # row labels, in the order Hydra numbered the jobs
    jobs: dict[str, list[Job]]  # setting -> its jobs
    patterns: list[str]  # evaluated patterns, canonical order as the jobs list them
    summaries: list[str]  # summary keys (avg, top1, last1, p0.5, ...)
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (setting, row, metric) -> Cell
    skipped: list[Path] = field(default_factory=list)  # job folders without patterns.json

    def cell(self, setting: str, row: str, metric: str = "miou") -> Cell | None:
        return self.cells.get((setting, row, metric))


# ------------------------------------------------------------------------------------------------ reading
def _override_key(override: str) -> str:
    """``+seed=3`` / ``++seed=3`` / ``seed=3`` -> ``seed``; ``~logger`` -> ``logger``."""
    return override.split("=", 1)[0].lstrip("+~")


def job_folders(folder: Path) -> list[Path]:
    """The numbered job folders Hydra made in a multirun folder (``<n>/.hydra/overrides.yaml``), by number."""
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"multirun folder {str(folder)!r} {what}: point at a folder made by `train.py -m ...`, e.g. "
            f"logs/train/multiruns/<time>"
        )
    jobs = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / ".hydra" / "overrides.yaml").is_file()
        ),
        key=lambda p: int(p.name),
    )
    if not jobs:
        hint = ""
        if (folder / "patterns.json").is_file():
            hint = f" ({folder} is a single run: its table is {folder / 'patterns.md'})"
        raise FileNotFoundError(
            f"{str(folder)!r} holds no Hydra job folder (looked for <n>/.hydra/overrides.yaml, e.g. "
            f"{folder / '0' / '.hydra' / 'overrides.yaml'}){hint}: point at a multirun folder such as "
            f"logs/train/multiruns/<time>"
        )
    return jobs


def read_job(folder: Path) -> Job:
    """One finished job folder (``patterns.json`` + ``.hydra/overrides.yaml``)."""
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"{overrides_file} is not a list of override strings as Hydra writes it: {overrides!r}")
    table_file = folder / "patterns.json"
    try:
        table = json.loads(table_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{table_file} is not valid JSON ({err}): rerun that job or remove its folder") from None
    missing = [k for k in ("split", "patterns", "summaries") if k not in table]
    if missing:
        raise ValueError(
            f"{table_file} has no {' and no '.join(missing)}: not a table as train.py / eval.py write it "
            f"(sgma.reporting.write_report with meta={{'split': ...}})"
        )
    values: dict[tuple[str, str], float] = {}
    for row in table["patterns"]:
        for metric in ("miou", "mf1", "oa"):
            values[(row["pattern"], metric)] = float(row[metric])
    for key, metrics in table["summaries"].items():
        for metric, value in metrics.items():
            values[(key, metric)] = float(value)
    seed = (table.get("config") or {}).get("seed")
    return Job(
        number=int(folder.name),
        folder=folder,
        overrides=tuple(o for o in overrides if _override_key(o) not in SEED_KEYS),
        seed=None if seed is None else int(seed),
        split=str(table["split"]),
        values=values,
    )


def _labels(jobs: Sequence[Job]) -> dict[tuple[str, ...], str]:
    """Setting label per distinct override set: only the overrides that differ between jobs (``model=sgma``),
    all of them when only the seed was swept."""
    common = set.intersection(*(set(j.overrides) for j in jobs))
    labels = {}
    for job in jobs:
        if job.overrides not in labels:
            varying = [o for o in job.overrides if o not in common]
            labels[job.overrides] = " ".join(varying or job.overrides) or "(defaults)"
    return labels


def _cell(values: Sequence[float]) -> Cell:
    finite = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return Cell(0, math.nan, math.nan)
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan
    return Cell(int(finite.size), float(np.mean(finite)), std)


def summarise(folder: str | Path) -> SweepSummary:
    """Mean and std over seeds per (setting, pattern or summary, metric) of a multirun folder."""
    folder = Path(folder).expanduser()
    folders = job_folders(folder)
    finished = [p for p in folders if (p / "patterns.json").is_file()]
    skipped = [p for p in folders if p not in finished]
    if not finished:
        raise FileNotFoundError(
            f"no finished job in {str(folder)!r}: looked for <n>/patterns.json in job folder(s) "
            f"{', '.join(p.name for p in folders)}; a job writes it at test end (still running, failed, or run "
            f"with test=false?)"
        )
    if skipped:
        log.warning(
            "skipping %d job(s) of %s without patterns.json (not finished: still running, failed or test=false): %s",
            len(skipped),
            folder,
            ", ".join(p.name for p in skipped),
        )
    jobs = [read_job(p) for p in finished]
    splits = sorted({j.split for j in jobs})
    if len(splits) > 1:
        by_split = {s: [j.folder.name for j in jobs if j.split == s] for s in splits}
        raise ValueError(f"the jobs of {folder} scored different splits ({by_split}): summarise one split at a time")

    labels = _labels(jobs)
    grouped: dict[str, list[Job]] = {}
    for job in jobs:
        grouped.setdefault(labels[job.overrides], []).append(job)
    patterns: list[str] = []
    summaries: list[str] = []
    for job in jobs:
        for row, _ in job.values:
            target = summaries if row in SUMMARY_LABELS or _is_probability(row) else patterns
            if row not in target:
                target.append(row)
    for setting, members in grouped.items():
        seeds = [j.seed for j in members if j.seed is not None]
        if len(seeds) != len(set(seeds)):
            log.warning(
                "setting %s repeats a seed (jobs %s, seeds %s): its std measures reruns, not seeds",
                setting,
                ", ".join(j.folder.name for j in members),
                ", ".join(map(str, seeds)),
            )
    summary = SweepSummary(folder, splits[0], list(grouped), grouped, patterns, summaries, skipped=skipped)
    keys = {key for job in jobs for key in job.values}
    for setting, members in grouped.items():
        for row, metric in keys:
            present = [j.values[(row, metric)] for j in members if (row, metric) in j.values]
            if present:
                summary.cells[(setting, row, metric)] = _cell(present)
    return summary


def _is_probability(key: str) -> bool:
    """``p0.5``: the expected mIoU under independent missing modalities (see sgma.metrics.build_report)."""
    try:
        return key.startswith("p") and 0 <= float(key[1:]) <= 1
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------- rendering
def _label(row: str) -> str:
    return SUMMARY_LABELS.get(row, f"E[mIoU] p={row[1:]}" if _is_probability(row) else row)


def _columns(summary: SweepSummary) -> list[str]:
    return summary.patterns + [s for s in TABLE_SUMMARIES if s in summary.summaries]


def _text(cell: Cell | None, n_jobs: int) -> str:
    if cell is None or cell.n == 0:
        return "-"
    text = f"{100 * cell.mean:.2f}" if math.isnan(cell.std) else f"{100 * cell.mean:.2f} ± {100 * cell.std:.2f}"
    return text if cell.n == n_jobs else f"{text} (n={cell.n})"


def to_markdown(summary: SweepSummary) -> str:
    columns = _columns(summary)
    header = ["setting", "seeds", "n", *[_label(c) for c in columns]]
    lines = [
        f"# Sweep summary: {summary.folder}",
        "",
        f"{summary.split} split, mIoU (%) as mean ± std over seeds (sample std, ddof=1); n = finished jobs of "
        f"the setting, (n=k) marks a cell with fewer numeric values. Every metric: summary.csv.",
    ]
    if summary.skipped:
        lines.append(f"Skipped (no patterns.json): job(s) {', '.join(p.name for p in summary.skipped)}.")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for setting in summary.settings:
        members = summary.jobs[setting]
        seeds = ", ".join("?" if j.seed is None else str(j.seed) for j in members)
        cells = [_text(summary.cell(setting, c), len(members)) for c in columns]
        lines.append("| " + " | ".join([setting, seeds, str(len(members)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(summary: SweepSummary) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "pattern", "metric", "n", "mean", "std", "seeds"])
    for setting in summary.settings:
        seeds = " ".join("?" if j.seed is None else str(j.seed) for j in summary.jobs[setting])
        for row in summary.patterns + summary.summaries:
            for metric in ("miou", "mf1", "oa"):
                cell = summary.cell(setting, row, metric)
                if cell is None:
                    continue
                std = "" if math.isnan(cell.std) else repr(cell.std)
                mean = "" if math.isnan(cell.mean) else repr(cell.mean)
                writer.writerow([setting, row, metric, cell.n, mean, std, seeds])
    return buf.getvalue()


def summary_figure(summary: SweepSummary) -> Figure:
    """Grouped bars: one group per pattern / summary, one bar per setting, one-std error bars (none for n=1)."""
    columns = _columns(summary)
    n_settings = len(summary.settings)
    width = max(6.0, 1.5 + len(columns) * (0.25 * n_settings + 0.35))
    fig = Figure(figsize=(width, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    bar = 0.8 / n_settings
    x = np.arange(len(columns), dtype=np.float64)
    for i, setting in enumerate(summary.settings):
        cells = [summary.cell(setting, c) for c in columns]
        means = np.array([100 * c.mean if c else np.nan for c in cells])
        stds = np.array([100 * c.std if c and not math.isnan(c.std) else 0.0 for c in cells])
        ax.bar(x - 0.4 + (i + 0.5) * bar, means, bar, yerr=stds, capsize=2, label=setting)
    if len(columns) > len(summary.patterns) > 0:  # patterns | summaries over them
        ax.axvline(len(summary.patterns) - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x, [_label(c) for c in columns], rotation=30, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{summary.split} mIoU per pattern, mean ± std over seeds")
    fig.legend(loc="outside upper center", ncols=min(n_settings, 3), fontsize="small")
    return fig


# ------------------------------------------------------------------------------------------------- writing
def write_summary(folder: str | Path) -> tuple[SweepSummary, list[Path]]:
    """Summarise a multirun folder and write ``summary.{md,csv,png}`` into it; return the summary and paths."""
    summary = summarise(folder)
    out = summary.folder
    # everything is rendered before any file is touched
    files = {
        out / "summary.md": to_markdown(summary).encode(),
        out / "summary.csv": to_csv(summary).encode(),
        out / "summary.png": png_bytes(summary_figure(summary)),
    }
    write_file_set(files)  # all three or none
    return summary, list(files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgma.summary",
        description="Mean and std over seeds per setting and pattern of a multirun folder; writes summary.md, "
        "summary.csv and summary.png into it and prints the table.",
    )
    parser.add_argument("folder", type=Path, help="a multirun folder, e.g. logs/train/multiruns/<time>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        summary, paths = write_summary(args.folder)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(summary))
    log.info("written: %s", ", ".join(str(p) for p in paths))
    return 0


class SummariseSweep(Callback):
    """Hydra callback: write and print the sweep summary when a multirun ends (``hydra.callbacks``, see
    ``conf/experiment/ablation.yaml``), so a sweep is one command from jobs to table. A sweep in which no job
    wrote its table is an error here, as it is for ``python -m sgma.summary``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        try:
            summary, paths = write_summary(folder)
        except Exception as err:  # Hydra would only warn and exit 0
            raise refuse(err) from err
        print(f"\nSweep summary ({folder}):\n\n{to_markdown(summary)}", flush=True)
        log.info("written: %s", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.exit(main())
