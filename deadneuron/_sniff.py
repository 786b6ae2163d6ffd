"""What a checkpoint file is, read from its bytes, and which pickle globals it names; nothing here runs it.

Private helpers of :mod:`deadneuron.checkpoint`. The extension is never trusted: a ``.pth`` may be a
safetensors file, a ``.safetensors`` may be a pickle. Pickles are only disassembled (``pickletools``),
never unpickled.
"""

from __future__ import annotations

import copy
import io
import os
import pickletools
import zipfile
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import IO

from torch.serialization import MAGIC_NUMBER

from deadneuron.errors import UnreadableInputError

_HEAD_BYTES = 64
_ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocol 2+ starts with PROTO; torch.save's legacy format pickles MAGIC_NUMBER first.
_PICKLE_PROTOCOLS = range(2, 6)
LEGACY_PICKLES = 5  # magic, protocol, sys_info, the object, the storage keys; raw tensor bytes follow
_OTHER_FORMATS = (
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run `git lfs pull`)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras .h5 model?)"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "gzip-compressed (decompress it first)"),
    (b"PK", "a zip archive that is not a PyTorch checkpoint"),
)


class CheckpointFormat(Enum):
    """What the bytes of a checkpoint file say it is."""

    ZIP = "zip"  # torch.save since 1.6: a zip with data.pkl
    LEGACY_PICKLE = "legacy-pickle"  # torch.save(..., _use_new_zipfile_serialization=False)
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"  # torch.jit.save: carries code
    EXPORTED_PROGRAM = "exported-program"  # torch.export.save (.pt2): carries a graph
    PLAIN_PICKLE = "plain-pickle"  # pickle.dump, not torch.save
    EMPTY = "empty"
    UNKNOWN = "unknown"


def open_input(path: Path) -> IO[bytes]:
    """``path`` opened for reading, or an UnreadableInputError saying why not."""
    if not path.exists():
        raise UnreadableInputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UnreadableInputError(f"{path}: is a folder, not a checkpoint file; give the file inside it")
    try:
        return open(path, "rb")
    except PermissionError:
        raise UnreadableInputError(f"{path}: permission denied; make the file readable (chmod +r)") from None
    except OSError as err:
        raise UnreadableInputError(
            f"{path}: cannot open it ({err.strerror or err}); check the path"
        ) from None


def sniff(path: str | os.PathLike[str]) -> CheckpointFormat:
    """The format of the checkpoint at ``path``, from its first bytes and (for zips) its member names."""
    with open_input(Path(path)) as f:
        head = f.read(_HEAD_BYTES)
        size = os.fstat(f.fileno()).st_size
        if not head:
            return CheckpointFormat.EMPTY
        if head.startswith(_ZIP_MAGIC):
            return _sniff_zip(f)
    if _is_safetensors_header(head, size):
        return CheckpointFormat.SAFETENSORS
    if len(head) > 1 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        if _first_pickle_is_torch_magic(head):
            return CheckpointFormat.LEGACY_PICKLE
        return CheckpointFormat.PLAIN_PICKLE
    return CheckpointFormat.UNKNOWN


def describe_unknown(path: Path) -> str:
    """A guess at what a file that is no checkpoint is, for the error message."""
    with open_input(path) as f:
        head = f.read(_HEAD_BYTES)
    for magic, description in _OTHER_FORMATS:
        if head.startswith(magic):
            return description
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file"
    return "random bytes?"


def _sniff_zip(f: IO[bytes]) -> CheckpointFormat:
    try:
        names = zipfile.ZipFile(f).namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        # Truncated or damaged: still a zip by its first bytes; loading reports the damage.
        return CheckpointFormat.ZIP
    records = {name.split("/", 1)[1] for name in names if "/" in name}
    # torch's own test (_is_torchscript_zip) is "constants.pkl"; code/ holds the TorchScript source.
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        return CheckpointFormat.TORCHSCRIPT
    if "archive_format" in records or any(
        r.startswith("models/") or "serialized_exported_program" in r for r in records
    ):
        return CheckpointFormat.EXPORTED_PROGRAM
    if "data.pkl" in records:
        return CheckpointFormat.ZIP
    return CheckpointFormat.UNKNOWN


def _is_safetensors_header(head: bytes, size: int) -> bool:
    # safetensors: little-endian u64 header length, then that many bytes of JSON starting with "{".
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _first_pickle_is_torch_magic(head: bytes) -> bool:
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if opcode.name in ("PROTO", "FRAME"):
                continue
            return opcode.name in ("LONG1", "LONG4") and arg == MAGIC_NUMBER
    except (ValueError, EOFError, UnicodeDecodeError):
        return False
    return False


def zip_pickle(path: Path) -> bytes:
    """The ``data.pkl`` record of a torch zip checkpoint, after checking every member's CRC.

    torch.load does not check CRCs, so one flipped byte in tensor data would load silently. Members
    stored with CRC 0 (``torch.serialization.set_crc32_options(False)``) cannot be checked.
    """
    with open_input(path) as f, zipfile.ZipFile(f) as archive:
        data_pkl = None
        for info in archive.infolist():
            if info.filename.endswith("/data.pkl") and info.filename.count("/") == 1:
                data_pkl = archive.read(info) if info.CRC else _read_unchecked(archive, info)
            elif info.CRC:
                with archive.open(info) as member:  # raises BadZipFile on a CRC mismatch at EOF
                    while member.read(1 << 20):
                        pass
        if data_pkl is None:
            raise zipfile.BadZipFile("no data.pkl record")
        return data_pkl


def _read_unchecked(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    unchecked = copy.copy(info)
    del unchecked.CRC  # CRC 0 means "not recorded": a ZipInfo without a CRC is read unchecked
    with archive.open(unchecked) as member:
        return member.read()


def pickle_globals(stream: IO[bytes], *, pickles: int = 1) -> set[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL / INST in the next ``pickles`` pickles of ``stream``.

    Static: a STACK_GLOBAL whose operands cannot be traced is reported as ``<unresolved>``.
    """
    found: set[str] = set()
    for _ in range(pickles):
        found |= set(_globals_of_one_pickle(stream))
    return found


def _globals_of_one_pickle(stream: IO[bytes]) -> Iterator[str]:
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # recent pushes; only strings matter, for STACK_GLOBAL's operands
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield f"{_builtins(module)}.{attr}"
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            operands = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            yield f"{_builtins(operands[0])}.{operands[1]}" if operands[0] and operands[1] else "<unresolved>"
            pushed.append(None)
        elif name in (
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "BINUNICODE8",
            "UNICODE",
            "STRING",
            "BINSTRING",
            "SHORT_BINSTRING",
        ):
            pushed.append(str(arg))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[_memo_key(arg)] = pushed[-1] if pushed else None
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(_memo_key(arg)))
        elif name not in ("PROTO", "FRAME"):
            pushed.append(None)
        del pushed[:-2]


def _memo_key(arg: object) -> int:
    """The memo index a PUT/GET opcode carries (pickletools decodes it as an int)."""
    return arg if isinstance(arg, int) else int(str(arg))


def _builtins(module: str | None) -> str | None:
    return "builtins" if module == "__builtin__" else module
