"""A function compiled with ``@torch.jit.script`` (a fused bias-GELU, as Megatron and older Hugging Face code
write it) runs as TorchScript: the probe sees nothing inside it, so its activations are not measured. The
audit names each such function the model's code calls, with the activations inside it (they were skipped
without a word); the layers around it are measured as usual."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.errors import UsageError


@torch.jit.script
def bias_gelu(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


@torch.jit.script
def gated(x: torch.Tensor) -> torch.Tensor:
    return bias_gelu(torch.zeros_like(x), x) * torch.sigmoid(x)  # a scripted call inside: inlined


@torch.jit.script
def scale(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x  # no activation: nothing to say


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8, bias=False)
        self.b = nn.Parameter(torch.zeros(8))
        self.out = nn.Linear(8, 4)
        self.act = nn.ReLU()
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = [bias_gelu(self.b, self.lin(x))][0]  # in a comprehension's scope too
        z = self.out(scale(h))
        self.seen.append(z.detach().numpy().copy())
        return self.act(z)


class Derived(Base):
    """Inherits Base's forward: the functions Base's code calls are found through the class's bases."""

    def extra(self, x: torch.Tensor) -> torch.Tensor:
        return gated(x)


@pytest.mark.parametrize("cls", [Base, Derived])
def test_scripted_functions_are_named_with_their_activations(cls: type[Base]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    batches = [torch.randn(5, 6), torch.randn(3, 6)]
    report = deadneuron.audit(model, batches, progress=False)
    named = {w.split("()")[0].removeprefix("function "): w for w in report.warnings if "TorchScript" in w}
    want = {"bias_gelu": "(tanh)", "gated": "(sigmoid, tanh)"} if cls is Derived else {"bias_gelu": "(tanh)"}
    assert set(named) == set(want), report.warnings  # `scale` computes no activation
    for function, acts in want.items():
        assert f"its activations {acts} are not measured" in named[function]
        assert f"(the model) ({cls.__name__})" not in named[function] and f"({cls.__name__})" in named[function]
    model.seen.clear()
    with torch.no_grad():
        for b in batches:
            model(b)
    z = np.concatenate(model.seen).astype(np.float64)
    site = report.sites["act"]  # the ReLU after it is measured as usual
    assert site.n == z.shape[0] == 8
    np.testing.assert_allclose(site.channel_zero, (z <= 0).mean(0), rtol=0, atol=1e-12)


def test_a_scripted_function_alone_makes_the_nothing_measured_error_say_why() -> None:
    class Only(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(bias_gelu(torch.zeros(3), x), torch.eye(3))

    with pytest.raises(UsageError) as err:
        deadneuron.audit(Only().eval(), [torch.randn(2, 3)], progress=False)
    assert "bias_gelu() called in 'the model' (Only) is TorchScript" in str(err.value)
