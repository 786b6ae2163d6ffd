"""Writes that never leave a half-written file at the destination.

Invariant: the file at ``path`` is either what it was before the call or the complete new content.
The bytes go to a temp file in the same folder (so ``os.replace`` is a rename on one file system),
are flushed and fsynced, checked (checkpoints are read back with ``weights_only=True``), then renamed
over ``path``, and the folder is fsynced so the rename itself survives a power cut. On any failure,
Ctrl-C or SIGTERM the temp file is removed; after SIGKILL a ``.<name>.*.tmp`` file may remain, but it
never has the destination's name.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from deadneuron.errors import DeadneuronError, UsageError, WriteError

PathLike = str | os.PathLike[str]

_ERRNO_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and run again",
    errno.EACCES: "no permission to write there: choose another folder",
    errno.EPERM: "no permission to write there: choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
}


def atomic_save(
    obj: object, path: PathLike, *, force: bool = False, protect: Sequence[PathLike] = ()
) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, after checking it reads back with ``weights_only=True``.

    Refuses (UsageError) to overwrite any of ``protect`` (the inputs) and, without ``force``, any existing
    file. Write failures are WriteError; the destination is untouched by a failed call.
    """
    target = _checked_target(path, force=force, protect=protect)
    return _write_atomically(
        target, lambda f: torch.save(obj, f), verify=lambda tmp: _verify_saved(obj, tmp, target)
    )


def atomic_write_bytes(
    data: bytes, path: PathLike, *, force: bool = True, protect: Sequence[PathLike] = ()
) -> Path:
    """``data`` written to ``path`` atomically (reports, JSON, SVG); same guarantees as :func:`atomic_save`."""
    target = _checked_target(path, force=force, protect=protect)
    return _write_atomically(target, lambda f: f.write(data))


def atomic_write_text(
    text: str,
    path: PathLike,
    *,
    force: bool = True,
    protect: Sequence[PathLike] = (),
    encoding: str = "utf-8",
) -> Path:
    return atomic_write_bytes(text.encode(encoding), path, force=force, protect=protect)


def _checked_target(path: PathLike, *, force: bool, protect: Sequence[PathLike]) -> Path:
    target = Path(path)
    if any(_same_file(target, Path(p)) for p in protect):
        raise UsageError(f"{target}: is an input of this run and is never overwritten; write to a new path")
    if target.is_dir():
        raise WriteError(f"{target}: is a folder; give a file path to write to")
    if not target.parent.is_dir():
        raise WriteError(f"{target}: folder {target.parent} does not exist; create it or choose another path")
    if target.exists() and not force:
        raise UsageError(f"{target}: already exists; pass --force to overwrite it, or choose another path")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


class _RecordingWriter:
    """A file wrapper that remembers the exception its ``write`` raised.

    torch.save turns any exception raised by a file object's ``write`` (ENOSPC, KeyboardInterrupt)
    into a RuntimeError("unexpected pos ..."); the recorded one is re-raised in its place.
    """

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except BaseException as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._file.flush()


def _write_atomically(
    target: Path, write: Callable[[Any], object], *, verify: Callable[[Path], None] | None = None
) -> Path:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with _sigterm_raises(), _sigint_deferred() as interrupted:
        try:
            _write_file(tmp, target, write, verify)
        except WriteError:
            if interrupted:  # a second Ctrl-C, raised inside the write: an interrupt, not a failure
                raise KeyboardInterrupt from None
            raise
        _fsync_folder(target.parent)
    return target


def _write_file(tmp: Path, target: Path, write: Callable[[Any], object], verify: Callable[[Path], None] | None) -> None:
    """Write ``tmp``, sync it, check it and rename it to ``target``; any failure is a one-line
    WriteError and leaves no temp file."""
    replaced = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            _write_recording(f, write)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
        replaced = True
    except DeadneuronError:
        raise
    except OSError as err:
        advice = _ERRNO_ADVICE.get(err.errno or 0, "check the folder and run again")
        raise WriteError(f"{target}: write failed ({err.strerror or err}); nothing was changed; {advice}") from None
    except Exception as err:  # the object itself cannot be serialised
        raise WriteError(
            f"{target}: not written: cannot serialise it ({type(err).__name__}: {_one_line(err)}); "
            "this is a bug in deadneuron, please report it"
        ) from None
    finally:
        if not replaced:
            with suppress(OSError):
                tmp.unlink()


def _write_recording(f: Any, write: Callable[[Any], object]) -> None:
    writer = _RecordingWriter(f)
    try:
        write(writer)
    except Exception:
        if writer.error is not None:
            raise writer.error from None
        raise


def _verify_saved(obj: object, tmp: Path, target: Path) -> None:
    try:
        with open(tmp, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:
        reason = _one_line(err)
        raise WriteError(
            f"{target}: not written: the checkpoint would not load back with weights_only=True ({reason}); "
            "this is a bug in deadneuron, please report it"
        ) from None
    if _layout(loaded) != _layout(obj):
        raise WriteError(f"{target}: not written: the saved file did not read back the same; run again")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _layout(obj: object, depth: int = 0) -> object:
    """Keys, tensor shapes and dtypes of a checkpoint, nested: what must survive the round trip."""
    if depth > 64:
        return "..."
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, Mapping):
        return {str(k): _layout(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_layout(v, depth + 1) for v in obj]
    return type(obj).__name__


def _fsync_folder(folder: Path) -> None:
    # Makes the rename durable; some file systems cannot fsync a folder, which is not an error.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _sigint_deferred() -> Iterator[list[int]]:
    """While writing, a first Ctrl-C is held until the file is complete and in place, then raised as
    KeyboardInterrupt; a second one raises at once (the temp file is removed). Python's default SIGINT
    handler raises wherever the signal lands, and inside torch.save's writer that turns into a
    RuntimeError, i.e. a write "failure". Only in the main thread with Python's default handler: an
    application's own handler (`deadneuron train` has one) is left alone. Yields the signals seen."""
    received: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield received
        return

    def on_sigint(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


class _Terminated(BaseException):
    """SIGTERM arrived during a write; raised so that ``finally`` removes the temp file."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While writing, SIGTERM raises (cleanup runs) and is then re-delivered with its default action.

    Only when SIGTERM still has its default action and this is the main thread (the only place Python
    can install a handler); an application's own SIGTERM handler is left alone.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    received: list[int] = []

    def on_sigterm(signum: int, _frame: object) -> None:
        received.append(signum)
        raise _Terminated

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received:
            signal.raise_signal(signal.SIGTERM)
