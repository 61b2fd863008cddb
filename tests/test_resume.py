"""Recovery: checkpoints on SIGINT/SIGTERM, exact resume, atomic checkpoints and report files, resume checks."""

from __future__ import annotations

import copy
import csv
import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from conftest import REPO, bind_to, compose_config
from sgma.metrics import build_report
from sgma.recovery import AtomicCheckpointIO, TrainingInterrupted
from sgma.reporting import write_report
from sgma.tasks import train


class SignalAt(L.Callback):
    """Sends ``signum`` to this very process at the end of training step ``step`` (``times`` times), or when the
    test starts (``step="test"``)."""

    def __init__(self, step: int | str, signum: int = int(signal.SIGINT), times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.step == "test":
            os.kill(os.getpid(), self.signum)


def _cfg(run: Path, model: str, *overrides: str, signal_at: dict | None = None):
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", f"model={model}", *overrides]), run)
    if signal_at is not None:
        with open_dict(cfg):
            cfg.callbacks.signal_at = {"_target_": "test_resume.SignalAt", **signal_at}
    return cfg


def _interrupt(cfg) -> TrainingInterrupted:
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    return info.value


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resuming: {different[:5]}"


@pytest.mark.parametrize(
    ("model", "epochs", "step", "signum"),
    [
        ("sgma", 2, 1, signal.SIGINT),  # mid-epoch of the first epoch: saved at the end of that step
        ("baseline", 2, 2, signal.SIGTERM),  # the last step of an epoch: saved after validation and the epoch end
    ],
)
def test_interrupted_run_resumes_exactly(tmp_path, model, epochs, step, signum):
    common = [f"trainer.max_epochs={epochs}", "callbacks.model_checkpoint.save_top_k=3"]
    if model == "sgma":  # with the paper augmentation: its draws follow (seed, epoch, index) across the restart
        common += ["test=false", "augment=paper"]
    full_metrics, full = train(_cfg(tmp_path / "full", model, *common))

    cut = tmp_path / "cut"
    logger = ["logger=wandb"] if model == "baseline" else []
    stopped = _interrupt(_cfg(cut, model, *common, *logger, signal_at={"step": step, "signum": int(signum)}))
    last = cut / "checkpoints" / "last.ckpt"
    assert stopped.checkpoint == last.resolve() and stopped.exit_code == 128 + signum
    assert f"{signum.name} at epoch 0 step {step}; resume with ckpt_path={last.resolve()}" in str(stopped)
    assert not (cut / "patterns.csv").exists()  # no test after an interruption
    saved = torch.load(last, map_location="cpu", weights_only=True)  # plain data only
    assert saved["global_step"] == step

    resumed_metrics, resumed = train(_cfg(tmp_path / "resumed", model, *common, *logger, f"ckpt_path={last}"))
    _assert_same_state(full["module"].state_dict(), resumed["module"].state_dict())
    assert resumed_metrics == full_metrics  # validation, MAS, lr and (baseline) test metrics, bit for bit
    # the best validation score so far and the top-k checkpoints carried across the interruption
    assert resumed["module"].val_best.update_count == full["module"].val_best.update_count == epochs
    best = {run: o["trainer"].checkpoint_callback for run, o in (("full", full), ("resumed", resumed))}
    assert {Path(p).name: float(s) for p, s in best["resumed"].best_k_models.items()} == {
        Path(p).name: float(s) for p, s in best["full"].best_k_models.items()
    }
    assert all(Path(p).parent == tmp_path / "resumed" / "checkpoints" for p in best["resumed"].best_k_models)
    if model == "sgma":  # the MAS sampler's robustness memory, epoch and draws
        memory = {run: o["datamodule"].train_sampler.memory.state_dict() for run, o in (("a", full), ("b", resumed))}
        for key, value in memory["a"].items():
            assert torch.equal(value, memory["b"][key]) if torch.is_tensor(value) else value == memory["b"][key], key
        assert not full["datamodule"].train_sampler.memory.is_uniform()
    else:  # offline, the resumed run follows the interrupted W&B run: its own id, derived from that one
        (cut_run,) = (tmp_path / "cut" / "wandb").glob("offline-run-*")
        (resumed_run,) = (tmp_path / "resumed" / "wandb").glob("offline-run-*")
        cut_id = cut_run.name.split("-", 3)[3]
        assert resumed_run.name.split("-", 3)[3].startswith(f"{cut_id}-resume1-")


def test_signal_outside_training_stops_with_its_exit_status(tmp_path):
    """SIGUSR1 (the time-limit warning) while testing: stopped at once, naming the current last.ckpt, exit 138 and
    a requeue as during training (Python's default action ended the process without a word). With checkpointing off,
    SIGTERM during training stops at once too, saving nothing (Lightning exited 0)."""
    stopped = _interrupt(_cfg(tmp_path / "a", "baseline", signal_at={"step": "test", "signum": int(signal.SIGUSR1)}))
    last = (tmp_path / "a" / "checkpoints" / "last.ckpt").resolve()
    assert stopped.exit_code == 138 and stopped.checkpoint == last and f"ckpt_path={last}" in str(stopped)
    assert not (tmp_path / "a" / "patterns.csv").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored

    off = ["+trainer.enable_checkpointing=false", "~callbacks.model_checkpoint"]
    stopped = _interrupt(_cfg(tmp_path / "b", "baseline", *off, signal_at={"step": 1, "signum": int(signal.SIGTERM)}))
    assert stopped.exit_code == 143 and stopped.checkpoint is None and "no checkpoint to resume from" in str(stopped)
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_last_checkpoint_is_the_last_epoch(tmp_path):
    """last.ckpt holds the newest epoch, whatever validation found: Lightning's save_last wrote it only beside a new
    top-k file, so here (validation every 2nd epoch) it stayed at the 2nd of 3 epochs."""
    cfg = _cfg(tmp_path, "baseline", "test=false", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2")
    _, objects = train(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["global_step"] == objects["trainer"].global_step


def test_second_signal_aborts_without_saving(tmp_path):
    cfg = _cfg(tmp_path, "baseline", "test=false", signal_at={"step": 1, "times": 2})
    with pytest.raises(SystemExit):  # Lightning's KeyboardInterrupt handling ends the process
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_resume_extends_the_schedule_and_refuses_another_config(tmp_path, caplog):
    train(_cfg(tmp_path / "first", "baseline", "test=false"))  # 1 epoch = 2 steps: the schedule ends at lr 0
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"

    with pytest.raises(ValueError, match="different config") as refused:
        train(_cfg(tmp_path / "other", "sgma", f"ckpt_path={last}", "trainer.max_epochs=2"))
    assert "model.fusion: " in str(refused.value) and "mas.branch: False -> True" in str(refused.value)
    assert "data.sampler: 'random' -> 'mas'" in str(refused.value) and "resume_force=true" in str(refused.value)
    # what the best checkpoint is chosen by, and the optimisation's step and clipping
    overrides = ["data.val_patterns=[dsm]", "+trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.1"]
    with pytest.raises(ValueError, match="different config") as refused:
        train(_cfg(tmp_path / "other", "baseline", f"ckpt_path={last}", "trainer.max_epochs=2", *overrides))
    for diff in ("data.val_patterns: 'all' -> ['dsm']", "trainer.accumulate_grad_batches: (absent) -> 2"):
        assert diff in str(refused.value)
    assert "trainer.gradient_clip_val: None -> 0.1" in str(refused.value)

    run = tmp_path / "longer"
    with caplog.at_level("WARNING", logger="sgma"):
        train(_cfg(run, "baseline", f"ckpt_path={last}", "trainer.max_epochs=2", "test=false", "missing=rgb+dsm",
                   "resume_force=true"))  # fmt: skip
    assert "missing.pattern: (absent) -> 'rgb+dsm'" in caplog.text
    assert "total steps 2 -> 4" in caplog.text
    rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert len(lrs) == 2 and all(lr > 0 for lr in lrs), lrs  # not the finished schedule's 0


def test_nothing_to_train_is_an_error(cfg_train):
    with open_dict(cfg_train):
        cfg_train.trainer.max_epochs = 0
    with pytest.raises(ValueError, match=r"trainer.max_epochs=0 with train=true trains nothing"):
        train(cfg_train)
    with open_dict(cfg_train):
        cfg_train.trainer.max_epochs = 1
        cfg_train.train = False
    with pytest.raises(ValueError, match=r"train=false tests a checkpoint: give it with ckpt_path=PATH"):
        train(cfg_train)
    assert not (Path(cfg_train.paths.output_dir) / "patterns.csv").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train": False, "test": False}, r"train=false test=false: nothing to do"),
        ({"optimizer.lr": -1}, r"optimizer\.lr=-1 must be a number > 0"),
        ({"scheduler.start_factor": -1}, r"scheduler\.start_factor=-1 must be in \(0, 1\]"),
        ({"scheduler.power": -2}, r"scheduler\.power=-2 must be a number > 0"),
        ({"scheduler.warmup_fraction": 0.5, "scheduler.power": 0}, r"scheduler\.power=0 must be"),
        ({"trainer.max_epochs": -1}, r"trainer\.max_epochs=-1 with trainer\.max_steps=.*needs a known length"),
        ({"trainer.accelerator": "gpu"}, r"trainer\.accelerator=gpu but torch sees no CUDA GPU.*trainer=cpu"),
        ({"trainer.precision": "16-mixed"}, r"trainer\.precision=16-mixed needs a GPU; on the CPU use .*bf16-mixed"),
        ({"data.batch_size": 0}, r"data\.batch_size=0 must be a whole number >= 1"),
        ({"data.eval_batch_size": 0}, r"data\.eval_batch_size=0 must be a whole number >= 1"),
        ({"eval.missing_probs": [1.5]}, r"eval\.missing_probs=\[1\.5\] must be a list of numbers in \[0, 1\)"),
        ({"eval.missing_probs": 0.3}, r"eval\.missing_probs=0\.3 must be a list"),
        ({"mas.lambda_main": -1}, r"mas\.lambda_main=-1 must be a number >= 0"),
        ({"mas.loss_momentum": 5}, r"mas\.loss_momentum=5 must be in \(0, 1\]"),
        ({"model.dropout": 1.5}, r"model\.dropout=1\.5 must be in \[0, 1\)"),
        ({"augment.rotate90": "no"}, r"augment\.rotate90='no' must be true or false"),
        ({"mas.branch": "off"}, r"mas\.branch='off' must be true or false"),
        ({"model.shared_encoder": "no"}, r"model\.shared_encoder='no' must be true or false"),
        ({"model.channels_last": "no"}, r"model\.channels_last='no' must be true or false"),
        ({"model.compile": 1}, r"model\.compile must be false, true or train, got 1"),
        ({"backbone.pretrained": 1}, r"backbone\.pretrained=1 must be true, false or the path of a weights file"),
        ({"model.decoder_channels": 0}, r"model\.decoder_channels=0 must be a whole number >= 1"),
        ({"model.decoder_channels": -1}, r"model\.decoder_channels=-1 must be a whole number >= 1"),
        (
            {"model.fusion": "sgf", "model.fusion_options.sgf.embed_dim": 0},
            r"model\.fusion_options\.sgf\.embed_dim=0 must be a whole number >= 1",
        ),
        ({"loss.ignore_index": 0}, r"loss\.ignore_index=0: the ignore index is the dataset's, 255 \(IGNORE_INDEX\)"),
        ({"data.sampler": "mas", "data.mas.floor": 2}, r"data\.mas\.floor must be in \[0, 1\]"),
        ({"dataset.splits.train.num_samples": 0}, r"dataset\.splits\.train\.num_samples must be >= 1, got 0"),
        (
            {"callbacks.model_checkpoint.monitor": "val/avg/mIoU"},
            r"callbacks\.model_checkpoint\.monitor=val/avg/mIoU is not a metric .*\(did you mean val/avg/miou\?\)",
        ),
        (  # a validation pattern subset logs no E[mIoU] rows
            {"data.val_patterns": ["rgb", "nir"], "optimized_metric": "val/p0.3/miou"},
            r"optimized_metric=val/p0\.3/miou is not a metric this run logs .* for one of rgb, nir, \.\.\.$",
        ),
    ],
)
def test_bad_settings_are_refused_before_the_run_folder_is_written(cfg_train, overrides, message):
    """Values that torch or Lightning would refuse deep inside training (or never: a negative lr warm-up, a
    negative loss weight, bool("no")), refused up front naming the option; no config.yaml of a run that never ran."""
    if torch.cuda.is_available() and overrides.get("trainer.accelerator") == "gpu":
        pytest.skip("this machine has a GPU")
    with open_dict(cfg_train):
        for key, value in overrides.items():
            OmegaConf.update(cfg_train, key, value, force_add=True)
    with pytest.raises(ValueError, match=message):
        train(cfg_train)
    assert not (Path(cfg_train.paths.output_dir) / "config.yaml").exists()


def test_overrides_the_run_ignores_are_warned(tmp_path, caplog):
    """A command-line value for a part the run does not use (MAS knobs without the sampler or the branch, eval's
    whole-tile options without eval.full_tile) is named in a warning; the same values where they apply are not."""
    from sgma.tasks import warn_inactive_overrides

    unused = ["model=baseline", "data.mas.floor=0.5", "mas.draw=sample"]
    with caplog.at_level("WARNING", logger="sgma"):
        warn_inactive_overrides(bind_to(compose_config("train", ["debug=tiny", *unused]), tmp_path))
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "data.mas.floor=0.5 has no effect in this run: the MAS sampler is off (data.sampler=random)",
        "mas.draw=sample has no effect in this run: the MAS branch is off (mas.branch=false)",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sgma"):
        warn_inactive_overrides(bind_to(compose_config("train", ["debug=tiny", "model=sgma", *unused[1:]]), tmp_path))
        warn_inactive_overrides(bind_to(compose_config("eval", ["ckpt_path=x", "eval.window=256"]), tmp_path))
        warn_inactive_overrides(
            bind_to(compose_config("eval", ["ckpt_path=x", "eval.window=256", "eval.full_tile=true"]), tmp_path)
        )
    assert [r.getMessage() for r in caplog.records] == [
        "eval.window=256 has no effect in this run: it applies to eval.full_tile=true only"
    ]
    caplog.clear()
    # mas_only's sampler memory stays uniform (mean fusion has no robustness maps); another fusion's options
    other = ["model=mas_only", "data.mas.floor=0.9", "model.fusion_options.sgf.num_heads=4"]
    with caplog.at_level("WARNING", logger="sgma"):
        warn_inactive_overrides(bind_to(compose_config("train", ["debug=tiny", *other]), tmp_path))
        warn_inactive_overrides(bind_to(compose_config("train", ["debug=tiny", "model=sgma", *other[1:]]), tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        "data.mas.floor=0.9 has no effect in this run: the MAS sampler's memory is fed by SGF's robustness maps, "
        "which this fusion has not (it stays uniform)",
        "model.fusion_options.sgf.num_heads=4 has no effect in this run: only the options of the fusion in use "
        "(model.fusion) reach the model",
    ]
    GlobalHydra.instance().clear()


@contextmanager
def _max_file_size(nbytes: int):
    """A real write fault without root: writes past ``nbytes`` fail with EFBIG, as they would with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_checkpoint_write_failure_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    assert path.stat().st_mode & 0o044  # readable by group/others like any file (umask), not mkstemp's 0600
    with _max_file_size(64 * 1024), pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt") as err:
        io.save_checkpoint({"step": 2, "w": torch.zeros(1_000_000)}, path)
    assert err.value.errno == errno.EFBIG and "is unchanged" in str(err.value)
    assert torch.load(path, weights_only=True)["step"] == 1  # the earlier checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_report_files_appear_as_a_set(tmp_path):
    classes = [f"class{i}" for i in range(6)]
    report = build_report(
        torch.eye(6, dtype=torch.long).repeat(3, 1, 1) * 100,
        torch.tensor([4, 4, 4]),
        all_patterns=["rgb", "dsm", "rgb+dsm"],
        class_names=classes,
    )
    meta = {"config": {"pad": "x" * 20000}}  # patterns.json, written second, outgrows the limit below
    written = write_report(report, tmp_path / "ok", title="t", meta=meta)
    sizes = {p.name: p.stat().st_size for p in written}
    assert max(sizes["patterns.csv"], sizes["patterns.md"]) < 20000 < sizes["patterns.json"]
    out = tmp_path / "full_disk"
    with _max_file_size(20000), pytest.raises(OSError) as err:
        write_report(report, out, title="t", meta=meta)
    assert err.value.errno == errno.EFBIG
    assert list(out.iterdir()) == []  # neither a lone patterns.csv nor temporaries


def test_run_folders_are_unique_within_a_second():
    cfg = compose_config("train", ["debug=tiny"])
    name = Path(str(cfg.hydra.run.dir)).name
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", name), name
    sweep = Path(str(cfg.hydra.sweep.dir)).name
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", sweep), sweep


def _sigterm_train_py(tmp_path: Path, args: list[str], *, after_start: float = 0.0) -> str:
    """Run ``train.py args`` in its own process group, SIGTERM the whole group ``after_start`` seconds into the
    first epoch (as SLURM and Ctrl-C do: DataLoader workers and DDP ranks get it too), check it exits 143 and
    return its output."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SGMA_LOG_DIR": str(tmp_path)}
    out_file = tmp_path / "out.txt"
    with out_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while "Epoch 0" not in out_file.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, "train.py did not start training"
                time.sleep(0.2)
            time.sleep(after_start)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=300) == 128 + signal.SIGTERM, out_file.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return out_file.read_text()


def test_train_py_saves_and_exits_on_sigterm(tmp_path):
    """A real SIGTERM to train.py's whole process group during the first epoch, as SLURM and Ctrl-C send it (the
    DataLoader workers get it too): a loadable last.ckpt, exit 143, the resume command."""
    run = tmp_path / "run"
    args = ["debug=tiny", "logger=csv", "trainer.max_epochs=1000", "data.batch_size=2", "data.num_workers=2"]
    out = _sigterm_train_py(tmp_path, [*args, f"hydra.run.dir={run}"])
    last = run / "checkpoints" / "last.ckpt"
    assert f"resume with ckpt_path={last.resolve()}" in out, out[-3000:]
    assert "sgma" in torch.load(last, map_location="cpu", weights_only=True)
    assert not (run / "patterns.json").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries


def test_ddp_ranks_stop_together_on_sigterm(tmp_path):
    """A real 2-process DDP run on CPU (gloo) gets SIGTERM mid-epoch: the ranks compare their flags on the same
    batches only (every ``sync_every_n_batches``), agree, save one loadable last.ckpt and exit 143 (no deadlock)."""
    run = tmp_path / "run"
    args = ["debug=tiny", "logger=csv", "trainer=ddp_cpu", "trainer.max_epochs=1000", "data.batch_size=2"]
    args += ["dataset.splits.train.num_samples=400", f"hydra.run.dir={run}"]
    out = _sigterm_train_py(tmp_path, args, after_start=1.0)  # a few steps into the epoch
    last = run / "checkpoints" / "last.ckpt"
    assert f"resume with ckpt_path={last.resolve()}" in out, out[-3000:]
    state = torch.load(last, map_location="cpu", weights_only=True)
    batches = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    # saved in the end hook of batch index `batches` (counted completed after the hook): a compared batch
    assert state["epoch"] > 0 or (batches + 1) % 10 == 0, batches


def test_resume_may_change_how_the_model_runs():
    """model.compile, compile_options, channels_last and pack_multiple change how the model is executed, not what it
    computes: a run may resume with other values, or from a checkpoint written before a knob existed."""
    from omegaconf import OmegaConf

    from sgma.recovery import resume_differences

    current = OmegaConf.to_container(compose_config("train", ["model=sgma"]))
    current.pop("hydra")
    old = copy.deepcopy(current)
    del old["model"]["pack_multiple"], old["model"]["channels_last"]
    current["model"].update(compile="train", compile_options={"backend": "cudagraphs"}, pack_multiple=8)
    assert resume_differences(old, current) == []
    current["model"]["decoder_channels"] = 128
    assert resume_differences(old, current) == ["model.decoder_channels: 256 -> 128"]


def test_checkpoints_from_before_augment_and_loss_resume_as_they_trained():
    """A stored config without the later `augment`, `loss` and `fresh_scenes` keys compares as none / ce / false
    (what those runs did), and a real difference is still reported."""
    from omegaconf import OmegaConf

    from sgma.recovery import resume_differences

    # what those runs did, spelt out: no augmentation, fixed synthetic scenes, cross-entropy
    current = OmegaConf.to_container(compose_config("train", ["augment=none", "dataset.builder.fresh_scenes=false"]))
    current.pop("hydra")
    old = copy.deepcopy(current)
    del old["augment"], old["loss"], old["dataset"]["builder"]["fresh_scenes"]
    assert resume_differences(old, current) == []
    current["augment"]["hflip"] = 0.5
    current["loss"]["_target_"] = "sgma.losses.OhemCrossEntropy"
    assert resume_differences(old, current) == [
        "augment.hflip: (absent) -> 0.5",
        "loss._target_: 'sgma.losses.CrossEntropy' -> 'sgma.losses.OhemCrossEntropy'",
    ]
