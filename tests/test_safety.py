"""Checkpoint loading never runs code: a crafted pickle is refused by eval, predict, resume and the notebook.

The crafted checkpoints carry a harmless payload: an object whose ``__reduce__`` calls ``Path.touch`` on a
marker file. Loaded with ``torch.load(weights_only=False)`` (the old code) the marker appears; loaded safely it
never does. Bad files (missing, a folder, unreadable, empty, truncated, corrupt, foreign) get errors that say
what the file is and name the CLI key.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from conftest import REPO, bind_to, compose_config
from sgma.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint_safely
from sgma.data.fake import write_geotiff
from sgma.inference import check_output_dir, predict
from sgma.tasks import evaluate, load_checkpoint, train


class Payload:
    """Unpickling this calls ``Path(marker).touch()``: harmless proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def craft(sgma_ckpt: Path, folder: Path, fmt: str = "zip") -> tuple[Path, Path]:
    """A checkpoint that looks like sgma's (same keys and tensors) with the payload in its sgma node."""
    marker = folder / f"PAYLOAD_RAN_{fmt}"
    ckpt = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)
    ckpt["sgma"]["version"] = Payload(marker)
    path = folder / f"crafted_{fmt}.ckpt"
    if fmt == "zip":  # torch.save's format, as Lightning writes it
        torch.save(ckpt, path)
    elif fmt == "legacy":  # torch's pre-1.6 format
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle renamed .ckpt
        with path.open("wb") as f:
            pickle.dump({"state_dict": {}, "sgma": {"config": {}, "version": Payload(marker)}}, f)
    return path, marker


@pytest.fixture
def crafted(sgma_ckpt, tmp_path) -> tuple[Path, Path]:
    return craft(sgma_ckpt, tmp_path)


def test_payload_runs_when_unpickled_unsafely(sgma_ckpt, tmp_path):
    """The test's own premise: the crafted file does run code under weights_only=False (the old loader)."""
    path, marker = craft(sgma_ckpt, tmp_path)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_own_checkpoint_loads_weights_only(sgma_ckpt):
    ckpt = load_checkpoint_safely(sgma_ckpt)
    assert {"state_dict", "sgma", "epoch", "optimizer_states"} <= set(ckpt)
    assert ckpt["sgma"]["config"]["model"]["fusion"] == "sgf" and ckpt["sgma"]["dataset"]["classes"]
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())
    assert load_checkpoint(str(sgma_ckpt))["state_dict"].keys() == ckpt["state_dict"].keys()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_crafted_refused_by_the_loader(sgma_ckpt, tmp_path, fmt):
    path, marker = craft(sgma_ckpt, tmp_path, fmt)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_safely(path)
    message = str(info.value)
    assert str(path) in message and "code/objects that a checkpoint written by sgma never has" in message
    assert "it was not loaded" in message and "pathlib" in message  # names what it would have imported
    assert not marker.exists()


def test_crafted_refused_by_eval(crafted, tmp_path):
    path, marker = crafted
    cfg = bind_to(compose_config("eval", [f"ckpt_path={path}"]), tmp_path / "eval")
    with pytest.raises(UnsafeCheckpointError, match=r"crafted_zip.ckpt"):
        evaluate(cfg)
    assert not marker.exists()


def test_crafted_refused_by_predict(crafted, tmp_path):
    path, marker = crafted
    rng = np.random.default_rng(0)
    for name, bands in (("rgb", 3), ("nir", 1), ("dsm", 1)):
        write_geotiff(tmp_path / "in" / f"{name}.tif", rng.integers(0, 255, (bands, 64, 64), dtype=np.uint8))
    out = tmp_path / "out"
    args = [f"ckpt_path={path}", f"input={tmp_path / 'in'}", f"output_dir={out}", "window=64"]
    with pytest.raises(UnsafeCheckpointError, match=r"crafted_zip.ckpt"):
        predict(bind_to(compose_config("predict", [*args, "trainer.accelerator=cpu"]), out))
    assert not marker.exists() and not list(out.glob("prediction*"))


def test_crafted_refused_on_resume(crafted, cfg_train):
    """train.py ckpt_path=... validates the file itself before Lightning unpickles it (and before training)."""
    path, marker = crafted
    with open_dict(cfg_train):
        cfg_train.ckpt_path = str(path)
    with pytest.raises(UnsafeCheckpointError, match=r"crafted_zip.ckpt"):
        train(cfg_train)
    assert not marker.exists()
    assert not (Path(cfg_train.paths.output_dir) / "checkpoints").exists()  # refused before any training


def test_crafted_refused_by_the_notebook(crafted, tmp_path, monkeypatch):
    """Run notebooks/explore.ipynb's cells where it looks for a checkpoint and finds the crafted one."""
    path, marker = crafted
    target = tmp_path / "logs" / "train" / "runs" / "x" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copy(path, target)
    cells = json.loads((REPO / "notebooks" / "explore.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    loading = [i for i, src in enumerate(code) if "load_checkpoint(" in src]
    assert loading, "the notebook no longer loads a checkpoint: update this test"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SGMA_LOG_DIR", str(tmp_path / "logs"))  # the notebook picks the newest run's last.ckpt there
    monkeypatch.delenv("SGMA_CKPT", raising=False)
    namespace: dict = {}
    for src in code[: loading[0]]:
        exec(compile(src, "explore.ipynb", "exec"), namespace)
    with pytest.raises(UnsafeCheckpointError, match=r"last.ckpt"):
        exec(compile(code[loading[0]], "explore.ipynb", "exec"), namespace)
    assert not marker.exists() and not (tmp_path / "PAYLOAD_RAN_zip").exists()


@pytest.mark.parametrize("node", ["missing", "model.compile_options"])
def test_stored_config_naming_other_callables_is_refused(sgma_ckpt, tmp_path, node):
    """The stored config is plain data (loads weights_only), but eval.py and predict.py build from it: a node naming
    a callable that no conf/ option builds (here builtins.open, which would create the marker) is refused first."""
    marker = tmp_path / "TARGET_RAN"
    ckpt = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)
    parent = ckpt["sgma"]["config"]
    *path, last = node.split(".")
    for key in path:
        parent = parent[key]
    parent[last] = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}
    crafted = tmp_path / "crafted_config.ckpt"
    torch.save(ckpt, crafted)
    expected = rf"crafted_config\.ckpt.*sets {node}\._target_='builtins\.open', which no option under conf/ builds"
    with pytest.raises(UnsafeCheckpointError, match=expected):
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={crafted}"]), tmp_path / "eval"))
    with pytest.raises(UnsafeCheckpointError, match=expected):
        load_checkpoint(str(crafted))  # predict.py and the notebook load through it
    assert not marker.exists()
    # a torch.optim class the user chose on the command line (not a conf/ option) is accepted
    ckpt["sgma"]["config"] = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)["sgma"]["config"]
    ckpt["sgma"]["config"]["optimizer"]["_target_"] = "torch.optim.SGD"
    torch.save(ckpt, crafted)
    assert load_checkpoint(str(crafted))["sgma"]["config"]["optimizer"]["_target_"] == "torch.optim.SGD"


def test_bad_files_say_what_they_are(sgma_ckpt, tmp_path):
    data = sgma_ckpt.read_bytes()
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='.*missing.ckpt': no such checkpoint file"):
        load_checkpoint_safely(tmp_path / "missing.ckpt")
    with pytest.raises(IsADirectoryError, match=r"it is a folder .*ckpt_path=.*checkpoints/last.ckpt"):
        load_checkpoint_safely(sgma_ckpt.parent.parent)  # a run folder: the message points at its last.ckpt
    cases = {
        "empty.ckpt": (b"", "it is empty"),
        "half.ckpt": (data[: len(data) // 2], "it is truncated"),
        "head.ckpt": (data[:100], "it is truncated"),
        "zeros.ckpt": (b"\0" * 100, "not a PyTorch checkpoint"),
        "notes.ckpt": (b"hello\n", "not a PyTorch checkpoint"),
    }
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # bit rot that torch.load itself would not see
    cases["damaged.ckpt"] = (bytes(damaged), "fails its checksum")
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=expected) as info:
            load_checkpoint_safely(tmp_path / name)
        assert not isinstance(info.value, UnsafeCheckpointError) and name in str(info.value)
    assert "copied or downloaded incompletely" in _message(lambda: load_checkpoint_safely(tmp_path / "half.ckpt"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="no stored sgma config"):
        load_checkpoint(str(foreign))
    # through eval.py's task: the same messages
    with pytest.raises(CheckpointError, match=r"half.ckpt': it is truncated"):
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={tmp_path / 'half.ckpt'}"]), tmp_path / "e"))


# ------------------------------------------------------------------------------- permissions (as non-root)
def _message(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "OK"


def as_unprivileged(fn: Callable[[], object]) -> str:
    """``fn()``'s outcome as ``"Type: message"`` (or ``"OK"``), run without root's power to ignore permissions.

    As root, a forked child drops to uid/gid 65534 (nobody) first; everything it needs is imported already.
    """
    if os.geteuid() != 0:
        return _message(fn)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, _message(fn).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_dir():
    """A folder any user may enter (pytest's tmp folders are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="sgma-safety-"))
    path.chmod(0o755)
    yield path
    for p in path.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(path)


def test_unreadable_checkpoint_is_not_called_truncated(sgma_ckpt, shared_dir):
    path = shared_dir / "last.ckpt"
    shutil.copy(sgma_ckpt, path)
    path.chmod(0)
    outcome = as_unprivileged(lambda: load_checkpoint_safely(path))
    assert outcome.startswith("PermissionError: ckpt_path=") and "is not readable" in outcome, outcome
    assert "truncated" not in outcome
    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    assert as_unprivileged(lambda: load_checkpoint_safely(path)) == "OK"


def test_unwritable_output_dir_fails_before_inference(shared_dir, tmp_path):
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    outcome = as_unprivileged(lambda: check_output_dir(locked))
    assert outcome.startswith("PermissionError: output_dir=") and "is not writable" in outcome, outcome
    outcome = as_unprivileged(lambda: check_output_dir(locked / "new"))
    assert outcome.startswith("PermissionError: output_dir=") and "cannot be created" in outcome, outcome
    # predict checks output_dir first: a bad one fails before the (here missing) checkpoint is even looked at
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = [f"ckpt_path={tmp_path / 'none.ckpt'}", f"input={tmp_path}", f"output_dir={blocker / 'out'}"]
    with pytest.raises(OSError, match=r"output_dir=.*a_file/out.* cannot be created"):
        predict(bind_to(compose_config("predict", args), tmp_path))


def test_checkpoint_of_another_version_is_named_in_rebuild_errors(sgma_ckpt, tmp_path):
    """A stored config with a key this version's model does not take: the error names the file and both versions."""
    ckpt = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)
    ckpt["sgma"]["config"]["model"]["future_knob"] = 1
    ckpt["sgma"]["version"] = "9.9.0"
    path = tmp_path / "future.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(TypeError, match="future_knob") as info:
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={path}"]), tmp_path / "eval"))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert f"checkpoint '{path}', written by sgma 9.9.0; this is sgma" in notes
