"""End to end: train(cfg) on tiny settings, eval.py on its checkpoint, a Hydra multirun, W&B offline files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from conftest import REPO, bind_to, compose_config
from sgma.modalities import all_patterns
from sgma.tasks import evaluate, train

N_PATTERNS = len(all_patterns(["rgb", "nir", "dsm"]))


def test_train_then_eval_checkpoint(cfg_train, tmp_path):
    metrics, objects = train(cfg_train)
    run = Path(cfg_train.paths.output_dir)
    for name in ("config.yaml", "patterns.csv", "patterns.json", "patterns.md"):
        assert (run / name).is_file(), name
    table = json.loads((run / "patterns.json").read_text())
    assert [r["pattern"] for r in table["patterns"]] == all_patterns(["rgb", "nir", "dsm"])
    assert {"avg", "top1", "last1", "p0.5"} <= set(table["summaries"])
    assert 0 <= metrics["test/avg/miou"] <= 1 and metrics["test/last1/miou"] <= metrics["test/top1/miou"]
    assert len((run / "patterns.csv").read_text().splitlines()) == 1 + N_PATTERNS + len(table["summaries"])
    # what a checkpoint monitor may name (checked before training) is what validation logged
    logged = {k for k in metrics if k.startswith("val/")}
    names = objects["module"].validation_metric_names(objects["datamodule"].eval_patterns("val"))
    assert {"val/avg/miou", "val/p0.5/miou", "val/rgb+nir+dsm/oa", "val/loss"} <= logged <= names
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "sgma" in torch.load(ckpt, map_location="cpu", weights_only=False)

    # eval.py rebuilds the model from the checkpoint and reproduces the test numbers of that checkpoint
    eval_dir = tmp_path / "eval"
    cfg_eval = bind_to(compose_config("eval", [f"ckpt_path={ckpt}"]), eval_dir)
    eval_metrics, _ = evaluate(cfg_eval)
    assert len(json.loads((eval_dir / "patterns.json").read_text())["patterns"]) == N_PATTERNS
    best = objects["trainer"].checkpoint_callback.best_model_path
    if Path(best) == ckpt or Path(best).resolve() == ckpt.resolve():
        assert eval_metrics["test/avg/miou"] == pytest.approx(metrics["test/avg/miou"])

    # other split, a pattern subset
    val_dir = tmp_path / "eval_val"
    cfg_val = bind_to(compose_config("eval", [f"ckpt_path={ckpt}", "split=val", "patterns=[rgb,dsm+nir]"]), val_dir)
    val_metrics, _ = evaluate(cfg_val)
    assert set(k.split("/")[1] for k in val_metrics if k.startswith("val/") and k.count("/") == 2) >= {
        "rgb",
        "nir+dsm",
    }
    rows = json.loads((val_dir / "patterns.json").read_text())["patterns"]
    assert [r["pattern"] for r in rows] == ["rgb", "nir+dsm"]


@pytest.mark.parametrize("model", ["baseline", "sgma"])
def test_training_lowers_the_loss(model, tmp_path):
    # 16 fixed, un-augmented scenes seen 6 times: the loss on them must fall
    overrides = ["debug=tiny", "logger=csv", f"model={model}", "augment=none", "dataset.builder.fresh_scenes=false"]
    cfg_train = bind_to(compose_config("train", overrides), tmp_path)
    with open_dict(cfg_train):
        cfg_train.dataset.splits.train.num_samples = 16
        cfg_train.trainer.max_epochs = 6
        cfg_train.test = False
        cfg_train.trainer.limit_val_batches = 0
        cfg_train.data.batch_size = 8
        cfg_train.scheduler = None
        cfg_train.optimizer.lr = 1e-3
        cfg_train.missing = {"_target_": "sgma.data.missing.FullModalities"}
    train(cfg_train)
    csv = next(Path(cfg_train.paths.output_dir).rglob("metrics.csv")).read_text().splitlines()
    header = csv[0].split(",")
    col = header.index("train/loss_epoch")
    losses = [float(r.split(",")[col]) for r in csv[1:] if r.split(",")[col]]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses


def test_eval_errors(tmp_path):
    cfg = bind_to(compose_config("eval", [f"ckpt_path={tmp_path / 'missing.ckpt'}"]), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        evaluate(cfg)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(RuntimeError, match="could not read checkpoint"):
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={broken}"]), tmp_path))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(RuntimeError, match="no stored sgma config"):
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={foreign}"]), tmp_path))
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={tmp_path}"]), tmp_path))


def test_eval_refuses_data_the_checkpoint_was_not_trained_on(sgma_ckpt, tmp_path):
    """Other modalities or other classes (names, channels or order) than the checkpoint's training data: a clear
    error listing both, before the weights are loaded (not a state-dict dump, never a silently misaligned table)."""
    from types import SimpleNamespace

    from sgma.data.synthetic import MODALITIES
    from sgma.tasks import check_facts_match

    overrides = [
        f"ckpt_path={sgma_ckpt}",
        "dataset=synthetic",
        "dataset.size=64",
        "+dataset.builder.modalities=[rgb,nir,dsm,sar]",
    ]
    cfg = bind_to(compose_config("eval", overrides), tmp_path)
    with pytest.raises(ValueError, match=r"(?s)other modalities.*checkpoint rgb\(3\), nir\(1\), dsm\(1\); dataset rgb"):
        evaluate(cfg)
    assert not (tmp_path / "patterns.csv").exists()

    facts = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)["sgma"]["dataset"]
    modalities = tuple(MODALITIES[m] for m in ("rgb", "nir", "dsm"))
    swapped = [facts["classes"][1], facts["classes"][0], *facts["classes"][2:]]
    with pytest.raises(
        ValueError, match=r"classes: checkpoint impervious_surface, building, .*; dataset building, impervious_surface"
    ):
        check_facts_match(
            facts, SimpleNamespace(modalities=modalities, classes=swapped), ckpt_path="x", dataset="folder"
        )
    check_facts_match(
        facts, SimpleNamespace(modalities=modalities, classes=facts["classes"]), ckpt_path="x", dataset="s"
    )


def test_eval_normalises_with_the_checkpoints_training_statistics(sgma_ckpt, tmp_path, caplog):
    """Data whose own statistics differ from the training data's (a new area, another root) is scaled as in
    training, with the checkpoint's mean and std, and the difference is logged."""
    from sgma.builders import build_datamodule

    ckpt = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)
    rgb = next(m for m in ckpt["sgma"]["dataset"]["modalities"] if m["name"] == "rgb")
    rgb["mean"], rgb["std"] = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]  # as if trained on data with these statistics
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with caplog.at_level("INFO", logger="sgma"):
        _, objects = evaluate(bind_to(compose_config("eval", [f"ckpt_path={other}", "split=val"]), tmp_path / "e"))
    assert "this dataset's own differ for rgb (rgb: mean [0.355, 0.363, 0.304]" in caplog.text
    dm = objects["datamodule"]
    assert [m.mean for m in objects["module"].net.modalities if m.name == "rgb"] == [(0.5, 0.5, 0.5)]
    val = dm.dataset("val")
    full = len(val.patterns) - 1  # rgb+nir+dsm
    raw = val.base[0]["rgb"]
    torch.testing.assert_close(val[(0, full)]["rgb"], (raw - 0.5) / 0.25)

    own = next(m for m in val.base.modalities if m.name == "rgb")  # a data module of its own uses these
    plain = build_datamodule(bind_to(compose_config("train", ["debug=tiny", "logger=csv"]), tmp_path / "t"))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (own.mean, own.std))
    torch.testing.assert_close(plain.dataset("val")[(0, full)]["rgb"], (raw - mean) / std)


def test_eval_settings_say_what_they_change(sgma_ckpt, tmp_path, caplog):
    """batch_size=0 is refused (it fell back to the training run's size); a pattern subset with missing_probs
    says why the table has no expected-mIoU rows."""
    with pytest.raises(ValueError, match=r"batch_size=0 must be a whole number >= 1"):
        evaluate(bind_to(compose_config("eval", [f"ckpt_path={sgma_ckpt}", "batch_size=0"]), tmp_path / "a"))
    with caplog.at_level("WARNING", logger="sgma"):
        cfg = compose_config("eval", [f"ckpt_path={sgma_ckpt}", "split=val", "patterns=[rgb]"])
        evaluate(bind_to(cfg, tmp_path / "b"))
    assert (
        "no expected-mIoU rows for missing_probs=[0.1, 0.3, 0.5]: they need every pattern, and patterns= scores 1 of 7"
        in (caplog.text)
    )


def test_train_with_a_test_pattern_subset_says_why_there_are_no_expected_miou_rows(tmp_path, caplog):
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", "data.test_patterns=[rgb,dsm]"]), tmp_path)
    with caplog.at_level("WARNING", logger="sgma"):
        train(cfg)
    assert "they need every pattern, and data.test_patterns scores 2 of 7" in caplog.text
    assert set(json.loads((tmp_path / "patterns.json").read_text())["summaries"]) == {"avg", "top1", "last1"}


def test_checkpoint_of_another_model_is_refused_naming_the_difference(sgma_ckpt, tmp_path):
    """train=false (or resume_force=true) with a checkpoint of another preset: what differs, not Lightning's dump of
    every state-dict key, and no run folder config of a run that never ran."""
    for i, extra in enumerate((["train=false"], ["resume_force=true", "trainer.max_epochs=2"])):
        run = tmp_path / str(i)
        cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", "model=baseline", *extra]), run)
        with open_dict(cfg):
            cfg.ckpt_path = str(sgma_ckpt)
        with pytest.raises(
            ValueError, match=r"its weights do not fit the model this config builds: 96 unexpected"
        ) as e:
            train(cfg)
        assert "model.fusion: 'sgf' -> 'mean'" in str(e.value) and "eval.py ckpt_path=PATH" in str(e.value)
        assert not (run / "config.yaml").exists()


def _run(args: list[str], tmp_path: Path, script: str = "train.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SGMA_LOG_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_multirun_one_job_per_pattern(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "missing=rgb,rgb+dsm", "debug=tiny", "logger=csv", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    choices = []
    for job in jobs:
        assert (job / "patterns.csv").is_file()
        config = (job / ".hydra" / "overrides.yaml").read_text()
        choices.append(next(line for line in config.splitlines() if "missing=" in line).split("=", 1)[1])
    assert choices == ["rgb", "rgb+dsm"]


def test_wandb_offline_run_files(tmp_path):
    proc = _run(["debug=tiny", "logger=wandb", "missing=rgb+dsm", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "no W&B run file"
    history = (runs[0] / f"run-{runs[0].name.rsplit('-', 1)[1]}.wandb").read_bytes()
    assert b"test/avg/miou" in history and b"rgb+dsm" in history  # metric keys and the W&B group


def test_cli_errors_are_clear(tmp_path):
    proc = _run(["debug=tiny", "logger=csv", "missing=nir+sar"], tmp_path)
    assert proc.returncode != 0 and "unknown modality 'sar'" in proc.stderr
    proc = _run(["debug=tiny", "logger=csv", "data.val_patterns=[rgb,foo]"], tmp_path)
    assert proc.returncode != 0 and "data.val_patterns=['rgb', 'foo']: unknown modality 'foo'" in proc.stderr
    proc = _run(["ckpt_path=/does/not/exist.ckpt"], tmp_path, script="eval.py")
    assert proc.returncode != 0 and "no such checkpoint file" in proc.stderr
