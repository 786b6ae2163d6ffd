"""The channel axis of a product of data with a weight (DESIGN section 3: "derived, never guessed silently").

A layer written as tensor ops (``x @ self.W``, ``self.W @ x + self.b``, ``torch.einsum("bld,df->blf", x,
self.W)``) produces channels as ``nn.Linear`` and a 1x1 conv do: one per output feature of the weight. So
where exactly one operand of ``matmul``/``mm``/``addmm``/``einsum`` is a weight (a parameter or a view of
one: `deadneuron.probe.coverage.is_weight`) and another is data, the result's channel dim is the one the
weight's free index gives it: the last dim for ``x @ W``, the dim before it for ``W @ x`` ((N, C, L) from
(C, C_in) @ (N, C_in, L)), for ``einsum`` the output letter of the weight's that is not summed over. A
product of data with data (attention scores), of weights with weights, or a weight with several free
letters (``bld,dhk->blhk``) fixes nothing: the axis stays unknown there, and a site reading it says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deadneuron.probe.axisrules import AxisSource, Found, Known, Producer
from deadneuron.probe.coverage import is_weight


def _operands(args: tuple[Any, ...], kwargs: Mapping[str, Any], first: int) -> tuple[Any, Any]:
    """The two matrices of ``matmul(a, b)`` (``first`` 0) or ``addmm(input, a, b)`` (``first`` 1)."""
    names = ("mat1", "mat2") if first else ("other",)
    a = args[first] if len(args) > first else kwargs.get(names[0] if first else "input")
    b = args[first + 1] if len(args) > first + 1 else kwargs.get(names[-1], kwargs.get("mat2"))
    return a, b


def _one_weight(tensors: list[Any]) -> int | None:
    """The index of the one weight among ``tensors`` where the others include data; else None."""
    weights = [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and is_weight(t)]
    data = [t for t in tensors if isinstance(t, torch.Tensor) and not is_weight(t)]
    return weights[0] if len(weights) == 1 and data else None


class MatrixProduct(Producer):
    """``matmul``, ``mm``, ``@`` (``swapped``: ``__rmatmul__``, other @ self) and ``addmm`` (``first`` 1)."""

    def __init__(self, *, first: int = 0, swapped: bool = False) -> None:
        super().__init__(last=True)
        self.first = first
        self.swapped = swapped

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
        a, b = _operands(args, kwargs, self.first)
        if self.swapped:
            a, b = b, a
        which = _one_weight([a, b])
        if which is None or not isinstance(out, torch.Tensor) or out.dim() == 0:
            return None
        w = b if which else a
        if w.dim() < 2:  # a weight vector sums its features away
            return None
        if which == 1 or out.dim() == 1:  # x @ W: W's columns; W @ x of a vector x: W's rows, the only dim
            return -1, AxisSource.PRODUCER
        return -2, AxisSource.PRODUCER  # W @ x: W's rows, before x's positions


def _implicit_output(inputs: list[str]) -> str:
    """The output subscripts einsum gives an equation without ``->``: the ellipsis, then the letters that
    appear once, in alphabetical order."""
    letters = "".join(inputs).replace(".", "")
    once = sorted(c for c in set(letters) if letters.count(c) == 1)
    return ("..." if any("..." in s for s in inputs) else "") + "".join(once)


class Einsum(Producer):
    """``torch.einsum(equation, *operands)`` (or ``(equation, [operands])``): the dim of the weight's one
    free letter in the output, counted from the end where the output's letters follow an ellipsis or
    there is none, from the front where they precede it."""

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
        return _einsum(args, out)


def _einsum(args: tuple[Any, ...], out: Any) -> Found:
    if not args or not isinstance(args[0], str) or not isinstance(out, torch.Tensor):
        return None
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    equation = args[0].replace(" ", "")
    inputs, _, output = equation.partition("->")
    subscripts = inputs.split(",")
    if len(subscripts) != len(operands):
        return None
    output = output if "->" in equation else _implicit_output(subscripts)
    which = _one_weight(operands)
    if which is None:
        return None
    free = [c for c in subscripts[which].replace(".", "") if c in output]
    if len(free) != 1:
        return None
    before, ellipsis, after = output.partition("...")
    if ellipsis and free[0] in before:
        return before.index(free[0]), AxisSource.PRODUCER
    tail = after if ellipsis else output
    return tail.index(free[0]) - len(tail), AxisSource.PRODUCER


def product_rules() -> dict[Any, Any]:
    """Each torch function and Tensor method of a matrix product, to its rule."""
    tensor: Any = torch.Tensor
    plain = MatrixProduct()
    return {torch.matmul: plain, tensor.matmul: plain, torch.mm: plain, tensor.mm: plain,
            tensor.__matmul__: plain, tensor.__rmatmul__: MatrixProduct(swapped=True),
            torch.addmm: MatrixProduct(first=1), tensor.addmm: MatrixProduct(first=1), torch.einsum: Einsum()}
