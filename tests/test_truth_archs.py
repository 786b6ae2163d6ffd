"""Truth on more architectures: each audit equals an oracle computed with numpy from the pre-activations
the model produced (stored by forward hooks of the test's own, not deadneuron's), or says why it cannot.

Covered: a mixture of experts whose expert gets no token; Hugging Face T5, whose batches hold an encoder
mask and a decoder mask.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron

DELTA = 0.05


def _left_tail(fn: Any) -> float:
    """The flat left tail of ``fn``: |f'(z)| <= DELTA * max |f'| from -inf up to this z (autograd on a grid)."""
    z = torch.linspace(-40, 40, 400001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(fn(z).sum(), z)
    d = d.detach().abs()
    first_steep = int(torch.nonzero(d > DELTA * d.max())[0])
    return float(z.detach()[first_steep - 1])


TAILS = {"silu": _left_tail(F.silu), "gelu": _left_tail(F.gelu)}


def flat_region(kind: str, z: np.ndarray) -> np.ndarray:
    return (z <= 0 if kind == "relu" else z <= TAILS[kind]) & np.isfinite(z)


class Calls:
    """The (z, a) of every call of the model's activation modules, from the test's own hooks."""

    def __init__(self, model: nn.Module, types: tuple[type, ...]) -> None:
        self.calls: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._z: dict[str, np.ndarray] = {}
        self._handles = []
        for name, m in model.named_modules():
            if isinstance(m, types):
                self._handles.append(m.register_forward_pre_hook(self._pre(name)))
                self._handles.append(m.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Any:
        return lambda m, args: self._z.__setitem__(name, _np(args[0]))

    def _post(self, name: str) -> Any:
        return lambda m, args, out: self.calls[name].append((self._z[name], _np(out)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64, copy=True).numpy()


def recorded(model: nn.Module, batches: Sequence[Any], types: tuple[type, ...]) -> Calls:
    calls = Calls(model.eval(), types)
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        calls.close()
    return calls


def oracle(calls: Sequence[tuple[np.ndarray, np.ndarray]], axis: int, kind: str,
           valid: Sequence[np.ndarray] | None = None) -> dict[str, Any]:  # fmt: skip
    zs, acts = [], []
    for k, (z, a) in enumerate(calls):
        z, a = np.moveaxis(z, axis, -1), np.moveaxis(a, axis, -1)
        if valid is not None:
            z, a = z[valid[k]], a[valid[k]]
        zs.append(z.reshape(-1, z.shape[-1]))
        acts.append(a.reshape(-1, a.shape[-1]))
    z, a = np.concatenate(zs), np.concatenate(acts)
    n = z.shape[0]
    flat = flat_region(kind, z).sum(0)
    return {
        "channels": z.shape[1], "n": n, "zero": (a == 0).sum(0), "flat": flat,
        "dead": tuple(np.flatnonzero(flat == n).tolist()),
        "dormant": tuple(np.flatnonzero((flat < n) & (flat >= 0.99 * n)).tolist()),
        "mean": a.mean(0), "std": a.std(0), "min": a.min(0), "max": a.max(0),
    }  # fmt: skip


def assert_site(site: deadneuron.SiteHealth, want: dict[str, Any], kind: str, *, guessed_ok: bool = False) -> None:
    where = site.name
    assert guessed_ok or site.axis_source != "guessed", f"{where}: channel axis guessed"
    assert site.channels == want["channels"], f"{where}: channels"
    assert site.n == want["n"], f"{where}: n"
    n = site.n
    np.testing.assert_array_equal(np.rint(np.asarray(site.channel_zero) * n), want["zero"], err_msg=f"{where}: zero")
    flat = np.rint(np.asarray(site.channel_flat) * n)
    tolerance = 0 if kind == "relu" else max(2, 0.01 * n)  # a smooth threshold derived on a grid
    assert np.abs(flat - want["flat"]).max() <= tolerance, f"{where}: flat {flat} vs {want['flat']}"
    assert tuple(site.dead_channels) == want["dead"], f"{where}: dead"
    assert tuple(site.dormant_channels) == want["dormant"], f"{where}: dormant"
    assert sum(site.channel_nonfinite) == 0
    for stat in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(site, f"channel_{stat}"), want[stat], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{where}: {stat}")  # fmt: skip


def audit(model: nn.Module, batches: Sequence[Any], **kwargs: Any) -> deadneuron.Report:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = deadneuron.audit(model, batches, progress=False, **kwargs)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items()), "the audit changed the model's state"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"
    return report


def by_module(report: deadneuron.Report, module: str) -> list[deadneuron.SiteHealth]:
    return [s for s in report.sites.values() if s.module == module]


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


# --- a mixture of experts: an expert that gets no token ----------------------------------------------


class MoE(nn.Module):
    """Top-1 routing over Linear + GELU experts; the router never picks the last expert."""

    def __init__(self, d: int = 6, hidden: int = 8, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                     for _ in range(experts))  # fmt: skip
        with torch.no_grad():
            self.router.bias[-1] = -100.0
            self.experts[0][0].bias[3] = -50.0  # planted: dead wherever expert 0 runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        choice = self.router(tokens).argmax(-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            picked = (choice == e).nonzero().squeeze(-1)
            out.index_add_(0, picked, expert(tokens[picked]))
        return out.view_as(x)


def test_moe_experts_match_the_oracle_and_an_expert_without_tokens_is_named() -> None:
    torch.manual_seed(0)
    model, g = MoE(), gen()
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(3, 4, 6, generator=g)]
    calls = recorded(model, batches, (nn.GELU,))
    report = audit(model, batches)
    for name in ("experts.0.1", "experts.1.1"):
        assert sum(z.shape[0] for z, _ in calls.calls[name]) > 0
        (site,) = by_module(report, name)
        assert_site(site, oracle(calls.calls[name], -1, "gelu"), "gelu")
    assert 3 in by_module(report, "experts.0.1")[0].dead_channels
    assert all(z.shape[0] == 0 for z, _ in calls.calls["experts.2.1"])  # the oracle: it never saw a token
    (empty,) = by_module(report, "experts.2.1")
    assert empty.n == 0 and empty.dead_channels == () and empty.dormant_channels == ()
    named = [w for w in report.meta["warnings"] if empty.name in w]
    assert named and "no element" in named[0], report.meta["warnings"]


# --- Hugging Face T5: an encoder mask and a decoder mask ---------------------------------------------


def _t5(ff: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, feed_forward_proj=ff, dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0)  # fmt: skip
    return transformers.T5Model(config).eval()


def _right_padded(n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 40, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # at least one real token per sample, the rest padding at random
        mask[i, 1 + int(torch.randint(0, length - 1, (1,), generator=g)):] = 0
    return ids, mask


def _t5_batches(lengths: Sequence[tuple[int, int, int]]) -> list[dict[str, torch.Tensor]]:
    g, out = gen(), []
    for n, enc, dec in lengths:
        ids, mask = _right_padded(n, enc, g)
        dids, dmask = _right_padded(n, dec, g)
        out.append({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dids, "decoder_attention_mask": dmask})
    return out


def _t5_oracle(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    calls = recorded(model, batches, (nn.ReLU,))
    out = {}
    for name, cs in calls.calls.items():
        key = "attention_mask" if name.startswith("encoder.") else "decoder_attention_mask"
        out[name] = oracle(cs, -1, "relu", [b[key].bool().numpy() for b in batches])
    return out


@pytest.mark.parametrize("lengths", [[(2, 5, 5), (3, 6, 6)], [(2, 5, 4), (3, 6, 3)]], ids=["same-length", "other-length"])
def test_t5_decoder_padding_is_never_masked_by_the_encoders_mask_without_a_word(lengths: list[tuple[int, int, int]]) -> None:
    model = _t5("relu")
    batches = _t5_batches(lengths)
    want = _t5_oracle(model, batches)
    report = audit(model, batches)
    for name, figures in want.items():
        if name.startswith("encoder."):
            assert_site(by_module(report, name)[0], figures, "relu")
    decoder = [s for s in report.sites.values() if s.module.startswith("decoder.")]
    assert decoder
    wrong = [s.name for s in decoder if s.n != want[s.module]["n"]]
    warned = [w for w in report.meta["warnings"] if "decoder_attention_mask" in w]
    assert not wrong or warned, f"decoder sites {wrong} counted under the wrong mask without a warning"


def test_t5_each_side_audited_with_its_own_mask_matches_the_oracle() -> None:
    model = _t5("relu")
    batches = _t5_batches([(2, 5, 5), (3, 6, 4)])
    want = _t5_oracle(model, batches)
    encoder = audit(model, batches, select=["encoder.*"])
    decoder = audit(model, batches, select=["decoder.*"], mask="decoder_attention_mask")
    for name, figures in want.items():
        side = encoder if name.startswith("encoder.") else decoder
        (site,) = by_module(side, name)
        assert site.masked
        assert_site(site, figures, "relu")


def test_t5_gated_feed_forward_block_is_not_named_as_an_activation() -> None:
    """T5's gated-gelu: its tanh-approximated GELU (Hugging Face's NewGELUActivation) is measured as that GELU
    (`deadneuron.known_modules`); the feed-forward block around it (T5DenseGatedActDense: two Linear layers,
    dropout, the activation) is no activation, and registering it as one would measure the whole block."""
    model = _t5("gated-gelu")
    report = audit(model, _t5_batches([(2, 5, 4)]))
    acts = {n for n, m in model.named_modules() if type(m).__name__ == "NewGELUActivation"}
    blocks = {n for n, m in model.named_modules() if type(m).__name__ == "T5DenseGatedActDense"}
    assert acts and blocks
    assert all(report.sites[name].label == "gelu(approximate=tanh)" for name in acts)
    assert not [n for n in report.sites if "tanh" in n]
    warned = report.meta["warnings"]
    assert not any(f"module {name!r}" in w for name in blocks | acts for w in warned), warned
