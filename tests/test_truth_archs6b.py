"""Truth on model kinds a researcher brings, continued (the oracle is tests/test_truth_archs6.py's): a DiT
block (adaLN: SiLU on a (B, D) conditioning vector modulating (B, T, D) tokens), a top-2 mixture of experts
(tokens picked per expert by index_select and by gather), and activations applied in place (ReLU6, Hardswish,
SiLU modules with inplace=True, their functional forms with inplace given by position) beside F.leaky_relu
whose negative_slope is given by position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.test_truth_archs import audit, by_module, gen, recorded
from tests.test_truth_archs6 import _padded, applied, check, figures, outputs

# --- DiT: adaLN modulation, sites of rank 2 and 3 in one model ----------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, dim=1)
        h = _modulate(self.norm1(x), s1, g1)
        x = x + a1.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]
        return x + a2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, g2))


class DiT(nn.Module):
    """Patches of an image as tokens; the conditioning: a timestep MLP plus a class embedding."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 2, stride=2)
        self.t = nn.Sequential(nn.Linear(4, d), nn.SiLU(), nn.Linear(d, d))
        self.y = nn.Embedding(5, d)
        self.blocks = nn.ModuleList(DiTBlock(d) for _ in range(2))
        self.final = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        with torch.no_grad():
            self.t[2].bias[1] = -50.0  # planted: conditioning channel 1 is far negative for every sample
            self.y.weight[:, 1] = 0.0
            self.blocks[1].mlp[0].bias[9] = -50.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        c = self.t(t) + self.y(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final(c).chunk(2, dim=1)
        return _modulate(h, shift, scale)


def test_dit_conditioning_and_token_sites_match_the_oracle() -> None:
    torch.manual_seed(0)
    model, g = DiT(), gen()
    # the second batch: 8 samples of width 8 ((B, D) square), 16 tokens of MLP width 16 ((B, T, 2D) square)
    batches = [{"x": torch.randn(n, 3, s, s, generator=g), "t": torch.randn(n, 4, generator=g),
                "y": torch.randint(0, 5, (n,), generator=g)} for n, s in ((3, 4), (8, 8))]  # fmt: skip
    calls = recorded(model, batches, (nn.SiLU, nn.GELU)).calls
    report = audit(model, batches)
    assert len(calls) == len(report.sites) == 6
    for name, cs in calls.items():
        (site,) = by_module(report, name)
        token = name.endswith("mlp.1")
        assert len(site.shape) == (3 if token else 2)
        check(site, figures(cs, -1, "gelu_tanh" if token else "silu"))
    for name in ("blocks.0.ada.0", "blocks.1.ada.0", "final.0"):
        assert 1 in by_module(report, name)[0].dead_channels
    assert 9 in by_module(report, "blocks.1.mlp.1")[0].dead_channels


# --- a top-2 mixture of experts: tokens picked by index_select and by gather ---------------------------


class Top2(nn.Module):
    """Experts are Linear + ReLU modules; each takes the tokens routed to it by index_select."""

    def __init__(self, d: int = 6, hidden: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                     for _ in range(experts))  # fmt: skip
        with torch.no_grad():
            self.experts[1][0].bias[2] = -50.0  # planted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weight, choice = self.router(tokens).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(choice == e)
            out.index_add_(0, rows, expert(torch.index_select(tokens, 0, rows)) * weight[rows, slot, None])
        return out.view_as(x)


class Top2Batched(nn.Module):
    """Experts as stacked weights; each expert's tokens gathered along dim 0, one ReLU module for all."""

    def __init__(self, d: int = 6, hidden: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.w = nn.Parameter(torch.randn(experts, d, hidden, generator=torch.Generator().manual_seed(2)) * 0.5)
        self.b = nn.Parameter(torch.zeros(experts, hidden))
        self.act = nn.ReLU()
        with torch.no_grad():
            self.b[3, 6] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        choice = self.router(tokens).topk(2, dim=-1).indices
        out = []
        for e in range(self.w.shape[0]):
            rows = (choice == e).any(-1).nonzero().squeeze(-1)
            picked = tokens.gather(0, rows[:, None].expand(-1, tokens.shape[-1]))
            out.append(self.act(picked @ self.w[e] + self.b[e]).sum(0))
        return torch.stack(out)


class MoENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.moe, self.batched = Top2(), Top2Batched()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.batched(h + self.moe(h))


def test_top2_experts_match_the_oracle_and_padding_routed_with_the_tokens_is_named() -> None:
    """Routing flattens the (N, L) tokens and picks them by index: the attention_mask fits no expert (or, read as
    the flattened rows where an expert took as many, fits rows picked in another order: not applied), so the
    padding is counted there (the figures are those of every token routed, padding included) and a warning says
    so."""
    torch.manual_seed(0)
    model, g = MoENet(), gen()
    batches = [_padded(2, 5, left=False, g=g), _padded(3, 7, left=True, g=g)]
    calls = recorded(model, batches, (nn.ReLU,)).calls
    report = audit(model, batches)
    for e in range(4):
        name = f"moe.experts.{e}.1"
        (site,) = by_module(report, name)
        assert sum(z.shape[0] for z, _ in calls[name]) == site.n > 0  # every routed token, padding included
        check(site, figures(calls[name], -1, "relu"))
    shared = calls["batched.act"]  # one module, four calls per forward pass: one site per expert
    for e in range(4):
        (site,) = [s for s in by_module(report, "batched.act") if s.name.endswith(f"#{e}")]
        check(site, figures(shared[e::4], -1, "relu"))
    assert 2 in by_module(report, "moe.experts.1.1")[0].dead_channels
    assert report.sites["batched.act#3"].dead_channels == (6,)
    assert not any(s.masked for s in report.sites.values())
    assert any("attention_mask" in w and "applied at no activation site" in w for w in report.meta["warnings"])


# --- in-place activations, and arguments given by position ---------------------------------------------


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.a1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(inplace=True)
        self.c2, self.a2 = nn.Conv2d(6, 6, 3, padding=1), nn.Hardswish(inplace=True)
        self.c3, self.a3 = nn.Conv2d(6, 6, 1), nn.SiLU(inplace=True)
        self.c4, self.c5, self.c6 = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(6, 5)
        with torch.no_grad():
            self.c1.bias[0], self.bn1.bias[4] = 0.0, 50.0  # planted: channel 4 saturates ReLU6 (z >= 6)
            self.c2.bias[1] = self.c4.bias[2] = self.c5.bias[3] = self.c6.bias[5] = -50.0
            self.fc1.bias[3] = self.fc2.bias[1] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a3(self.c3(self.a2(self.c2(self.a1(self.bn1(self.c1(x)))))))
        h = F.hardswish(self.c4(h), True)
        h = F.silu(self.c5(h), True)
        h = F.relu6(self.c6(h), True)
        pooled = h.mean((2, 3))
        return F.leaky_relu(self.fc1(pooled), 0.01) + F.leaky_relu(self.fc2(pooled), 0.2, True)


def test_in_place_activations_and_positional_arguments_match_the_oracle() -> None:
    torch.manual_seed(0)
    model, g = InPlace(), gen()
    batches = [torch.randn(n, 3, s, s, generator=g) * 3 for n, s in ((2, 4), (3, 6))]
    with torch.no_grad():  # running statistics a trained model would have
        for b in batches:
            model.train()(b)
    modules = recorded(model, batches, (nn.ReLU6, nn.Hardswish, nn.SiLU)).calls
    kept = outputs(model, batches, ["c4", "c5", "c6", "fc1", "fc2"])
    report = audit(model, batches)
    assert len(report.sites) == 8
    check(report.sites["a1"], figures(modules["a1"], 1, "relu6"))
    check(report.sites["a2"], figures(modules["a2"], 1, "hardswish"))
    check(report.sites["a3"], figures(modules["a3"], 1, "silu"))
    check(report.sites["c4>hardswish"], figures(applied(F.hardswish, kept["c4"]), 1, "hardswish"))
    check(report.sites["c5>silu"], figures(applied(F.silu, kept["c5"]), 1, "silu"))
    check(report.sites["c6>relu6"], figures(applied(F.relu6, kept["c6"]), 1, "relu6"))
    check(report.sites["fc1>leaky_relu"], figures(applied(lambda z: F.leaky_relu(z, 0.01), kept["fc1"]), 1, "leaky"))
    check(report.sites["fc2>leaky_relu"], figures(applied(lambda z: F.leaky_relu(z, 0.2), kept["fc2"]), 1, "none"))
    assert report.sites["a1"].dead_channels == (4,) and report.sites["a1"].channel_zero[4] == 0.0
    assert 1 in report.sites["a2"].dead_channels and 3 in report.sites["c5>silu"].dead_channels
    assert 3 in report.sites["fc1>leaky_relu"].dead_channels and report.sites["fc2>leaky_relu"].dead_channels == ()
