"""Padding given as per-sample lengths (mask="len:KEY" / --mask 'len:KEY'): an LSTM fed through
pack_padded_sequence, its output padded back with zeros, measured against numpy over the pre-activations the
model stored itself with the padded positions dropped by the lengths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.errors import UsageError

C, H, K = 3, 5, 6  # input features, LSTM hidden size, channels of the measured ReLU
PAD_ONLY = 3  # fires on padded positions only
BATCHES = [([7, 3, 5], 7), ([2, 6, 4, 1], 6), ([4, 4], 5)]  # (lengths, L); no batch has N == L


class PackedLSTM(nn.Module):
    """nn.LSTM over packed sequences, padded back with zeros, then Linear -> ReLU. Hidden unit 0 saturates
    near 1 at every valid step, so channel PAD_ONLY (bias 1, weight -10 on it) is negative wherever there is
    data and 1 at every padded position. Stores every pre-activation of ``act`` as (N, L, K)."""

    def __init__(self, *, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm, self.fc, self.act = nn.LSTM(C, H, batch_first=batch_first), nn.Linear(H, K), nn.ReLU()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            w_ih, w_hh, b_ih, b_hh = (getattr(self.lstm, f"{p}_l0") for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for gate in range(4):  # unit 0: input, forget, cell and output gates saturated open / at +1
                w_ih[gate * H], w_hh[gate * H], b_ih[gate * H], b_hh[gate * H] = 0.0, 0.0, 20.0, 0.0
            self.fc.weight[PAD_ONLY].zero_()
            self.fc.weight[PAD_ONLY, 0], self.fc.bias[PAD_ONLY] = -10.0, 1.0
        self.double()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        total = x.shape[1] if self.batch_first else x.shape[0]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=self.batch_first, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=self.batch_first, total_length=total)
        z = self.fc(out)
        self.seen.append((z if self.batch_first else z.transpose(0, 1)).detach().clone())
        return self.act(z)


def batches(*, batch_first: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths, positions in BATCHES:
        x = torch.randn(len(lengths), positions, C, generator=g, dtype=torch.float64)
        out.append({"x": x if batch_first else x.transpose(0, 1).contiguous(), "lengths": torch.tensor(lengths)})
    return out


def valid_rows(seen: list[torch.Tensor], data: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """The stored (N, L, K) pre-activations at the positions below each sample's length, as (rows, K)."""
    rows = [z.numpy()[n, : int(length)] for z, b in zip(seen, data, strict=True) for n, length in enumerate(b["lengths"])]
    return np.concatenate(rows)


def assert_matches(site: Any, z: np.ndarray) -> None:
    a = np.maximum(z, 0.0)
    assert site.masked and site.n == z.shape[0]
    assert np.array_equal(np.rint(np.array(site.channel_zero) * site.n), (a == 0).sum(0))
    assert np.array_equal(np.rint(np.array(site.channel_flat) * site.n), (z <= 0).sum(0))
    np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(site.channel_std, a.std(0), rtol=0, atol=1e-9)
    assert list(site.dead_channels) == np.flatnonzero((z <= 0).all(0)).tolist()


@pytest.mark.parametrize("batch_first", [True, False])
def test_lengths_leave_the_padding_out_exactly(batch_first: bool) -> None:
    model, data = PackedLSTM(batch_first=batch_first), batches(batch_first=batch_first)
    report = deadneuron.audit(model, data, rules=False, progress=None, mask="len:lengths")
    z = valid_rows(model.seen, data)
    assert z.shape[0] == sum(sum(lengths) for lengths, _ in BATCHES)
    assert_matches(report.sites["act"], z)
    assert PAD_ONLY in report.sites["act"].dead_channels
    assert report.meta["mask"] == "len:lengths"
    assert report.meta["samples"] == sum(len(lengths) for lengths, _ in BATCHES)  # N, also from (L, N, C) data


def test_a_mask_key_on_sequence_first_data_is_taken_as_lengths_are() -> None:
    """An (N, L) bool mask beside (L, N, C) data (N != L): accepted (the data's leading dim is L, not N), the same
    figures as the lengths give, and N samples."""
    model, data = PackedLSTM(batch_first=False), batches(batch_first=False)
    for b in data:
        b["valid"] = torch.arange(b["x"].shape[0])[None, :] < b["lengths"][:, None]
    report = deadneuron.audit(model, data, rules=False, progress=None, mask="valid")
    assert_matches(report.sites["act"], valid_rows(model.seen, data))
    assert report.meta["samples"] == sum(len(lengths) for lengths, _ in BATCHES)


def test_auto_warns_about_a_lengths_key_and_counts_the_padding() -> None:
    model, data = PackedLSTM(), batches()
    report = deadneuron.audit(model, data, rules=False, progress=None)
    site = report.sites["act"]
    assert not site.masked and site.n == sum(len(lengths) * positions for lengths, positions in BATCHES)
    assert PAD_ONLY not in site.dead_channels  # the padding made it fire
    said = [w for w in report.meta["warnings"] if "'lengths'" in w]
    assert len(said) == 1 and "mask='len:lengths'" in said[0] and "--mask 'len:lengths'" in said[0]
    quiet = deadneuron.audit(PackedLSTM(), batches(), rules=False, progress=None, mask=None)
    assert not [w for w in quiet.meta["warnings"] if "'lengths'" in w]


def _with(**changes: Any) -> list[dict[str, Any]]:
    (first, *_) = batches()
    return [{**first, **changes}]


@pytest.mark.parametrize(
    ("spec", "data", "message"),
    [
        ("len:lens", batches(), "lengths key 'lens' (mask 'len:lens') is not in the batch (its keys: 'x', 'lengths')"),
        ("len:", batches(), "names no lengths key"),
        ("len:lengths", _with(lengths=torch.tensor([7, 3])), "fits neither dim 0"),
        ("len:lengths", _with(lengths=torch.tensor([7.0, 3.0, 5.0])), "dtype torch.float32, not a 1-D integer tensor"),
        ("len:lengths", _with(lengths=torch.tensor([[7, 3, 5]])), "of shape (1, 3) and dtype torch.int64"),
        ("len:lengths", _with(lengths=torch.tensor([8, 3, 5])), "hold values in [3, 8], outside [0, 7]"),
        ("len:lengths", _with(lengths=torch.tensor([7, -1, 5])), "outside [0, 7]"),
        ("len:lengths", [{"x": torch.zeros(3, 3, C, dtype=torch.float64), "lengths": torch.tensor([3, 1, 2])}],
         "cannot tell batch first (N, L, ...) from sequence first (L, N, ...) where N == L == 3"),
        ("len:lengths", [(torch.zeros(2, 4, C), torch.tensor([4, 2]))], "needs dict batches"),
    ],
)
def test_bad_lengths_are_one_clear_line(spec: str, data: list[Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        deadneuron.audit(PackedLSTM(), data, rules=False, progress=None, mask=spec)
    text = str(caught.value)
    assert message in text and "\n" not in text


# -- CLI -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lstm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lengths")
    torch.save(PackedLSTM().state_dict(), folder / "lstm.pth")
    (folder / "lstm.py").write_text(
        "import torch\nfrom tests.test_masks_lengths import PackedLSTM, batches\n"
        "def build():\n    return PackedLSTM()\n"
        "def good():\n    return batches()\n"
        "def long():\n    return [{**b, 'lengths': b['lengths'] + 5} for b in batches()]\n"
    )
    return folder / "lstm.pth", folder / "lstm.py"


def _cli(files: tuple[Path, Path], data: str, *extra: str) -> tuple[int, str, str]:
    ckpt, code = files
    args = ["audit", str(ckpt), "--model", f"{code}:build", "--data", f"{code}:{data}", "--no-rules", *extra]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_cli_takes_a_lengths_key(lstm_files: tuple[Path, Path]) -> None:
    code, out, err = _cli(lstm_files, "good", "--format", "json", "--mask", "len:lengths")
    assert code == 0, err
    report = deadneuron.Report.from_dict(json.loads(out))
    assert report.meta["mask"] == "len:lengths" and PAD_ONLY in report.sites["act"].dead_channels
    assert report.sites["act"].n == sum(sum(lengths) for lengths, _ in BATCHES)
    code, out, err = _cli(lstm_files, "good", "--mask", "len:lengths")
    assert code == 0, err
    assert "mask     len:lengths masked" in out


@pytest.mark.parametrize(
    ("data", "spec", "message"),
    [("good", "len:seq_len", "lengths key 'seq_len'"), ("long", "len:lengths", "outside [0, 7]")],
)
def test_cli_lengths_errors_are_one_line_and_exit_2(lstm_files: tuple[Path, Path], data: str, spec: str,
                                                    message: str) -> None:  # fmt: skip
    code, _, err = _cli(lstm_files, data, "--mask", spec)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


# -- Monitor -------------------------------------------------------------------------------------------

def test_the_monitor_measures_the_valid_positions_only() -> None:
    torch.manual_seed(0)
    model, data = PackedLSTM(), batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    targets = torch.Generator().manual_seed(2)
    with deadneuron.Monitor(model, every=3, mask="len:lengths") as mon:
        for step in range(6):
            b = data[step % len(data)]
            out = model(x=b["x"], lengths=b["lengths"])
            y = torch.randint(0, K, (b["x"].shape[0],), generator=targets)
            F.cross_entropy(out.sum(1), y).backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    assert [s.step for s in mon.snapshots] == [3, 6]
    for snap in mon.snapshots:
        window = range(snap.first_step, snap.step)
        z = valid_rows([model.seen[k] for k in window], [data[k % len(data)] for k in window])
        site = snap.sites["act"]
        assert site.n == z.shape[0] == sum(sum(BATCHES[k % len(data)][0]) for k in window)
        assert set(site.dead_channels) == set(np.flatnonzero((z <= 0).all(0)).tolist())
        assert site.sparsity == pytest.approx((z <= 0).mean(), rel=1e-12)
    assert mon.last_health["act"].masked
    assert [w.split(")")[0] for w in mon.warnings] == ["module 'lstm' (LSTM"]  # its gates: nothing about the batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lengths_on_the_host_give_a_mask_on_the_model_s_device() -> None:
    from deadneuron.probe.masks import choose_mask

    b = batches()[0]
    on_gpu = {"x": b["x"].cuda(), "lengths": b["lengths"]}
    choice = choose_mask("len:lengths", on_gpu, batch_size=3, device=torch.device("cuda"))
    assert choice.mask is not None and choice.mask.is_cuda
    want = np.arange(b["x"].shape[1])[None, :] < b["lengths"].numpy()[:, None]
    assert np.array_equal(choice.mask.cpu().numpy(), want)
    model, data = PackedLSTM().cuda(), batches()
    report = deadneuron.audit(model, data, rules=False, progress=None, mask="len:lengths", device="cuda")
    assert_matches(report.sites["act"], valid_rows([z.cpu() for z in model.seen], data))
