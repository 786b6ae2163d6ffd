"""The batches data loaders actually yield: tuple (input_ids, attention_mask) batches, Hugging Face
BatchEncoding, nested dicts and lists, named tuples and dataclasses, PackedSequence, iterable datasets of
unknown length, float16/bfloat16/float64 models. Each audit's per-site figures are checked against numpy (in
float64) over the tensors the model's activation saw, stored by a forward hook of the test's own in a pass
of its own, outside the audit; the report's sample count against the samples fed."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import deadneuron
from deadneuron.errors import AuditRuntimeError, UsageError

COMPILE = [True, False]  # the native kernels and the torch path


# -- the oracle ---------------------------------------------------------------------------------------
def stored(act: nn.Module, run: Callable[[], Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (z, a) pairs ``act`` saw while ``run()`` ran the model, in float64, by a hook of the test's own."""
    pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        pairs.append((args[0].detach().double().numpy().copy(), out.detach().double().numpy().copy()))

    handle = act.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return pairs


def joined(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The z and the a of every stored call, their rows one after the other."""
    return np.concatenate([z for z, _ in pairs]), np.concatenate([a for _, a in pairs])


def rows(t: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """A channels-last (..., C) array as (elements, C), the positions where ``valid`` (its leading shape) only."""
    return t[valid] if valid is not None else t.reshape(-1, t.shape[-1])


def check_site(site: Any, z: np.ndarray, a: np.ndarray, flat: Callable[[np.ndarray], np.ndarray]) -> None:
    """The site's n, per-channel zero and flat counts, dead channels and means against numpy over (elements, C)."""
    assert site.n == z.shape[0]
    np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), (a == 0).sum(0))
    np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), flat(z).sum(0))
    assert set(site.dead_channels) == set(np.flatnonzero(flat(z).all(0)).tolist())
    np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-9, atol=1e-12)


def relu_flat(z: np.ndarray) -> np.ndarray:
    return z <= 0


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- token models and padded batches ------------------------------------------------------------------
class Tokens(nn.Module):
    """Embedding -> Linear -> ReLU over token ids; takes input_ids only (any other keyword is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.act = nn.Embedding(30, 6), nn.Linear(6, 5), nn.ReLU()

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.act(self.lin(self.emb(input_ids)))


def padded(n: int = 6, length: int = 7, *, left: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``n`` sequences of random lengths 1..length, padded with id 0."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    lengths[0] = length - 2  # some padding in every batch of 2
    lengths[1] = length - 1 if n > 1 else lengths[1]
    pos = torch.arange(length)[None, :]
    mask = (pos >= length - lengths[:, None]) if left else (pos < lengths[:, None])
    ids = torch.randint(1, 30, (n, length), generator=gen) * mask
    return ids, mask.long()


def token_model() -> Tokens:
    torch.manual_seed(3)
    return Tokens().eval()


def tuple_warnings(report: deadneuron.Report) -> list[str]:
    return [w for w in report.meta["warnings"] if "looks like an attention mask" in w]


# -- (input_ids, attention_mask) tuple batches --------------------------------------------------------
@pytest.mark.parametrize("left", [False, True])
def test_a_tuple_batch_of_ids_and_mask_warns_once_and_counts_what_it_says(left: bool) -> None:
    model = token_model()
    ids, mask = padded(left=left)
    loader = DataLoader(TensorDataset(ids, mask), batch_size=2)  # yields [ids, mask] lists
    pairs = stored(model.act, lambda: [model(b[0]) for b in loader])
    z, a = joined(pairs)
    for compile in COMPILE:
        report = deadneuron.audit(model, loader, rules=False, compile=compile)
        (line,) = tuple_warnings(report)
        assert "\n" not in line and "item 1" in line and "mask='1'" in line and "--no-mask" in line
        assert "on 3 of 3 batches, from batch 0" in line
        assert report.meta["samples"] == 6 and report.meta["mask"] is None
        check_site(report.sites["act"], rows(z), rows(a), relu_flat)  # padding counted, as the warning says
        valid = mask.bool().numpy()
        for spec in ("1", lambda b: b[1]):
            report = deadneuron.audit(model, loader, rules=False, compile=compile, mask=spec)
            assert not tuple_warnings(report) and report.meta["samples"] == 6
            assert report.sites["act"].masked
            check_site(report.sites["act"], rows(z, valid), rows(a, valid), relu_flat)
    assert hooks(model) == 0


def test_the_warning_counts_the_batches_that_had_padding() -> None:
    model = token_model()
    ids, mask = padded(4, 5)
    full = torch.randint(1, 30, (2, 5)), torch.ones(2, 5, dtype=torch.long)  # no padding: nothing to warn about
    report = deadneuron.audit(model, [full, (ids[:2], mask[:2]), full, (ids[2:], mask[2:])], rules=False)
    (line,) = tuple_warnings(report)
    assert "on 2 of 4 batches, from batch 1" in line


def _labels(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n, length = ids.shape
    spans = torch.zeros(n, length, dtype=torch.long)
    spans[:, 2:4] = 1  # 0/1 token labels that start and stop within a row
    return {
        "classes": torch.randint(0, 2, (n,), generator=gen),
        "token classes": torch.randint(0, 5, (n, length), generator=gen),
        "ignored at padding": torch.where(mask.bool(), torch.randint(0, 2, (n, length), generator=gen), -100),
        "spans": spans,
        "float targets": mask.float(),
        "no padding": torch.ones(n, length, dtype=torch.long),
    }


@pytest.mark.parametrize("kind", list(_labels(*padded())))
def test_targets_beside_the_input_are_not_taken_for_a_mask(kind: str) -> None:
    model = token_model()
    ids, mask = padded()
    y = _labels(ids, mask)[kind]
    report = deadneuron.audit(model, DataLoader(TensorDataset(ids, y), batch_size=3), rules=False)
    assert not tuple_warnings(report)
    assert report.meta["samples"] == 6 and report.sites["act"].n == ids.numel()


def test_a_tuple_of_lengths_is_named_by_index() -> None:
    model = token_model()
    ids, mask = padded()
    lengths = mask.sum(1)
    report = deadneuron.audit(model, [(ids, lengths)], rules=False, mask="len:1")
    valid = mask.bool().numpy()
    (z, a), = stored(model.act, lambda: model(ids))
    check_site(report.sites["act"], rows(z, valid), rows(a, valid), relu_flat)


def test_a_mask_index_out_of_the_tuple_is_one_line() -> None:
    ids, mask = padded()
    with pytest.raises(UsageError) as err:
        deadneuron.audit(token_model(), [(ids, mask)], rules=False, mask="2")
    assert "'2'" in str(err.value) and "'0', '1'" in str(err.value) and "\n" not in str(err.value)
    for spec in ("valid", "len:lengths"):  # a name, not an index: how to name a tuple's item
        with pytest.raises(UsageError) as err:
            deadneuron.audit(token_model(), [(ids, mask)], rules=False, mask=spec)
        assert "by its index" in str(err.value) and "\n" not in str(err.value)


# -- BatchEncoding, nested values, named tuples, dataclasses --------------------------------------------
def test_a_batch_encoding_is_fed_as_keywords_and_masked() -> None:
    transformers = pytest.importorskip("transformers")
    model = token_model()
    ids, mask = padded()
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    (z, a), = stored(model.act, lambda: model(ids))
    valid = mask.bool().numpy()
    for compile in COMPILE:
        report = deadneuron.audit(model, [batch], rules=False, compile=compile)
        assert report.meta["mask"] == "attention_mask" and report.meta["samples"] == 6
        check_site(report.sites["act"], rows(z, valid), rows(a, valid), relu_flat)


def test_nested_dicts_and_lists_beside_the_ids_do_not_change_the_count() -> None:
    model = token_model()
    ids, mask = padded()
    batch = {"meta": {"boxes": torch.zeros(9, 4)}, "views": [torch.zeros(3, 2), torch.zeros(3, 2)],
             "input_ids": ids, "attention_mask": mask}  # fmt: skip
    (z, a), = stored(model.act, lambda: model(ids))
    valid = mask.bool().numpy()
    report = deadneuron.audit(model, [batch], rules=False)
    assert report.meta["samples"] == 6
    check_site(report.sites["act"], rows(z, valid), rows(a, valid), relu_flat)
    report = deadneuron.audit(model, [batch], rules=False, mask=None)
    assert report.meta["samples"] == 6  # the batch's own tensor, not one nested in front of it


class Encoded(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def test_a_named_tuple_with_an_attention_mask_is_masked() -> None:
    model = token_model()
    ids, mask = padded()
    (z, a), = stored(model.act, lambda: model(ids))
    valid = mask.bool().numpy()
    for compile in COMPILE:
        report = deadneuron.audit(model, [Encoded(ids, mask)], rules=False, compile=compile)
        assert report.meta["mask"] == "attention_mask" and report.meta["samples"] == 6
        check_site(report.sites["act"], rows(z, valid), rows(a, valid), relu_flat)


def test_a_named_tuple_mask_of_another_name_is_named_by_its_field() -> None:
    Pair = collections.namedtuple("Pair", "tokens keep")
    model = token_model()
    ids, mask = padded()
    report = deadneuron.audit(model, [Pair(ids, mask)], rules=False)
    (line,) = tuple_warnings(report)
    assert "item 1 ('keep')" in line and "mask='keep'" in line
    report = deadneuron.audit(model, [Pair(ids, mask)], rules=False, mask="keep")
    (z, a), = stored(model.act, lambda: model(ids))
    valid = mask.bool().numpy()
    check_site(report.sites["act"], rows(z, valid), rows(a, valid), relu_flat)


def test_a_named_tuple_of_input_and_label_is_input_then_target() -> None:
    Sample = collections.namedtuple("Sample", "x y")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU()).eval()
    batches = [Sample(torch.randn(3, 4), torch.tensor([0, 1, 1])), Sample(torch.randn(2, 4), torch.tensor([1, 0]))]
    pairs = stored(model[1], lambda: [model(b.x) for b in batches])
    report = deadneuron.audit(model, batches, rules=False)
    assert report.meta["samples"] == 5 and not report.meta["warnings"]
    check_site(report.sites["1"], *joined(pairs), relu_flat)


def test_a_dataclass_batch_is_refused_in_one_line_naming_its_fields() -> None:
    @dataclasses.dataclass
    class Batch:
        input_ids: torch.Tensor
        attention_mask: torch.Tensor

    model = token_model()
    with pytest.raises(UsageError) as err:
        deadneuron.audit(model, [Batch(*padded())], rules=False)
    line = str(err.value)
    assert "\n" not in line and "Batch" in line and "input_ids, attention_mask" in line and "vars(batch)" in line
    assert hooks(model) == 0 and not model.training


# -- PackedSequence -------------------------------------------------------------------------------------
class Recurrent(nn.Module):
    """LSTM over a PackedSequence, then Linear -> ReLU on pad_packed_sequence's (padded) output."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm, self.lin, self.act = nn.LSTM(3, 4, batch_first=batch_first), nn.Linear(4, 6), nn.ReLU()

    def forward(self, packed: PackedSequence) -> torch.Tensor:
        out, _ = self.lstm(packed)
        padded_out, _ = pad_packed_sequence(out, batch_first=self.batch_first)
        return self.act(self.lin(padded_out))


def recurrent_only(warnings: list[str]) -> bool:
    """Whether the audit's one warning is that the LSTM's own gates are not measured (nothing about the batch)."""
    return len(warnings) == 1 and warnings[0].startswith("module 'lstm' (LSTM)") and "recurrent kernel" in warnings[0]


def sequences(batch_first: bool, lengths: list[int]) -> tuple[PackedSequence, np.ndarray]:
    """A PackedSequence of random sequences of ``lengths`` (unsorted) and its (N, T) valid positions."""
    gen = torch.Generator().manual_seed(len(lengths))
    x = torch.randn(len(lengths), max(lengths), 3, generator=gen)
    packed = pack_padded_sequence(x if batch_first else x.transpose(0, 1), torch.tensor(lengths),
                                  batch_first=batch_first, enforce_sorted=False)  # fmt: skip
    return packed, np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_target", [False, True])
def test_a_packed_sequence_is_fed_whole_and_its_padding_left_out(batch_first: bool, with_target: bool) -> None:
    torch.manual_seed(0)
    model = Recurrent(batch_first).eval()
    data = [sequences(batch_first, [5, 2, 4]), sequences(batch_first, [3, 6, 1, 2])]
    pairs = stored(model.act, lambda: [model(p) for p, _ in data])
    # the stored (N, T, C) or (T, N, C) outputs, their valid positions only
    z = np.concatenate([rows(p[0] if batch_first else p[0].swapaxes(0, 1), v) for p, (_, v) in zip(pairs, data, strict=True)])
    a = np.concatenate([rows(p[1] if batch_first else p[1].swapaxes(0, 1), v) for p, (_, v) in zip(pairs, data, strict=True)])
    assert z.shape[0] == 5 + 2 + 4 + 3 + 6 + 1 + 2
    batches = [(p, torch.zeros(len(v), dtype=torch.long)) if with_target else p for p, v in data]
    for compile in COMPILE:
        report = deadneuron.audit(model, batches, rules=False, compile=compile)
        assert report.meta["samples"] == 7 and report.meta["mask"] == "PackedSequence"
        assert recurrent_only(report.meta["warnings"])
        check_site(report.sites["act"], z, a, relu_flat)
    assert hooks(model) == 0


def test_a_recurrent_classifier_on_packed_input_measures_its_head_without_a_warning_about_the_batch() -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.lin, self.act = nn.LSTM(3, 4), nn.Linear(4, 5), nn.ReLU()

        def forward(self, packed: PackedSequence) -> torch.Tensor:
            _, (h, _) = self.lstm(packed)
            return self.act(self.lin(h[-1]))

    torch.manual_seed(0)
    model = Classifier().eval()
    packed, _ = sequences(False, [4, 2, 3])
    (z, a), = stored(model.act, lambda: model(packed))
    report = deadneuron.audit(model, [packed], rules=False)
    assert report.meta["samples"] == 3 and recurrent_only(report.meta["warnings"])
    check_site(report.sites["act"], z, a, relu_flat)


def test_a_packed_sequence_reaching_an_activation_module_fails_as_the_model_does_in_one_line() -> None:
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.act = nn.LSTM(3, 4), nn.ReLU()

        def forward(self, packed: PackedSequence) -> Any:
            out, _ = self.lstm(packed)
            return self.act(out)

    model = Direct().eval()
    packed, _ = sequences(False, [4, 2, 3])
    with pytest.raises(TypeError):
        model(packed)  # the model itself cannot run on it
    with pytest.raises(AuditRuntimeError) as err:
        deadneuron.audit(model, [packed], rules=False)
    line = str(err.value)
    assert "\n" not in line and "PackedSequence" in line and "batch 0" in line
    assert hooks(model) == 0 and not model.training


def test_an_activation_that_takes_packed_sequences_is_measured_on_the_packed_data() -> None:
    class PackedReLU(nn.Module):
        def forward(self, x: PackedSequence) -> PackedSequence:
            return x._replace(data=torch.relu(x.data))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.act = nn.LSTM(3, 4), PackedReLU()

        def forward(self, packed: PackedSequence) -> torch.Tensor:
            out, _ = self.lstm(packed)
            return pad_packed_sequence(self.act(out))[0]

    torch.manual_seed(0)
    model = Model().eval()
    packed, _ = sequences(False, [4, 2, 3])
    with torch.no_grad():
        data = model.lstm(packed)[0].data.double().numpy()
    report = deadneuron.audit(model, [packed], rules=False)
    (site,) = report.sites.values()
    assert report.meta["samples"] == 3
    check_site(site, data, np.maximum(data, 0), relu_flat)  # the 9 packed rows: no padding among them


# -- iterable datasets and generators -----------------------------------------------------------------
class Stream(IterableDataset):
    """Rows of 4 features, no __len__; counts the rows taken from it."""

    def __init__(self, count: int) -> None:
        self.count, self.pulled = count, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(5)
        for _ in range(self.count):
            self.pulled += 1
            yield torch.randn(4, generator=gen)


@pytest.mark.parametrize("max_batches", [None, 2])
def test_a_loader_over_an_iterable_dataset_of_unknown_length(max_batches: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU()).eval()
    stream = Stream(11)
    pairs = stored(model[1], lambda: [model(b) for b in DataLoader(stream, batch_size=4)])
    taken = pairs[:max_batches] if max_batches else pairs
    z, a = joined(taken)
    stream.pulled = 0
    report = deadneuron.audit(model, DataLoader(stream, batch_size=4), rules=False, max_batches=max_batches)
    assert report.meta["samples"] == z.shape[0] == (8 if max_batches else 11)
    assert report.meta["batches"] == (2 if max_batches else 3)
    assert stream.pulled == z.shape[0]  # no row taken past the batches asked for
    check_site(report.sites["1"], z, a, relu_flat)


def test_a_generator_is_not_consumed_past_max_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU()).eval()
    made: list[torch.Tensor] = []

    def batches() -> Iterator[torch.Tensor]:
        for k in range(6):
            made.append(torch.randn(k + 1, 4))
            yield made[-1]

    report = deadneuron.audit(model, batches(), rules=False, max_batches=3)
    assert len(made) == 3 and report.meta["samples"] == 1 + 2 + 3 and report.meta["batches"] == 3
    pairs = stored(model[1], lambda: [model(b) for b in made])
    check_site(report.sites["1"], *joined(pairs), relu_flat)


# -- float16, bfloat16, float64 models ----------------------------------------------------------------
TANH_EDGE = math.atanh(math.sqrt(1 - 0.05))  # |tanh'(z)| = 1 - tanh(z)^2 <= 0.05 * max (1, at 0)


def tanh_flat(z: np.ndarray) -> np.ndarray:
    return np.abs(z) >= TANH_EDGE


def _gelu_slope(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2))) + z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _gelu_edge() -> float:
    """Where |GELU'| rises to 0.05 x its maximum (at sqrt 2) coming from -inf, by bisection in float64 (deadneuron's
    edge, from a grid, is about 5e-9 further left: no value of the test lies in between)."""
    limit, lo, hi = 0.05 * _gelu_slope(math.sqrt(2)), -10.0, -math.sqrt(2)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if abs(_gelu_slope(mid)) <= limit else (lo, mid)
    return lo


GELU_EDGE = _gelu_edge()


def gelu_flat(z: np.ndarray) -> np.ndarray:
    return z <= GELU_EDGE


def _step(v: torch.Tensor, up: int) -> torch.Tensor:
    """The value of ``v``'s 16-bit dtype ``up`` steps away from positive ``v`` (+1: the next above, -1: below)."""
    return (v.reshape(1).view(torch.int16) + up).view(v.dtype)[0]


def _near_edge(dtype: torch.dtype) -> torch.Tensor:
    """Values of ``dtype`` either side of the tanh edge (for 16-bit dtypes the last below it and the first above;
    for float64 1e-9 either side: definitions of the edge agree to about 1e-15), signed zeros and small values,
    then random rows."""
    if dtype == torch.float64:
        below, above = torch.tensor(TANH_EDGE - 1e-9, dtype=dtype), torch.tensor(TANH_EDGE + 1e-9, dtype=dtype)
    else:
        rounded = torch.tensor(TANH_EDGE, dtype=dtype)
        below = rounded if rounded.double() < TANH_EDGE else _step(rounded, -1)
        above = _step(below, 1)
    planted = torch.stack([below, above, -below, -above])
    gen = torch.Generator().manual_seed(2)
    tiny = torch.tensor([0.0, -0.0, 1e-3, -1e-3], dtype=dtype)
    return torch.cat([planted[None], tiny[None], (3 * torch.randn(10, 4, generator=gen)).to(dtype)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_bfloat16_and_double_models_match_numpy_in_float64(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5), nn.GELU())
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():  # the first layer passes the planted values through exactly
        first.weight.copy_(torch.eye(4))
        first.bias.zero_()
    model = model.to(dtype).eval()
    x = _near_edge(dtype)
    tanh_pairs, relu_pairs, gelu_pairs = (stored(model[k], lambda: model(x)) for k in (1, 3, 5))
    z_t = tanh_pairs[0][0]
    assert (z_t[0, :2] < TANH_EDGE).tolist() == [True, False]  # the planted values straddle the edge
    for compile in COMPILE:
        report = deadneuron.audit(model, [x], rules=False, compile=compile)
        assert report.meta["samples"] == 12
        check_site(report.sites["1"], *tanh_pairs[0], tanh_flat)
        check_site(report.sites["3"], *relu_pairs[0], relu_flat)
        check_site(report.sites["5"], *gelu_pairs[0], gelu_flat)


# -- the training monitor, where the same mask code reads the forward's arguments ---------------------
class PooledTokens(Tokens):
    """Tokens whose forward takes the mask positionally, to pool over the valid tokens."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (super().forward(input_ids) * attention_mask[..., None]).sum()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, mon: deadneuron.Monitor, *args: Any) -> None:
    opt.zero_grad()
    model(*args).backward()
    opt.step()
    mon.step()


def test_the_monitor_names_a_positional_mask_and_reads_it_by_index() -> None:
    torch.manual_seed(0)
    model = PooledTokens()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the stored z is the monitored one
    ids, mask = padded()
    with pytest.warns(RuntimeWarning, match="looks like an attention mask"), \
            deadneuron.Monitor(model, every=1, optimizer=opt, mask="auto") as mon:  # fmt: skip
        _train_step(model, opt, mon, ids, mask)
    assert any("item 1 of the tuple batches" in w and "mask='1'" in w for w in mon.warnings)
    with deadneuron.Monitor(model, every=1, optimizer=opt, mask="1") as mon:
        _train_step(model, opt, mon, ids, mask)
    assert not mon.warnings
    (z, a), = stored(model.act, lambda: model(ids, mask))
    valid = mask.bool().numpy()
    check_site(mon.report().sites["act"], rows(z, valid), rows(a, valid), relu_flat)


def test_the_monitor_leaves_out_the_padding_of_a_packed_sequence() -> None:
    torch.manual_seed(0)
    model = Recurrent(batch_first=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    packed, valid = sequences(True, [5, 2, 4])
    with deadneuron.Monitor(model, every=1, optimizer=opt, mask="auto") as mon:
        opt.zero_grad()
        model(packed).sum().backward()
        opt.step()
        mon.step()
    assert recurrent_only(mon.warnings)
    (z, a), = stored(model.act, lambda: model(packed))
    check_site(mon.report().sites["act"], rows(z, valid), rows(a, valid), relu_flat)
