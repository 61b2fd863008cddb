"""W&B media of real offline runs: a tiny training run, eval.py's and predict.py's runs, names, groups, artifacts.

The offline run folder is read as W&B wrote it: media files under ``files/media``, and the run's transaction log
(``run-<id>.wandb``: LevelDB-log framed protobuf records) for the run's name, group, config, history and artifacts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import bind_to, compose_config
from sgma.config import WANDB_SETTING_MAX
from sgma.inference import predict
from sgma.tasks import evaluate, train
from sgma.wandb_media import (
    MAS_PLOTS,
    WandbLogger,
    WandbMedia,
    log_evaluation,
    resume_options,
    training_run_name,
    wandb_run,
)

# the name of the `trained` run below: its task overrides that make a setting follow preset, backbone, ...
TRAINED = "sgma-mit_b0-synthetic-uniform-debug=tiny,trainer.max_epochs=2"

BLOCK = 32768  # the transaction log's block size; each record chunk has a 7-byte header (crc, length, type)


def wandb_records(run_dir: Path, timeout: float = 30.0) -> list:
    """Every record of a finished offline run's ``run-<id>.wandb`` file, decoded with W&B's own protobuf schema.

    W&B's service process writes the file on its own after ``run.finish()`` returns: read it until it holds
    the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_records(next(run_dir.glob("run-*.wandb")).read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{run_dir}: no exit record after {timeout} s"
        time.sleep(0.2)


def _read_records(data: bytes) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, chunk, pos = [], b"", 7  # 7-byte file header: magic, key, version
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def run_record(run_dir: Path):
    return next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")


def run_config(run_dir: Path) -> dict:
    """The run's config: what wandb.init got, then each update (Lightning's log_hyperparams)."""
    config = {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return config


def history(run_dir: Path) -> list[dict]:
    """The run's logged steps, each as {key: value}; media as their description's fields (``val/patterns/_type``)."""
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in wandb_records(run_dir)
        if r.WhichOneof("record_type") == "history"
    ]


def offline_run(folder: Path) -> Path:
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def tables(run_dir: Path, key: str) -> list[dict]:
    """The tables logged under ``key``, in step order (W&B names them <key>_<step>_<hash>.table.json)."""
    folder = run_dir / "files" / "media" / "table" / Path(key).parent
    files = [p for p in folder.glob(f"{Path(key).name}_*.table.json") if p.name.split("_")[-2].isdigit()]
    files.sort(key=lambda p: int(p.name.split("_")[-2]))
    assert files, f"no table {key} in {folder}"
    return [json.loads(p.read_text()) for p in files]


def images(run_dir: Path, prefix: str) -> list[Path]:
    found = sorted((run_dir / "files" / "media" / "images").glob(f"{prefix}*.png"))
    assert found, f"no images {prefix}* in {run_dir}"
    for path in found:
        with Image.open(path) as image:
            image.verify()  # a whole, valid PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 16
    return found


def assert_table_matches(table: dict, report) -> None:
    columns = table["columns"]
    assert columns[:4] == ["pattern", "miou", "mf1", "oa"] and columns[4:] == [f"iou_{c}" for c in report.class_names]
    assert [row[0] for row in table["data"]] == [r.pattern for r in report.patterns]
    for row, scores in zip(table["data"], report.patterns, strict=True):
        assert row[1] == pytest.approx(scores.miou) and row[3] == pytest.approx(scores.oa)


def assert_confusion_matches(run_dir: Path, split: str, report) -> None:
    for row in report.patterns:
        (table,) = tables(run_dir, f"{split}_confusion/{row.pattern}_table")
        assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
        counts = np.zeros((len(report.class_names),) * 2, np.int64)
        for true, predicted, n in table["data"]:
            counts[report.class_names.index(true), report.class_names.index(predicted)] = n
        assert (counts == np.asarray(row.confusion)).all() and counts.sum() > 0


# ------------------------------------------------------------------------------ one tiny training run
@pytest.fixture(scope="module")
def wandb_data_dir(tmp_path_factory):
    """W&B stages artifact files (checkpoints, and offline every logged table) in $WANDB_DATA_DIR: keep them here."""
    folder = tmp_path_factory.mktemp("wandb_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wandb_data_dir):
    """2 epochs of tiny SGMA with the default W&B logger (offline) and log_model=true."""
    run = tmp_path_factory.mktemp("wandb_run")
    overrides = ["debug=tiny", "logger=wandb", "trainer.max_epochs=2", "seed=7", "logger.wandb.log_model=true"]
    overrides.append("callbacks.wandb_media.panel_samples=1")  # of the 2 in debug=tiny's splits: faster
    cfg = bind_to(compose_config("train", overrides), run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, objects = train(cfg)
    GlobalHydra.instance().clear()
    return run, objects


def test_training_run_media(trained):
    run, objects = trained
    module = objects["module"]
    run_dir = offline_run(run)
    # the per-pattern table at each validation (2 epochs) and at test, equal to the module's reports
    val = tables(run_dir, "val/patterns")
    assert len(val) == 2
    assert_table_matches(val[-1], module.reports["val"])
    (test,) = tables(run_dir, "test/patterns")
    assert_table_matches(test, module.reports["test"])
    assert_confusion_matches(run_dir, "test", module.reports["test"])
    assert len(images(run_dir, "test_confusion/normalised")) == len(module.reports["test"].patterns)
    # panels: sample 0 at epoch 0 and at the last epoch, inputs with masks and the maps
    maps = images(run_dir, "val_samples/0_maps")
    assert len(maps) == 2 and Image.open(maps[0]).size[0] > 500
    assert not list(run_dir.rglob("val_samples/1_*"))  # panel_samples=1
    inputs = [p for p in images(run_dir, "val_samples/0_") if "maps" not in p.name]
    with Image.open(inputs[0]) as image:
        assert image.size == (64, 64)  # the sample itself, debug=tiny's 64 px
    masks = images(run_dir, "mask/val_samples/0_")
    assert {np.asarray(Image.open(p)).max() for p in masks} <= set(range(6)) | {255}
    images(run_dir, "test_samples/")
    # MAS over training: one line per modality, one point per epoch, the values logged as scalars at that epoch
    logged: dict[str, dict[int, float]] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                scalar = isinstance(value, (int, float)) and "by_modality" not in key  # 0.0 reads as 0
                if key.startswith(("mas/", "train/mas/")) and scalar:
                    logged.setdefault(key, {})[items["epoch"]] = value
    for family in ("mas/present_", "mas/fragile_", "mas/rho_", "train/mas/drawn_"):
        plot = tables(run_dir, f"{family}by_modality_table")[-1]
        assert plot["columns"] == ["step", "lineKey", "lineVal"]
        points = {(key, epoch): value for epoch, key, value in plot["data"]}
        assert {key for key, _ in points} == {"rgb", "nir", "dsm"} and {e for _, e in points} == {0, 1}
        assert points == {(k.removeprefix(family), e): v for k, ev in logged.items() if k.startswith(family)
                          for e, v in ev.items()}  # fmt: skip
    # the record travels in checkpoints (a resumed run continues the curves): last.ckpt was written at the last
    # validation, before that epoch's MAS values existed
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("WandbMedia")]
    assert {key: [e for e, _ in points] for key, points in state["mas_history"].items()} == {
        f"{family}{m}": [0] for family in MAS_PLOTS for m in ("rgb", "nir", "dsm")
    }


def test_training_run_name_group_and_artifacts(trained, wandb_data_dir):
    run, objects = trained
    run_dir = offline_run(run)
    record = run_record(run_dir)
    assert record.display_name == f"{TRAINED}-s7"
    assert record.run_group == TRAINED and record.job_type == "train"
    assert list(record.tags) == ["synthetic", "mit_b0", "sgf", "sgma", "uniform"]
    # log_model=true offline: the best and the last checkpoint are recorded as `model` artifacts of the offline
    # run, each file copied (byte for byte) into W&B's staging folder, from which `wandb sync` uploads it
    artifacts = [r.artifact for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "artifact"]
    models = {json.loads(a.metadata)["original_filename"]: a for a in artifacts if a.type == "model"}
    best = Path(objects["trainer"].checkpoint_callback.best_model_path)
    assert set(models) == {best.name, "last.ckpt"}
    assert "best" in models[best.name].aliases and models[best.name].name == f"model-{record.run_id}"
    for filename, artifact in models.items():
        (entry,) = artifact.manifest.contents
        digest = base64.b64encode(hashlib.md5((run / "checkpoints" / filename).read_bytes()).digest()).decode()
        staged = Path(entry.local_path)
        assert entry.path == "model.ckpt" and entry.digest == digest
        assert staged.parent == wandb_data_dir / "artifacts" / "staging"
        assert base64.b64encode(hashlib.md5(staged.read_bytes()).digest()).decode() == digest


def test_eval_logs_its_own_run(trained, tmp_path):
    run, _ = trained
    overrides = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "split=val", "trainer.accelerator=cpu"]
    overrides.append("patterns=[rgb,rgb+dsm]")  # two patterns: fewer figures, faster
    cfg = bind_to(compose_config("eval", [*overrides, "logger=wandb"]), tmp_path)
    plain = cfg.copy()  # evaluate() itself without a logger: this test calls the W&B hook explicitly
    with open_dict(plain):
        plain.logger = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, objects = evaluate(plain)
        run_dir = log_evaluation(
            cfg, run_cfg=objects["cfg"], module=objects["module"], datamodule=objects["datamodule"], panel_samples=1
        )
    GlobalHydra.instance().clear()
    assert run_dir == offline_run(tmp_path)
    report = objects["module"].reports["val"]
    assert [r.pattern for r in report.patterns] == ["rgb", "rgb+dsm"]
    (table,) = tables(run_dir, "val/patterns")
    assert_table_matches(table, report)
    assert_confusion_matches(run_dir, "val", report)
    assert len(images(run_dir, "val_samples/0_maps")) == 1 and not list(run_dir.rglob("val_samples/1_*"))
    record = run_record(run_dir)
    assert record.display_name == f"eval-val-{TRAINED}-s7"
    assert record.run_group == TRAINED and record.job_type == "eval"
    assert b"val/avg/miou" in next(run_dir.glob("run-*.wandb")).read_bytes()


def test_predict_logs_the_predicted_images(trained, tmp_path):
    run, _ = trained
    rng = np.random.default_rng(0)
    scene = tmp_path / "scene"
    scene.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8), "RGB").save(scene / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (48, 80), dtype=np.uint8)).save(scene / "dsm.png")
    out = tmp_path / "out"
    args = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={scene}", f"output_dir={out}", "window=64"]
    cfg = bind_to(compose_config("predict", [*args, "pattern=rgb+dsm", "trainer.accelerator=cpu", "logger=wandb"]), out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = predict(cfg)
    GlobalHydra.instance().clear()
    run_dir = offline_run(out)
    (table,) = tables(run_dir, "predict/scenes")
    assert table["columns"] == ["scene", "pattern", "nodata_pixels", "file"]
    assert table["data"] == [["scene", "rgb+dsm", 0, str(result["files"]["prediction"])]]
    (logged,) = images(run_dir, "predict/prediction_")
    written = np.asarray(Image.open(result["files"]["prediction"]).convert("RGB"))
    assert (np.asarray(Image.open(logged).convert("RGB")) == written).all()  # the written file, as it is
    record = run_record(run_dir)
    assert record.display_name == f"predict-rgb+dsm-{TRAINED}-s7" and record.job_type == "predict"


# ---------------------------------------------------------------------------- configuration and errors
@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ([], "sgma-mit_b0-synthetic-uniform-s42"),
        (["model=baseline", "missing=rgb+dsm", "seed=3"], "baseline-mit_b0-synthetic-rgb+dsm-s3"),
        (["missing=pattern", "missing.pattern=nir+dsm", "backbone=pvt_v2"], "sgma-tu-pvt_v2_b2-synthetic-nir+dsm-s42"),
        (["missing=bernoulli", "model=mas_only", "dataset=potsdam"], "mas_only-mit_b0-potsdam-bernoulli-s42"),
    ],
)
def test_run_names_and_groups(overrides, name, tmp_path):
    cfg = bind_to(compose_config("train", overrides), tmp_path)
    node = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    GlobalHydra.instance().clear()
    assert node["name"] == name and node["group"] == name.rsplit("-s", 1)[0]
    assert node["_target_"] == "sgma.wandb_media.WandbLogger" and node["offline"] is True


def test_training_run_name_of_a_checkpoint_without_wandb():
    run_cfg = OmegaConf.create(
        {"backbone": {"name": "mit_b0"}, "dataset": {"name": "potsdam"}, "model": {"fusion": "sgf"}, "seed": 1}
    )
    assert training_run_name(run_cfg) == ("mit_b0-potsdam-sgf-s1", "mit_b0-potsdam-sgf")
    with open_dict(run_cfg):
        run_cfg.logger = {"wandb": {"name": "sgma-x-s1", "group": "sgma-x"}}
    assert training_run_name(run_cfg) == ("sgma-x-s1", "sgma-x")


def test_eval_and_predict_refuse_other_loggers(tmp_path):
    cfg = bind_to(compose_config("predict", ["ckpt_path=x.ckpt", f"input={tmp_path}", "logger=csv"]), tmp_path)
    with pytest.raises(ValueError, match=r"predict.py logs to W&B only \(logger=wandb\); logger.csv"):
        predict(cfg)
    GlobalHydra.instance().clear()
    assert compose_config("eval", ["ckpt_path=x.ckpt"]).get("logger") is None  # off by default
    assert compose_config("predict", ["ckpt_path=x.ckpt", "input=x"]).get("logger") is None


def test_callback_without_wandb_and_bad_options(tmp_path):
    trainer = Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", enable_progress_bar=False)
    assert wandb_run(trainer) is None  # the callback then does nothing
    assert WandbMedia().state_dict() == {"mas_history": {}, "validations": 0}
    with pytest.raises(ValueError, match=r"callbacks.wandb_media.panels_every_n_validations must be an integer >= 1"):
        WandbMedia(panels_every_n_validations=0)
    with pytest.raises(ValueError, match=r"callbacks.wandb_media.panel_samples must be an integer >= 0"):
        WandbMedia(panel_samples=-1)
    with pytest.raises(ValueError, match=r"offline=true contradicts logger.wandb.mode='online'"):
        WandbLogger(offline=True, mode="online")
    restored = WandbMedia()
    restored.load_state_dict({"mas_history": {"mas/rho_rgb": [(0, 1.0), (1, 0.9)]}})  # a checkpoint without the count
    assert restored.mas_history == {"mas/rho_rgb": [[0, 1.0], [1, 0.9]]} and restored.validations == 0


# ------------------------------------------------------------------------------- names and groups of sweeps
def name_and_group(overrides: list[str], out: Path) -> tuple[str, str]:
    """W&B name and group of a train job with these task overrides, as Hydra composes each job of a sweep."""
    cfg = bind_to(compose_config("train", overrides), out)
    node = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    GlobalHydra.instance().clear()
    return node["name"], node["group"]


def test_sweeps_over_plain_keys_get_a_group_per_setting(tmp_path):
    plain = "sgma-mit_b0-synthetic-uniform"
    assert name_and_group([], tmp_path) == (f"{plain}-s42", plain)
    # the jobs of `-m debug=tiny test=false loss=ce,ohem` and of sweeps over model.fusion, missing.p, augment, mas.*
    sweeps = [
        [["debug=tiny", "test=false", f"loss={v}"] for v in ("ce", "ohem")],
        [["model=sgma", f"model.fusion={v}"] for v in ("sgf", "concat")],
        [["missing=bernoulli", f"missing.p={v}"] for v in (0.1, 0.3)],
        [[f"augment={v}"] for v in ("none", "paper")],
        [[f"mas.lambda_mas={v}", "data.mas.floor=0.1"] for v in (0.5, 2.0)],
    ]
    for jobs in sweeps:
        named = [name_and_group(job, tmp_path) for job in jobs]
        assert len({n for n, _ in named}) == len({g for _, g in named}) == len(jobs), named
    assert name_and_group(["debug=tiny", "test=false", "loss=ohem"], tmp_path) == (
        f"{plain}-debug=tiny,loss=ohem-s42",
        f"{plain}-debug=tiny,loss=ohem",
    )
    assert name_and_group(["model=sgma", "model.fusion=concat"], tmp_path)[0] == f"{plain}-model.fusion=concat-s42"
    # the seeds of a setting share its group, in any order on the command line
    one, two = name_and_group(["loss=ohem", "seed=1"], tmp_path), name_and_group(["seed=2", "loss=ohem"], tmp_path)
    assert one == (f"{plain}-loss=ohem-s1", f"{plain}-loss=ohem") and two == (f"{plain}-loss=ohem-s2", one[1])
    # where things are, how the run executes, what it logs, resuming: the same setting
    moved = ["loss=ohem", "seed=1", "ckpt_path=/runs/a/checkpoints/last.ckpt", "logger.wandb.offline=false"]
    moved += ["trainer.accelerator=cpu", "data.num_workers=2", "callbacks.wandb_media.panel_samples=0", "test=false"]
    assert name_and_group(moved, tmp_path) == one
    # an Optuna trial's overrides: cut to a bounded length, and still one name per trial
    trial = ["mas.lambda_mas=0.7345123412", "data.mas.floor=0.1234123412", "data.mas.mix=0.4123412341"]
    trials = [[*trial, f"optimizer.lr={lr}"] for lr in (1.234e-4, 1.235e-4)]
    (first, group), (second, _) = [name_and_group(t, tmp_path) for t in trials]
    assert first != second and len(group) == len(plain) + 1 + WANDB_SETTING_MAX
    assert name_and_group(trials[0], tmp_path)[0] == first  # the same trial, the same name


class StopAfterEpoch(L.Callback):
    """Ends training after epoch ``epoch``, as an interruption would: its last.ckpt is then resumed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def train_tiny(out: Path, *overrides: str, stop_after: int | None = None) -> dict:
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=wandb", "test=false", *overrides]), out)
    if stop_after is not None:  # not an override: the same setting as the run without it
        with open_dict(cfg):
            cfg.callbacks.stop = {"_target_": "test_wandb_media.StopAfterEpoch", "epoch": stop_after}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, objects = train(cfg)
    GlobalHydra.instance().clear()
    return objects


def test_panels_follow_the_validation_count(tmp_path):
    # 9 epochs validated every 2nd: validations after epochs 1, 3, 5, 7; panels at the first, every 2nd after it,
    # and at the last, which is epoch 7 (epoch 9 would be the next)
    panels = ["panels_every_n_validations=2", "panel_samples=1", "panel_patterns=1"]
    train_tiny(tmp_path, "trainer.max_epochs=9", "trainer.check_val_every_n_epoch=2",
               *[f"callbacks.wandb_media.{p}" for p in panels])  # fmt: skip
    validations = [step for step in history(offline_run(tmp_path)) if "val/patterns/_type" in step]
    assert [step["trainer/global_step"] for step in validations] == [4, 8, 12, 16]  # 2 steps an epoch
    assert ["val_samples/0_maps/_type" in step for step in validations] == [True, False, True, True]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    assert saved["WandbMedia"]["validations"] == 4  # a resumed run counts on


def test_offline_resume_is_a_run_of_its_own_in_the_same_group(tmp_path):
    common = ["seed=5", "callbacks.wandb_media.panel_samples=0"]
    train_tiny(tmp_path / "a", *common, "trainer.max_epochs=3", stop_after=0)
    first_dir = offline_run(tmp_path / "a")
    first = run_record(first_dir)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train_tiny(tmp_path / "b", *common, "trainer.max_epochs=4", f"ckpt_path={last}", stop_after=1)  # a longer run
    resumed_dir = offline_run(tmp_path / "b")
    resumed = run_record(resumed_dir)
    # a new id (offline, the same id would replace the first run's history when both are synced), the first run's
    # group although the longer schedule names another one
    assert first.run_group == resumed.run_group == "sgma-mit_b0-synthetic-uniform-debug=tiny,trainer.max_epochs=3"
    assert first.display_name == f"{first.run_group}-s5"
    assert resumed.display_name == "sgma-mit_b0-synthetic-uniform-debug=tiny,trainer.max_epochs=4-s5-resume1"
    assert re.fullmatch(rf"{first.run_id}-resume1-[0-9a-z]+", resumed.run_id), resumed.run_id
    config = run_config(resumed_dir)
    assert config["resumed_from"] == config["original_run_id"] == first.run_id and config["seed"] == 5
    # W&B's _step starts again; the curves go on from the checkpoint's step (epoch 0: steps 1-2) on trainer/global_step
    steps = {run: [s["trainer/global_step"] for s in history(d) if "trainer/global_step" in s]
             for run, d in (("first", first_dir), ("resumed", resumed_dir))}  # fmt: skip
    assert max(steps["first"]) == min(steps["resumed"]) == 2 and max(steps["resumed"]) == 4
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["callbacks"]["WandbMedia"]["validations"] == 2


def test_resume_options_online_and_offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    node = {"offline": False, "name": "sgma-x-s1", "group": "sgma-x"}
    assert resume_options(node, "ab12cd34") == {"id": "ab12cd34", "resume": "allow"}  # online: W&B continues it
    assert resume_options(node, "ab12cd34", "sgma-y")["group"] == "sgma-y"  # the followed run's group
    monkeypatch.setenv("WANDB_MODE", "offline")
    again = resume_options(node, "ab12cd34-resume1-x7y8")  # the resumed run's checkpoint, resumed in turn
    assert re.fullmatch(r"ab12cd34-resume2-[0-9a-z]+", again["id"]) and again["name"] == "sgma-x-s1-resume2"
    assert again["config"] == {"resumed_from": "ab12cd34-resume1-x7y8", "original_run_id": "ab12cd34"}
    assert resume_options(node, "ab12cd34")["id"] != resume_options(node, "ab12cd34")["id"]  # never one id twice
