"""Truth on more architectures, continued (the oracle is tests/test_truth_archs.py's): a diffusion-style
U-Net, a feature pyramid whose one ReLU serves every level, one ReLU on (N, C) and (N, C, H, W) tensors,
a depthwise-separable Conv1d net with channels-last permutes, a Conv3d video net with an in-place ReLU,
graph message passing by index_add_, and Hugging Face GPT-2 under left and right padding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_truth_archs import assert_site, audit, by_module, gen, oracle, recorded


class Block(nn.Module):
    """GroupNorm + SiLU + conv, twice, with a time embedding broadcast onto the map ((N, C) -> (N, C, 1, 1))."""

    def __init__(self, cin: int, cout: int, temb: int = 8) -> None:
        super().__init__()
        self.n1, self.a1, self.c1 = nn.GroupNorm(2, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2, self.a2, self.c2 = nn.GroupNorm(2, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.a1(self.n1(x))) + self.t(t)[:, :, None, None]
        return self.c2(self.a2(self.n2(h))) + self.skip(x)


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.temb = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
        self.inc, self.d1 = nn.Conv2d(3, 8, 3, padding=1), Block(8, 8)
        self.down, self.mid = nn.Conv2d(8, 16, 3, stride=2, padding=1), Block(16, 16)
        self.up, self.u1, self.u2 = nn.ConvTranspose2d(16, 16, 2, stride=2), Block(24, 8), Block(16, 8)
        self.act, self.out = nn.SiLU(), nn.Conv2d(8, 3, 1)
        with torch.no_grad():
            self.d1.n1.bias[5] = self.u2.n2.bias[3] = -50.0  # planted dead channels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        te = self.temb(t)
        h1 = self.d1(self.inc(x), te)
        m = self.mid(self.down(h1), te)
        u = self.u1(torch.cat([self.up(m), h1], dim=1), te)
        u = self.u2(torch.cat([F.interpolate(m[:, :8], scale_factor=2.0), u], dim=1), te)
        return self.out(self.act(u))


def test_unet_every_silu_matches_the_oracle() -> None:
    torch.manual_seed(0)
    model, g = UNet(), gen()
    batches = [{"x": torch.randn(n, 3, s, s, generator=g), "t": torch.randn(n, 8, generator=g)} for n, s in ((2, 8), (3, 12))]
    calls = recorded(model, batches, (nn.SiLU,))
    report = audit(model, batches)
    assert len(report.sites) == len(calls.calls) == 10
    for name, cs in calls.calls.items():
        (site,) = by_module(report, name)
        assert_site(site, oracle(cs, 1, "silu"), "silu")
    assert 5 in by_module(report, "d1.a1")[0].dead_channels and 3 in by_module(report, "u2.a2")[0].dead_channels


class Pyramid(nn.Module):
    """One ReLU after three strided convs and after a head shared by three levels; a dict and tuple out."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(c, 8, 3, stride=2, padding=1) for c in (3, 8, 8))
        self.lat = nn.ModuleList(nn.Conv2d(8, 4, 1) for _ in range(3))
        self.head, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        with torch.no_grad():
            self.head.bias[2] = self.c2.bias[1] = -50.0

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        f1 = self.act(self.c1(x))
        f2 = self.act(self.c2(f1))
        f3 = self.act(self.c3(f2))
        p3 = self.lat[2](f3)
        p2 = self.lat[1](f2) + F.interpolate(p3, size=f2.shape[-2:])
        p1 = self.lat[0](f1) + F.interpolate(p2, size=f1.shape[-2:])
        return {f"p{i}": self.act(self.head(p)) for i, p in ((1, p1), (2, p2), (3, p3))}, (p1, p2)


def test_pyramid_one_relu_per_level_matches_the_oracle() -> None:
    torch.manual_seed(0)
    model, g = Pyramid(), gen()
    batches = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(3, 3, 24, 24, generator=g)]
    calls = recorded(model, batches, (nn.ReLU,)).calls["act"]
    report = audit(model, batches)
    names = ["c1>act", "c2>act", "c3>act", "head>act#0", "head>act#1", "head>act#2"]
    assert sorted(report.sites) == sorted(names)
    for k, name in enumerate(names):  # six calls per forward pass, in this order
        assert_site(report.sites[name], oracle(calls[k::6], 1, "relu"), "relu")


class Ranks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv, self.act = nn.Linear(5, 6), nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        with torch.no_grad():
            self.fc.bias[4] = self.conv.bias[1] = -50.0

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(v)).sum() + self.act(self.conv(x)).sum()


def test_one_relu_on_2d_and_4d_tensors_is_two_sites_on_their_own_axes() -> None:
    torch.manual_seed(0)
    model, g = Ranks(), gen()
    batches = [{"x": torch.randn(n, 3, s, s, generator=g), "v": torch.randn(n, 5, generator=g)} for n, s in ((2, 5), (4, 6))]
    calls = recorded(model, batches, (nn.ReLU,)).calls["act"]
    report = audit(model, batches)
    assert_site(report.sites["fc>act"], oracle(calls[0::2], -1, "relu"), "relu")
    assert_site(report.sites["conv>act"], oracle(calls[1::2], 1, "relu"), "relu")


class Separable(nn.Module):
    """Tokens (N, L, 3) -> Linear -> depthwise Conv1d (N, C, L) -> LayerNorm channels last -> GELU -> pointwise."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.inp, self.dw = nn.Linear(3, c), nn.Conv1d(c, c, 3, padding=1, groups=c)
        self.norm, self.act, self.pw, self.act2 = nn.LayerNorm(c), nn.GELU(), nn.Conv1d(c, c, 1), nn.ReLU()
        with torch.no_grad():
            self.norm.bias[2] = self.pw.bias[4] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dw(self.inp(x).permute(0, 2, 1)).transpose(1, 2))
        return self.act2(self.pw(self.act(h).transpose(1, 2).contiguous()))


class Video(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv3d(3, 5, 3, padding=1), nn.BatchNorm3d(5)
        self.c2, self.bn2 = nn.Conv3d(5, 4, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.c2(self.act(self.bn(self.c1(x))))))


def test_separable_conv1d_with_permutes_where_length_equals_channels() -> None:
    torch.manual_seed(0)
    model, g = Separable(), gen()
    batches = [torch.randn(2, 6, 3, generator=g), torch.randn(3, 6, 3, generator=g)]  # L == C: shapes cannot tell
    calls = recorded(model, batches, (nn.GELU, nn.ReLU)).calls
    report = audit(model, batches)
    assert_site(report.sites["act"], oracle(calls["act"], -1, "gelu"), "gelu")
    assert_site(report.sites["act2"], oracle(calls["act2"], 1, "relu"), "relu")


def test_video_conv3d_batchnorm3d_inplace_relu() -> None:
    torch.manual_seed(0)
    model, g = Video(), gen()
    batches = [torch.randn(2, 3, t, 6, 6, generator=g) for t in (4, 5)]
    with torch.no_grad():  # running statistics a trained model would have
        for b in batches:
            model.train()(b)
        model.bn.bias[3] = -50.0
    calls = recorded(model, batches, (nn.ReLU,)).calls["act"]
    report = audit(model, batches)
    assert_site(report.sites["bn>act"], oracle(calls[0::2], 1, "relu"), "relu")
    assert_site(report.sites["bn2>act"], oracle(calls[1::2], 1, "relu"), "relu")
    assert 3 in report.sites["bn>act"].dead_channels


class Graph(nn.Module):
    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.lin, self.msg, self.act = nn.Linear(d, d), nn.Linear(d, d), nn.ReLU()
        with torch.no_grad():
            self.lin.bias[2] = -50.0

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        src, dst = edges
        return self.act(self.lin(x) + torch.zeros_like(x).index_add_(0, dst, self.msg(x)[src]))


def test_graph_message_passing_nodes_by_channels() -> None:
    torch.manual_seed(0)
    model, g = Graph(), gen()
    batches = [{"x": torch.randn(n, 5, generator=g), "edges": torch.randint(0, n, (2, e), generator=g)}
               for n, e in ((7, 12), (4, 6))]  # fmt: skip
    calls = recorded(model, batches, (nn.ReLU,)).calls["act"]
    assert_site(audit(model, batches).sites["act"], oracle(calls, -1, "relu"), "relu")


def _gpt2_batches(g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for n, length, left in ((2, 5, True), (3, 7, False)):
        mask = torch.ones(n, length, dtype=torch.long)
        for i in range(n):
            k = int(torch.randint(0, length - 1, (1,), generator=g))
            mask[i, :k] = 0 if left else 1
            mask[i, length - k:] = 1 if left else 0
        out.append({"input_ids": torch.randint(0, 50, (n, length), generator=g), "attention_mask": mask})
    return out


def test_gpt2_left_and_right_padding_is_left_out() -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)  # fmt: skip
    model: Any = transformers.GPT2Model(config).eval()
    batches = _gpt2_batches(gen())
    assert any(b["attention_mask"].min() == 0 for b in batches)
    from transformers.activations import GELUActivation

    calls = recorded(model, batches, (GELUActivation,)).calls
    report = audit(model, batches)
    valid = [b["attention_mask"].bool().numpy() for b in batches]
    for name, cs in calls.items():
        (site,) = by_module(report, name)
        assert site.masked
        want = oracle(cs, -1, "gelu", valid)
        assert site.channel_axis == 2  # GPT-2's Conv1D (addmm on the last dim) is a channel-last producer
        assert_site(site, want, "gelu")
        assert site.axis_source == "producer"
    assert not [f for f in report.findings if f.rule == "axis-guessed"]
