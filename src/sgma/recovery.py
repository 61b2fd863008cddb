"""Checkpoints that survive faults, and runs that resume exactly where they stopped.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to its final path, fsyncs it
  and renames it into place: a full disk or a kill never leaves a half-written file under a checkpoint's name,
  and the previous ``last.ckpt`` stays loadable.
- :class:`CheckpointOnSignal` turns SIGINT (Ctrl-C), SIGTERM (``kill``, SLURM preemption or time limit) and
  SIGUSR1 / SIGUSR2 (SLURM's warning before the time limit, :data:`TIME_LIMIT_SIGNALS`) into a checkpoint: at the
  next point where the training state is consistent it writes ``last.ckpt`` and stops; :func:`sgma.tasks.train`
  then raises :class:`TrainingInterrupted` (``train.py`` exits with 128 + the signal number, after
  :func:`sgma.cluster.requeue` gave a time-limited SLURM job back to the queue) without testing. A second SIGINT or
  SIGTERM aborts at once, without saving.
- :class:`ResumeState` stores every RNG the run draws from (python, numpy, torch CPU and CUDA, per DDP rank) and
  the W&B run id; the RNGs are restored at the first resumed training batch, so a resumed run draws exactly
  what the uninterrupted run would have drawn. The train sampler's position travels with the datamodule's state
  (:meth:`sgma.data.datamodule.MultiModalDataModule.state_dict`).
- :func:`resume_differences` compares a run config with the one stored in the checkpoint it resumes.

Everything stored is plain data (tensors, numbers, strings, lists, dicts), so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from sgma.config import CONFIG_DIR
from sgma.data.sharding import distributed_rank_and_size

log = logging.getLogger("sgma")

LAST = "last.ckpt"
# SLURM's warning that the time limit is near (sbatch --signal=USR1@<s>; submitit sends USR2): save and stop, as for
# SIGTERM, but never abort on a second signal, since clusters may send it together with SIGTERM on preemption
TIME_LIMIT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, *TIME_LIMIT_SIGNALS)


# ---------------------------------------------------------------------------------------------- atomic writes
def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the new name survives a power cut)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems (network mounts) cannot fsync a folder: the rename still happened
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path``: the same file system, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def open_new(path: Path) -> int:
    """Create ``path`` exclusively with the usual permissions (umask applies, unlike ``mkstemp``'s 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch.save reports a failed write as a RuntimeError raised while it closes
    the archive, with the OSError as its context."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target folder, flushes and fsyncs it, renames it over the
    final name and fsyncs the folder. On any failure (ENOSPC, EDQUOT, a signal) the temporary file is removed
    and the file that had the name before (the previous ``last.ckpt``) is left as it was.

    Remote paths (``s3://...``) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        try:
            with os.fdopen(open_new(tmp), "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            cause = _os_error(err)
            if cause is not None:
                full = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                hint = f"free space in {path.parent} (df -h) and resume" if full else "check the folder and resume"
                raise OSError(
                    cause.errno,
                    f"could not write checkpoint {path}: {cause.strerror or cause}; nothing was written under that "
                    f"name (an earlier {path.name}, if any, is unchanged): {hint}",
                ) from err
            raise
        fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------- signals
class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal (SIGINT, SIGTERM, SIGUSR1, SIGUSR2) after saving ``checkpoint`` (None: nothing
    to save yet)."""

    def __init__(self, message: str, *, signum: int | None, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + (self.signum or signal.SIGTERM)


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal (received by another rank)"


@contextlib.contextmanager
def stop_on_signal(checkpoint_dir: Path) -> Iterator[None]:
    """Outside ``trainer.fit`` (setup, test, plots), SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 stops the task at once with
    :class:`TrainingInterrupted`, naming ``checkpoint_dir/last.ckpt`` when there is one: nothing is being trained,
    so nothing is lost, and the exit status (128 + the signal) and a time-limit requeue follow as for a stop during
    training (SIGUSR1 was fatal without a word: Python's default action). During ``fit``,
    :meth:`CheckpointOnSignal.handling_signals` takes over; with checkpointing off, these handlers stay and stop
    training at once, saving nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a forked DataLoader worker: the main process decides
            return
        last = checkpoint_dir / LAST
        saved = last.resolve() if last.is_file() else None
        resume = f"resume with ckpt_path={saved} (same config)" if saved else "no checkpoint to resume from"
        raise TrainingInterrupted(f"stopped by {_signal_name(signum)}; {resume}", signum=signum, checkpoint=saved)

    previous = {s: signal.signal(s, handle) for s in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class CheckpointOnSignal(Checkpoint):
    """On SIGINT, SIGTERM, SIGUSR1 or SIGUSR2, save ``last.ckpt`` at the next consistent point of training and stop.

    Consistent points, where a checkpoint resumes to exactly the same continuation:

    - the end of a training batch, unless validation or the end of the epoch follows it (Lightning would skip
      them on resume): then the end of the epoch (after validation, the epoch-end hooks and the regular
      checkpoints), or the end of the next batch after a mid-epoch validation;
    - the start of training, for a signal during setup or the sanity check (a fresh run only: a resumed run
      still has the checkpoint it resumed from).

    At a batch end the callback raises :class:`TrainingInterrupted` through Lightning (asking Lightning to
    stop there would run a validation first); at an epoch end it sets ``trainer.should_stop`` and
    :meth:`raise_if_stopped` raises after ``fit`` returns. Under DDP the ranks agree on the decision (any rank's
    signal stops all of them at the same step), so the collective save cannot deadlock; agreeing is an
    all-reduce, a host sync, so mid-epoch the ranks compare only every ``sync_every_n_batches`` batches (the
    same batches on every rank) and a signal takes effect within that many steps. One process checks its
    flag at every batch, which costs nothing.

    Without a signal, it writes ``last.ckpt`` at the end of every epoch (when the ModelCheckpoint has
    ``save_last``), so the newest epoch can always be resumed. Handlers are installed by :meth:`handling_signals`
    around ``trainer.fit`` and the previous ones restored afterwards. A Checkpoint subclass, so Lightning runs it
    after the ModelCheckpoint callbacks.
    """

    def __init__(self, dirpath: str | os.PathLike, *, sync_every_n_batches: int = 10) -> None:
        if sync_every_n_batches < 1:
            raise ValueError(f"sync_every_n_batches must be >= 1, got {sync_every_n_batches}")
        self.default_dirpath = Path(dirpath)
        self.sync_every_n_batches = int(sync_every_n_batches)
        self.signum: int | None = None  # the first signal received by this process
        self.checkpoint: Path | None = None  # where the interrupted state was saved
        self.stopped: TrainingInterrupted | None = None
        self._pid = os.getpid()
        self._installed = False
        self._deferred_logged = False

    # handlers ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
            log.warning("training outside the main thread: SIGINT/SIGTERM will not save a checkpoint")
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in HANDLED_SIGNALS}
        self._installed = True
        try:
            yield
        finally:
            self._installed = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        name = signal.Signals(signum).name
        if self.signum is not None:
            if signum in TIME_LIMIT_SIGNALS or self.signum in TIME_LIMIT_SIGNALS:
                log.warning("%s received while already stopping: still saving %s", name, LAST)
                return
            log.error("second %s: aborting without saving a checkpoint", name)
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received%s: saving %s and stopping at the next consistent point (after the current step; validation "
            "and the end of the epoch finish first when they follow it).%s",
            name,
            " (the time limit is near)" if signum in TIME_LIMIT_SIGNALS else "",
            LAST,
            "" if signum in TIME_LIMIT_SIGNALS else " Send it again to abort without saving.",
        )

    # decisions -----------------------------------------------------------------------------------------
    def _requested(self, trainer: L.Trainer) -> bool:
        if self.stopped is not None:
            return False
        return bool(trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False))

    def _path(self, trainer: L.Trainer) -> Path:
        """``last.ckpt`` in the ModelCheckpoint's folder (where the README says to resume from)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / LAST
        return self.default_dirpath / LAST

    def _save(self, trainer: L.Trainer) -> TrainingInterrupted:
        path = self._path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full training state
        self.checkpoint = path.resolve()
        self.stopped = TrainingInterrupted(
            f"training interrupted by {_signal_name(self.signum)} at epoch {trainer.current_epoch} step "
            f"{trainer.global_step}; resume with ckpt_path={self.checkpoint} (same config)",
            signum=self.signum,
            checkpoint=self.checkpoint,
        )
        if trainer.is_global_zero:
            log.warning("saved %s", self.checkpoint)
        return self.stopped

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning chained its own SIGTERM handler in front of ours when fit started; it would end the run with
        # SystemExit at the end of the epoch (under DDP at the next batch), before our checkpoint: ours alone now.
        # (Lightning's teardown puts back the handlers of before fit, i.e. ours, and handling_signals the rest.)
        if self._installed:
            signal.signal(signal.SIGTERM, self._handle)
        if not self._requested(trainer):
            return
        if trainer.ckpt_path:  # nothing trained since the checkpoint this run resumed from
            self.stopped = TrainingInterrupted(
                f"training interrupted by {_signal_name(self.signum)} before it resumed; nothing new to save: "
                f"resume again with ckpt_path={Path(trainer.ckpt_path).resolve()}",
                signum=self.signum,
                checkpoint=None,
            )
            raise self.stopped
        raise self._save(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1 and (batch_idx + 1) % self.sync_every_n_batches:
            return  # ranks compare flags on the same batches only (an all-reduce per step would sync every step)
        if not self._requested(trainer):
            return
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch or loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            if not self._deferred_logged:
                log.warning("validation or the end of the epoch follows this step: saving after it")
                self._deferred_logged = True
            return
        raise self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._requested(trainer):
            self._save_last(trainer)
            return
        stopped = self._save(trainer)
        if not trainer.fit_loop._can_stop_early:  # trainer.min_epochs not reached: should_stop would be ignored
            raise stopped
        trainer.should_stop = True  # the epoch's metrics are still logged; fit then returns

    def _save_last(self, trainer: L.Trainer) -> None:
        """``save_last``: ``last.ckpt`` at the end of every epoch. Lightning's ModelCheckpoint writes it only when it
        also writes a top-k file (an improvement), so after a crash it could be many epochs old; and its copy is
        taken at validation's end, before the epoch-end hooks (the MAS memory's commit): this one follows them."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / LAST
                trainer.save_checkpoint(path, weights_only=False)
                callback.last_model_path = str(path)
                return

    def raise_if_stopped(self) -> None:
        """After ``trainer.fit``: raise the :class:`TrainingInterrupted` of an interruption at an epoch end."""
        if self.stopped is not None:
            raise self.stopped


# ---------------------------------------------------------------------------------------------- RNG + W&B id
def rng_state() -> dict:
    """This process's RNG states as plain data (``weights_only``-loadable)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just to read it
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: the one this rank trains on
    return state


def set_rng_state(state: Mapping) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"])))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            log.warning("the checkpoint holds a CUDA RNG state but this run has no GPU: CUDA draws are not restored")


def _metric_states(module: torch.nn.Module) -> dict[str, dict]:
    """States of the module's torchmetrics (e.g. the best validation score so far): not in its state_dict."""
    from torchmetrics import Metric

    return {
        name: {
            "state": {attr: getattr(metric, attr) for attr in metric._defaults},
            "update_count": int(metric._update_count),
        }
        for name, metric in module.named_modules()
        if isinstance(metric, Metric) and all(isinstance(getattr(metric, a), torch.Tensor) for a in metric._defaults)
    }


def _set_metric_states(module: torch.nn.Module, states: Mapping[str, Mapping]) -> None:
    metrics = dict(module.named_modules())
    for name, saved in states.items():
        metric = metrics.get(name)
        if metric is None:
            log.warning("the checkpoint holds the state of metric %r, which this model does not have", name)
            continue
        for attr, value in saved["state"].items():
            setattr(metric, attr, value.to(getattr(metric, attr).device))
        metric._update_count = int(saved["update_count"])
        metric._computed = None


def _adopt_checkpoints(callback: ModelCheckpoint, state: dict) -> None:
    """Make a ModelCheckpoint's state from another run folder its own, so top-k selection continues exactly.

    Lightning drops the best-k scores when the folder changed (a resumed run writes to its new run folder), so
    the first validation after resuming would become "best" whatever its score, and the final test could use a
    worse checkpoint than the uninterrupted run. The earlier top-k files are hard-linked (copied across file
    systems) into the new folder, which then manages them as the uninterrupted run would manage its own.
    """
    old_dir, new_dir = state.get("dirpath"), callback.dirpath
    if not old_dir or not new_dir or os.path.realpath(old_dir) == os.path.realpath(new_dir):
        return
    Path(new_dir).mkdir(parents=True, exist_ok=True)
    moved: dict[str, str] = {}
    kept: dict[str, Any] = {}
    for path, score in (state.get("best_k_models") or {}).items():
        src = Path(path)
        if not src.is_file():
            log.warning("the checkpoint's top-k file %s is gone: best-checkpoint selection continues without it", src)
            continue
        dst = Path(new_dir) / src.name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed: copy (atomically)
                tmp = temporary_sibling(dst)
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
        moved[str(src)] = str(dst)
        kept[str(dst)] = score
    state["best_k_models"] = kept
    if kept:
        ranked = sorted(kept, key=lambda k: float(kept[k]), reverse=callback.mode == "max")
        state["best_model_path"], state["best_model_score"] = ranked[0], kept[ranked[0]]
        state["kth_best_model_path"], state["kth_value"] = ranked[-1], kept[ranked[-1]]
    else:
        state["best_model_path"], state["best_model_score"] = "", None
        state["kth_best_model_path"], state["kth_value"] = "", None
    state["last_model_path"] = ""  # the new folder has none yet
    state["dirpath"] = new_dir
    if moved:
        log.info("resumed top-%d checkpoints linked into %s: %s", callback.save_top_k, new_dir, ", ".join(moved))


class ResumeState(Callback):
    """Saves what an exact resume needs beyond Lightning's own state, and restores it.

    - every RNG state (one per DDP rank), restored at the first training batch of the resumed run: between
      loading and that batch the model draws its initial weights and loaders are built, where the uninterrupted
      run drew nothing;
    - the module's torchmetrics states (the best validation score so far), which are not in its state_dict;
    - the ModelCheckpoint callbacks' top-k bookkeeping, carried into the resumed run's folder
      (:func:`_adopt_checkpoints`);
    - the W&B run id, which ``train()`` reads to continue that W&B run (online) or follow it (offline);
    - the scheduler ``job`` that writes it (:func:`sgma.cluster.scheduler_job`): a requeued job resumes only a
      checkpoint of its own.
    """

    def __init__(self, job: str | None = None) -> None:
        self.job = job
        self._pending: list[dict] | None = None
        self._module: torch.nn.Module | None = None
        self.wandb_id: str | None = None
        self.wandb_group: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._module = pl_module
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                self.wandb_id = logger.version
                self.wandb_group = (getattr(logger, "_wandb_init", None) or {}).get("group")

    def state_dict(self) -> dict:
        _, world = distributed_rank_and_size()
        if self._pending is not None:  # saved again before the first resumed batch: still the loaded states
            states = self._pending
        elif world > 1:  # every rank takes part: Lightning builds the checkpoint on all of them
            states = [None] * world
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        metrics = _metric_states(self._module) if self._module is not None else {}
        return {
            "rng": states,
            "metrics": metrics,
            "wandb_id": self.wandb_id,
            "wandb_group": self.wandb_group,
            "job": self.job,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks", {})
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.state_key in states:
                _adopt_checkpoints(callback, states[callback.state_key])

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")
        # the live run's id wins: offline, a resumed run is a W&B run of its own, which the next resume follows
        self.wandb_id = self.wandb_id or state_dict.get("wandb_id")
        self.wandb_group = self.wandb_group or state_dict.get("wandb_group")
        if self._module is not None and state_dict.get("metrics"):
            _set_metric_states(self._module, state_dict["metrics"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self._pending is None:
            return
        rank, world = distributed_rank_and_size()
        states, self._pending = self._pending, None
        if len(states) != world:
            log.warning(
                "the checkpoint holds RNG states of %d rank(s) but this run has %d: the resumed random draws differ "
                "from those of an uninterrupted run",
                len(states),
                world,
            )
        set_rng_state(states[rank % len(states)])


# ---------------------------------------------------------------------------------------------- resume checks
# config sections that decide what is trained; a resumed run must match them (resume_force=true overrides)
RESUME_KEYS = (
    "dataset",
    "backbone",
    "model",
    "mas",
    "missing",
    "augment",
    "loss",
    "optimizer",
    "scheduler",
    "seed",
    "data.batch_size",
    "data.sampler",
    "data.mas",
    "data.val_patterns",  # with the monitor: what "best checkpoint" compares across the resume
    "callbacks.model_checkpoint.monitor",
    "callbacks.model_checkpoint.mode",
    "trainer.accumulate_grad_batches",  # the steps per epoch, hence the schedule's length
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
)
# leaves that only say where things are or how they are shown: moving the data is fine
RESUME_IGNORED_LEAVES = ("root", "cache_dir", "progress", "num_workers")
# how the model is executed, not what it computes: a run may resume compiled, channels-last or padded differently
RESUME_EXECUTION_KEYS = ("model.compile", "model.compile_options", "model.channels_last", "model.pack_multiple")
# config keys added after checkpoints were written, with what reproduces those runs (a conf/ file or a value):
# a checkpoint that lacks one compares as if it had it, wherever the current config has the key
ADDED_LATER: dict[str, str | Any] = {
    "augment": "augment/none.yaml",
    "loss": "loss/ce.yaml",
    "dataset.builder.fresh_scenes": False,
}


def _with_added_later(saved: Mapping, current: Mapping) -> dict:
    """``saved`` with each absent :data:`ADDED_LATER` key that ``current`` has set to its old behaviour."""
    out = OmegaConf.create(dict(saved))
    for dotted, old in ADDED_LATER.items():
        if _select(saved, dotted) is _ABSENT and _select(current, dotted) is not _ABSENT:
            value = OmegaConf.load(CONFIG_DIR / old) if isinstance(old, str) else old
            OmegaConf.update(out, dotted, value, force_add=True)
    return OmegaConf.to_container(out)


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _select(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _resume_ignores(key: str) -> bool:
    """A dotted config leaf that may differ on resume: a location or display leaf, or an execution setting."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf in RESUME_IGNORED_LEAVES or any(key == k or key.startswith(k + ".") for k in RESUME_EXECUTION_KEYS)


def resume_differences(saved: Mapping, current: Mapping) -> list[str]:
    """``key: checkpoint -> now`` for every leaf of :data:`RESUME_KEYS` that differs between the two configs."""
    diffs = []
    saved = _with_added_later(saved, current)
    for section in RESUME_KEYS:
        old = _flatten(_select(saved, section), section)
        new = _flatten(_select(current, section), section)
        for key in sorted(set(old) | set(new)):
            if _resume_ignores(key):
                continue
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if a != b:
                diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def stored_resume_state(ckpt: Mapping) -> Mapping:
    """What :class:`ResumeState` saved in a loaded checkpoint (empty if nothing)."""
    states = ckpt.get("callbacks")
    state = states.get(ResumeState.__qualname__) if isinstance(states, Mapping) else None
    return state if isinstance(state, Mapping) else {}


def check_resume(stored: Mapping | None, current: Mapping, ckpt: Mapping, *, path: Path, force: bool) -> dict:
    """Refuse to resume ``ckpt`` (loaded from ``path``, trained with the config ``stored``) with a config that
    trains something else; return what the resumed run needs from it: ``{"wandb_id", "wandb_group", "epoch",
    "global_step"}``."""
    if stored is None:
        raise ValueError(
            f"ckpt_path={str(path)!r} has no stored sgma config: train.py resumes only checkpoints it wrote "
            f"(a run's checkpoints/last.ckpt)"
        )
    diffs = resume_differences(stored, current)
    if diffs:
        listed = "\n  ".join(diffs)
        if not force:
            raise ValueError(
                f"ckpt_path={str(path)!r} was trained with a different config; resuming it would train something "
                f"else. Differing keys (checkpoint -> now):\n  {listed}\nresume with the checkpoint's values, or "
                f"add resume_force=true to resume anyway (the optimizer state, including its lr, comes from the "
                f"checkpoint)"
            )
        log.warning("resume_force=true: resuming %s with a different config:\n  %s", path, listed)
    state = stored_resume_state(ckpt)
    return {
        "wandb_id": state.get("wandb_id"),
        "wandb_group": state.get("wandb_group"),
        "epoch": int(ckpt.get("epoch", 0)),
        "global_step": int(ckpt.get("global_step", 0)),
    }
