"""Loading checkpoints without running their code, matching them to models, saving them without loss.

DESIGN section 4. The format is read from the bytes (:func:`sniff`), never from the extension. Pickles
load only through ``torch.load(..., weights_only=True, map_location="cpu")``; extra types come in by
name through ``allow_globals``, never from a forbidden module. Code-carrying formats (TorchScript,
torch.export ``.pt2``, a whole pickled ``nn.Module``) need ``trust_code``, which warns with the file's
SHA-256. A refused file is never retried unsafely. Every error is a DeadneuronError whose ``str`` is
one line: the file, what is wrong, what to do.

TorchScript modules refuse forward hooks and exported programs inline their layers, so neither can be
audited layer by layer: with ``trust_code`` their *weights* are returned (a state_dict) with a warning
to pass ``--model MODULE:FACTORY``.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch

from deadneuron._atomic import atomic_save, atomic_write_bytes, atomic_write_text
from deadneuron._sniff import (
    LEGACY_PICKLES,
    CheckpointFormat,
    describe_unknown,
    open_input,
    pickle_globals,
    sniff,
    zip_pickle,
)
from deadneuron._state_dict import (
    extract_state_dict,
    load_state_dict_strict,
    nonfinite_parameters,
    strip_common_prefix,
)
from deadneuron.errors import DeadneuronError, UnreadableInputError, UnsafeCheckpointError, UsageError

__all__ = [
    "CheckpointFormat",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "extract_state_dict",
    "file_sha256",
    "load_checkpoint",
    "load_state_dict_strict",
    "nonfinite_parameters",
    "sniff",
    "strip_common_prefix",
]

PathLike = str | os.PathLike[str]
Warn = Callable[[str], None]

# Never allowed, not even with --trust-code or --allow-global: no checkpoint needs to run commands,
# import modules or touch files. Defence in depth; weights_only loading already blocks them.
# fmt: off
_DENIED_MODULES = frozenset((
    "os", "posix", "nt", "sys", "subprocess", "runpy", "importlib", "pickle", "_pickle", "shutil", "socket",
    "ctypes", "pty", "code", "codeop", "marshal", "_posixsubprocess", "multiprocessing", "webbrowser", "io",
    "_io", "pdb",
))
_DENIED_BUILTINS = (
    "exec", "eval", "compile", "getattr", "setattr", "delattr", "__import__", "open", "globals", "locals",
    "vars", "breakpoint", "input",
)
_DENIED_NAMES = frozenset((
    *(f"builtins.{name}" for name in _DENIED_BUILTINS),
    "codecs.open", "numpy.load", "torch.load", "torch.serialization.load", "torch.jit.load", "torch.hub.load",
    "torch.storage._load_from_bytes",
))
# fmt: on
_MAX_NESTING = 100
_DESCRIPTIONS = {
    CheckpointFormat.ZIP: "a torch.save zip checkpoint",
    CheckpointFormat.LEGACY_PICKLE: "a legacy torch.save pickle",
    CheckpointFormat.SAFETENSORS: "safetensors",
    CheckpointFormat.TORCHSCRIPT: "a TorchScript archive",
    CheckpointFormat.EXPORTED_PROGRAM: "a torch.export program (.pt2)",
    CheckpointFormat.PLAIN_PICKLE: "a plain pickle",
    CheckpointFormat.EMPTY: "empty",
    CheckpointFormat.UNKNOWN: "not a checkpoint",
}
_SHOWN = 4  # names listed in a message before "and N more"


def _warn_to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open_input(Path(path)) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(
    path: PathLike,
    *,
    allow_globals: Sequence[str] = (),
    trust_code: bool = False,
    warn: Warn = _warn_to_stderr,
) -> object:
    """The object stored at ``path``, loaded without running its code unless ``trust_code``.

    Returns a dict (a checkpoint or a state_dict; for trusted TorchScript / ``.pt2`` files, their weights)
    or, with ``trust_code``, a whole pickled nn.Module. ``allow_globals`` names extra types
    (``module.Name``) weights_only loading may build. Raises UsageError (a forbidden or unknown
    ``allow_globals`` name), UnsafeCheckpointError (code or blocked types; the message lists them and the
    flag that opens them) or UnreadableInputError (missing, damaged or not a checkpoint).
    """
    source = Path(path)
    allowed = _resolve_allowed_globals(allow_globals)
    fmt = sniff(source)
    if source.suffix == ".safetensors" and fmt is not CheckpointFormat.SAFETENSORS:
        warn(f"{source}: is not safetensors: its bytes are {_DESCRIPTIONS[fmt]}; reading it as that")
    try:
        obj = _load_by_format(source, fmt, allowed, trust_code=trust_code, warn=warn)
    except DeadneuronError:
        raise
    except RecursionError:
        raise UnreadableInputError(_too_deep(source)) from None
    except Exception as err:  # untrusted bytes: any parser error means a damaged file
        raise UnreadableInputError(
            f"{source}: corrupt or truncated checkpoint ({_one_line(err)}); download or save it again"
        ) from None
    _check_nesting(obj, source)
    return obj


class _Allowed(NamedTuple):
    entries: list[Any]  # for torch.serialization.safe_globals
    names: frozenset[str]


def _resolve_allowed_globals(requested: Sequence[str]) -> _Allowed:
    entries: list[Any] = []
    names: set[str] = set()
    for name in requested:
        obj = _import_global(name)
        real = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if _is_denied(name) or _is_denied(real):
            raise UsageError(
                f"--allow-global {name}: refused: it would let a checkpoint run code or touch files; "
                "only allow plain data types (e.g. argparse.Namespace)"
            )
        entries += [obj, (obj, name)]
        names |= {name, real}
        if obj is _numpy_dtype():
            # A pickled numpy dtype is rebuilt through its concrete class (numpy.dtypes.Float64DType...).
            entries += _numpy_dtype_classes()
    return _Allowed(entries, frozenset(names))


def _import_global(name: str) -> Any:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module)
        except ImportError:
            continue
        except Exception as err:  # the module itself failed while importing
            raise UsageError(f"--allow-global {name}: importing {module} failed ({_one_line(err)})") from None
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if not isinstance(obj, type(sys)):
            return obj
        break
    raise UsageError(f"--allow-global {name}: cannot import it; give module.Name, e.g. argparse.Namespace")


def _numpy_dtype() -> object:
    numpy = sys.modules.get("numpy")
    return getattr(numpy, "dtype", None) if numpy else None


def _numpy_dtype_classes() -> list[type]:
    import numpy

    return [c for c in vars(numpy.dtypes).values() if isinstance(c, type) and issubclass(c, numpy.dtype)]


def _is_denied(qualified: str) -> bool:
    module = qualified.rpartition(".")[0]
    return qualified in _DENIED_NAMES or any(
        module == m or module.startswith(f"{m}.") for m in _DENIED_MODULES
    )


def _load_by_format(
    source: Path, fmt: CheckpointFormat, allowed: _Allowed, *, trust_code: bool, warn: Warn
) -> object:
    match fmt:
        case CheckpointFormat.EMPTY:
            raise UnreadableInputError(
                f"{source}: is empty (0 bytes), maybe an interrupted download or save; download or save it again"
            )
        case CheckpointFormat.UNKNOWN:
            raise UnreadableInputError(
                f"{source}: not a PyTorch checkpoint ({describe_unknown(source)}); "
                "expected a .pth/.pt zip or pickle written by torch.save, or .safetensors"
            )
        case CheckpointFormat.SAFETENSORS:
            return safetensors.torch.load_file(str(source), device="cpu")
        case CheckpointFormat.TORCHSCRIPT | CheckpointFormat.EXPORTED_PROGRAM:
            return _load_code_archive(source, fmt, trust_code=trust_code, warn=warn)
        case _:
            return _load_pickle(source, fmt, allowed, trust_code=trust_code, warn=warn)


def _load_pickle(
    source: Path, fmt: CheckpointFormat, allowed: _Allowed, *, trust_code: bool, warn: Warn
) -> object:
    found = _globals_in(source, fmt)
    dangerous = sorted(g for g in found if _is_denied(g))
    if dangerous:
        raise UnsafeCheckpointError(
            f"{source}: refused: its pickle calls {_few(dangerous)}, which can run commands or touch files; "
            "no checkpoint needs that, so it is refused even with --trust-code"
        )
    blocked = sorted(found - _safe_global_names() - allowed.names)
    if fmt is CheckpointFormat.PLAIN_PICKLE:
        raise _plain_pickle_error(source, blocked)
    if blocked and not trust_code:
        raise UnsafeCheckpointError(_blocked_message(source, blocked))
    if blocked:
        _warn_trusted(source, f"a pickle that imports {_few(blocked)}", warn)
        return _trusted_load(source, lambda f: torch.load(f, map_location="cpu", weights_only=False))
    with torch.serialization.safe_globals(allowed.entries):
        return _weights_only_load(source)


def _globals_in(source: Path, fmt: CheckpointFormat) -> set[str]:
    if fmt is CheckpointFormat.ZIP:
        return pickle_globals(io.BytesIO(zip_pickle(source)))
    with open_input(source) as f:
        return pickle_globals(f, pickles=LEGACY_PICKLES if fmt is CheckpointFormat.LEGACY_PICKLE else 1)


def _safe_global_names() -> set[str]:
    """Globals weights_only loading accepts: torch's default allowlist plus add_safe_globals ones."""
    # torch 2.13 has no public accessor for its default allowlist; an empty set only over-reports.
    defaults: dict[str, object] = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)()
    user = torch.serialization.get_safe_globals()
    return set(defaults) | {
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in user
    }


def _blocked_message(source: Path, blocked: list[str]) -> str:
    if any(g.startswith("torch.nn.modules.") for g in blocked):
        return (
            f"{source}: refused: it holds a whole pickled model ({_few(blocked)}), and loading one runs code; "
            "pass --trust-code if you trust its source, or load a state_dict instead"
        )
    flags = " ".join(f"--allow-global {g}" for g in blocked[:_SHOWN] if g != "<unresolved>")
    return (
        f"{source}: refused: it needs types that weights_only loading blocks ({_few(blocked)}); "
        f"if you trust them pass {flags or '--allow-global module.Name'}, or --trust-code to trust the whole file"
    )


def _plain_pickle_error(source: Path, blocked: list[str]) -> DeadneuronError:
    advice = "load it in Python and save it with torch.save(model.state_dict())"
    if blocked:
        return UnsafeCheckpointError(
            f"{source}: refused: a plain pickle (not torch.save) that imports {_few(blocked)}; {advice}"
        )
    return UnreadableInputError(f"{source}: is a plain pickle, not a torch.save checkpoint; {advice}")


def _weights_only_load(source: Path) -> object:
    with open_input(source) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's hints (protocol, TorchScript) do not apply here
        try:
            # A file object, not the path: torch.load dispatches "*.safetensors" paths by name.
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refused_by_torch(source, err) from None


def _refused_by_torch(source: Path, err: Exception) -> DeadneuronError:
    text = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    reason = " ".join(text.split("Please use `torch")[0].split())[:200]
    if any(word in reason for word in ("global", "build", "reduce", "new object")):
        return UnsafeCheckpointError(
            f"{source}: refused by weights_only loading ({reason}); "
            "if you trust the type it names, pass --allow-global module.Name"
        )
    return UnreadableInputError(
        f"{source}: weights_only loading cannot read it ({reason}); it is corrupt or was written with an "
        "unusual pickle protocol: save it again with torch.save's defaults"
    )


def _load_code_archive(
    source: Path, fmt: CheckpointFormat, *, trust_code: bool, warn: Warn
) -> dict[str, torch.Tensor]:
    kind = _DESCRIPTIONS[fmt]
    if not trust_code:
        raise UnsafeCheckpointError(
            f"{source}: is {kind}, which carries code that runs when loaded; refused by default: "
            "pass --trust-code if you trust its source, or save the model's state_dict instead"
        )
    _warn_trusted(source, kind, warn)
    if fmt is CheckpointFormat.TORCHSCRIPT:
        weights = _trusted_load(source, lambda f: torch.jit.load(f, map_location="cpu").state_dict())
    else:
        weights = _trusted_load(source, lambda f: dict(torch.export.load(f).state_dict))
    warn(
        f"{source}: {kind} cannot take per-layer forward hooks, so only its weights were read; "
        "pass --model MODULE:FACTORY to audit them in the eager model"
    )
    return {name: tensor.detach().cpu() for name, tensor in weights.items()}


def _warn_trusted(source: Path, kind: str, warn: Warn) -> None:
    warn(
        f"{source}: --trust-code: loading {kind}, which can run code on this machine; "
        f"SHA-256 {file_sha256(source)}; compare it with the publisher's checksum"
    )


def _trusted_load(source: Path, load: Callable[[Any], Any]) -> Any:
    with open_input(source) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return load(f)
        except RecursionError:
            raise UnreadableInputError(_too_deep(source)) from None
        except Exception as err:
            raise UnreadableInputError(
                f"{source}: loading with --trust-code failed ({_one_line(err)}); run where the model's code "
                "can be imported, or save model.state_dict() instead"
            ) from None


def _check_nesting(obj: object, source: Path) -> None:
    """Refuse absurdly nested containers before anything recursive (repr, deepcopy, save) meets them."""
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_NESTING:
            raise UnreadableInputError(_too_deep(source))
        if isinstance(item, Mapping):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            stack += [(v, depth + 1) for v in item]


def _too_deep(source: Path) -> str:
    return f"{source}: nested more than {_MAX_NESTING} levels deep, which no checkpoint needs (corrupt or hostile?); not loaded"


def _few(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return f"{shown} and {len(items) - _SHOWN} more" if len(items) > _SHOWN else shown


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 160 else f"{text[:157]}..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
