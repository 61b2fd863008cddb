"""Loading user-supplied checkpoints without running their code, and saying what is wrong with a bad file.

A ``.ckpt`` is a pickle: loaded with ``torch.load(weights_only=False)`` it can run any code its author put in
(an object whose ``__reduce__`` calls ``os.system``). sgma therefore loads every checkpoint it is handed
(``eval.py``, ``predict.py``, ``train.py ckpt_path=...``, the notebook) with ``weights_only=True``: only
tensors, numbers, strings and plain containers are rebuilt, which is all a checkpoint written by sgma's
``train.py`` holds, so no allow-list is needed. Anything else is refused, and nothing in the file runs.

The stored run config is data too, but eval.py, predict.py and the notebook build objects from it: each
``_target_`` of the nodes they build names a callable that Hydra imports and calls. A checkpoint may therefore
only name what an option of this checkout's config tree (``conf/``) builds, or a ``torch.optim`` optimizer or
schedule class (:func:`check_stored_targets`); ``builtins.print`` or ``os.system`` is refused before anything is
built.

A file that cannot be loaded gets an error saying what it actually is: missing, a folder, unreadable,
truncated, corrupt (a zip member failing its CRC), not a PyTorch checkpoint, or unsafe.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "check_stored_targets",
    "checkpoint_file",
    "load_checkpoint_safely",
]

# the nodes of a stored run config that eval.py, predict.py and the notebook instantiate
BUILT_NODES = ("dataset", "missing", "augment", "model", "loss", "optimizer", "scheduler")

# pickle opcodes that call something: a bare pickle with one of these but no named global is still refused
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "EXT1", "EXT2", "EXT4"}
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
_TRUNCATED = "is it complete? a checkpoint is written atomically by train.py, so a truncated file was copied or "
_TRUNCATED += "downloaded incompletely: copy it again"
_CORRUPT = "it was damaged after train.py wrote it (disk, copy or download): copy it again from its source"


class CheckpointError(RuntimeError):
    """The file exists and is readable but is not a loadable checkpoint (truncated, corrupt, not PyTorch)."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds code or objects that ``weights_only=True`` refuses; nothing of it was loaded."""


def checkpoint_file(path: str | os.PathLike, *, what: str = "ckpt_path") -> Path:
    """``path`` as a readable regular file, or an error naming ``what`` (the CLI key) and what the path is."""
    p = Path(path).expanduser()
    shown = f"{what}={str(path)!r}"
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        hint = ""
        if p.parent.is_dir():
            near = sorted(q.name for q in p.parent.glob("*.ckpt"))[:5]
            hint = f" (the folder holds {', '.join(near)})" if near else " (its folder holds no .ckpt file)"
        raise FileNotFoundError(f"{shown}: no such checkpoint file{hint}") from None
    except PermissionError:
        raise PermissionError(f"{shown}: a folder on its path cannot be entered (permission denied)") from None
    if stat.S_ISDIR(mode):
        inside = [q for q in (p / "checkpoints" / "last.ckpt", p / "last.ckpt") if q.is_file()]
        inside += sorted(p.glob("*.ckpt"))[:3]
        hint = f"e.g. {what}={inside[0]}" if inside else "e.g. <run folder>/checkpoints/last.ckpt"
        raise IsADirectoryError(f"{shown} is not a checkpoint file: it is a folder (point at a .ckpt file, {hint})")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"could not read checkpoint {shown}: it is not a regular file (a device, pipe or socket)")
    try:
        with p.open("rb"):
            pass
    except PermissionError:
        user = _user()
        raise PermissionError(
            f"{shown} is not readable{f' by user {user}' if user else ''} (permission denied): fix its permissions "
            f"(chmod u+r) or copy it somewhere readable"
        ) from None
    return p


def load_checkpoint_safely(path: str | os.PathLike, *, what: str = "ckpt_path") -> dict:
    """The checkpoint at ``path`` loaded on the CPU with ``weights_only=True``, as a dict.

    Raises FileNotFoundError / IsADirectoryError / PermissionError (what the path is), CheckpointError
    (truncated, corrupt, not a PyTorch checkpoint) or UnsafeCheckpointError (code or foreign objects inside:
    refused, nothing executed). ``what`` names the CLI key the path came from, for the messages.
    """
    p = checkpoint_file(path, what=what)
    shown = f"{what}={str(p)!r}"
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"could not read checkpoint {shown}: it is empty (0 bytes); {_TRUNCATED}")
    with p.open("rb") as f:
        starts_as_zip = f.read(4) == b"PK\x03\x04"
    is_zip = zipfile.is_zipfile(p)  # torch.save's format
    if starts_as_zip and not is_zip:  # the zip's central directory, written last, is missing
        raise CheckpointError(f"could not read checkpoint {shown}: it is truncated ({size} bytes); {_TRUNCATED}")
    if is_zip:
        _check_zip(p, shown)
    try:
        with warnings.catch_warnings():
            # torch warns about a bare pickle's protocol just before refusing it: we say what the file is instead
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # refused by the weights-only unpickler, or not a pickle at all
        names = _unsafe_globals(p, is_zip) or _refused_globals(str(err))
        if names:
            raise UnsafeCheckpointError(_unsafe_message(shown, names)) from None
        raise CheckpointError(_foreign_message(shown, err)) from None
    except EOFError:
        raise CheckpointError(
            f"could not read checkpoint {shown}: it is truncated (ends early, {size} bytes); {_TRUNCATED}"
        ) from None
    except Exception as err:  # whatever torch raises on a foreign or damaged file: say so, keep the cause
        raise CheckpointError(_foreign_message(shown, err)) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{shown} holds a {type(ckpt).__name__}, not a training checkpoint: point at a .ckpt written by train.py"
        )
    return ckpt


# ---------------------------------------------------------------------------------------------- helpers
def _user() -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:  # torch's long preamble is advice we do not want repeated
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _foreign_message(shown: str, err: BaseException) -> str:
    return (
        f"could not read checkpoint {shown}: it is not a PyTorch checkpoint, or it is corrupt "
        f"({type(err).__name__}: {_first_line(err)}). Point at a .ckpt written by train.py; if it is one, {_CORRUPT}"
    )


def _unsafe_message(shown: str, names: list[str]) -> str:
    found = f" ({', '.join(sorted(set(names)))})" if names else ""
    return (
        f"checkpoint {shown} refused: it contains code/objects that a checkpoint written by sgma never has{found}; "
        f"it was not loaded. sgma loads checkpoints with torch.load(weights_only=True), so nothing in it ran; "
        f"use only checkpoints written by sgma's train.py from a source you trust"
    )


def _check_zip(p: Path, shown: str) -> None:
    """CRC-check every member: torch.load itself would read a damaged tensor without noticing."""
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"could not read checkpoint {shown}: its zip archive is damaged ({_first_line(err)}); {_CORRUPT}"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"could not read checkpoint {shown}: it is corrupt (member {bad} fails its checksum); {_CORRUPT}"
        )


def _refused_globals(message: str) -> list[str]:
    """The names torch's weights-only unpickler refused (``GLOBAL posix.system``), from its message."""
    return re.findall(r"GLOBAL ([\w.]+)", message)


def _unsafe_globals(p: Path, is_zip: bool) -> list[str]:
    """What the file would import or call, found without executing anything ([] for garbage or a clean file)."""
    if is_zip:
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
        except Exception:  # damaged archive: the caller reports a corrupt file
            return []
    return _plain_pickle_globals(p)


def _plain_pickle_globals(p: Path, max_pickles: int = 8) -> list[str]:
    """Names the pickles of a non-zip file import or call, read with pickletools (which parses, never runs).

    A bare pickle is one pickle; torch's legacy format is a few in a row followed by raw tensor bytes (where
    parsing stops). Names torch allows under ``weights_only`` are left out. [] for garbage (not a pickle): the
    caller then reports a corrupt file.
    """
    names: list[str] = []
    calls = False
    try:
        with p.open("rb") as f:
            for _ in range(max_pickles):
                found, called = _pickle_globals(f)
                names += found
                calls |= called
    except Exception:  # not (or no longer) a pickle: keep what the complete pickles before it imported
        pass
    allowed = _weights_only_allowed()
    unsafe = [n for n in names if n not in allowed]
    return unsafe or (["a call"] if calls and not names else [])


def _pickle_globals(f) -> tuple[list[str], bool]:
    """(names imported, whether anything is called) by the next pickle in ``f``; raises on a non-pickle."""
    names: list[str] = []
    calls = False
    strings: list[str] = []  # strings pushed so far, to name STACK_GLOBAL's (module, name) operands
    memo: dict[int, str | None] = {}
    last: str | None = None
    for op, arg, _ in pickletools.genops(f):
        pushed = None
        if op.name in _STRING_OPCODES:
            pushed = str(arg)
        elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = last
            continue  # memoising keeps the top of the stack
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(int(arg))
        elif op.name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]) if len(strings) >= 2 else "an imported name")
        elif op.name in _CODE_OPCODES:
            calls = True
        if pushed is not None:
            strings.append(pushed)
        last = pushed
    return names, calls


def _weights_only_allowed() -> set[str]:
    """The globals torch's weights-only unpickler accepts (private API: empty if it moved)."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):
        return set()


# the key under which train.py stores the run config and dataset facts in every checkpoint
CHECKPOINT_KEY = "sgma"


def load_checkpoint(path: str | None) -> dict:
    """A checkpoint written by sgma's train.py, loaded without running any code in it (``weights_only=True``),
    whose stored config names only callables this checkout builds (:func:`check_stored_targets`)."""
    if path is None:
        raise ValueError("ckpt_path=PATH is required: a checkpoint written by train.py (e.g. checkpoints/last.ckpt)")
    ckpt = load_checkpoint_safely(path, what="ckpt_path")
    config = stored_config(ckpt)
    if config is None or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint ckpt_path={str(path)!r} has no stored sgma config; only checkpoints written by this "
            f"project's train.py can be used by eval.py, predict.py and the notebook"
        )
    check_stored_targets(config, path=str(path))
    return ckpt


def stored_config(ckpt: dict) -> dict | None:
    """The run config train.py stored in a loaded checkpoint (None: not one of its checkpoints)."""
    stored = ckpt.get(CHECKPOINT_KEY)
    config = stored.get("config") if isinstance(stored, dict) else None
    return config if isinstance(config, dict) else None


@contextlib.contextmanager
def rebuilding_from(ckpt: dict, path: str) -> Iterator[None]:
    """Name the checkpoint, and the sgma version that wrote it when that is not this one, in an error raised while
    building the data and model from its stored config or loading its weights (an unknown key, a missing weight)."""
    try:
        yield
    except Exception as err:
        import sgma
        from sgma.utils import add_note

        written = ckpt.get(CHECKPOINT_KEY, {}).get("version")
        note = f"(while rebuilding the run stored in checkpoint {path!r}"
        if written != sgma.__version__:
            note += (
                f", written by sgma {written or '(unknown version)'}; this is sgma {sgma.__version__}: use the "
                "version that trained it"
            )
        add_note(err, note + ")")
        raise


def _targets(node: object, where: str) -> list[tuple[str, object]]:
    """(config key, value) of every ``_target_`` in a plain-container config tree."""
    if isinstance(node, dict):
        found = [(f"{where}._target_", node["_target_"])] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{where}.{key}")
        return found
    if isinstance(node, list):
        return [t for i, value in enumerate(node) for t in _targets(value, f"{where}[{i}]")]
    return []


def config_tree_targets() -> set[str]:
    """Every ``_target_`` that an option under ``conf/`` names: what this checkout builds from a config."""
    import yaml

    from sgma.config import CONFIG_DIR

    found: set[str] = set()
    for path in CONFIG_DIR.rglob("*.yaml"):
        found.update(str(target) for _, target in _targets(yaml.safe_load(path.read_text()), path.stem))
    return found


def _torch_optim_class(name: str) -> bool:
    """Whether ``name`` is a ``torch.optim`` optimizer or learning-rate schedule, looked up without importing."""
    if not name.startswith("torch.optim."):
        return False
    obj: object = torch.optim
    for part in name.removeprefix("torch.optim.").split("."):
        obj = getattr(obj, part, None)
    base = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
    return isinstance(obj, type) and issubclass(obj, base)


def check_stored_targets(config: dict, *, path: str) -> None:
    """Refuse a stored run config whose built nodes (:data:`BUILT_NODES`) name a callable that no option of this
    checkout's ``conf/`` builds (and that is no ``torch.optim`` class): Hydra would import and call it."""
    allowed = config_tree_targets()
    for node in BUILT_NODES:
        for key, target in _targets(config.get(node), node):
            if not (isinstance(target, str) and (target in allowed or _torch_optim_class(target))):
                raise UnsafeCheckpointError(
                    f"checkpoint {path!r}: its stored config sets {key}={target!r}, which no option under "
                    f"conf/ builds; eval.py, predict.py and the notebook would import and call it, so nothing was "
                    f"built. A checkpoint written by this checkout's train.py names only what its options build; "
                    f"if you trust this file and its author's code, add a config option that builds {target!r}"
                )
