"""Activations written as one expression of torch calls: ``0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x**3)))``.

GELU written out (GPT-2's and BERT's reference code, minGPT's ``NewGELU``, a ``def gelu(x)`` of one's own), or
Mish as ``x * torch.tanh(F.softplus(x))``, calls a tanh, an erf or a softplus that alone is not the activation:
measured as the tanh, a channel far out on GELU's linear side reads saturated; the erf is no activation at all,
so the GELU was skipped. The source says what was written, so at such a call (`SEED_NAMES`) `Written.at` reads the
expression around it in the calling frame's source (`code.co_positions` gives its place, `ast` its shape) and
takes the largest enclosing expression that is arithmetic and elementwise torch or math calls of one local
variable ``x`` and numbers (module constants included), where ``x`` also appears outside the call. That
expression is the activation: its input is ``x`` (read from the frame), its output the tensor its last call
returns (the probe holds the site until a call made at the expression's own place in the same frame; should
anything else run first, the expression is computed again on ``x``: `WrittenActivation.fn`), and its flat
region derived from it like any kind's. It is named as the built-in kind it equals (GELU, Mish, SiLU, on a grid, to
1e-6), else by the function it is the return value of (``nonlinearity``), else by its text. The other calls
of the same expression (Mish's tanh) are no sites. What is not such an expression (a call of two variables,
one whose source cannot be read, ``self.scale * torch.tanh(x)``) is measured as before: the call alone.
Read once per call place; the frame is held only while its expression runs.

A ``torch.where`` or ``torch.maximum`` of one variable can be the activation whole: a ReLU written by hand
(``torch.where(x > 0, x, 0.1 * x)``, ``torch.maximum(x, torch.zeros_like(x))``). Such a call (`WHOLE_NAMES`) is
taken where it equals ReLU or a leaky ReLU on the grid, measured with its own output at once; any other is left
as it was (a gate reads two variables; an ELU written so stays an unknown function).
"""

from __future__ import annotations

import ast
import linecache
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy
import torch
import torch.nn.functional as F

from deadneuron.activations import ActivationKind, ActivationSpec, CustomActivation, flat_region

T = torch.Tensor
# calls an activation can be written around (an erf alone is no activation: `Part`), and calls that can be one
# whole (`torch.where(x > 0, x, 0.1 * x)`, `torch.maximum(x, torch.zeros_like(x))`: ReLUs written by hand)
WHOLE_NAMES = frozenset({"where", "maximum"})
SEED_NAMES = frozenset({"tanh", "erf", "softplus"}) | WHOLE_NAMES
SEED_SITES = SEED_NAMES | {"special_erf"}  # as the probe names torch's functions (torch.special.erf)
# elementwise functions and methods the expression may call, by name, on torch, math or numpy
_ELEMENTWISE = frozenset({
    "tanh", "erf", "softplus", "sigmoid", "exp", "pow", "sqrt", "mul", "add", "sub", "div", "abs", "square",
    "neg", "log", "log1p", "expm1", "sin", "cos", "relu", "gelu", "silu", "mish", "rsqrt", "reciprocal", "special",
    "clamp", "clip", "maximum", "minimum", "true_divide", "multiply", "expit", "erfc", "nn", "functional",
    "where", "zeros_like",
})  # fmt: skip
_MODULES = (torch, math, numpy, F, torch.nn, torch.special)
_SKIPPED = (os.path.join(torch.__path__[0], ""), os.path.join(os.path.dirname(os.path.dirname(__file__)), ""))  # torch, deadneuron
_KNOWN: tuple[tuple[ActivationSpec, Callable[[T], T]], ...] = (
    (ActivationSpec(ActivationKind.GELU, (("approximate", "none"),)), F.gelu),
    (ActivationSpec(ActivationKind.GELU, (("approximate", "tanh"),)), lambda t: F.gelu(t, approximate="tanh")),
    (ActivationSpec(ActivationKind.MISH), F.mish),
    (ActivationSpec(ActivationKind.SILU), F.silu),
)


@dataclass(frozen=True)
class WrittenActivation:
    """The expression a call belongs to: its spec and site name, the local variable that is its input, its
    function, its place in the source (lines and columns, as `code.co_positions` gives them) and whether this
    call is the first of its seed calls to run (the one measured)."""

    spec: ActivationSpec
    name: str
    var: str
    fn: Callable[[T], T]
    span: tuple[int, int, int, int]
    first: bool
    whole: bool = False  # the call is the whole expression: measured with its own output, nothing held

    def holds(self, place: tuple[int | None, ...]) -> bool:
        """Whether source place ``place`` lies inside the expression."""
        line, end_line, col, end_col = place
        if line is None or end_line is None or col is None or end_col is None:
            return False
        top, bottom, left, right = self.span
        return (top, left) <= (line, col) and (end_line, end_col) <= (bottom, right)


@dataclass
class Held:
    """A written activation whose first call ran: held until the call that makes its output (`Written.place`)."""

    written: WrittenActivation
    frame: types.FrameType
    x: T


class Written:
    """Per call place (code object, instruction), the written activation there, or None."""

    def __init__(self) -> None:
        self._places: dict[tuple[types.CodeType, int], WrittenActivation | None] = {}
        self._positions: dict[types.CodeType, list[tuple[int | None, ...]]] = {}

    def place(self) -> tuple[types.FrameType | None, tuple[int | None, ...]]:
        """The frame of the model's code making the running torch call, and the source place of that call."""
        frame = _caller()
        if frame is None:
            return None, (None, None, None, None)
        positions = self._positions.get(frame.f_code)
        if positions is None:
            positions = self._positions[frame.f_code] = list(frame.f_code.co_positions())
        i = frame.f_lasti // 2
        return frame, positions[i] if i < len(positions) else (None, None, None, None)

    def at(self) -> tuple[WrittenActivation, types.FrameType] | None:
        """The written activation the running torch call is part of, with its frame; None where it is none."""
        frame = _caller()
        if frame is None:
            return None
        key = (frame.f_code, frame.f_lasti)
        if key not in self._places:
            try:
                self._places[key] = _read(frame)
            except Exception:  # source not as parsed (edited since, generated): not read
                self._places[key] = None
        found = self._places[key]
        return None if found is None else (found, frame)


def input_of(written: WrittenActivation, frame: types.FrameType, z: T) -> T | None:
    """The expression's input in ``frame``: its variable, where it is a floating tensor shaped as ``z``."""
    x = frame.f_locals.get(written.var)
    return x if isinstance(x, torch.Tensor) and x.is_floating_point() and x.shape == z.shape else None


def _caller() -> types.FrameType | None:
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return frame


def _read(frame: types.FrameType) -> WrittenActivation | None:
    code = frame.f_code
    positions = list(code.co_positions())
    if frame.f_lasti // 2 >= len(positions):
        return None
    line, end_line, col, end_col = positions[frame.f_lasti // 2]
    if line is None or col is None:
        return None
    tree, parents = _parsed(code.co_filename)
    if tree is None:
        return None
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and (n.lineno, n.end_lineno, n.col_offset,
                 n.end_col_offset) == (line, end_line, col, end_col)), None)  # fmt: skip
    if call is None or _called_name(call) not in SEED_NAMES:
        return None
    names = _Names(frame)
    var = names.variable(call)
    if var is None:
        return None
    top: ast.expr = call
    while isinstance(parent := parents.get(top), (ast.BinOp, ast.UnaryOp, ast.Call, ast.Attribute)):
        if isinstance(parent, ast.Attribute):  # a method called on it: the call around that attribute
            grand = parents.get(parent)
            if not isinstance(grand, ast.Call) or grand.func is not parent:
                break
            parent = grand
        if names.variable(parent) != var:
            break
        top = parent
    whole = top is call and _called_name(call) in WHOLE_NAMES and _reads(call, var) >= 2
    if not whole and (top is call or not _outside(top, call, var)):
        return None
    fn = names.function(top, var)
    if fn is None:
        return None
    seeds = [n for n in _postorder(top) if isinstance(n, ast.Call) and _called_name(n) in SEED_NAMES]
    spec, name = _named(fn, top, code, parents)
    if whole and spec.kind not in (ActivationKind.RELU, ActivationKind.LEAKY_RELU):
        return None  # a where or maximum alone is taken as a ReLU written by hand only
    flat_region(spec, 0.05)  # derivable (differentiable), or raises: not taken
    span = (top.lineno, top.end_lineno or top.lineno, top.col_offset, top.end_col_offset or 0)
    return WrittenActivation(spec, name, var, fn, span, first=seeds[0] is call, whole=whole)


_FILES: dict[str, tuple[int, ast.Module | None, dict[ast.AST, ast.AST]]] = {}


def _parsed(filename: str) -> tuple[ast.Module | None, dict[ast.AST, ast.AST]]:
    lines = linecache.getlines(filename)
    key = hash(tuple(lines))
    cached = _FILES.get(filename)
    if cached is None or cached[0] != key:
        try:
            tree: ast.Module | None = ast.parse("".join(lines)) if lines else None
        except SyntaxError:
            tree = None
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)} if tree else {}
        cached = _FILES[filename] = (key, tree, parents)
    return cached[1], cached[2]


def _called_name(call: ast.Call) -> str | None:
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def _postorder(node: ast.AST) -> list[ast.AST]:
    out: list[ast.AST] = []
    for child in ast.iter_child_nodes(node):
        out += _postorder(child)
    return [*out, node]


def _reads(node: ast.AST, var: str) -> int:
    return sum(isinstance(n, ast.Name) and n.id == var for n in ast.walk(node))


def _outside(top: ast.AST, call: ast.AST, var: str) -> bool:
    """Whether ``var`` is read in ``top`` outside ``call``."""
    inside = {id(n) for n in ast.walk(call)}
    return any(isinstance(n, ast.Name) and n.id == var and id(n) not in inside for n in ast.walk(top))


class _Names:
    """The names of one frame an expression may read: its one local variable, numbers and modules of its globals."""

    def __init__(self, frame: types.FrameType) -> None:
        self._globals, self._builtins = frame.f_globals, frame.f_builtins
        self._locals = set(frame.f_code.co_varnames) | set(frame.f_code.co_cellvars) | set(frame.f_code.co_freevars)

    def _constant(self, name: str) -> Any:
        if name in self._locals:
            return None
        value = self._globals[name] if name in self._globals else self._builtins.get(name)
        ok = any(value is m for m in _MODULES) or (isinstance(value, (int, float)) and not isinstance(value, bool))
        return value if ok else None

    def variable(self, node: ast.AST) -> str | None:
        """The one local variable ``node`` reads, where it is an allowed expression of it; else None."""
        found: set[str] = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and self._constant(n.id) is None:
                if n.id not in self._locals:
                    return None
                found.add(n.id)
            elif not self._allowed(n):
                return None
        return found.pop() if len(found) == 1 else None

    def _allowed(self, n: ast.AST) -> bool:
        if isinstance(n, ast.Attribute):  # an elementwise function or method, a module, or a module's number
            return n.attr in _ELEMENTWISE or _module_constant(n, self)
        if isinstance(n, ast.Call):  # torch.tanh(...), x.pow(3): no *args or **kwargs
            return isinstance(n.func, ast.Attribute) and all(k.arg is not None for k in n.keywords) \
                and not any(isinstance(a, ast.Starred) for a in n.args)  # fmt: skip
        if isinstance(n, ast.Constant):
            return isinstance(n.value, (int, float, str)) and not isinstance(n.value, bool)
        if isinstance(n, ast.BinOp):
            return isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow))
        if isinstance(n, ast.Compare):  # where's condition: x > 0
            return all(isinstance(op, (ast.Gt, ast.GtE, ast.Lt, ast.LtE)) for op in n.ops)
        return isinstance(n, (ast.Name, ast.UnaryOp, ast.Load, ast.operator, ast.unaryop, ast.keyword, ast.cmpop))

    def function(self, node: ast.expr, var: str) -> Callable[[T], T] | None:
        """``node`` as a function of ``var``, checked elementwise and differentiable on a float64 grid."""
        namespace = {n.id: self._constant(n.id) for n in ast.walk(node) if isinstance(n, ast.Name) and n.id != var}
        body = ast.Lambda(ast.arguments([], [ast.arg(var)], None, [], [], None, []), node)
        fn = eval(compile(ast.fix_missing_locations(ast.Expression(body)), "<written>", "eval"), {"__builtins__": {}, **namespace})
        grid = torch.linspace(-8, 8, 321, dtype=torch.float64)
        out = fn(grid)
        perm = torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(0))
        if not isinstance(out, torch.Tensor) or out.shape != grid.shape \
                or not torch.allclose(fn(grid[perm]), out[perm], rtol=1e-12, atol=0):  # fmt: skip
            return None
        return fn  # type: ignore[no-any-return]


def _module_constant(node: ast.Attribute, names: _Names) -> bool:
    """``math.pi``, ``numpy.e``: a number of an allowed module."""
    return isinstance(node.value, ast.Name) and names._constant(node.value.id) is not None \
        and isinstance(getattr(names._constant(node.value.id), node.attr, None), float)  # fmt: skip


def _named(fn: Callable[[T], T], top: ast.expr, code: types.CodeType, parents: dict[ast.AST, ast.AST]) -> tuple[ActivationSpec, str]:
    grid = torch.linspace(-12, 12, 2401, dtype=torch.float64)
    with torch.no_grad():
        values = fn(grid)
        slope = float(f"{float(values[0] / grid[0]):.12g}")  # a ReLU's 0, a leaky one's negative slope
        if 0 <= slope < 1 and torch.allclose(values, F.leaky_relu(grid, slope), rtol=1e-12, atol=0):
            kind, params = (ActivationKind.RELU, ()) if slope == 0 else (ActivationKind.LEAKY_RELU, (("negative_slope", slope),))
            return ActivationSpec(kind, (*params, ("written", _text(top)))), kind.value
        for spec, known in _KNOWN:
            if torch.allclose(values, known(grid), rtol=1e-6, atol=1e-9):
                return ActivationSpec(spec.kind, (*spec.params, ("written", _text(top))), spec.prelu_weight), spec.kind_name
    returned = isinstance(parents.get(top), ast.Return) and code.co_name not in ("forward", "<lambda>")
    name = code.co_name if returned else "written"
    return ActivationSpec(ActivationKind.CUSTOM, custom=CustomActivation(code.co_name if returned else _text(top), fn)), name


def _text(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 48 else text[:45] + "..."
