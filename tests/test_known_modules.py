"""Hugging Face activation modules that write GELU (or QuickGELU) out of other torch calls are measured as the
function they compute, not as the tanh or sigmoid inside them: GPT-2's ``gelu_new`` read as its ``torch.tanh``
called a channel whose input stays high saturated (both of tanh's tails are flat, only GELU's left one is).

The oracle: numpy over the layer inputs the test's own hooks stored, with each function's flat tail found on a
grid from numpy's own derivative of the function (np.gradient), not by deadneuron.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron

transformers = pytest.importorskip("transformers")

DELTA = 0.05
GRID = np.linspace(-40, 40, 1600001)
ERF = np.vectorize(math.erf)


def _tail(f: Callable[[np.ndarray], np.ndarray]) -> float:
    """The last point of the flat left tail: |f'| <= DELTA max |f'|, f' from numpy's finite differences."""
    d = np.abs(np.gradient(f(GRID), GRID))
    return float(GRID[np.argmax(d > DELTA * d.max()) - 1])


TANH_GELU = _tail(lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))))
GELU = _tail(lambda x: 0.5 * x * (1 + ERF(x / math.sqrt(2))))
QUICK = _tail(lambda x: x / (1 + np.exp(-1.702 * x)))
SILU = _tail(lambda x: x / (1 + np.exp(-x)))
DEAD, HIGH = 3, 7  # planted channels: far below the flat tail, far above it (linear there)


def _gpt2(act: str) -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, activation_function=act)
    return transformers.GPT2Model(cfg).eval()


def _bert(act: str) -> nn.Module:
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  vocab_size=50, hidden_act=act)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _clip(act: str) -> nn.Module:
    cfg = transformers.CLIPTextConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      vocab_size=50, hidden_act=act)  # fmt: skip
    return transformers.CLIPTextModel(cfg).eval()


def _llama(act: str) -> nn.Module:
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, hidden_act=act, mlp_bias=True)  # fmt: skip
    return transformers.LlamaModel(cfg).eval()


# activation name -> (model, the layer whose output the activation takes, the activation's module, kind, tail)
CASES = {
    "gelu_new": (_gpt2, "h.0.mlp.c_fc", "h.0.mlp.act", "gelu(approximate=tanh)", TANH_GELU),
    "gelu_fast": (_gpt2, "h.0.mlp.c_fc", "h.0.mlp.act", "gelu(approximate=tanh)", TANH_GELU),
    "gelu_accurate": (_gpt2, "h.0.mlp.c_fc", "h.0.mlp.act", "gelu(approximate=tanh)", TANH_GELU),
    "gelu_python": (_bert, "encoder.layer.0.intermediate.dense", "encoder.layer.0.intermediate.intermediate_act_fn",
                    "gelu(approximate=none)", GELU),  # fmt: skip
    "gelu_python_tanh": (_bert, "encoder.layer.0.intermediate.dense", "encoder.layer.0.intermediate.intermediate_act_fn",
                         "gelu(approximate=tanh)", TANH_GELU),  # fmt: skip
    "quick_gelu": (_clip, "encoder.layers.0.mlp.fc1", "encoder.layers.0.mlp.activation_fn", "x*sigmoid(1.702x)", QUICK),
    "silu": (_llama, "layers.0.mlp.gate_proj", "layers.0.mlp.act_fn", "silu", SILU),  # SiLUActivation: F.silu
}


@pytest.mark.parametrize("act", list(CASES))
def test_a_hugging_face_activation_is_measured_as_the_function_it_computes(act: str) -> None:
    build, layer, site, label, tail = CASES[act]
    torch.manual_seed(0)
    model = build(act)
    producer = model.get_submodule(layer)
    with torch.no_grad():
        producer.bias[DEAD], producer.bias[HIGH] = -60.0, 60.0
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50, (3, 9), generator=g)} for _ in range(2)]
    kept: list[np.ndarray] = []
    hook = producer.register_forward_hook(lambda m, a, o: kept.append(o.detach().double().reshape(-1, o.shape[-1]).numpy()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    z = np.concatenate(kept)
    report = deadneuron.audit(model, batches, progress=False)
    s = report.sites[site]
    assert s.label == label and s.channel_axis in (-1, 2) and report.meta["warnings"] == []
    flat = z <= tail
    assert np.array_equal(np.asarray(s.channel_flat), flat.mean(0))
    assert list(s.dead_channels) == [DEAD] == list(np.flatnonzero(flat.all(0)))  # the high channel is alive
    assert not [n for n in report.sites if n.endswith((">tanh", ".tanh", ">sigmoid", ".sigmoid", "swish"))]


def test_a_subclass_that_overrides_forward_is_left_to_the_probe() -> None:
    """Its forward computes something else (GELU of its input minus 1): not matched as the class, the probe reads
    the expression the parent's forward writes (`deadneuron.probe.written`), on the tensor it is written of."""

    class ShiftedGELU(transformers.activations.NewGELUActivation):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input - 1.0)

    model = nn.Sequential(nn.Linear(4, 6), ShiftedGELU())
    report = deadneuron.audit(model.eval(), [torch.randn(5, 4)], progress=False)
    (site,) = report.sites.values()
    assert site.name != "1" and site.kind == "gelu" and "written=" in site.label
