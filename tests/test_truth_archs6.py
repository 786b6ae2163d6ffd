"""Truth on model kinds a researcher brings, each audit against a numpy oracle over the tensors the model
produced (stored by the test's own forward hooks): a Llama decoder (Hugging Face, SiLU-gated MLP, RMSNorm)
under left and right padding, a Swin block written by hand (channel-last maps, shifted windows), a
wav2vec2 audio encoder (Hugging Face: strided Conv1d + GroupNorm, then a transformer layer) on padded
audio, and a Mamba block written by hand (causal depthwise Conv1d sliced to length, SiLU on both branches).

Continued in tests/test_truth_archs6b.py (DiT, a top-2 mixture of experts, in-place and positional
activations) and tests/test_truth_archs6c.py (positions reordered before a layer: a bidirectional Mamba, a
Swin MLP in its rolled frame), which share the oracle written here. The oracle covers what tests/test_truth_archs.py's
does, plus the channel axis the site took and flat regions of more kinds, read exactly where the kind's
flat region has an exact edge and within a narrow band around the edge of a smooth one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from tests.test_truth_archs import _left_tail, _np, audit, by_module, gen, recorded

BAND = 1e-3  # around the edge of a smooth kind's flat region, derived on a grid of step 2e-4
TAILS = {"silu": _left_tail(F.silu), "gelu": _left_tail(F.gelu),
         "gelu_tanh": _left_tail(lambda z: F.gelu(z, approximate="tanh"))}  # fmt: skip
EXACT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: z <= 0,
    "leaky": lambda z: z <= 0,  # a slope <= 0.05 of the positive side's: flat
    "relu6": lambda z: (z <= 0) | (z >= 6),
    "hardswish": lambda z: z <= -3,
    "none": lambda z: np.zeros(z.shape, bool),  # a leaky slope above 0.05: nowhere flat
}


def flat_bounds(kind: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (last dim), the flat count with the edge at its lowest and highest place."""
    if kind in EXACT:
        flat = EXACT[kind](z).sum(0)
        return flat, flat
    return (z <= TAILS[kind] - BAND).sum(0), (z <= TAILS[kind] + BAND).sum(0)


def figures(calls: Sequence[tuple[np.ndarray, np.ndarray]], axis: int, kind: str,
            valid: Sequence[np.ndarray] | None = None) -> dict[str, Any]:  # fmt: skip
    """What the audit must report for one site, from the (z, a) of its calls, ``valid`` True at data."""
    zs, acts = [], []
    for k, (z, a) in enumerate(calls):
        z, a = np.moveaxis(z, axis, -1), np.moveaxis(a, axis, -1)
        if valid is not None:
            z, a = z[valid[k]], a[valid[k]]
        zs.append(z.reshape(-1, z.shape[-1]))
        acts.append(a.reshape(-1, a.shape[-1]))
    z, a = np.concatenate(zs), np.concatenate(acts)
    n = z.shape[0]
    lo, hi = flat_bounds(kind, z)
    return {"axis": axis % calls[0][0].ndim, "channels": z.shape[1], "n": n, "zero": (a == 0).sum(0), "flat": (lo, hi),
            "dead": (set(np.flatnonzero(lo == n)), set(np.flatnonzero(hi == n))),
            "dormant": (set(np.flatnonzero((lo < n) & (lo >= 0.99 * n))), set(np.flatnonzero((hi < n) & (hi >= 0.99 * n)))),
            "mean": a.mean(0), "std": a.std(0), "min": a.min(0), "max": a.max(0)}  # fmt: skip


def check(site: deadneuron.SiteHealth, want: dict[str, Any]) -> None:
    """The site's figures are the oracle's: channel axis (derived, not guessed), n, zeros and flat counts per
    channel, dead and dormant channels, moments and ranges."""
    where = site.name
    assert site.axis_source != "guessed", f"{where}: channel axis guessed"
    assert site.channel_axis == want["axis"], f"{where}: channel axis {site.channel_axis}, want {want['axis']}"
    assert (site.channels, site.n) == (want["channels"], want["n"]), f"{where}: channels, n"
    n = site.n
    np.testing.assert_array_equal(np.rint(np.asarray(site.channel_zero) * n), want["zero"], err_msg=f"{where}: zero")
    flat = np.rint(np.asarray(site.channel_flat) * n)
    lo, hi = want["flat"]
    assert ((lo <= flat) & (flat <= hi)).all(), f"{where}: flat {flat}, want {lo}..{hi}"
    for key in ("dead", "dormant"):
        got, (least, most) = set(getattr(site, f"{key}_channels")), want[key]
        assert least <= got <= most, f"{where}: {key} {sorted(got)}, want {sorted(least)}..{sorted(most)}"
    assert sum(site.channel_nonfinite) == 0
    for stat in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(site, f"channel_{stat}"), want[stat], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{where}: {stat}")  # fmt: skip


class Outputs:
    """The output of every call of the named modules, copied when it is made (before an in-place op
    after it can overwrite it), from the test's own forward hooks."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.out: dict[str, list[np.ndarray]] = defaultdict(list)
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str) -> Any:
        return lambda m, args, out: self.out[name].append(_np(out))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def outputs(model: nn.Module, batches: Sequence[Any], names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    kept = Outputs(model.eval(), names)
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        kept.close()
    return kept.out


def applied(fn: Callable[[torch.Tensor], torch.Tensor], zs: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(z, fn(z)) per call, fn applied in float32 as the model did (float64 would move a SiLU's underflow)."""
    return [(z, _np(fn(torch.from_numpy(z).float()))) for z in zs]


# --- Llama (Hugging Face): SiLU-gated MLP, RMSNorm, left and right padding -----------------------------


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      mlp_bias=True, pad_token_id=0)  # fmt: skip
    model = transformers.LlamaModel(config).eval()
    with torch.no_grad():
        model.layers[0].mlp.gate_proj.bias[3] = -50.0  # planted: dead on every token
    return model


def _padded(n: int, length: int, *, left: bool, g: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # sample i keeps at least one token
        k = int(torch.randint(0, length - 1, (1,), generator=g)) if i else length - 1
        if left:
            mask[i, :k] = 0
        else:
            mask[i, length - k:] = 0
    ids = torch.randint(1, 50, (n, length), generator=g).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def test_llama_gated_silu_left_and_right_padding_match_the_oracle() -> None:
    model, g = _llama(), gen()
    batches = [_padded(2, 5, left=True, g=g), _padded(3, 7, left=False, g=g), _padded(2, 6, left=True, g=g)]
    from transformers.activations import SiLUActivation

    calls = recorded(model, batches, (SiLUActivation, nn.SiLU)).calls
    report = audit(model, batches)
    valid = [b["attention_mask"].bool().numpy() for b in batches]
    assert sorted(calls) == ["layers.0.mlp.act_fn", "layers.1.mlp.act_fn"]
    assert len(report.sites) == 2
    for name, cs in calls.items():
        (site,) = by_module(report, name)
        want = figures(cs, -1, "silu", valid)
        assert want["n"] < figures(cs, -1, "silu")["n"]  # the padding is there to leave out
        assert site.masked and site.excluded == figures(cs, -1, "silu")["n"] - want["n"]
        check(site, want)
        assert site.axis_source == "producer"  # gate_proj, a Linear
    assert 3 in by_module(report, "layers.0.mlp.act_fn")[0].dead_channels
    assert report.meta["warnings"] == []


# --- Swin, by hand: channel-last (B, H, W, C) maps, torch.roll, window partition, patch merging -------


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w * w, c)


def _unwindow(win: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    x = win.view(b, h // w, wd // w, w, w, win.shape[-1]).permute(0, 1, 3, 2, 4, 5).contiguous()
    return x.view(b, h, wd, -1)


class SwinBlock(nn.Module):
    """Pre-norm window attention on a shifted grid, then a GELU MLP, on (B, H, W, C) maps. ``probe``: a ReLU
    reading the attention branch straight out of the window reversal and the roll back."""

    def __init__(self, c: int, *, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.attn = nn.LayerNorm(c), nn.MultiheadAttention(c, 2, batch_first=True)
        self.probe = nn.ReLU()
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.shift
        win = _windows(torch.roll(self.norm1(x), shifts=(-s, -s), dims=(1, 2)), self.window)
        win = self.attn(win, win, win, need_weights=False)[0]
        x = x + self.probe(torch.roll(_unwindow(win, self.window, b, h, w), shifts=(s, s), dims=(1, 2)))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Swin(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.b1, self.b2 = SwinBlock(c, window=3, shift=0), SwinBlock(c, window=3, shift=1)
        self.merge_norm, self.reduce = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)
        self.b3 = SwinBlock(2 * c, window=3, shift=0)
        with torch.no_grad():
            self.b1.fc1.bias[5] = self.b3.fc1.bias[7] = -50.0  # planted

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.embed(img).permute(0, 2, 3, 1)))
        merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.b3(self.reduce(self.merge_norm(merged)))


def test_swin_channel_last_shifted_windows_match_the_oracle() -> None:
    torch.manual_seed(0)
    model, g = Swin(), gen()
    # the first batch's maps are (2, 6, 6, 6): H == W == C, only the ops can tell the channel dim
    batches = [torch.randn(2, 3, 12, 12, generator=g), torch.randn(3, 3, 12, 24, generator=g)]
    calls = recorded(model, batches, (nn.GELU, nn.ReLU)).calls
    report = audit(model, batches)
    assert len(calls) == len(report.sites) == 6
    for name, cs in calls.items():
        (site,) = by_module(report, name)
        check(site, figures(cs, 3, "gelu" if name.endswith("act") else "relu"))
    assert 5 in by_module(report, "b1.act")[0].dead_channels and 7 in by_module(report, "b3.act")[0].dead_channels


# --- wav2vec2 (Hugging Face): strided Conv1d + GroupNorm(C, C) + GELU, then a transformer layer ---------


def _wav2vec2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, conv_dim=(6, 6, 6), conv_stride=(5, 2, 2),
                                         conv_kernel=(10, 3, 3), feat_extract_norm="group", num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2, apply_spec_augment=False, hidden_dropout=0.0,
                                         attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                                         layerdrop=0.0)  # fmt: skip
    return transformers.Wav2Vec2Model(config).eval()


def _audio(g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for n, samples in ((2, 400), (3, 480)):
        mask = torch.ones(n, samples, dtype=torch.long)
        for i in range(1, n):  # sample 0 full length, the others shorter, zero-padded
            mask[i, samples - 55 * i:] = 0
        out.append({"input_values": torch.randn(n, samples, generator=g) * mask, "attention_mask": mask})
    return out


def _wav2vec2_calls(model: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, list[Any]]:
    from transformers.activations import GELUActivation

    calls = recorded(model, batches, (GELUActivation,)).calls
    assert len(calls) == 5  # three conv layers, the positional conv, the feed-forward
    return calls


def _axis(name: str) -> int:
    return -1 if "feed_forward" in name else 1  # the convs' (N, C, T), the feed-forward's (N, T, C)


def test_wav2vec2_sample_mask_fits_no_site_and_says_so() -> None:
    """The attention_mask is per audio sample, (N, samples); no activation has that length: the audit counts the
    padding (the figures are the unmasked oracle's) and says that it did."""
    model, batches = _wav2vec2(), _audio(gen())
    calls = _wav2vec2_calls(model, batches)
    report = audit(model, batches)
    for name, cs in calls.items():
        (site,) = by_module(report, name)
        assert not site.masked
        check(site, figures(cs, _axis(name), "gelu"))
    assert any("attention_mask" in w and "applied at no activation site" in w for w in report.meta["warnings"])


def test_wav2vec2_frame_mask_leaves_padding_out_where_it_fits() -> None:
    """The same padding given at the frames' rate (the model's own downsampling of the mask): the sites at that
    length (the last conv, the positional conv, the feed-forward) equal the oracle without the padded frames;
    the two earlier convs, longer, are not masked, and the report's mask line counts them out."""
    model, batches = _wav2vec2(), _audio(gen())
    calls = _wav2vec2_calls(model, batches)

    def frames(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        length = int(model._get_feat_extract_output_lengths(batch["input_values"].shape[1]))
        return model._get_feature_vector_attention_mask(length, batch["attention_mask"])

    report = audit(model, batches, mask=frames)
    valid = [frames(b).numpy() for b in batches]
    assert all(v.shape == (v.shape[0], calls["encoder.layers.0.feed_forward.intermediate_act_fn"][k][0].shape[1])
               for k, v in enumerate(valid))  # fmt: skip
    masked = 0
    for name, cs in calls.items():
        (site,) = by_module(report, name)
        fits = cs[0][0].shape[1 if _axis(name) == -1 else 2] == valid[0].shape[1]
        assert site.masked == fits, name
        want = figures(cs, _axis(name), "gelu", valid if fits else None)
        if fits:
            assert want["n"] < figures(cs, _axis(name), "gelu")["n"]
        check(site, want)
        masked += fits
    assert masked == 3
    from deadneuron.render.markdown import mask_text

    assert f"masked 3 of {len(report.sites)} sites" in str(mask_text(report))


# --- Mamba, by hand: causal depthwise Conv1d sliced to length, SiLU on both branches, gate -------------


class MambaBlock(nn.Module):
    def __init__(self, d: int = 6, expand: int = 2, kernel: int = 4) -> None:
        super().__init__()
        inner = d * expand
        self.in_proj = nn.Linear(d, 2 * inner)
        self.conv = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1)
        self.x_proj, self.out_proj = nn.Linear(inner, inner), nn.Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h, gate = self.in_proj(x).chunk(2, dim=-1)
        h = F.silu(self.conv(h.transpose(1, 2))[..., :length]).transpose(1, 2)
        return x + self.out_proj(self.x_proj(h) * F.silu(gate))


class Mamba(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.b1, self.b2 = MambaBlock(), MambaBlock()
        with torch.no_grad():
            self.b1.conv.bias[2] = -50.0  # planted: the conv branch's channel 2
            self.b2.in_proj.bias[12 + 4] = -50.0  # planted: the gate's channel 4

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(self.emb(input_ids)))


def test_mamba_conv_and_gate_branches_match_the_oracle() -> None:
    torch.manual_seed(0)
    model, g = Mamba(), gen()
    # the second batch's length is the inner width (12): (N, C, L) and (N, L, C) look alike
    batches = [_padded(2, 5, left=False, g=g), _padded(3, 12, left=False, g=g)]
    valid = [b["attention_mask"].bool().numpy() for b in batches]
    kept = outputs(model, batches, ["b1.conv", "b1.in_proj", "b2.conv", "b2.in_proj"])
    report = audit(model, batches)
    assert len(report.sites) == 4
    for block in ("b1", "b2"):
        conv = [z[..., :b["input_ids"].shape[1]] for z, b in zip(kept[f"{block}.conv"], batches, strict=True)]
        gate = [z[..., 12:] for z in kept[f"{block}.in_proj"]]
        sites = sorted(by_module(report, block), key=lambda s: s.name)  # call order: the conv branch first
        assert [s.kind for s in sites] == ["silu", "silu"] and all(s.masked for s in sites)
        check(sites[0], figures(applied(F.silu, conv), 1, "silu", valid))
        check(sites[1], figures(applied(F.silu, gate), -1, "silu", valid))
    assert 2 in sorted(by_module(report, "b1"), key=lambda s: s.name)[0].dead_channels
    assert 4 in sorted(by_module(report, "b2"), key=lambda s: s.name)[1].dead_channels
