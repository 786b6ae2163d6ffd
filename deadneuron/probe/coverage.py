"""What the probe did not measure (DESIGN section 3: "unknown activations are never skipped silently").

`Coverage` is filled by the Recorder: at registration, every module that looks like an activation but
is no recognised kind (`unknown_reason`); during the forward passes, functional calls that look like
an activation but are not measured (``F.glu``) and the activations a ``select`` left out. After the
audit, `warnings` names each unknown module that no measured site covers, and each one measured only
through recognised functions called inside it that its class name does not name (a ``Swish`` computing
``x * torch.sigmoid(x)`` is measured as the sigmoid, whose flat region is not Swish's; a
``GELUActivation`` calling ``F.gelu`` is measured as itself), and `left_out` says what a ``select``
could have matched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from deadneuron._text import few
from deadneuron.activations import ActivationSpec
from deadneuron.errors import UsageError
from deadneuron.functional_kinds import GLU_REASON
from deadneuron.probe.scripted import script_functions
from deadneuron.report import UNREACHED

if TYPE_CHECKING:
    from deadneuron.probe.site import Site

# Parts of a class name that say "activation": anywhere in the lowercased name, or as a whole word.
_ANYWHERE = ("relu", "gelu", "swish", "silu", "mish", "sigmoid", "tanh", "softplus", "glu", "activation")
_WORDS = frozenset({"act", "sin", "sine", "elu", "snake"})
_NOT = ("norm", "loss", "softmax", "softmin", "attention")  # ActNorm, SigmoidFocalLoss...
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# torch.nn's activation classes (a TorchScript module keeps their names only), less those that are none
_TORCH_ACTIVATIONS = frozenset(nn.modules.activation.__all__) - {
    "MultiheadAttention", "Softmax", "Softmin", "Softmax2d", "LogSoftmax"}
Named = tuple[str, nn.Module, ActivationSpec | None]


@functools.lru_cache(maxsize=1024)  # a pure function of the name, asked once per module of every audit
def looks_like_activation(class_name: str) -> bool:
    """Whether a class name says it is an activation (``MyAct``, ``SwiGLU``, ``Sine``, ``StarReLU``...)."""
    lower = class_name.lower()
    if any(word in lower for word in _NOT):
        return False
    if any(part in lower for part in _ANYWHERE):
        return True
    words = [w.lower() for w in _WORD.findall(class_name)]
    return any(w in _WORDS or w.endswith("elu") for w in words)


# Words of a class name that say what a parameter-free, shape-keeping module is when it is no activation.
_NOT_ACTING = frozenset({
    "drop", "dropout", "droppath", "identity", "noop", "scale", "noise", "pos", "position", "positional",
    "embed", "embedding", "encoding", "pad", "shift", "roll", "perm", "permute", "transpose", "reshape", "view",
    "flatten", "squeeze", "unsqueeze", "cast", "contiguous", "clone", "copy", "detach", "quant", "dequant",
    "stub", "fake", "observer", "grad", "reverse", "checkpoint", "stochastic", "depth", "mask", "rearrange",
    "channel", "shuffle", "residual", "skip", "print", "debug", "log", "trace", "hook", "barrier",
})  # fmt: skip


def suspect(m: nn.Module) -> bool:
    """Whether ``m`` could be an activation written as a module of the user's own class though its name does
    not say so (``Squash``): a leaf of a class from outside torch, holding no parameters and no buffers,
    whose class name has no word of `_NOT_ACTING`. It is named in a warning once it is seen acting as one."""
    cls = type(m)
    if m._modules or m._parameters or m._buffers or cls.__module__.startswith("torch."):
        return False
    return not any(w.lower() in _NOT_ACTING for w in _WORD.findall(cls.__name__))


def unknown_reason(m: nn.Module) -> str | None:
    """Why module ``m`` (not a recognised kind) is named in a warning, or None if it is not."""
    if isinstance(m, nn.GLU):
        return GLU_REASON
    if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
        return _recurrent_reason(m)
    if looks_like_activation(type(m).__name__):
        return _QUANTIZED_REASON if type(m).__module__.startswith("torch.ao.") else \
            "looks like an activation but is not a recognised kind, so it is not measured"
    return None


# torch.ao's quantized fused modules (LinearReLU, ConvReLU2d after quantize_dynamic / convert): no elementwise
# function of theirs could be registered, the activation runs inside their own kernel.
_QUANTIZED_REASON = ("is a quantized module that applies its activation inside its own kernel, so the activation is "
                     "not measured: audit the float model, before quantization")


def _recurrent_reason(m: nn.RNNBase | nn.RNNCellBase) -> str:
    """nn.RNN, LSTM, GRU and their cells run their time steps inside one torch kernel: no hook or probe sees
    the gates' or the hidden state's activation, so their health is not measured (said, not skipped)."""
    if isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)):
        what, them = "its gates' sigmoid and its tanh", "they are"
    else:
        what, them = f"its {getattr(m, 'nonlinearity', 'tanh')}", "it is"
    return (f"applies {what} inside torch's recurrent kernel, {UNREACHED}, so {them} not measured "
            "(to measure them, write the time step in Python with torch's activation functions)")


@dataclass
class Coverage:
    """Unknown activations and left-out sites of one Recorder (see the module doc)."""

    modules: int = 0
    unknown: dict[str, tuple[str, str]] = field(default_factory=dict)  # module name -> (class, reason)
    calls: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, function) -> reason
    unselected: dict[str, None] = field(default_factory=dict)  # activations select left out (ordered)
    scripted: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # TorchScript module -> (class, acts)
    # TorchScript functions the model's code calls: function -> (first module whose class names it, class, acts)
    script_calls: dict[str, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)
    # modules of the user's own classes that could be an activation by what they hold (see `suspect`), and
    # those of them seen acting as one (one tensor in, a floating tensor of its shape out)
    suspects: dict[nn.Module, str] = field(default_factory=dict)
    acting: dict[str, str] = field(default_factory=dict)  # module name -> class
    dtypes: dict[str, tuple[str, str]] = field(default_factory=dict)  # activation module -> (class, input dtype)
    weights: dict[str, str] = field(default_factory=dict)  # activation module called on a parameter -> class
    watched: dict[nn.Module, str] = field(default_factory=dict)  # the unknown modules, to tell those that ran
    ran: set[str] = field(default_factory=set)

    def scan(self, named: Sequence[Named]) -> list[Named]:
        """Note the unknown activation modules among ``named`` (name, module, recognised spec): a module
        holding a recognised activation module is made of it, so it is not one. Note the TorchScript modules
        too (no forward hook runs inside them): the others, which can be hooked, are returned."""
        self.modules = len(named)
        for name, m, _ in named:
            if isinstance(m, torch.jit.ScriptModule) and not any(_inside(name, s) for s in self.scripted):
                self.scripted[name] = (getattr(m, "original_name", type(m).__name__), _scripted_activations(name, m))
        named = [(name, m, spec) for name, m, spec in named if not isinstance(m, torch.jit.ScriptModule)]
        for name, m, _ in named:
            for function, called in script_functions(type(m)):
                self.script_calls.setdefault(function, (name, type(m).__name__, called))
        recognised = {m for _, m, spec in named if spec is not None}
        inside = tuple(f"{name}." for name, _, spec in named if spec is not None and name)
        # a module holding an activation module (recognised, or one named here itself) is made of it, so it is
        # not one (T5's T5DenseGatedActDense holding its NewGELUActivation)
        acts = recognised | {m for _, m, spec in named if spec is None and unknown_reason(m) is not None}
        for name, m, spec in named:
            if spec is not None or (name == "" and m._modules) or name.startswith(inside):
                continue  # a model is no activation unless a leaf; nor is what a measured one holds
            reason = unknown_reason(m)
            if reason is not None and (isinstance(m, nn.GLU) or not any(s in acts for s in m.modules() if s is not m)):
                self.unknown[name] = (type(m).__name__, reason)
                self.watched[m] = name
            elif reason is None and suspect(m):
                self.suspects[m] = name
        return named

    def saw(self, m: nn.Module, args: tuple[object, ...], out: object) -> None:
        """A suspect module returned: noted where it acted as an elementwise function would (see `suspect`)."""
        x = args[0] if len(args) == 1 else None
        if (type(out) is torch.Tensor and isinstance(x, torch.Tensor) and out.is_floating_point()
                and out.shape == x.shape and out is not x):  # fmt: skip
            self.acting.setdefault(self.suspects[m], type(m).__name__)

    def readable(self, name: str, m: nn.Module, z: torch.Tensor) -> bool:
        """Whether activation module ``m``'s input ``z`` is measured: a real floating tensor of data. Other dtypes
        (complex, integer, bool) and parameters (`is_weight`) are noted for a warning; a nested tensor stops the
        audit (`refuse_nested`)."""
        refuse_nested(z, name)
        if is_weight(z):  # a weight transform (`is_weight`): named, not measured
            self.weights.setdefault(name, type(m).__name__)
            return False
        if z.is_floating_point():
            return True
        self.dtypes.setdefault(name, (type(m).__name__, str(z.dtype).removeprefix("torch.")))
        return False

    def unmeasured_call(self, owner: str, function: str, reason: str) -> None:
        self.calls.setdefault((owner, function), reason)

    def left_out(self, name: str) -> None:
        self.unselected.setdefault(name, None)

    def warnings(self, measured: Iterable[Site], select: Sequence[str] | None = None) -> list[str]:
        """One line per unknown module no measured site covers, or covered only by functions its class name
        does not name (and, with ``select``, that it matches), then one per unmeasured functional call outside
        those modules."""
        sites = [(s.owner, s.spec.kind_name if s.functional else None) for s in measured]
        owners = [owner for owner, _ in sites]
        out = [_scripted_warning(name, cls, inside) for name, (cls, inside) in self.scripted.items()]
        out += [f"function {function}() called in {name or 'the model'!r} ({cls}) is TorchScript (torch.jit.script): the "
                f"probe sees nothing inside it, so its activations ({', '.join(acts)}) are not measured: audit with "
                "the Python function (without @torch.jit.script)" for function, (name, cls, acts) in self.script_calls.items()]
        for name, (cls, reason) in self.unknown.items():
            if select and not _matches(name, cls, select):
                continue
            if not _covered(name, owners):
                idle = "" if name in self.ran else " (it was not called by these batches)"  # created, unused
                out.append(f"module {name or '(the model)'!r} ({cls}) {reason}{idle}{_advice(cls, reason)}")
            elif foreign := _foreign_kinds(name, cls, sites):
                out.append(_measured_through(name, cls, foreign))
        for (owner, function), reason in self.calls.items():
            if owner in self.unknown or (select and not _matches(owner, function, select)):
                continue
            out.append(f"{function}() called in {owner or 'the model'!r} {reason}")
        for name, cls in self.weights.items():
            if not select or _matches(name, cls, select):
                out.append(f"module {name or '(the model)'!r} ({cls}) was called on one of the model's parameters: those "
                           "calls are weight transforms, not activations of data, and are not measured")
        for name, (cls, dtype) in self.dtypes.items():
            if not select or _matches(name, cls, select):
                out.append(f"module {name or '(the model)'!r} ({cls}) was called on {dtype} input: not measured there "
                           "(the figures are defined for real floating-point activations)")
        acting = [(name, cls) for name, cls in self.acting.items() if not _covered(name, owners)]
        if acting and not select:
            shown = few([f"{name!r} ({cls})" for name, cls in acting])
            out.append(f"module{'s' if len(acting) > 1 else ''} {shown} of your own class{'es' if len(acting) > 1 else ''}"
                       " hold no parameters and return a tensor shaped as their input, as an activation does, but are "
                       "no recognised kind, so they are not measured: if one is an activation, register it with "
                       "deadneuron.register_activation(cls, fn) (fn: its elementwise function)")
        return out


WEIGHT_REASON = ("on one of the model's parameters (a weight transform, as softplus of a scale or sigmoid of a gate "
                 "is: its entries are no activations of data), so it is not measured")  # fmt: skip


def is_weight(z: torch.Tensor) -> bool:
    """Whether ``z`` is a parameter, or a view of one: an activation applied to it is a weight transform
    (softplus of a scale, sigmoid of a gate), as a parametrization is, not an activation of data."""
    base = z._base
    return _parameter(z) or (base is not None and _parameter(base))


def _parameter(t: torch.Tensor) -> bool:
    """``isinstance(t, nn.Parameter)`` without its Python ``__instancecheck__`` for a plain tensor (every
    activation input and matrix product asks)."""
    return type(t) is not torch.Tensor and isinstance(t, nn.Parameter)


def refuse_nested(z: torch.Tensor, name: str) -> None:
    """A UsageError for a nested (jagged) tensor reaching activation ``name``: its figures are read on
    strided tensors, and the padded equivalent with a mask gives the same figures."""
    if z.is_nested:
        raise UsageError(f"activation {name or '(the model)'!r} got a nested tensor of shape {tuple(z.shape)}: "
                         "deadneuron reads strided tensors; pad the batch (torch.nested.to_padded_tensor(x, 0.0)) "
                         "and leave the padding out with a mask (mask=... in deadneuron.audit, --mask KEY)")


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(f"{outer}.")


def _covered(name: str, owners: list[str]) -> bool:
    if name == "":
        return bool(owners)
    return any(o == name or o.startswith(name + ".") for o in owners)


def _foreign_kinds(name: str, cls: str, sites: list[tuple[str, str | None]]) -> list[str]:
    """The kinds of the functional sites inside module ``name`` that its class name does not name, where
    only functional sites cover it (a module site inside it is a recognised activation it is made of). A gated
    unit (SwiGLU, GeGLU) is no elementwise function: the function on its gate is what there is to measure."""
    inside = [kind for owner, kind in sites if owner == name or owner.startswith(f"{name}.") or name == ""]
    if any(kind is None for kind in inside) or "glu" in cls.lower():
        return []
    return sorted({kind for kind in inside if kind is not None and kind.lower() not in cls.lower()})


def _scripted_activations(name: str, m: nn.Module) -> list[str]:
    """The activation modules inside TorchScript module ``m`` (as ``ReLU '2.1'``), from their original class names."""
    found = []
    for sub_name, sub in m.named_modules():
        cls = getattr(sub, "original_name", type(sub).__name__)
        if cls in _TORCH_ACTIVATIONS or looks_like_activation(cls):
            found.append(f"{cls} {'.'.join(p for p in (name, sub_name) if p)!r}")
    return found


def _scripted_warning(name: str, cls: str, inside: list[str]) -> str:
    what = f"its activations ({few(inside)}) are" if inside else "any activation it computes is"
    return (f"module {name or '(the model)'!r} ({cls}) is TorchScript: no forward hook runs inside it, so {what} "
            "not measured: audit the Python module (before torch.jit.script)")


def _measured_through(name: str, cls: str, kinds: list[str]) -> str:
    called = ", ".join(f"{k}()" for k in kinds)
    return (
        f"module {name or '(the model)'!r} ({cls}) is not a recognised kind: it is measured only as the {called}"
        f" called inside it, whose flat region is not {cls}'s unless {cls} is that function alone, so its dead"
        f" and saturated channels may be wrong{_advice(cls, '')}"
    )


def _matches(name: str, other: str, select: Sequence[str]) -> bool:
    from deadneuron.select import matches

    return matches((name, other), select)


def _advice(cls: str, reason: str) -> str:
    if reason in (GLU_REASON, _QUANTIZED_REASON) or UNREACHED in reason:
        return ""
    return f": register it with deadneuron.register_activation({cls}, fn) (fn: its elementwise function)"
