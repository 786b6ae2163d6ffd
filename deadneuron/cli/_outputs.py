"""Output paths: checked before any work, written together at the end, never left half done.

``check_outputs`` refuses, before anything is loaded or trained: one of the inputs, two options naming
the same file, an existing file without ``--force`` (usage errors, exit 2), and a path that is a folder, a
folder that does not exist or cannot be written to (write failures, exit 7, as `deadneuron train` and
`deadneuron.checkpoint.atomic_save` say of them). ``Outputs`` collects what a run
produces (every payload rendered in memory first, so a figure that cannot be drawn fails before any file
is written) and writes it at the end, each file atomically; if one write fails, the files this run
created before it are removed again, so a run leaves all its outputs or none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deadneuron.errors import UsageError, WriteError

Say = Callable[[str], None]


def check_output(path: Path, *, option: str, inputs: Sequence[Path] = (), force: bool = False) -> None:
    """One output file path, before any work (see the module docstring)."""
    for source in inputs:
        if _same(path, source):
            raise UsageError(f"{option} {path}: is an input of this run and is never overwritten; choose another path")
    if path.is_dir():
        raise WriteError(f"{option} {path}: is a folder; give a file path to write to (for example {path / 'out'}"
                         f"{_suffix(option)})")  # fmt: skip
    if path.exists() and not force:
        raise UsageError(f"{option} {path}: already exists; pass --force to overwrite it, or choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise WriteError(f"{option} {path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(f"{option} {path}: no permission to write in folder {folder}; choose another folder")


def check_outputs(paths: Mapping[str, Path | None], *, inputs: Sequence[Path] = (), force: bool = False) -> None:
    """Every given output path (option -> path), and that no two options name the same file."""
    given = [(option, path) for option, path in paths.items() if path is not None]
    for option, path in given:
        check_output(path, option=option, inputs=inputs, force=force)
    for i, (option, path) in enumerate(given):
        for other, other_path in given[i + 1 :]:
            if _same(path, other_path):
                raise UsageError(f"{option} and {other} both name {path}; give each output its own path")


_FILE_SUFFIXES = frozenset({".md", ".html", ".htm", ".json", ".png", ".txt", ".pdf", ".svg", ".csv"})


def check_folder(path: Path, *, option: str) -> None:
    """An output folder (created if missing): not a file, and its nearest existing parent writable."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file; give a folder to write the report files into")
    if not path.exists() and path.suffix.lower() in _FILE_SUFFIXES:  # `--out report.md` meant a file
        raise UsageError(f"{option} {path}: {option} takes a folder, where it writes report.json, report.md, "
                         f"report.html and the figures; give one, e.g. {option} {path.with_suffix('')}/")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{option} {path}: {existing} is not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WriteError(f"{option} {path}: no permission to write in {existing}; choose another folder")


@dataclass
class Outputs:
    """Payloads to write at the end: checkpoints (``torch.save``), text, bytes."""

    protect: Sequence[Path] = ()
    force: bool = False
    _items: list[tuple[Path, str, object]] = field(default_factory=list, init=False)

    def checkpoint(self, path: Path, obj: object) -> None:
        self._items.append((path, "checkpoint", obj))

    def text(self, path: Path, text: str) -> None:
        self._items.append((path, "bytes", text.encode("utf-8")))

    def data(self, path: Path, data: bytes) -> None:
        self._items.append((path, "bytes", data))

    def write(self, say: Say) -> list[Path]:
        """Write every payload atomically; on a failure remove what this call created, then re-raise."""
        from deadneuron.checkpoint import atomic_save, atomic_write_bytes

        created: list[Path] = []
        try:
            for path, kind, payload in self._items:
                existed = path.exists()
                if kind == "checkpoint":
                    atomic_save(payload, path, force=self.force, protect=self.protect)
                else:
                    assert isinstance(payload, bytes)
                    atomic_write_bytes(payload, path, force=self.force, protect=self.protect)
                if not existed:
                    created.append(path)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
        for path, _, _ in self._items:
            say(f"wrote {path}")
        return [path for path, _, _ in self._items]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _suffix(option: str) -> str:
    return {"--figure": ".png", "--markdown": ".md"}.get(option, ".pth")


__all__ = ["Outputs", "check_folder", "check_output", "check_outputs"]
