"""Finding a release's files under a data root by their names, wherever the unzip put them.

Archives unpack in different ways: flat (``5_Labels_all.zip`` has no folder inside), double nested
(``4_Ortho_RGBIR/4_Ortho_RGBIR/``), into a folder named after the archive, or by hand into folders of the
user's choice. The loaders therefore never join fixed paths: they walk the root once (:class:`FileIndex`,
to :data:`MAX_DEPTH` folders deep, skipping caches and hidden folders), pick files by name pattern
(:meth:`FileIndex.match`), and when something is missing raise one message (:func:`inventory`) that says
what was found and where, what is missing, which archive holds it, and where the search looked. A file that
is simply elsewhere under the root is found, so no message tells the user to extract a file again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 5  # folders below the root searched: covers <root>/<release>/<archive>/<archive>/<split>/file
SKIPPED_DIRS = frozenset({"__MACOSX", "$RECYCLE.BIN", "System Volume Information"})  # plus hidden folders


class FileIndex:
    """Every regular file under ``root`` (up to ``max_depth`` folders deep), walked once.

    Hidden folders (``.sgma_cache``, ``.git``) and archive-tool leftovers (``__MACOSX``) are skipped;
    symbolic links to files are followed (a tree of links into a shared data store is common), links to
    folders are not (they could loop).
    """

    def __init__(self, root: str | os.PathLike, *, max_depth: int = MAX_DEPTH) -> None:
        self.root = Path(root)
        self.max_depth = int(max_depth)
        self.files: list[Path] = []
        self.too_deep: list[Path] = []  # folders at the depth limit that were not entered
        self.unreadable: list[Path] = []  # folders the walk could not list (permissions)
        self._walk(self.root, 0)
        self.files.sort()

    def _walk(self, folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # an unreadable sub-folder: its files are reported missing, with the folder named
            self.unreadable.append(folder)
            return
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIPPED_DIRS:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 > self.max_depth:
                        self.too_deep.append(Path(entry.path))
                    else:
                        self._walk(Path(entry.path), depth + 1)
                elif entry.is_file():
                    self.files.append(Path(entry.path))
            except OSError:
                continue

    def match(
        self,
        pattern: str | re.Pattern[str],
        *,
        key: Callable[[re.Match[str]], str] | None = None,
        where: Callable[[Path], bool] | None = None,
    ) -> dict[str, list[Path]]:
        """Files whose whole name matches ``pattern`` (case-insensitive), grouped by ``key(match)`` (default:
        the group ``id``), optionally only those for which ``where(path)`` holds."""
        regex = re.compile(pattern, re.IGNORECASE) if isinstance(pattern, str) else pattern
        out: dict[str, list[Path]] = {}
        for path in self.files:
            m = regex.fullmatch(path.name)
            if m is None or (where is not None and not where(path)):
                continue
            out.setdefault(key(m) if key else m["id"], []).append(path)
        return out

    def folders(self, name: str) -> list[Path]:
        """Folders called ``name`` (case-insensitive) that hold at least one indexed file, shallowest first."""
        lower = name.lower()
        found = {p for f in self.files for p in f.relative_to(self.root).parents if p.name.lower() == lower}
        return sorted((self.root / p for p in found), key=lambda p: (len(p.parts), str(p)))

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, for messages (``.`` for the root itself)."""
        rel = path.relative_to(self.root).as_posix()
        return rel or "."

    def searched(self) -> str:
        """Where the search looked, for messages."""
        text = f"searched {str(self.root)!r} and its sub-folders to {self.max_depth} levels ({len(self.files)} files)"
        if self.too_deep:
            text += f"; not entered (deeper): {', '.join(self.relative(p) for p in self.too_deep[:3])}"
        if self.unreadable:
            text += f"; unreadable (permissions): {', '.join(self.relative(p) for p in self.unreadable[:3])}"
        return text


def folders_of(index: FileIndex, paths: Iterable[Path]) -> str:
    """The folders (relative to the root) that hold ``paths``, for messages: ``5_Labels_all/`` or ``the root``."""
    names = sorted({index.relative(p.parent) for p in paths})
    shown = ["the root" if n == "." else f"{n}/" for n in names[:3]]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def sample(ids: Sequence[str], n: int = 6) -> str:
    """``a, b, c, ... (12 in all)`` for long lists."""
    ids = list(ids)
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


class DuplicateFileError(ValueError):
    """Two files could be the same item (the message names both and how to resolve it)."""


def single(found: Mapping[str, list[Path]], what: str, index: FileIndex) -> dict[str, Path]:
    """One file per key, or an error naming the copies (the loader cannot guess which one is meant)."""
    twice = {k: v for k, v in found.items() if len(v) > 1}
    if twice:
        k, paths = next(iter(sorted(twice.items())))
        raise DuplicateFileError(
            f"{what}: {len(twice)} item(s) have several files under the root, e.g. {k}: "
            f"{', '.join(index.relative(p) for p in paths)}. Keep one copy (delete or move the other out of the "
            f"data root, e.g. a second unzip of the same archive)"
        )
    return {k: v[0] for k, v in found.items()}


@dataclass
class Part:
    """One kind of file of a release, as found: what it is, its name pattern, the archive it comes in, the
    files found by id and the ids needed. ``note`` adds a sentence (an accepted alternative)."""

    what: str
    pattern: str
    archive: str
    found: Mapping[str, Path]
    needed: Sequence[str]
    note: str = ""
    missing: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.missing = [i for i in self.needed if i not in self.found]


def inventory(dataset: str, index: FileIndex, parts: Sequence[Part], *, source: str) -> str:
    """One message for everything that is missing: per part what was found where, what is missing and in
    which archive it comes; then where the search looked and where the release comes from."""
    lines = [f"{dataset}: files missing under dataset.builder.root={str(index.root)!r}:"]
    for part in parts:
        present = [p for i, p in part.found.items() if i in set(part.needed)]
        status = f"{len(present)}/{len(part.needed)}"
        where = f" in {folders_of(index, present)}" if present else ""
        if part.missing:
            line = (
                f"  - {part.what} ({part.pattern}): {status} found{where}; missing {sample(part.missing)}; they come "
                f"in {part.archive}: unzip it anywhere under the root"
            )
        else:
            line = f"  - {part.what} ({part.pattern}): {status} found{where}"
        lines.append(line + (f". {part.note}" if part.note else ""))
    lines.append(f"({index.searched()}. Data: {source}.)")
    return "\n".join(lines)
