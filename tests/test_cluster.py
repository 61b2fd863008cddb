"""Cluster scale: the submitit launchers (SLURM composed, local run for real), trainer.num_nodes, the Optuna search,
the time-limit signal, and whole-tile evaluation shared out across torch.distributed ranks (gloo on CPU).

Real SLURM cannot run here: its launcher is composed, resolved and instantiated, and its checks are exercised; the
SLURM environment variables that some checks read are set on the test process only (monkeypatch.setenv).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from conftest import REPO, bind_to, compose_config
from sgma.cluster import SLURM_LAUNCHER, LauncherCheck, check_shared_run_dir, resume_checkpoint, scheduler_job
from sgma.config import CONFIG_DIR, register_configs
from sgma.data.fake import make_fake_potsdam
from sgma.inference import TileProgress, evaluate_full_tiles
from sgma.modalities import Modality, all_patterns
from sgma.models.segmentor import SegmentorOutput
from sgma.recovery import LAST, ResumeState
from sgma.summary import summarise
from sgma.utils import instantiate

PATTERNS = all_patterns(["rgb", "nir", "dsm"])
CLASSES = ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
SLURM = ["hydra/launcher=submitit_slurm", "slurm.partition=gpu", "slurm.account=proj"]
# the fake Potsdam test split cut to 3 tiles (6_13, 6_14, 6_15): two ranks get 2 and 1
KEEP = ("6_13", "6_14", "6_15")


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SGMA_LOG_DIR": str(tmp_path)}


def _resolved_launcher(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config("train", overrides).hydra.launcher, resolve=True)


# ------------------------------------------------------------------------------------------ SLURM launcher
def test_slurm_launcher_follows_the_trainer():
    cfg = compose_config("train", [*SLURM, "trainer=ddp", "trainer.num_nodes=2", "slurm.mem_gb=200"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == SLURM_LAUNCHER
    assert (launcher["partition"], launcher["account"], launcher["mem_gb"]) == ("gpu", "proj", 200)
    # one task per GPU on each node, as Lightning's SLURM environment expects; set once, in the trainer
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    assert launcher["signal_delay_s"] == 300 and launcher["max_num_timeout"] == 10
    assert launcher["submitit_folder"].endswith(".submitit/%j")
    LauncherCheck().check(cfg)  # consistent: no error
    # Hydra builds the real launcher from it (submitit itself is only called to submit)
    built = instantiate(cfg.hydra.launcher)
    assert type(built).__name__ == "SlurmLauncher" and built.params["tasks_per_node"] == 4

    cpu = _resolved_launcher([*SLURM, "trainer.accelerator=cpu", "trainer.devices=2"])
    assert (cpu["tasks_per_node"], cpu["gpus_per_node"]) == (2, None)  # CPU tasks ask for no GPU


def test_slurm_launcher_refuses_bad_values():
    with pytest.raises(InterpolationResolutionError, match=r"slurm.partition=None: .*slurm.partition=gpu"):
        _resolved_launcher(["hydra/launcher=submitit_slurm"])
    with pytest.raises(InterpolationResolutionError, match=r"trainer.num_nodes=0: .* >= 1"):
        _resolved_launcher([*SLURM, "trainer.num_nodes=0"])
    with pytest.raises(InterpolationResolutionError, match=r"trainer.devices='auto': .*trainer.devices=4"):
        _resolved_launcher([*SLURM, "trainer.devices=auto"])
    # a launcher that disagrees with the trainer is refused before anything is submitted
    cfg = compose_config("train", [*SLURM, "trainer=ddp", "hydra.launcher.tasks_per_node=2"])
    with pytest.raises(ValueError, match=r"tasks_per_node=2 but trainer.devices=4: .*trainer.devices=2"):
        LauncherCheck().check(cfg)
    cfg = compose_config("train", [*SLURM, "trainer.num_nodes=2", "hydra.launcher.nodes=1"])
    with pytest.raises(ValueError, match=r"nodes=1 but trainer.num_nodes=2"):
        LauncherCheck().check(cfg)
    cfg = compose_config("train", ["hydra/launcher=submitit_local", "trainer=ddp_cpu"])
    with pytest.raises(ValueError, match=r"trainer.devices=2 with hydra/launcher=submitit_local"):
        LauncherCheck().check(cfg)


def test_refused_sweeps_stop_before_any_job(tmp_path):
    """Hydra only warns when a callback raises and launches the jobs anyway: a refusal must stop the command (exit
    status 1, the message on stderr) before a job starts. Also: a sweep over a value the launcher is sized from."""
    cases = [
        (["trainer=ddp_cpu"], r"trainer.devices=2 with hydra/launcher=submitit_local"),
        (["trainer.devices=1,2"], r"trainer.devices=1,2: hydra/launcher=submitit_local sizes every job .* one sweep"),
    ]
    # a sweep over a trainer key the launcher does not read is fine
    from sgma.cluster import swept_launcher_keys

    cfg = compose_config("train", ["hydra/launcher=submitit_slurm", "trainer.max_epochs=1"])
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["trainer.max_epochs=1,2", "slurm.mem_gb=32,64", "trainer=gpu,ddp", "seed=1,2"]
    assert swept_launcher_keys(cfg) == ["slurm.mem_gb=32,64", "trainer=gpu,ddp"]
    for extra, message in cases:
        sweep = tmp_path / "sweep"
        args = ["-m", "hydra/launcher=submitit_local", "debug=tiny", "logger=csv", f"hydra.sweep.dir={sweep}", *extra]
        run = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 1 and re.search(message, run.stderr), run.stderr[-2000:]
        assert not (sweep / ".submitit").exists() and not (sweep / "0").exists()


def test_the_local_example_file_composes(tmp_path):
    """conf/local/default.yaml.example, copied into place as the README says, sets the SLURM keys."""
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    shutil.copy(conf / "local" / "default.yaml.example", conf / "local" / "default.yaml")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["partition"] == "gpu" and launcher["setup"] == ["source .venv/bin/activate"]


# ------------------------------------------------------------------------------------------ num_nodes
def test_num_nodes_is_a_trainer_key(tmp_path):
    cfg = bind_to(compose_config("train", ["debug=tiny", "trainer.num_nodes=2"]), tmp_path)  # no `+`
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.num_nodes == 2 and trainer.world_size == 2  # 1 CPU device x 2 nodes: DDP
    cfg = bind_to(compose_config("train", ["debug=tiny", "trainer.num_nodes=0"]), tmp_path)
    with pytest.raises(ValueError, match="num_nodes"):
        instantiate(cfg.trainer, logger=False)
    assert compose_config("eval", ["ckpt_path=x", "trainer.num_nodes=2"]).trainer.num_nodes == 2


# ------------------------------------------------------------------------------------------ srun and requeue
def test_srun_tasks_need_one_run_folder(tmp_path, monkeypatch):
    """Tasks started by srun compose their configs separately: a folder named by the time is refused."""
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "sgma")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    HydraConfig().set_config(compose_config("train", ["debug=tiny"]))
    with pytest.raises(ValueError, match=r"srun started 8 tasks .*hydra.run.dir=logs/train/runs/slurm-\$SLURM_JOB_ID"):
        check_shared_run_dir()
    HydraConfig().set_config(compose_config("train", ["debug=tiny", f"hydra.run.dir={tmp_path}"]))
    check_shared_run_dir()  # a fixed folder is fine
    GlobalHydra.instance().clear()


def test_ckpt_path_last_in_the_runs_own_new_folder_warns(tmp_path, monkeypatch, caplog):
    """`ckpt_path=last` without a run folder: Hydra's new timestamped folder cannot hold an earlier run's checkpoint,
    so training from scratch is a warning that says how to name the run to resume; a folder given on the command
    line (an sbatch script's first start) is a plain log line."""
    for name in ("SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    new = tmp_path / "runs" / "2026-11-27_13-40-00_123456"
    bind_to(compose_config("train", ["debug=tiny"]), new)
    with caplog.at_level("INFO", logger="sgma"):
        assert resume_checkpoint("last", new) is None
        assert resume_checkpoint("last", tmp_path / "multiruns" / "2026-11-27_13-40-00_123456" / "3") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "hydra.run.dir=<that run folder> ckpt_path=last" in warnings[0], warnings
    caplog.clear()
    bind_to(compose_config("train", ["debug=tiny", f"hydra.run.dir={new}"]), new)
    with caplog.at_level("INFO", logger="sgma"):
        assert resume_checkpoint("last", new) is None
        assert resume_checkpoint("last", tmp_path / "my_run") is None
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "does not exist yet: training from scratch" in caplog.text
    GlobalHydra.instance().clear()


def _checkpoint_by(path: Path, job: str | None) -> None:
    """A checkpoint file as ResumeState records its writer (the rest of a checkpoint plays no part here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"callbacks": {ResumeState.__qualname__: {"job": job}}}, path)


def test_restarted_jobs_resume_from_their_folder(tmp_path, monkeypatch, caplog):
    for name in ("SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    last = tmp_path / "checkpoints" / LAST
    assert resume_checkpoint(None, tmp_path) is None
    assert resume_checkpoint("some/file.ckpt", tmp_path) == "some/file.ckpt"
    assert resume_checkpoint("last", tmp_path) is None  # nothing saved yet: from scratch (logged)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with caplog.at_level("WARNING", logger="sgma"):
        assert resume_checkpoint(None, tmp_path) is None
    assert "SLURM job 123 (restart 1), but" in caplog.text and "hydra.run.dir" in caplog.text
    _checkpoint_by(last, scheduler_job())
    assert resume_checkpoint(None, tmp_path) == str(last)  # the requeued job continues
    assert resume_checkpoint("last", tmp_path) == str(last)
    # a job started from another run's checkpoint continues from its own after a requeue, not from that one again
    assert resume_checkpoint("other/run/last.ckpt", tmp_path) == str(last)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    # a first attempt never picks up a folder's checkpoint, and does not train over it
    with pytest.raises(FileExistsError, match=r"training from scratch would overwrite the run in .* holds last\.ckpt"):
        resume_checkpoint(None, tmp_path)
    with pytest.raises(FileExistsError, match=r"training from ckpt_path=other/run/last\.ckpt would overwrite"):
        resume_checkpoint("other/run/last.ckpt", tmp_path)
    assert resume_checkpoint(None, tmp_path, fit=False) is None  # testing writes no checkpoint
    earlier = str(last.with_name("epoch_003.ckpt"))
    assert resume_checkpoint(earlier, tmp_path) == earlier  # the run again from one of its own checkpoints
    last.rename(last.with_name("epoch_007.ckpt"))  # save_last=false: any checkpoint is the run's
    with pytest.raises(FileExistsError, match=r"holds epoch_007\.ckpt"):
        resume_checkpoint(None, tmp_path)
    last.with_name("epoch_007.ckpt").rename(last)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert resume_checkpoint(None, tmp_path) == str(last)  # a submitit job's folder is its own: job 123 wrote it
    # another job in that folder (the sweep launched again into the same hydra.sweep.dir) neither resumes the
    # earlier job's checkpoint nor overwrites it, unless told to resume it
    monkeypatch.setenv("SLURM_JOB_ID", "456")
    for ckpt_path in (None, "other/run/last.ckpt"):
        with pytest.raises(FileExistsError, match=r"written by SLURM job 123, not by this job \(SLURM job 456\)"):
            resume_checkpoint(ckpt_path, tmp_path)
    assert resume_checkpoint("last", tmp_path) == str(last)
    assert resume_checkpoint(earlier, tmp_path) == earlier  # a rollback, requeued before its first save
    assert resume_checkpoint("other/run/last.ckpt", tmp_path, fit=False) == "other/run/last.ckpt"  # test-only
    _checkpoint_by(last, None)  # a run outside any scheduler wrote it
    with pytest.raises(FileExistsError, match="written by a run outside any scheduler"):
        resume_checkpoint(None, tmp_path)
    # a checkpoint of an sgma that did not record its job: a SLURM-restarted job takes it (requeued across an
    # update), a submitit job that SLURM did not restart does not
    torch.save({"callbacks": {ResumeState.__qualname__: {"rng": []}}}, last)
    with pytest.raises(FileExistsError, match="written by a run that did not record its job"):
        resume_checkpoint(None, tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with caplog.at_level("WARNING", logger="sgma"):
        assert resume_checkpoint(None, tmp_path) == str(last)
    assert "does not record the job that wrote it; resuming it as this job's own" in caplog.text


def test_a_local_submitit_job_is_known_by_its_controller_process(monkeypatch):
    """submitit's local controller restarts a requeued job's tasks with the same SUBMITIT_LOCAL_JOB_ID (its own
    process id); the start time tells that process from a later one with a reused id."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", str(os.getpid()))
    job = scheduler_job()
    assert job.startswith(f"submitit local job {os.getpid()} on ") and "(started at tick ?)" not in job
    assert scheduler_job() == job
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", str(os.getppid()))
    assert scheduler_job() != job
    # inside a SLURM allocation a local job inherits the allocation's SLURM_JOB_ID, shared by all its jobs
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert scheduler_job().startswith(f"submitit local job {os.getppid()} on ")


def test_time_limit_signal_saves_then_ckpt_path_last_resumes(tmp_path):
    """SIGUSR1 (the sbatch script's time-limit warning) to train.py's process group mid-epoch: last.ckpt, exit 138
    and, outside SLURM, no requeue; then the same run folder with ckpt_path=last continues to the end."""
    run = tmp_path / "run"
    args = ["debug=tiny", "logger=csv", "test=false", "data.batch_size=2", "data.num_workers=1", f"hydra.run.dir={run}"]
    out_file = tmp_path / "out.txt"
    with out_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "trainer.max_epochs=1000"],
                                cwd=tmp_path, env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "Epoch 0" not in out_file.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, "train.py did not start training"
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGUSR1)  # the DataLoader worker gets it too, and ignores it
            assert proc.wait(timeout=120) == 128 + signal.SIGUSR1, out_file.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = out_file.read_text()
    last = run / "checkpoints" / LAST
    assert "SIGUSR1 received (the time limit is near)" in text and last.is_file()
    assert f"SIGUSR1 outside SLURM: nothing to requeue; resume with ckpt_path={last.resolve()}" in text
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]

    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args, f"trainer.max_epochs={stopped_at + 1}",
                           "ckpt_path=last"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ckpt_path=last: resuming from {last}" in proc.stderr + proc.stdout
    # the command again without ckpt_path=last would train over that run: refused before Hydra writes its files
    hydra_files = {p: p.read_bytes() for p in [*run.glob(".hydra/*.yaml"), last]}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and f"training from scratch would overwrite the run in {run}" in proc.stderr
    assert {p: p.read_bytes() for p in hydra_files} == hydra_files


# ------------------------------------------------------------------------------------------ local sweep
def job_start_time(log: Path) -> float:
    """When a submitit job process started: the time stamp of its first log line (local time, milliseconds)."""
    match = re.search(r"submitit INFO \((\S+ \S+)\) - Starting with", log.read_text())
    assert match, f"{log}: no submitit start line"
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_submitit_local_sweep_runs_jobs_in_parallel(tmp_path):
    """The ablation command narrowed to two tiny jobs (experiment=ablation model=baseline missing=full seed=1,2)
    through hydra/launcher=submitit_local: both start together, and the sweep ends with its summary (the
    experiment's Hydra callback, run in the launching process once every job has finished)."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "experiment=ablation", "model=baseline", "missing=full", "seed=1,2"]
    args += ["debug=tiny", "logger=csv", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (sweep / ".submitit").is_dir()  # submitit's job files: pickles and each job's stdout/stderr
    avg = []
    for n, seed in ((0, 1), (1, 2)):
        table = json.loads((sweep / str(n) / "patterns.json").read_text())
        assert table["config"]["seed"] == seed and [r["pattern"] for r in table["patterns"]] == PATTERNS
        assert f"seed={seed}" in yaml.safe_load((sweep / str(n) / ".hydra" / "overrides.yaml").read_text())
        avg.append(table["summaries"]["avg"]["miou"])
    # side by side: both job processes started (submitit's first log line, before the job imports torch) before
    # either finished (wrote its table); a launcher running them one after the other could not do that
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    starts = [job_start_time(log) for log in logs]
    ends = [(sweep / str(n) / "patterns.json").stat().st_mtime for n in (0, 1)]
    assert len(starts) == 2 and max(starts) < min(ends), (logs, starts, ends)
    summary = summarise(sweep)
    cell = summary.cell(summary.settings[0], "avg")
    assert len(summary.settings) == 1 and cell.n == 2 and cell.std == pytest.approx(np.std(avg, ddof=1))
    assert "Sweep summary" in proc.stdout and "| 1, 2 | 2 |" in proc.stdout  # printed by the callback
    assert all((sweep / name).is_file() for name in ("summary.md", "summary.csv", "summary.png"))
    # the same sweep launched again into that folder is refused before any job starts: its jobs would resume the
    # first sweep's runs as if requeued, or overwrite them (their .hydra/overrides.yaml first)
    files = {p: p.read_bytes() for p in [*sweep.glob("*/checkpoints/*.ckpt"), *sweep.glob("*/.hydra/*.yaml")]}
    submitted = sorted((sweep / ".submitit").iterdir())
    again = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 1, (again.stdout + again.stderr)[-3000:]
    assert f"hydra.sweep.dir={sweep} holds the runs of an earlier sweep" in again.stderr, again.stderr[-3000:]
    assert len(files) >= 10 and {p: p.read_bytes() for p in files} == files
    assert sorted((sweep / ".submitit").iterdir()) == submitted  # nothing submitted


# ------------------------------------------------------------------------------------------ Optuna
def _optuna_installed() -> bool:
    try:
        import hydra_plugins.hydra_optuna_sweeper.optuna_sweeper  # noqa: F401
    except ImportError:
        return False
    return True


needs_optuna = pytest.mark.skipif(
    not _optuna_installed(), reason="hydra-optuna-sweeper is not installed: pip install -e '.[optuna]'"
)


@needs_optuna
def test_optuna_search_composes():
    cfg = compose_config("train", ["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.storage is None and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert OmegaConf.to_container(sweeper.sampler, resolve=True)["seed"] == cfg.seed
    assert cfg.optimized_metric == "val/avg/miou_best" and cfg.hydra.mode.name == "MULTIRUN"
    assert {"mas.lambda_mas", "data.mas.floor", "data.mas.mix", "data.mas.temperature", "optimizer.lr"} == set(
        sweeper.params
    )
    for key in sweeper.params:  # every searched key exists in the config it overrides
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.slow  # about a minute; the composition test above runs in the default suite
@needs_optuna
def test_optuna_search_runs_two_trials(tmp_path):
    sweep = tmp_path / "search"
    args = ["hparams_search=optuna", "debug=tiny", "logger=csv", "test=false", "hydra.sweeper.n_trials=2"]
    args += ["hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and math.isfinite(results["best_value"]) and 0 <= results["best_value"] <= 1
    assert set(results["best_params"]) == {
        "mas.lambda_mas",
        "data.mas.floor",
        "data.mas.mix",
        "data.mas.temperature",
        "optimizer.lr",
    }
    values = []
    for n in (0, 1):  # each trial's objective, as train.py logged it
        log_text = (sweep / str(n) / "train.log").read_text()
        line = next(x for x in log_text.splitlines() if "objective val/avg/miou_best =" in x)
        values.append(float(line.rsplit("=", 1)[1]))
    assert all(math.isfinite(v) for v in values) and results["best_value"] == pytest.approx(max(values))


def test_objective_errors():
    from sgma.tasks import objective

    assert objective({"val/avg/miou_best": torch.tensor(0.25)}, "val/avg/miou_best") == 0.25
    with pytest.raises(KeyError, match=r"optimized_metric=val/avg/miou_best was not logged .*val/rgb/miou"):
        objective({"val/rgb/miou": 0.5}, "val/avg/miou_best")
    with pytest.raises(ValueError, match="is nan"):
        objective({"val/avg/miou_best": float("nan")}, "val/avg/miou_best")


# ------------------------------------------------------------------------------------------ whole tiles, DDP
class PixelNet(torch.nn.Module):
    """A per-pixel linear map of the Potsdam inputs with fixed weights: the same net in every process."""

    modalities = (
        Modality("rgb", 3, (0.0,) * 3, (255.0,) * 3),
        Modality("nir", 1, (0.0,), (255.0,)),
        Modality("dsm", 1, (0.0,), (255.0,)),
    )

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(5, len(CLASSES), 1)
        with torch.no_grad():
            weights = torch.linspace(-1, 1, self.conv.weight.numel()).view_as(self.conv.weight)
            self.conv.weight.copy_(weights)
            self.conv.bias.zero_()

    def forward(self, inputs, available, return_robustness=False):
        return SegmentorOutput(self.conv(torch.cat([inputs[m.name] for m in self.modalities], dim=1)))


def _potsdam_test_tiles(root: Path, keep: tuple[str, ...]):
    from sgma.data.isprs import Potsdam

    drop = ["7_10", *(t for t in Potsdam.TEST_TILES if t not in keep)]
    return Potsdam(root=str(root), split="test", crop_size=64, drop_tiles=drop, progress=False)


def _evaluate(root: Path, keep: tuple[str, ...], **kwargs):
    return evaluate_full_tiles(
        PixelNet().eval(),
        _potsdam_test_tiles(root, keep),
        split="test",
        patterns=PATTERNS,
        all_patterns=PATTERNS,
        class_names=CLASSES,
        exclude_classes=["clutter"],
        missing_probs=[0.5],
        window=64,
        overlap=0.25,
        blend="gaussian",
        batch_size=4,
        **kwargs,
    )


def _rank_main(rank: int, world: int, root: str, keep: tuple[str, ...], out: str, label_key: str) -> None:
    """One gloo rank: evaluate this rank's share, save what it returned (or the error it raised)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        report = _evaluate(Path(root), keep, label_key=label_key)
        result = {"confusion": [r.confusion for r in report.patterns], "summaries": report.summaries}
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def potsdam_root(tmp_path_factory) -> Path:
    root = make_fake_potsdam(tmp_path_factory.mktemp("potsdam"))
    with warnings.catch_warnings():  # the fake tree's deliberate defects (off-palette pixels, a narrow nDSM)
        warnings.simplefilter("ignore")
        _potsdam_test_tiles(root, KEEP)  # prepare the tile cache once, before processes share it
    return root


def test_distributed_whole_tiles_equal_one_process(potsdam_root, tmp_path):
    """3 ranks (gloo) over 2 tiles: ranks with 1, 1 and 0 tiles return the one-process table exactly; a failure on
    some ranks surfaces on every rank instead of leaving the others waiting in the reduction."""
    one = _evaluate(potsdam_root, KEEP[:2])
    expected = {"confusion": [r.confusion for r in one.patterns], "summaries": one.summaries}
    ctx = torch.multiprocessing.get_context("spawn")
    for label_key, out in (("mask", tmp_path / "ok"), ("no_such_raster", tmp_path / "failing")):
        out.mkdir()
        procs = [ctx.Process(target=_rank_main, args=(r, 3, str(potsdam_root), KEEP[:2], str(out), label_key))
                 for r in range(3)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, "a rank hung or crashed"
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(3)]
        if label_key == "mask":
            assert all(r == expected for r in results)  # integers: exactly equal
        else:  # ranks 0 and 1 read a missing label raster; rank 2 has no tile and learns that they failed
            assert all("error" in r for r in results)
            assert "2 of 3 ranks failed" in results[2]["error"]


def test_tile_progress_lines(caplog):
    now = [0.0]
    progress = TileProgress({"a": 4, "b": 4}, 2, split="test", every_s=15, rank=1, world_size=2, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="sgma"):
        progress.begin("a")
        for t, n in ((10, 4), (20, 4)):  # within every_s of the start: no line; then a line
            now[0] = t
            progress.advance(n)
        now[0] = 30
        progress.end()
        progress.begin("b")
        now[0] = 40  # 10 s after the last line: none
        progress.advance(8)
        now[0] = 60
        progress.end()
    assert caplog.messages == [
        "[rank 1/2] full-tile test: tile a (1/2): 8/8 windows (2 patterns); 50 % of this rank's windows, 20s "
        "elapsed, ETA 20s",
        "[rank 1/2] full-tile test: tile a done (1/2 tiles of this rank); 50 % of this rank's windows, 30s elapsed, "
        "ETA 30s",
        "[rank 1/2] full-tile test: tile b done (2/2 tiles of this rank); 100 % of this rank's windows, 1m00s "
        "elapsed, ETA 0s",
    ]


@pytest.fixture(scope="module")
def potsdam_ckpt(potsdam_root, tmp_path_factory) -> Path:
    """last.ckpt of a tiny baseline trained on the fake Potsdam (64 px crops)."""
    from sgma.tasks import train

    run = tmp_path_factory.mktemp("potsdam_run")
    overrides = ["debug=tiny", "dataset=potsdam", f"dataset.builder.root={potsdam_root}", "logger=csv"]
    overrides += ["model=baseline", "test=false", "dataset.builder.crop_size=64", "dataset.builder.progress=false"]
    overrides += ["data.batch_size=2", "dataset.splits.train.num_samples=2", "dataset.splits.val.num_samples=1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(bind_to(compose_config("train", overrides), run))
    GlobalHydra.instance().clear()
    return run / "checkpoints" / LAST


def _one_and_two_processes(args: list[str], tmp_path: Path) -> tuple[list[dict], str]:
    """The same evaluation in this process and through eval.py with trainer.devices=2 (Fabric or Lightning starts
    the second process, gloo): both patterns.json tables, and the 2-process run's output."""
    from sgma.tasks import evaluate

    one = tmp_path / "one"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(bind_to(compose_config("eval", args), one))
    GlobalHydra.instance().clear()
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), *args, "trainer.devices=2", f"hydra.run.dir={two}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return [json.loads((folder / "patterns.json").read_text()) for folder in (one, two)], output


def test_eval_py_whole_tiles_on_two_processes(potsdam_ckpt, tmp_path):
    """eval.py eval.full_tile=true trainer.devices=2 (Fabric starts the second process, gloo): 3 tiles, 2 and 1 per
    rank; rank 0 writes the same table as a one-process evaluation, to the integer."""
    from sgma.data.isprs import Potsdam

    drop = json.dumps(["7_10", *(t for t in Potsdam.TEST_TILES if t not in KEEP)])
    args = [f"ckpt_path={potsdam_ckpt}", "dataset=potsdam", "dataset.size=64", "eval.full_tile=true", "eval.window=64"]
    args += ["trainer.accelerator=cpu", f"dataset.builder.drop_tiles={drop}", "eval.progress_every_s=0"]
    tables, output = _one_and_two_processes(args, tmp_path)
    assert "on 2 process(es)" in output
    assert "[rank 0/2] full-tile test: tile 6_15 done (2/2 tiles of this rank)" in output
    assert "[rank 1/2] full-tile test: tile 6_14 done (1/1 tiles of this rank)" in output
    assert "[rank 1/2] full-tile test: tile 6_14 (1/1): 28/28 windows (7 patterns)" in output  # within a tile
    assert [r["confusion"] for r in tables[0]["patterns"]] == [r["confusion"] for r in tables[1]["patterns"]]
    assert tables[0]["summaries"] == tables[1]["summaries"]
    assert [r["pattern"] for r in tables[1]["patterns"]] == PATTERNS


@pytest.mark.slow  # ~16 s; the whole-tile 2-process eval.py test above runs in the default suite
def test_eval_py_crops_on_two_processes(potsdam_ckpt, tmp_path):
    """Crop evaluation under DDP (trainer.devices=2): the evaluation sampler shards itself, Lightning must not shard
    it again, and the table equals the one-process table."""
    tables, _ = _one_and_two_processes([f"ckpt_path={potsdam_ckpt}", "trainer.accelerator=cpu", "split=val"], tmp_path)
    assert [r["confusion"] for r in tables[0]["patterns"]] == [r["confusion"] for r in tables[1]["patterns"]]
