"""What an audit does when the model's forward pass fails on a batch: one line naming the batch, the last site
and module run, and what the error likely means (`forward_error`); or, where the model computes gradients in
its forward (forces as -dE/dx, a physics-informed loss, a gradient penalty: ``torch.autograd.grad`` inside
``torch.enable_grad()``), which ``torch.inference_mode`` forbids whatever the grad mode, the pass starts again
under ``torch.no_grad`` (`NeedsAutograd`), which lets it: the first batch is fed again, the rest follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from deadneuron.errors import AuditRuntimeError
from deadneuron.probe.masks import batch_shapes

if TYPE_CHECKING:
    from deadneuron.probe import Recorder

# what autograd says when a forward pass that takes gradients runs under torch.inference_mode
_NO_AUTOGRAD = ("does not require grad", "does not have a grad_fn", "Inference tensors cannot be saved for backward",
                "inference tensor")  # fmt: skip

AUTOGRAD_NOTE = ("the model computes gradients in its forward pass (its first batch failed under torch.inference_mode, "
                 "which forbids them): audited under torch.no_grad, where its torch.enable_grad() blocks run")  # fmt: skip


class NeedsAutograd(Exception):
    """The first batch's forward pass needs autograd: ``batch`` (fed again), then ``rest`` (not yet taken)."""

    def __init__(self, batch: Any, rest: Iterator[Any]) -> None:
        super().__init__("the forward pass needs autograd")
        self.batch, self.rest = batch, rest


def needs_autograd(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a forward pass under torch.inference_mode, says that autograd was missing."""
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in _NO_AUTOGRAD)


def forward_error(exc: Exception, rec: Recorder, index: int, batch: Any) -> AuditRuntimeError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f"after site {rec.last_site!r}" if rec.last_site else "before any activation site ran"
    module = f", last module run {rec.last_module!r}" if rec.last_module else ""
    hint = ""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        # the first element alone was fed: a model of several inputs, or of a list of per-sample tensors (a
        # detection model's images), fails on it with an error about shapes or arguments that does not say so
        hint = (f" (a {type(batch).__name__} batch feeds its first element alone, the rest being targets: for a model "
                "of several inputs, or of the whole list (per-sample images), yield dicts of keyword arguments, e.g. "
                "{'images': [...]})")
    return AuditRuntimeError(
        f"forward pass failed on batch {index} (input {batch_shapes(batch)}) {where}{module}: "
        f"{type(exc).__name__}: {first_line}{hint}"
    )


__all__ = ["AUTOGRAD_NOTE", "NeedsAutograd", "forward_error", "needs_autograd"]
