"""Padding masks at sequence-first sites (DESIGN section 3, "Masks: padding is not data"): a model that
reads (L, N, C), as ``nn.TransformerEncoderLayer(batch_first=False)`` does, under an (N, L) attention mask.

Where the batch holds as many samples as positions (N == L) the shapes cannot tell which dim is N: the
audit must not guess quietly. Where they can (N != L) the mask lies on dims (1, 0). Oracle: numpy over
the pre-activations the model stored itself, with the padded (position, sample) rows dropped. Planted:
channel 3 of ``act`` fires on padding only (dead on the data); the wrong rows left out would revive it."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.render.markdown import mask_text

USER_MODEL = '''
import torch
from torch import nn

PAD, VOCAB = 0, 12


class SeqFirst(nn.Module):
    """Embedding, then (L, N, C) as nn.TransformerEncoder(batch_first=False) reads it: fc -> ReLU, and a
    sequence-first encoder layer (its GELU reads (L, N, 16)). Stores every pre-activation of ``act``."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.act = nn.Embedding(VOCAB, 6), nn.Linear(6, 8), nn.ReLU()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.GELU())
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (self.emb.weight, self.fc.weight, self.fc.bias):
                p.copy_(torch.randint(-3, 4, p.shape, generator=g).float())
            self.emb.weight[PAD] = 50.0
            self.fc.weight[3], self.fc.bias[3] = 1.0, -100.0  # fires on padding only
        self.double()
        self.seen = []

    def forward(self, input_ids, attention_mask=None):
        z = self.fc(self.emb(input_ids).transpose(0, 1))  # (L, N, C)
        self.seen.append(z.detach().clone())
        pad = None if attention_mask is None else attention_mask == 0
        return self.layer(self.act(z), src_key_padding_mask=pad)


def build():
    return SeqFirst()


def batch(lengths, positions):
    g = torch.Generator().manual_seed(len(lengths) * 100 + positions)
    ids = torch.randint(1, VOCAB, (len(lengths), positions), generator=g)
    mask = (torch.arange(positions)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


def square():
    return [batch([4, 2, 3, 1], 4)]  # N == L == 4, a mask that is not its own transpose
'''
ACT = "act"
DEAD = 3


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("seqfirst_user_model", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    source = tmp_path_factory.mktemp("seqfirst") / "seqfirst.py"
    source.write_text(USER_MODEL)
    return source, load(source)


def oracle(seen: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per channel of ``act`` over the valid (position, sample) rows of the stored (L, N, C) pre-activations."""
    rows = np.concatenate([z.numpy()[b["attention_mask"].numpy().T.astype(bool)] for z, b in zip(seen, batches, strict=True)])
    a = np.maximum(rows, 0.0)
    return {"n": np.array(rows.shape[0]), "zero": (a == 0).mean(0), "flat": (rows <= 0).mean(0), "mean": a.mean(0),
            "min": a.min(0), "max": a.max(0), "dead": np.flatnonzero((rows <= 0).all(0))}  # fmt: skip


def assert_matches(site: Any, want: dict[str, np.ndarray]) -> None:
    assert site.masked and site.n == int(want["n"])
    np.testing.assert_allclose(site.channel_zero, want["zero"], rtol=1e-12)
    np.testing.assert_allclose(site.channel_flat, want["flat"], rtol=1e-12)
    np.testing.assert_allclose(site.channel_mean, want["mean"], rtol=1e-12)
    np.testing.assert_allclose(site.channel_min, want["min"], rtol=1e-12)
    np.testing.assert_allclose(site.channel_max, want["max"], rtol=1e-12)
    assert list(site.dead_channels) == want["dead"].tolist()


def audit(module: Any, batches: list[dict[str, torch.Tensor]], **kw: Any) -> tuple[deadneuron.Report, list[torch.Tensor]]:
    model = module.build()
    report = deadneuron.audit(model, batches, rules=False, **kw)
    return report, model.seen


def mask_warnings(report: deadneuron.Report) -> list[str]:
    return [w for w in report.meta["warnings"] if "padding mask" in w]


def test_sequence_first_sites_are_masked_on_dims_1_0_where_the_shapes_tell(user: tuple[Path, Any]) -> None:
    _, module = user
    batches = [module.batch([5, 2, 3], 5), module.batch([1, 4], 4), module.batch([6, 6, 2, 5], 6)]  # N != L
    report, seen = audit(module, batches)
    want = oracle(seen, batches)
    assert want["dead"].tolist() == [DEAD]  # planted: dead on the data, alive on the padding
    assert_matches(report.sites[ACT], want)
    assert mask_warnings(report) == []
    placed = report.meta["mask_dims"]
    assert placed[ACT] == {"dims": [1, 0], "how": "shape", "options": []}
    assert placed["layer.activation"]["dims"] == [1, 0] and report.sites["layer.activation"].masked
    assert "; act, layer.activation on dims (1, 0)" in (mask_text(report) or "")  # placed alike: named together


def test_a_square_batch_is_not_placed_quietly_and_mask_dims_states_it(user: tuple[Path, Any]) -> None:
    _, module = user
    batches = module.square()
    guessed, seen = audit(module, batches)
    want = oracle(seen, batches)
    (warning,) = [w for w in mask_warnings(guessed) if w.startswith(f"site '{ACT}'")]
    assert "dims (0, 1) were used" in warning and "--mask-dims 'act=1,0'" in warning
    assert "mask_dims={'act': (1, 0)}" in warning
    assert guessed.meta["mask_dims"][ACT] == {"dims": [0, 1], "how": "guessed", "options": [[0, 1], [1, 0]]}
    assert "; act, layer.activation on dims (0, 1) (a guess: see the warnings)" in (mask_text(guessed) or "")
    assert want["dead"].tolist() == [DEAD] and DEAD not in guessed.sites[ACT].dead_channels  # the guess read padding

    stated, seen = audit(module, batches, mask_dims={ACT: (1, 0), "layer.*": (-2, 0)})
    assert_matches(stated.sites[ACT], oracle(seen, batches))
    assert mask_warnings(stated) == []
    assert stated.meta["mask_dims"][ACT]["how"] == "stated"
    assert stated.meta["mask_dims"]["layer.activation"]["dims"] == [1, 0]
    assert "; act, layer.activation on dims (1, 0) (as set)" in (mask_text(stated) or "")


def test_a_square_batch_takes_the_placement_other_batches_told(user: tuple[Path, Any]) -> None:
    _, module = user
    batches = [module.batch([2, 5, 1], 5), *module.square()]
    report, seen = audit(module, batches)
    assert_matches(report.sites[ACT], oracle(seen, batches))
    assert mask_warnings(report) == [] and report.meta["mask_dims"][ACT]["how"] == "shape"


def test_a_guess_that_later_batches_contradict_is_named(user: tuple[Path, Any]) -> None:
    _, module = user
    report, _ = audit(module, [*module.square(), module.batch([2, 5, 1], 5)])
    (warning,) = [w for w in mask_warnings(report) if w.startswith(f"site '{ACT}'")]
    assert "placed on dims (0, 1), but other batches fit it on dims (1, 0) only" in warning
    assert "left out the wrong elements" in warning and "--mask-dims 'act=1,0'" in warning
    assert report.meta["mask_dims"][ACT]["how"] == "misplaced"


def test_bad_mask_dims_are_one_clear_line(user: tuple[Path, Any]) -> None:
    _, module = user
    with pytest.raises(deadneuron.DeadneuronError, match=r"must differ from each other and from the channel dim 2"):
        audit(module, module.square(), mask_dims={ACT: (2, 0)})
    with pytest.raises(deadneuron.DeadneuronError, match=r"set for site 'act' name 1 dims, but the mask has shape \(4, 4\)"):
        audit(module, module.square(), mask_dims={ACT: (1,)})
    with pytest.raises(deadneuron.DeadneuronError, match=r"mask_dims\['act'\] = '10'"):
        audit(module, module.square(), mask_dims={ACT: "10"})


def test_the_printed_mask_dims_flag_runs_on_the_command_line(user: tuple[Path, Any], tmp_path: Path) -> None:
    source, module = user
    torch.save(module.build().state_dict(), tmp_path / "seqfirst.pth")
    command = ["audit", str(tmp_path / "seqfirst.pth"), "--model", f"{source}:build", "--data", f"{source}:square",
               "--no-rules", "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.stderr
    warnings = json.loads(result.stdout)["meta"]["warnings"]
    (warning,) = [w for w in warnings if w.startswith(f"site '{ACT}'")]
    flag = re.search(r"--mask-dims ('[^']*')", warning)
    assert flag is not None, warning
    result = CliRunner().invoke(app, [*command, "--mask-dims", *shlex.split(flag.group(1)), "--mask-dims", "layer.*=1,0"])
    assert result.exit_code == 0, result.stderr
    fixed = json.loads(result.stdout)
    assert not [w for w in fixed["meta"]["warnings"] if "padding mask" in w]
    model = module.build()
    model.load_state_dict(torch.load(tmp_path / "seqfirst.pth", weights_only=True))
    with torch.no_grad():
        model(**module.square()[0])
    want = oracle(model.seen, module.square())
    (site,) = [s for s in fixed["sites"] if s["name"] == ACT]
    assert site["n"] == int(want["n"]) and site["dead_channels"] == [DEAD]
    np.testing.assert_allclose(site["channel_mean"], want["mean"], rtol=1e-12)
    assert fixed["meta"]["audit_args"][-4:] == ["--mask-dims", "act=1,0", "--mask-dims", "layer.*=1,0"]


def test_the_monitor_masks_sequence_first_sites_and_their_gradients(user: tuple[Path, Any]) -> None:
    _, module = user
    torch.manual_seed(0)
    model = module.build().train()
    batches = [module.batch([5, 2, 3], 5), module.batch([1, 4], 4)]
    with deadneuron.Monitor(model, every=None, mask="attention_mask", tau=0.0) as mon:
        for b in batches:
            model(**b).pow(2).mean().backward()
            mon.step()
        mon.snapshot()
    row = mon.timeline.set_index("site").loc[ACT]
    valid = sum(int(b["attention_mask"].sum()) for b in batches)
    assert int(row["n"]) == valid and int(row["grad_elements"]) == valid
    assert not [w for w in mon.warnings if "padding mask" in w]
