"""notebooks/explore.ipynb: executed headless by a real Jupyter kernel on a tiny SGMA checkpoint, and how it picks
the checkpoint."""

from __future__ import annotations

import base64
import io
import os
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from conftest import REPO
from sgma.figures import DPI, pattern_bars
from sgma.metrics import PatternReport, PatternScores
from sgma.modalities import all_patterns

NOTEBOOK = REPO / "notebooks" / "explore.ipynb"
PATTERNS = all_patterns(["rgb", "nir", "dsm"])


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_executes_headless(sgma_ckpt, monkeypatch):
    monkeypatch.setenv("SGMA_CKPT", str(sgma_ckpt))
    nb = read_notebook()
    # kernel "python3": jupyter_client runs its `python` with this interpreter (sys.executable), i.e. the venv's;
    # the kernel starts in notebooks/, as under `jupyter lab`
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]

    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"checkpoint: {sgma_ckpt}" in text and "(from SGMA_CKPT)" in text
    assert "fusion=sgf" in text
    table = next(o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert all(f"| {p} |" in table for p in PATTERNS) and "| Average |" in table and "val split" in table

    images = [
        Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
        for o in outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2 + 1  # a panel figure per sample (NUM_SAMPLES = 2), then the pattern chart
    assert all(image.format == "PNG" for image in images)
    panel, chart = images[0], images[-1]
    assert panel.width > 2 * panel.height  # inputs, label, prediction and 3 robustness maps per row
    stand_in = PatternReport([PatternScores(p, 0.5, 0.5, 0.5, {}, {}) for p in PATTERNS], ["a"], [], {})
    assert chart.size == tuple((pattern_bars(stand_in).get_size_inches() * DPI).round().astype(int))


def run_parameter_cell(monkeypatch, tmp_path, *, ckpt: str | None) -> dict:
    """The notebook's parameter cell run here, with ``logs/`` at ``tmp_path/logs``."""
    monkeypatch.setenv("SGMA_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)  # the cell moves to the checkout; the test's working folder is restored after it
    if ckpt is None:
        monkeypatch.delenv("SGMA_CKPT", raising=False)
    else:
        monkeypatch.setenv("SGMA_CKPT", ckpt)
    cell = next(c for c in read_notebook().cells if c.get("id") == "params")
    assert "parameters" in cell.metadata.get("tags", [])
    namespace: dict = {}
    exec(compile(cell.source, f"{NOTEBOOK}:params", "exec"), namespace)
    return namespace


def fake_run(tmp_path: Path, name: str, mtime: float) -> Path:
    """A run folder's last.ckpt; the parameter cell only picks the file (its content is read by the next cell)."""
    ckpt = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"placeholder")
    os.utime(ckpt, (mtime, mtime))
    return ckpt


def test_default_checkpoint_is_the_newest_and_printed(monkeypatch, tmp_path, capsys):
    newer = fake_run(tmp_path, "2024-01-01_00-00-00", 2_000_000_000)  # sorts first by name, but written last
    fake_run(tmp_path, "2025-01-01_00-00-00", 1_000_000_000)
    assert run_parameter_cell(monkeypatch, tmp_path, ckpt=None)["CKPT"] == newer
    out = capsys.readouterr().out
    written = f"{datetime.fromtimestamp(2_000_000_000):%Y-%m-%d %H:%M:%S}"
    assert f"checkpoint: {newer}\n  written {written} (the newest last.ckpt under {tmp_path / 'logs'})" in out

    chosen = fake_run(tmp_path, "chosen", 1_500_000_000)
    assert run_parameter_cell(monkeypatch, tmp_path, ckpt=str(chosen))["CKPT"] == chosen  # SGMA_CKPT wins


def test_relative_checkpoint_path_is_relative_to_the_checkout(monkeypatch, tmp_path):
    """README: SGMA_CKPT=logs/train/runs/<time>/checkpoints/last.ckpt jupyter lab notebooks/explore.ipynb, typed in
    the checkout; Jupyter starts the kernel in notebooks/, where that path (and a relative data root) does not exist."""
    ckpt = fake_run(tmp_path, "r1", 1_000_000_000)
    relative = os.path.relpath(ckpt, REPO)
    assert run_parameter_cell(monkeypatch, tmp_path, ckpt=relative)["CKPT"].resolve() == ckpt.resolve()
    assert Path.cwd() == REPO


def test_checkpoint_errors_say_how_to_set_it(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found under .*: set SGMA_CKPT=/path/to/last.ckpt"):
        run_parameter_cell(monkeypatch, tmp_path, ckpt=None)
    with pytest.raises(FileNotFoundError, match=r"SGMA_CKPT='.*missing.ckpt': no such checkpoint file"):
        run_parameter_cell(monkeypatch, tmp_path, ckpt=str(tmp_path / "missing.ckpt"))
