"""Padding masks (DESIGN section 3, "Masks: padding is not data"): masked statistics equal those of the
same data unpadded, and equal a numpy oracle over the valid positions of tensors the models stored."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.errors import UsageError
from deadneuron.probe.masks import BatchMask, mask_applies, masked_channel_view
from deadneuron.probe.placement import placements
from tests import zoo

# -- the pure function ----------------------------------------------------------------------------------

LAYOUTS = {  # tensor shape, channel axis, mask shape
    "tokens (N, L, C)": ((3, 5, 4), -1, (3, 5)),
    "conv (N, C, H, W)": ((2, 4, 3, 5), 1, (2, 3, 5)),
    "channels-first tokens (N, C, L)": ((3, 4, 5), 1, (3, 5)),
    "inner dims (N, L, C, D)": ((2, 5, 3, 4), 2, (2, 5)),
    "channel first (C, N, L)": ((4, 3, 5), 0, (3, 5)),
    "flattened grid (N, H*W, C)": ((2, 12, 5), 2, (2, 3, 4)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_masked_view_holds_exactly_the_valid_positions(layout: str) -> None:
    shape, axis, mask_shape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    mask = torch.rand(mask_shape, generator=g) < 0.6
    (place,) = placements(shape, axis, mask_shape)  # one placement fits each of these layouts
    view, excluded = masked_channel_view(x, axis, BatchMask.of(mask), place)
    # oracle: channel last, then numpy boolean indexing over the leading (mask) dims
    k, c = len(mask_shape), shape[axis % len(shape)]
    rest = [d for i, d in enumerate(shape) if i != axis % len(shape)]
    if tuple(rest[:k]) != mask_shape:  # positions flattened into one dim
        x_mask, k = mask.reshape(mask_shape[0], -1), 2
    else:
        x_mask = mask
    moved = np.moveaxis(x.numpy(), axis % x.dim(), k)  # (mask dims..., C, inner...)
    want = moved[x_mask.numpy()].reshape(int(mask.sum()), c, -1)  # (valid positions, C, inner)
    # any layout will do as long as each channel holds exactly its values at the valid positions
    got = view.numpy()
    assert got.shape[1] == c and got.size == want.size
    for ch in range(c):
        np.testing.assert_array_equal(np.sort(got[:, ch].ravel()), np.sort(want[:, ch].ravel()))
    assert excluded == int((~mask).sum()) * want.shape[2]


def test_a_mask_fits_only_the_leading_non_channel_dims() -> None:
    assert mask_applies((2, 7, 5), -1, (2, 7))
    assert mask_applies((2, 8, 6, 6), 1, (2, 6, 6))
    assert not mask_applies((2, 4, 7, 7), -1, (2, 7))  # attention scores (N, heads, L, L) on their last dim
    assert not mask_applies((2, 7, 6, 6, 8), -1, (2, 6, 6))  # (N, K, H, W, C): a slot dim in between
    assert not mask_applies((2, 4, 7, 7), 1, (2, 7))  # scores read on heads: which L is the query?
    assert not mask_applies((2, 7, 7, 7, 8), -1, (2, 7, 7))  # K == H == W: the positions are ambiguous
    assert mask_applies((2, 8, 7, 7), 1, (2, 7, 7))  # a square conv map is not ambiguous
    assert not mask_applies((2, 8), -1, (2, 7))  # pooled features
    assert not mask_applies((2, 6, 7), -1, (2, 7))  # a length that differs
    assert mask_applies((2, 42, 8), -1, (2, 6, 7))  # an (N, H, W) grid flattened to (N, H*W, C) tokens
    assert not mask_applies((2, 41, 8), -1, (2, 6, 7))
    x = torch.randn(2, 4, 7, 7)
    assert placements(x.shape, -1, (2, 7)) == ()
    view, excluded = masked_channel_view(x, -1, BatchMask.of(torch.ones(2, 7, dtype=torch.bool)), None)
    assert excluded is None and view.shape == (2 * 4 * 7, 7, 1)


def test_a_full_mask_reads_the_tensor_without_a_copy() -> None:
    x = torch.randn(3, 5, 4)
    view, excluded = masked_channel_view(x, -1, BatchMask.of(torch.ones(3, 5)), placements(x.shape, -1, (3, 5))[0])
    assert excluded == 0 and view.data_ptr() == x.data_ptr()


# -- a per-token model: padded batches against the same sentences unpadded ------------------------------

PAD, VOCAB, LENGTH = 0, 16, 10


class TokenModel(nn.Module):
    """Embedding -> fc1 -> ReLU(inplace), -> fc2 -> GELU and -> fc3 -> PReLU, per token. Integer weights
    make every product exact, so a padded batch and a batch of one compute bit-identical activations;
    float64, so that every statistics kernel sums in double (float32 summation is another matter).
    Planted: act1 channel 3 fires on padding only; act2 channel 5 never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.act1 = nn.Embedding(VOCAB, 8), nn.Linear(8, 12), nn.ReLU(inplace=True)
        self.fc2, self.act2 = nn.Linear(12, 12), nn.GELU()
        self.fc3, self.act3 = nn.Linear(12, 6), nn.PReLU(1, init=0.01)
        self.head = nn.Linear(18, 2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (self.emb.weight, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                      self.fc3.weight, self.fc3.bias):  # fmt: skip
                p.copy_(torch.randint(-3, 4, p.shape, generator=g).float())
            self.emb.weight[PAD] = 50.0
            self.fc1.weight[3], self.fc1.bias[3] = 1.0, -100.0
            self.fc2.weight[5], self.fc2.bias[5] = 0.0, -50.0
        self.double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        h = self.act1(self.fc1(self.emb(input_ids)))
        return self.head(torch.cat([self.act2(self.fc2(h)), self.act3(self.fc3(h))], dim=-1))


def sentences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (1, 4, 7, 2, 9, 3, 5, 8, 6, 1)]


def padded_batches(size: int = 4, *, key: str = "attention_mask") -> list[dict[str, torch.Tensor]]:
    out, sents = [], sentences()
    for start in range(0, len(sents), size):
        chunk = sents[start : start + size]
        ids = torch.full((len(chunk), LENGTH), PAD)
        mask = torch.zeros(len(chunk), LENGTH, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        out.append({"input_ids": ids, key: mask})
    return out


def unpadded_batches() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s[None]} for s in sentences()]


@pytest.mark.parametrize("compile", [True, False], ids=["fast", "eager"])
def test_padded_batches_equal_the_same_sentences_unpadded(compile: bool) -> None:
    model = TokenModel().eval()
    padded = deadneuron.audit(model, padded_batches(), progress=False, compile=compile)
    alone = deadneuron.audit(model, unpadded_batches(), progress=False, compile=compile)
    assert padded.meta["mask"] == "attention_mask" and alone.meta["mask"] is None
    assert list(padded.sites) == list(alone.sites) == ["act1", "act2", "act3"]
    tokens = sum(len(s) for s in sentences())
    for name, got in padded.sites.items():
        want = alone.sites[name]
        assert got.masked and not want.masked
        assert got.excluded == len(sentences()) * LENGTH - tokens
        assert got.n == want.n == tokens
        for field in ("channel_zero", "channel_flat", "channel_nonfinite", "dead_channels", "dormant_channels",
                      "channel_min", "channel_max"):  # fmt: skip
            assert getattr(got, field) == getattr(want, field), (name, field)
        np.testing.assert_allclose(got.channel_mean, want.channel_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.channel_std, want.channel_std, rtol=1e-12, atol=1e-12)
    assert padded.sites["act1"].dead_channels == (3,) and 5 in padded.sites["act2"].dead_channels


def test_without_a_mask_the_padding_counts() -> None:
    model = TokenModel().eval()
    report = deadneuron.audit(model, padded_batches(), progress=False, mask=None)
    assert report.meta["mask"] is None
    site = report.sites["act1"]
    assert not site.masked and site.excluded == 0 and site.n == len(sentences()) * LENGTH
    assert 3 not in site.dead_channels  # it fires on padding


def test_a_key_names_the_mask_and_a_callable_gives_it() -> None:
    model = TokenModel().eval()
    want = deadneuron.audit(model, padded_batches(), progress=False)
    by_key = deadneuron.audit(model, padded_batches(key="valid"), progress=False, mask="valid")
    by_call = deadneuron.audit(model, padded_batches(), progress=False, mask=lambda b: b["input_ids"] != PAD)
    assert (by_key.meta["mask"], by_call.meta["mask"]) == ("valid", "callable")
    for report in (by_key, by_call):
        for name, site in want.sites.items():
            assert report.sites[name].channel_flat == site.channel_flat and report.sites[name].n == site.n


def _bad(batch: dict[str, torch.Tensor], **change: Any) -> list[dict[str, Any]]:
    return [{**batch, **change}]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing key", r"mask key 'valid' is not in the batch \(its keys: 'input_ids', 'attention_mask'\)"),
        ("longer than the tokens", r"mask 'attention_mask' of shape \(4, 11\) does not match input_ids of shape \(4, 10\)"),
        ("other batch size", r"has shape \(3, 10\), which does not fit a batch of 4 samples"),
        ("not a tensor", r"the mask callable's result is a list"),
        ("not 0/1", r"holds values other than 0 and 1"),
        ("fits no site", r"mask 'callable' of shape \(4, 3, 5\) applied at no activation site"),
        ("key on tensors", r"mask key 'valid' needs dict batches, got a Tensor"),
    ],
)
def test_masks_that_do_not_fit_are_usage_errors(case: str, match: str) -> None:
    batch = padded_batches()[0]
    cases: dict[str, tuple[Any, Any]] = {
        "missing key": (_bad(batch), "valid"),
        "longer than the tokens": (_bad(batch, attention_mask=torch.ones(4, 11)), "attention_mask"),
        "other batch size": (_bad(batch), lambda b: b["attention_mask"][:3]),
        "not a tensor": (_bad(batch), lambda b: [1, 0]),
        "not 0/1": (_bad(batch), lambda b: b["attention_mask"] * 2),
        "fits no site": (_bad(batch), lambda b: torch.ones(4, 3, 5)),
        "key on tensors": ([torch.randint(1, VOCAB, (4, 10))], "valid"),
    }
    data, mask = cases[case]
    with pytest.raises(UsageError, match=match) as info:
        deadneuron.audit(TokenModel().eval(), data, progress=False, mask=mask)
    assert "\n" not in str(info.value)


def test_a_mask_error_half_way_leaves_the_model_as_it_was() -> None:
    model = TokenModel().train()
    data = [padded_batches()[0], {"input_ids": padded_batches()[1]["input_ids"]}]  # the second has no key
    with pytest.raises(UsageError, match="mask key 'attention_mask' is not in the batch"):
        deadneuron.audit(model, data, progress=False, mask="attention_mask")
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_auto_leaves_out_an_attention_mask_that_does_not_fit_and_says_so() -> None:
    batch = padded_batches()[0]
    extended = batch["attention_mask"][:, None, None, :].float()  # (N, 1, 1, L): not (N, L)
    report = deadneuron.audit(TokenModel().eval(), _bad(batch, attention_mask=extended), progress=False)
    assert report.meta["mask"] is None and not report.sites["act1"].masked
    assert any("attention_mask of shape (4, 1, 1, 10) does not match input_ids" in w for w in report.warnings)


# -- a conv net with a callable mask over (N, H, W), against numpy over its own stored tensors ----------

class GridNet(nn.Module):
    """(N, 3, H, W), input channel 2 flags padding. conv1 channel 2 fires on padding only. float64."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv1, self.act = nn.Conv2d(3, 6, 1), nn.ReLU()
            self.conv2, self.fc = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 5)
        with torch.no_grad():
            self.conv1.weight[2], self.conv1.bias[2] = torch.tensor([0.0, 0.0, 5.0])[:, None, None], -1.0
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        self.tap.pre("act", z, 1)
        x = self.tap.post("act", self.act(z))
        z = self.conv2(x)
        self.tap.pre("conv2>gelu", z, 1)
        x = self.tap.post("conv2>gelu", F.gelu(z))
        z = self.fc(x.mean((2, 3)))
        self.tap.pre("fc>relu", z, -1)
        return self.tap.post("fc>relu", F.relu(z))


def grid_batches() -> list[torch.Tensor]:
    g, out = torch.Generator().manual_seed(3), []
    for n, h, w in ((3, 5, 4), (2, 6, 6), (4, 3, 7)):
        x = torch.zeros(n, 3, h, w, dtype=torch.float64)
        x[:, 2] = 1.0
        for i in range(n):
            gh, gw = (int(torch.randint(1, d + 1, (1,), generator=g)) for d in (h, w))
            x[i, :2, :gh, :gw] = torch.randn(2, gh, gw, generator=g, dtype=torch.float64)
            x[i, 2, :gh, :gw] = 0.0
        out.append(x)
    return out


def test_conv_net_with_a_callable_mask_equals_numpy_over_the_valid_cells() -> None:
    tap = zoo.Tap()
    model, batches = GridNet(tap).eval(), grid_batches()
    tap.on = True
    with torch.no_grad():
        for b in batches:
            model(b)
    tap.on = False
    report = deadneuron.audit(model, batches, progress=False, mask=lambda x: x[:, 2] < 0.5, histograms=True)
    assert all(b.dtype == torch.float64 for b in batches)
    valid = [(b[:, 2] < 0.5).numpy() for b in batches]
    for name, kind, masked in (("act", "relu", True), ("conv2>gelu", "gelu", True), ("fc>relu", "relu", False)):
        z = np.concatenate([np.moveaxis(t, 1, -1)[v] if masked else t for t, v in zip(tap.z[name], valid, strict=True)])
        a = np.concatenate([np.moveaxis(t, 1, -1)[v] if masked else t for t, v in zip(tap.a[name], valid, strict=True)])
        got = report.sites[name]
        assert got.masked is masked and got.n == z.shape[0]
        cells = sum(v.size for v in valid)
        assert got.excluded == (cells - z.shape[0] if masked else 0)
        np.testing.assert_array_equal(np.rint(np.array(got.channel_zero) * got.n), (a == 0).sum(0), err_msg=name)
        flat = np.rint(np.array(got.channel_flat) * got.n)
        want_flat = zoo.flat_mask(kind, z).sum(0)
        assert np.abs(flat - want_flat).max() <= (0 if kind == "relu" else 2), name
        np.testing.assert_array_equal(got.channel_min, a.min(0))
        np.testing.assert_array_equal(got.channel_max, a.max(0))
        np.testing.assert_allclose(got.channel_mean, a.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.channel_std, a.std(0), rtol=1e-9, atol=1e-12)
        assert sum(got.histogram or ()) == a.size  # the histogram covers the valid cells only
    assert report.sites["act"].dead_channels == (2,)


class PaddedEncoder(nn.Module):
    """A batch-first TransformerEncoder fed PyTorch's own padding convention: ``pad`` is True at padding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.enc(self.emb(x), src_key_padding_mask=pad)


def _padded_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for lengths in ([7, 3, 5], [2, 7, 6]):
        pad = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]
        out.append({"x": torch.randn(3, 7, 4, generator=g), "pad": pad})
    return out


def test_a_key_padding_mask_true_at_padding_is_inverted_with_a_tilde_and_its_name_warns() -> None:
    torch.manual_seed(0)
    model, batches = PaddedEncoder().eval(), _padded_batches()
    kept: list[torch.Tensor] = []
    hook = model.enc.layers[0].linear1.register_forward_hook(lambda m, a, o: kept.append(o.detach().clone()))
    with torch.enable_grad():  # with gradients the encoder takes its slow path, where linear1's hook runs
        for b in batches:
            model(**b)
    hook.remove()
    z = torch.cat([o[~b["pad"]] for o, b in zip(kept, batches, strict=True)])  # the data positions only
    site = "enc.layers.0.linear1>relu"
    inverted = deadneuron.audit(model, batches, mask="~pad", progress=False)
    s = inverted.sites[site]
    assert s.masked and s.n == z.shape[0] == 30 and s.excluded == 12
    assert s.sparsity == pytest.approx(float((z <= 0).double().mean()), abs=1e-12)
    assert list(s.dead_channels) == torch.nonzero((z <= 0).all(0)).flatten().tolist()
    assert not any("'pad'" in w for w in inverted.meta["warnings"])
    as_given = deadneuron.audit(model, batches, mask="pad", progress=False)
    assert as_given.sites[site].n == 12  # read as True = data: the padding alone
    (warning,) = [w for w in as_given.meta["warnings"] if "'pad'" in w]
    assert "True" in warning and "'~pad'" in warning


def test_auto_without_attention_mask_names_a_key_that_looks_like_a_padding_mask() -> None:
    torch.manual_seed(0)
    model, batches = PaddedEncoder().eval(), _padded_batches()
    report = deadneuron.audit(model, batches, progress=False)  # mask="auto": no attention_mask in these batches
    site = report.sites["enc.layers.0.linear1>relu"]
    assert not site.masked and site.n == sum(b["pad"].numel() for b in batches)  # padding counted as data
    (warning,) = [w for w in report.meta["warnings"] if "'pad'" in w]
    assert "'~pad'" in warning and "--no-mask" in warning
    plain = deadneuron.audit(model, [{"x": b["x"], "pad": b["pad"]} for b in batches], mask=None, progress=False)
    assert not any("'pad'" in w for w in plain.meta["warnings"])  # mask=None: padding counted, as asked
