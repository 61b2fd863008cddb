"""Running on clusters: Lightning's SLURM environment, requeued jobs that resume, and checks made before a sweep is
submitted.

- :func:`lightning_plugins`: under ``srun``, Lightning's SLURM environment with its own auto-requeue off. Its
  auto-requeue would save ``hpc_ckpt_*.ckpt`` from inside its signal handler, in the middle of a step, and requeue
  the job at once (SLURM then kills it while checkpoints are still being written). sgma's
  :class:`~sgma.recovery.CheckpointOnSignal` instead saves ``last.ckpt`` at the next consistent point, and
  :func:`requeue` hands the job back to SLURM after that save.
- :func:`resume_checkpoint`: ``ckpt_path=last`` resumes the run folder's ``last.ckpt``; a job that SLURM or
  submitit restarted (requeued after its time limit or a preemption) runs the same command in the same folder and
  resumes from that checkpoint by itself, if it wrote it (:func:`scheduler_job`).
- :func:`check_shared_run_dir`: the tasks that ``srun`` starts compose their configs separately; a run folder named
  by the time would differ per task.
- :class:`RunFolderCheck` (a Hydra callback, ``conf/hydra/default.yaml``): a training run or sweep into the folder of an
  earlier run is refused before Hydra writes there.
- :class:`LauncherCheck` (a Hydra callback, ``conf/hydra/default.yaml``): before a submitit sweep is submitted, the
  launcher's nodes and tasks agree with ``trainer.num_nodes`` and ``trainer.devices``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from sgma.checkpoint import load_checkpoint_safely
from sgma.recovery import LAST, TrainingInterrupted, stored_resume_state

# conf/hydra/default.yaml names run and sweep folders ${now:%Y-%m-%d_%H-%M-%S_%f}
TIMESTAMPED = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d{6}")

log = logging.getLogger("sgma")

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
# SLURM's warning before the time limit: USR1 in scripts/slurm/train_paper.sbatch (--signal=USR1@300), USR2 from
# submitit (its --signal=USR2@signal_delay_s, and its local controller before timeout_min)
TIME_LIMIT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
RESUME_LAST = "last"  # ckpt_path=last


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_plugins() -> list:
    """Plugins for ``Trainer`` / ``Fabric``: Lightning's SLURM environment without auto-requeue when launched by
    ``srun`` (Lightning detects the same environment by itself, with auto-requeue on); nothing elsewhere."""
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


# ---------------------------------------------------------------------------------------------- resuming
def slurm_job_id() -> str | None:
    """The id ``scontrol`` knows this job by (``<array job>_<task>`` inside a job array), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def restarted_job() -> str | None:
    """How SLURM restarted this job (requeued after its time limit, a preemption or a node failure), or None."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    if count.isdigit() and int(count) > 0:
        return f"SLURM job {slurm_job_id()} (restart {count})"
    return None


UNRECORDED = "a run that did not record its job (an sgma before checkpoints named it)"


def scheduler_job() -> str | None:
    """This job's id at its scheduler, the same across its restarts, or None outside one: submitit's local job id,
    the process that starts and restarts the job's tasks (with the host and that process's start time: process ids
    are reused), else SLURM's (also under submitit's SLURM executor). Local first: a local submitit job inside a
    SLURM allocation inherits the allocation's SLURM_JOB_ID, which all its jobs share."""
    local = os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    if local is not None:
        try:  # field 22 of /proc/<pid>/stat, counted after the command name (which may hold spaces)
            started = Path(f"/proc/{local}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            started = "?"
        return f"submitit local job {local} on {socket.gethostname()} (started at tick {started})"
    slurm = slurm_job_id()
    return None if slurm is None else f"SLURM job {slurm}"


def checkpoint_job(path: Path) -> str | None:
    """The scheduler job that wrote the checkpoint at ``path`` (:class:`~sgma.recovery.ResumeState` records it):
    None for a run outside a scheduler, :data:`UNRECORDED` for a checkpoint from before that record."""
    try:  # memory-mapped: reads the one record, not the tensors
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # say what is wrong with the file, as a resumed checkpoint's load would
        ckpt = load_checkpoint_safely(path, what="the run folder's checkpoint")
    state = stored_resume_state(ckpt) if isinstance(ckpt, dict) else {}
    return state.get("job", UNRECORDED)


def _own_checkpoint(last: Path, restart: str | None) -> tuple[bool, str | None]:
    """Whether this job wrote ``last``, and which job did. A SLURM-restarted job takes an unrecorded one as its own
    (a job requeued across an update of sgma), with a warning."""
    written_by = checkpoint_job(last)
    if written_by == UNRECORDED and restart is not None:
        log.warning("%s: %s does not record the job that wrote it; resuming it as this job's own", restart, last)
        return True, written_by
    return written_by == scheduler_job(), written_by


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def checkpoints_in(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


def _not_this_jobs(last: Path, written_by: str | None) -> FileExistsError:
    return FileExistsError(
        f"{last} was written by {written_by or 'a run outside any scheduler'}, not by this job ({scheduler_job()}): "
        "a job neither resumes nor overwrites another job's run (a folder used again, e.g. a sweep launched again "
        "into the same hydra.sweep.dir). Launch it into a new folder (leave hydra.sweep.dir / hydra.run.dir unset "
        f"for a timestamped one), delete {last.parent.parent}, or resume that checkpoint on purpose with ckpt_path=last"
    )


def _first_of(held: list[str]) -> str:
    """The first of ``held`` checkpoints and how many more there are."""
    return held[0] + (f" and {len(held) - 1} more checkpoint(s)" if len(held) > 1 else "")


def _folder_in_use(run_dir: Path, doing: str) -> FileExistsError:
    held = _first_of([p.name for p in checkpoints_in(run_dir)])
    return FileExistsError(
        f"{doing} would overwrite the run in {run_dir}, which holds {held}. "
        "Resume that run with ckpt_path=last, train in a new folder (leave hydra.run.dir unset for a timestamped "
        f"one, or name another), or delete {run_dir} first"
    )


def resume_checkpoint(ckpt_path: Any, run_dir: Path, *, fit: bool = True) -> str | None:
    """The checkpoint ``train()`` resumes from: ``ckpt_path`` as given, or ``run_dir/checkpoints/last.ckpt`` for
    ``ckpt_path=last`` and for a restarted job (None: a fresh start).

    A restarted job runs the same command in the same folder (submitit's job folder, or the ``hydra.run.dir`` of an
    sbatch script), so its ``last.ckpt`` is where it stopped: submitit jobs and jobs with SLURM_RESTART_COUNT >= 1
    resume from it without being told, also when the command names another ``ckpt_path`` (the one the job first
    started from; resuming that again would throw away every requeue's progress). Each case is logged.

    Nothing is resumed or overwritten by mistake (FileExistsError otherwise): a job resumes only a checkpoint that
    it wrote itself (:func:`checkpoint_job`; another job's is one of an earlier run in a folder used again), and
    training (``fit``) from scratch or from another checkpoint is refused in a folder that holds checkpoints;
    ``ckpt_path=last`` resumes on purpose, and a ``ckpt_path`` in the run's own checkpoints folder restarts the run
    from there.
    """
    last = run_dir / "checkpoints" / LAST
    restart = restarted_job()
    submitit = os.environ.get("SUBMITIT_EXECUTOR")  # a submitit job: its folder is its own, across restarts
    why = restart or (f"submitit ({submitit}) job" if submitit else None)
    if ckpt_path is not None and str(ckpt_path) != RESUME_LAST:
        if not fit:
            return str(ckpt_path)  # testing it writes no checkpoint
        given = Path(str(ckpt_path)).expanduser()
        rollback = _same_file(given.parent, last.parent)  # one of this run's own checkpoints
        if why is not None and last.is_file() and not _same_file(given, last):
            own, written_by = _own_checkpoint(last, restart)
            if own:
                log.info("%s: resuming from its own %s, not ckpt_path=%s (where it started)", why, last, ckpt_path)
                return str(last)
            if not rollback:
                raise _not_this_jobs(last, written_by)
        elif why is None and checkpoints_in(run_dir) and not rollback:
            raise _folder_in_use(run_dir, f"training from ckpt_path={ckpt_path}")
        return str(ckpt_path)
    if ckpt_path is None and why is None:
        if fit and checkpoints_in(run_dir):
            raise _folder_in_use(run_dir, "training from scratch")
        return None
    if ckpt_path is None and last.is_file():
        own, written_by = _own_checkpoint(last, restart)
        if not own:
            raise _not_this_jobs(last, written_by)
    why = "ckpt_path=last" if ckpt_path is not None else why
    if last.is_file():
        log.info("%s: resuming from %s", why, last)
        return str(last)
    if ckpt_path is not None and fresh_default_folder(run_dir):
        log.warning(
            "ckpt_path=last resumes this run folder's own checkpoint, and %s is the new folder of this run: training "
            "from scratch. To resume an earlier run, name its folder: hydra.run.dir=<that run folder> ckpt_path=last "
            "(or ckpt_path=<that run folder>/checkpoints/last.ckpt)",
            run_dir,
        )
    elif ckpt_path is not None:  # a fixed folder's first start (an sbatch script's hydra.run.dir)
        log.info("ckpt_path=last: %s does not exist yet: training from scratch", last)
    elif restart:
        log.warning(
            "%s, but %s does not exist: training from scratch. A restarted job resumes only in its own folder: give "
            "every srun task the same fixed hydra.run.dir (scripts/slurm/train_paper.sbatch)",
            restart,
            last,
        )
    return None


def fresh_default_folder(run_dir: Path) -> bool:
    """Whether ``run_dir`` is the timestamped folder Hydra made for this very run (conf/hydra: ``runs/<time>``, or a
    job of ``multiruns/<time>/``) rather than one named on the command line: such a folder never holds a checkpoint
    of an earlier run."""
    if not HydraConfig.initialized():
        return False
    overrides = HydraConfig.get().overrides.hydra
    if any(o.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
        return False
    stamped = [run_dir, run_dir.parent]  # a run folder, or the sweep folder above a job's subdir
    return any(TIMESTAMPED.fullmatch(p.name) for p in stamped)


def requeue(err: TrainingInterrupted) -> None:
    """After a time-limit signal (SIGUSR1/SIGUSR2) stopped training and saved ``last.ckpt``: give the job back to
    its scheduler, which restarts it in the same folder (it then resumes: :func:`resume_checkpoint`).

    - a submitit job: submitit's own handler of that signal (restored after training) resubmits the job, counting
      ``max_num_timeout``, and exits;
    - a plain SLURM job (sbatch + srun): rank 0 runs ``scontrol requeue`` (allowed unless the job was submitted with
      ``--no-requeue``);
    - elsewhere nothing is requeued; the log says how to resume.

    Any other signal (SIGINT, SIGTERM) requeues nothing: SLURM requeues a preempted job by itself when the cluster
    is set up to.
    """
    if err.signum not in TIME_LIMIT_SIGNALS:
        return
    name = signal.Signals(err.signum).name
    handler = signal.getsignal(err.signum)
    # None: stopped before a resumed run trained anything; the checkpoint it resumed from is still the one
    where = err.checkpoint or "the run folder's last.ckpt"
    if os.environ.get("SUBMITIT_EXECUTOR") and callable(handler):
        log.warning("%s: submitit requeues the job, which resumes from %s", name, where)
        handler(err.signum, None)  # rank 0: requeues, then exits (SystemExit); other ranks: returns
        return
    job = slurm_job_id()
    if job is None:
        log.warning("%s outside SLURM: nothing to requeue; resume with ckpt_path=%s", name, where)
        return
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return  # rank 0 requeues the whole job
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{name}: training stopped ({where}) but `scontrol requeue {job}` failed (exit "
            f"{result.returncode}: {(result.stderr or result.stdout).strip()}): submit the job again with the same "
            f"hydra.run.dir and it resumes from that checkpoint; jobs submitted with --no-requeue cannot be requeued"
        )
    log.warning(
        "%s: requeued SLURM job %s; it restarts in the same folder and resumes from %s", name, job, err.checkpoint
    )


# ---------------------------------------------------------------------------------------------- run folders
def _named_by_time(node: DictConfig) -> str | None:
    """``hydra.run`` / ``hydra.sweep``'s folder as written (unresolved) when it is named by the time (``${now:...}``,
    a new folder for every run), else None."""
    raw = OmegaConf.to_container(node, resolve=False).get("dir")
    return raw if isinstance(raw, str) and "${now:" in raw else None


def check_shared_run_dir() -> None:
    """Refuse a run started as several ``srun`` tasks (one per device) whose run folder is named by the time: each
    task composes its config on its own, so each would name a different folder (the checkpoints would land in rank
    0's, and a requeued job could not find them)."""
    tasks = os.environ.get("SLURM_NTASKS", "1")
    if not tasks.isdigit() or int(tasks) < 2 or os.environ.get("SUBMITIT_EXECUTOR") or not SLURMEnvironment.detect():
        return  # one process, or submitit (its jobs share the sweep's folder), or not launched by srun
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    raw = _named_by_time(hydra_cfg.sweep if multirun else hydra_cfg.run)
    if raw:
        raise ValueError(
            f"srun started {tasks} tasks of this run, and its folder is named by the time ({raw}), which every task "
            "resolves on its own: give them one folder, e.g. hydra.run.dir=logs/train/runs/slurm-$SLURM_JOB_ID "
            "(scripts/slurm/train_paper.sbatch)"
        )


# ---------------------------------------------------------------------------------------------- launcher check
class Refused(SystemExit):
    """A Hydra callback refusing a run or a sweep. Hydra turns an ``Exception`` raised in a callback into a warning
    and runs the jobs anyway, so a refusal leaves as ``SystemExit``: the message on stderr, exit status 1."""


def refuse(err: Exception) -> Refused:
    log.error("%s", err)
    return Refused(f"{type(err).__name__}: {err}")


# what the submitit launchers take their resources from (conf/hydra/launcher/submitit_*.yaml): these keys and
# groups exactly, and everything under the prefixes
LAUNCHER_KEYS = ("trainer", "trainer.num_nodes", "trainer.devices", "trainer.accelerator", "slurm")
LAUNCHER_PREFIXES = ("slurm.", "hydra.launcher.")


def swept_launcher_keys(config: DictConfig) -> list[str]:
    """The command line's sweeps over a value the launcher is sized from: Hydra resolves the launcher once, from
    the config before the sweep, so every job would get the same resources whatever its value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [
        o.input_line
        for o in parsed
        if o.is_sweep_override() and (o.key_or_group in LAUNCHER_KEYS or o.key_or_group.startswith(LAUNCHER_PREFIXES))
    ]


class LauncherCheck(Callback):
    """Hydra callback: before a sweep goes to a submitit launcher, its resources must agree with the trainer's
    (Lightning's SLURM environment needs ``devices`` tasks on each of ``num_nodes`` nodes; a mismatch would fail
    in every job, after its wait in the queue), and no value they come from may be swept. The launcher's own
    values are resolved here too, so the ``sgma.*`` resolvers (:mod:`sgma.config`) refuse a missing partition or
    a non-numeric device count at once. A refusal stops the sweep before anything is submitted
    (:class:`Refused`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.check(config)
        except Exception as err:
            raise refuse(err) from err

    def check(self, config: DictConfig) -> None:
        target = config.hydra.launcher.get("_target_")
        if target not in (SLURM_LAUNCHER, LOCAL_LAUNCHER):
            return
        option = "submitit_slurm" if target == SLURM_LAUNCHER else "submitit_local"
        if "trainer" not in config:
            raise ValueError(
                f"hydra/launcher={option} sizes its jobs from trainer.devices and trainer.num_nodes, which this "
                "config has no trainer for: use it with train.py or eval.py"
            )
        swept = swept_launcher_keys(config)
        if swept:
            raise ValueError(
                f"{' '.join(swept)}: hydra/launcher={option} sizes every job of a sweep from one value of these "
                "(the launcher is set up once, before the sweep), so the jobs would not get what they ask for. Run "
                "one sweep per value instead"
            )
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        devices, nodes = config.trainer.get("devices"), config.trainer.get("num_nodes", 1)
        if target == LOCAL_LAUNCHER:
            check_local_launcher(launcher, devices)
        else:
            check_slurm_launcher(launcher, devices, nodes)


class RunFolderCheck(Callback):
    """Hydra callback: a training run or sweep that would overwrite an earlier run's checkpoints (the rules of
    :func:`resume_checkpoint`) is refused before Hydra writes into its folder: a refused run leaves the earlier run
    as it was, ``.hydra/overrides.yaml`` included (what :mod:`sgma.summary` groups a sweep's jobs by). Restarted
    jobs and the jobs of a sweep are judged again by ``train()``, knowing the job that wrote the checkpoint."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("train") or restarted_job() or os.environ.get("SUBMITIT_EXECUTOR"):
            return
        run_dir = _fixed_folder(config.hydra.run)
        if run_dir is None:
            return
        try:
            resume_checkpoint(config.get("ckpt_path"), run_dir, fit=True)
        except FileExistsError as err:
            raise refuse(err) from err

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("train") or str(config.get("ckpt_path")) == RESUME_LAST:
            return
        sweep_dir = _fixed_folder(config.hydra.sweep)
        held = [] if sweep_dir is None else [str(p) for p in sorted(sweep_dir.glob("*/checkpoints/*.ckpt"))]
        if held:
            raise refuse(
                FileExistsError(
                    f"hydra.sweep.dir={sweep_dir} holds the runs of an earlier sweep ({_first_of(held)}): this sweep's "
                    "jobs would overwrite them, starting with their .hydra/overrides.yaml. Launch it into a new folder "
                    f"(leave hydra.sweep.dir unset for a timestamped one), delete {sweep_dir}, or resume those runs "
                    "with ckpt_path=last"
                )
            )


def _fixed_folder(node: DictConfig) -> Path | None:
    """``hydra.run`` / ``hydra.sweep``'s folder when it is named on the command line or in a config; None for the
    default one named by the time (new for every run)."""
    return None if _named_by_time(node) else Path(str(node.dir))


def check_slurm_launcher(launcher: dict, devices: Any, nodes: Any) -> None:
    tasks, gpus = launcher["tasks_per_node"], launcher.get("gpus_per_node")
    if launcher["nodes"] != nodes:
        raise ValueError(
            f"hydra.launcher.nodes={launcher['nodes']} but trainer.num_nodes={nodes}: Lightning would refuse the "
            f"job. Set trainer.num_nodes={launcher['nodes']} and leave hydra.launcher.nodes to follow it"
        )
    if tasks != devices:
        raise ValueError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: Lightning's SLURM environment "
            f"needs one task per device. Set trainer.devices={tasks} and leave hydra.launcher.tasks_per_node to "
            "follow it"
        )
    if gpus not in (None, 0) and gpus != tasks:
        raise ValueError(
            f"hydra.launcher.gpus_per_node={gpus} but trainer.devices={devices}: each task trains on one GPU, so a "
            f"node needs {tasks}. Leave hydra.launcher.gpus_per_node to follow trainer.devices"
        )


def check_local_launcher(launcher: dict, devices: Any) -> None:
    if launcher["tasks_per_node"] != 1 or launcher["nodes"] != 1:
        raise ValueError(
            f"hydra.launcher.tasks_per_node={launcher['tasks_per_node']}, hydra.launcher.nodes={launcher['nodes']}: "
            "hydra/launcher=submitit_local runs each job as one process on this machine; set both to 1"
        )
    if devices != 1:
        raise ValueError(
            f"trainer.devices={devices} with hydra/launcher=submitit_local: Lightning would start the other DDP "
            "processes by re-running the submitit job command, which cannot work. Run one device per job "
            "(trainer.devices=1), or DDP without the launcher (python train.py trainer=ddp ...)"
        )
