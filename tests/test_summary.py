"""``python -m sgma.summary``: mean and std over seeds per setting and pattern of a multirun folder.

The fast tests build multirun folders of the shape a real ``train.py -m ... seed=1,2 model=baseline,sgf_only``
leaves (``<n>/.hydra/overrides.yaml`` as Hydra writes it, ``<n>/patterns.json`` written by the real
:func:`sgma.reporting.write_report` from real confusion-matrix scores); the slow test makes a real one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, compose_config
from sgma.metrics import build_report
from sgma.modalities import all_patterns
from sgma.reporting import write_report
from sgma.summary import DPI, main, summarise, summary_figure, write_summary

PATTERNS = all_patterns(["rgb", "nir", "dsm"])
CLASSES = ["road", "building", "tree"]


def write_job(sweep: Path, number: int, overrides: list[str], *, seed: int, split: str = "test", empty=()) -> Path:
    """A finished job folder: Hydra's overrides file and the pattern table of random confusion matrices
    (``empty`` patterns get a matrix without labelled pixels: NaN scores)."""
    job = write_unfinished(sweep, number, overrides)
    rng = np.random.default_rng(1000 * number + seed)
    confmat = torch.from_numpy(rng.integers(0, 50, size=(len(PATTERNS), len(CLASSES), len(CLASSES))))
    for pattern in empty:
        confmat[PATTERNS.index(pattern)] = 0
    samples = torch.full((len(PATTERNS),), 2)
    report = build_report(confmat, samples, all_patterns=PATTERNS, class_names=CLASSES, missing_probs=[0.5])
    write_report(report, job, title=f"{split} split", meta={"split": split, "config": {"seed": seed}})
    return job


def write_unfinished(sweep: Path, number: int, overrides: list[str]) -> Path:
    """A job folder as Hydra leaves it before the job writes its table (running, failed, or test=false)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))  # "- debug=tiny\n- seed=1\n..."
    return job


def job_values(job: Path) -> dict[str, float]:
    """mIoU per pattern and summary, read straight from the job's patterns.json."""
    table = json.loads((job / "patterns.json").read_text())
    values = {row["pattern"]: row["miou"] for row in table["patterns"]}
    values.update({key: v["miou"] for key, v in table["summaries"].items()})
    return values


def ablation(sweep: Path) -> dict[str, list[Path]]:
    """Hydra's order for ``seed=1,2,3 model=baseline,sgma``: 3 + 2 finished jobs, job 5 unfinished."""
    jobs: dict[str, list[Path]] = {"model=baseline": [], "model=sgma": []}
    number = 0
    for seed in (1, 2, 3):
        for model in ("baseline", "sgma"):
            overrides = ["debug=tiny", "logger=csv", f"seed={seed}", f"model={model}"]
            if number == 5:
                write_unfinished(sweep, number, overrides)
            else:
                jobs[f"model={model}"].append(write_job(sweep, number, overrides, seed=seed))
            number += 1
    return jobs


def test_mean_and_std_over_seeds_per_setting_and_pattern(tmp_path, caplog):
    sweep = tmp_path / "multirun"
    jobs = ablation(sweep)
    with caplog.at_level(logging.WARNING, logger="sgma"):
        summary, paths = write_summary(sweep)
    assert "skipping 1 job(s)" in caplog.text and caplog.records[-1].getMessage().endswith(": 5")
    assert summary.settings == ["model=baseline", "model=sgma"]  # the overrides common to all jobs are not shown
    assert summary.patterns == PATTERNS and summary.summaries == ["avg", "top1", "last1", "p0.5"]
    assert [p.name for p in summary.skipped] == ["5"]
    for setting, members in jobs.items():
        per_job = [job_values(j) for j in members]
        for row in [*PATTERNS, "avg", "top1", "last1", "p0.5"]:
            values = np.array([v[row] for v in per_job])
            cell = summary.cell(setting, row)
            assert cell.n == len(members)
            assert cell.mean == pytest.approx(np.mean(values))
            assert cell.std == pytest.approx(np.std(values, ddof=1))

    assert [p.name for p in paths] == ["summary.md", "summary.csv", "summary.png"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == ["summary.csv", "summary.md", "summary.png"]

    md = (sweep / "summary.md").read_text()
    header = "| setting | seeds | n | " + " | ".join(PATTERNS) + " | Average | Top-1 | Last-1 |"
    assert header in md and "Skipped (no patterns.json): job(s) 5." in md
    baseline = [line for line in md.splitlines() if line.startswith("| model=baseline |")]
    cell = summary.cell("model=baseline", "rgb")
    assert baseline == [baseline[0]] and baseline[0].startswith(
        f"| model=baseline | 1, 2, 3 | 3 | {100 * cell.mean:.2f} ± {100 * cell.std:.2f} |"
    )
    assert "| model=sgma | 1, 2 | 2 |" in md

    rows = list(csv.DictReader(io.StringIO((sweep / "summary.csv").read_text())))
    # 2 settings x (7 patterns x 3 metrics + avg's 3 + top1, last1, p0.5)
    assert len(rows) == 2 * (7 * 3 + 3 + 3)
    oa = next(r for r in rows if (r["setting"], r["pattern"], r["metric"]) == ("model=sgma", "nir+dsm", "oa"))
    expected = [json.loads((j / "patterns.json").read_text())["patterns"][5]["oa"] for j in jobs["model=sgma"]]
    assert (oa["n"], oa["seeds"]) == ("2", "1 2")
    assert float(oa["mean"]) == pytest.approx(np.mean(expected)) and float(oa["std"]) == pytest.approx(
        np.std(expected, ddof=1)
    )

    png = (sweep / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = (summary_figure(summary).get_size_inches() * DPI).round().astype(int)
    with Image.open(sweep / "summary.png") as image:
        assert image.size == (width, height) and width > height


def test_nan_scores_and_single_seed_cells(tmp_path):
    """A pattern without labelled pixels (NaN) in one job leaves that job out of its cell only; n=1: no std."""
    sweep = tmp_path / "multirun"
    for number, seed in enumerate((1, 2, 3)):
        write_job(sweep, number, [f"seed={seed}", "missing=rgb"], seed=seed, empty=["dsm"] if seed == 2 else ())
    write_job(sweep, 3, ["seed=1", "missing=rgb+dsm"], seed=1)
    summary, _ = write_summary(sweep)
    assert summary.settings == ["missing=rgb", "missing=rgb+dsm"]
    dsm = [job_values(sweep / str(n))["dsm"] for n in range(3)]
    assert math.isnan(dsm[1])
    cell = summary.cell("missing=rgb", "dsm")
    assert cell.n == 2 and cell.mean == pytest.approx(np.mean([dsm[0], dsm[2]]))
    assert cell.std == pytest.approx(np.std([dsm[0], dsm[2]], ddof=1))
    single = summary.cell("missing=rgb+dsm", "rgb")
    assert single.n == 1 and math.isnan(single.std)
    md = (sweep / "summary.md").read_text()
    assert f"{100 * cell.mean:.2f} ± {100 * cell.std:.2f} (n=2)" in md
    assert f"| missing=rgb+dsm | 1 | 1 | {100 * single.mean:.2f} |" in md  # no "±" for one seed
    row = next(
        r
        for r in csv.DictReader(io.StringIO((sweep / "summary.csv").read_text()))
        if (r["setting"], r["pattern"], r["metric"]) == ("missing=rgb+dsm", "rgb", "miou")
    )
    assert row["n"] == "1" and row["std"] == ""


def test_seed_only_sweep_and_repeated_seeds(tmp_path, caplog):
    sweep = tmp_path / "multirun"
    for number in range(2):
        write_job(sweep, number, ["model=sgma", "seed=7"], seed=7)  # the same seed twice: reruns, not seeds
    with caplog.at_level(logging.WARNING, logger="sgma"):
        summary = summarise(sweep)
    assert summary.settings == ["model=sgma"]  # nothing varies but the seed: the setting is all its overrides
    assert "repeats a seed" in caplog.text and "7, 7" in caplog.text


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: point at a folder made by `train.py -m"):
        summarise(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    (run / "patterns.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"no Hydra job folder \(looked for <n>/.hydra/overrides.yaml.*single run"
    ):
        summarise(run)
    sweep = tmp_path / "multirun"
    for number in range(2):
        write_unfinished(sweep, number, [f"seed={number}"])
    with pytest.raises(
        FileNotFoundError, match=r"no finished job in .*looked for <n>/patterns.json in job folder\(s\) 0, 1"
    ):
        summarise(sweep)
    write_job(sweep, 2, ["seed=2"], seed=2)
    write_job(sweep, 3, ["seed=3"], seed=3, split="val")
    with pytest.raises(ValueError, match=r"different splits \(\{'test': \['2'\], 'val': \['3'\]\}\)"):
        write_summary(sweep)
    assert not list(sweep.glob("summary*")) and not list(sweep.glob(".summary*"))  # nothing written on error


def test_cli(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    ablation(sweep)
    proc = subprocess.run(
        [sys.executable, "-m", "sgma.summary", str(sweep)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"# Sweep summary: {sweep}") and "| model=sgma | 1, 2 | 2 |" in proc.stdout
    assert "without patterns.json" in proc.stderr and "summary.png" in proc.stderr
    assert main([str(tmp_path / "empty")]) == 2
    assert "error: multirun folder" in capsys.readouterr().err


@pytest.mark.slow
def test_real_multirun(tmp_path):
    """A real ablation multirun (2 presets x 2 seeds) through train.py, then the command on it."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SGMA_LOG_DIR": str(tmp_path)}
    args = ["-m", "debug=tiny", "logger=csv", "seed=1,2", "model=baseline,sgf_only", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "sgma.summary", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summarise(sweep)
    assert summary.settings == ["model=baseline", "model=sgf_only"] and not summary.skipped
    for setting, numbers in (("model=baseline", (0, 2)), ("model=sgf_only", (1, 3))):
        values = [job_values(sweep / str(n))["avg"] for n in numbers]
        cell = summary.cell(setting, "avg")
        assert cell.n == 2 and cell.mean == pytest.approx(np.mean(values))
        assert cell.std == pytest.approx(np.std(values, ddof=1))
    assert f"| {'model=baseline'} | 1, 2 | 2 |" in proc.stdout
    with Image.open(sweep / "summary.png") as image:
        assert image.format == "PNG"


def test_ablation_experiment_sweeps_presets_regimes_and_seeds():
    """experiment=ablation: the sweep's axes, and the summary callback that ends it (a real run of the command,
    narrowed to two tiny jobs: tests/test_cluster.py::test_submitit_local_sweep_runs_jobs_in_parallel)."""
    cfg = compose_config("train", ["experiment=ablation"])
    params = cfg.hydra.sweeper.params
    assert params.model.split(",") == ["baseline", "muss", "sgf_only", "mas_only", "sgma"]
    assert params.missing.split(",") == ["full", "uniform"] and params.seed.split(",") == ["1", "2", "3"]
    assert cfg.hydra.callbacks.sweep_summary._target_ == "sgma.summary.SummariseSweep"
    assert cfg.hydra.mode.name == "MULTIRUN"  # a sweep without -m too (was: one default job, no summary)


def test_summary_callback_failure_stops_the_command(tmp_path):
    """Hydra turns a callback's exception into a warning (exit status 0): a sweep without any finished job must
    end in an error, as python -m sgma.summary does."""
    from sgma.cluster import Refused
    from sgma.summary import SummariseSweep

    cfg = compose_config("train", ["experiment=ablation", f"hydra.sweep.dir={tmp_path}"])
    with pytest.raises(Refused, match=str(tmp_path)) as info:
        SummariseSweep().on_multirun_end(cfg)
    assert info.value.code.startswith(("FileNotFoundError", "ValueError"))
