"""The pattern table: console rendering and ``patterns.{csv,json,md}``, written as one set (all or none)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sgma.metrics import PatternReport
from sgma.recovery import fsync_dir, open_new, temporary_sibling

SUMMARY_LABELS = {"avg": "Average", "top1": "Top-1", "last1": "Last-1"}


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _rows(report: PatternReport) -> tuple[list[str], list[list[str]]]:
    header = ["pattern", "mIoU", "mF1", "OA", *[f"IoU {c}" for c in report.class_names]]
    rows = [
        [r.pattern, _pct(r.miou), _pct(r.mf1), _pct(r.oa), *[_pct(r.iou[c]) for c in report.class_names]]
        for r in report.patterns
    ]
    for key, values in report.summaries.items():
        label = SUMMARY_LABELS.get(key, f"E[mIoU] p={key[1:]}" if key.startswith("p") else key)
        rows.append(
            [label, _pct(values["miou"]), _pct(values.get("mf1", math.nan)), _pct(values.get("oa", math.nan))]
            + [""] * len(report.class_names)
        )
    return header, rows


def render_table(report: PatternReport, *, title: str) -> Table:
    """The console table. Every cell is plain text: rich would read ``E[mIoU]`` (or a class or dataset name in
    square brackets) as style markup and drop it."""
    header, rows = _rows(report)
    table = Table(title=Text(title), show_lines=False)
    for i, name in enumerate(header):
        table.add_column(Text(name), justify="left" if i == 0 else "right")
    n_patterns = len(report.patterns)
    for i, row in enumerate(rows):
        table.add_row(*map(Text, row), end_section=i == n_patterns - 1)
    return table


def print_table(report: PatternReport, *, title: str, console: Console | None = None) -> None:
    (console or Console(width=200)).print(render_table(report, title=title))


def to_markdown(report: PatternReport, *, title: str) -> str:
    header, rows = _rows(report)
    lines = [f"# {title}", ""]
    if report.excluded_classes:
        lines += [
            f"mIoU and mF1 exclude: {', '.join(report.excluded_classes)} (OA counts every labelled pixel).",
            "",
        ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(report: PatternReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pattern", "miou", "mf1", "oa", *[f"iou_{c}" for c in report.class_names]])
    for r in report.patterns:
        writer.writerow([r.pattern, r.miou, r.mf1, r.oa, *[r.iou[c] for c in report.class_names]])
    for key, values in report.summaries.items():
        writer.writerow([key, values["miou"], values.get("mf1", ""), values.get("oa", "")])
    return buf.getvalue()


def write_file_set(files: Mapping[Path, str | bytes]) -> None:
    """Write every file (text or bytes) to a temporary name in its folder (flushed to disk), then rename them
    all into place.

    A failure while writing (a full disk, a signal) removes the temporaries and leaves none of the final names
    touched: a set such as the pattern table appears whole or not at all, never as a lone ``patterns.csv``.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            tmp = temporary_sibling(path)
            written.append((tmp, path))
            with os.fdopen(open_new(tmp), "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {path.parent for path in files}:
        fsync_dir(folder)


def write_report(report: PatternReport, out_dir: str | Path, *, title: str, meta: dict | None = None) -> list[Path]:
    """Write ``patterns.csv``, ``patterns.json`` and ``patterns.md`` into ``out_dir`` as one set; return their
    paths. The json also holds each pattern's confusion matrix (``confusion``: pixel counts, rows true and
    columns predicted class, in ``class_names`` order)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, **(meta or {}), **report.to_dict()}
    files = {
        out / "patterns.csv": to_csv(report),
        out / "patterns.json": json.dumps(payload, indent=2, allow_nan=True) + "\n",
        out / "patterns.md": to_markdown(report, title=title),
    }
    write_file_set(files)
    return list(files)
