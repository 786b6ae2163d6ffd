"""Padding masks on real model families (the ARC adapter, a transformers BERT), on CUDA, in the CLI
and in the renderers (DESIGN section 3, "Masks: padding is not data")."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.probe import Recorder
from deadneuron.report import Report
from tests import zoo
from tests.test_masks import GridNet, TokenModel, grid_batches, padded_batches, sentences

# -- the ARC adapter's validity mask ---------------------------------------------------------------------

def test_arc_adapter_masks_the_encoder_maps_and_the_decoder_and_keeps_the_slot_figures() -> None:
    from arc_model.adapter import ArcSlotAdapter

    adapter = ArcSlotAdapter()
    ckpt = torch.load(Path(__file__).parents[1] / "checkpoints" / "slot_attention.pth", weights_only=True)
    model = adapter.load(ckpt)
    batches = list(adapter.batches("heldout", {**ckpt["config"], "BATCH_SIZE": 8}, max_grids=24))
    stored: list[tuple[np.ndarray, np.ndarray]] = []
    tokens: list[np.ndarray] = []  # the encoder MLP's pre-activation, (N, H*W, C) tokens of the grid
    decoded: dict[int, list[np.ndarray]] = {1: [], 3: [], 5: []}  # the decoder's, (N, K, H, W, C): every slot
    handles = [
        model.encoder.relu.register_forward_hook(
            lambda m, args, out: stored.append((args[0].detach().clone().numpy(), out.detach().clone().numpy()))
        ),
        model.encoder.mlp[1].register_forward_pre_hook(lambda m, args: tokens.append(args[0].detach().clone().numpy())),
        *[model.decoder.layers[i].register_forward_pre_hook(
            lambda m, args, i=i: decoded[i].append(args[0].detach().clone().numpy())) for i in decoded],
    ]  # fmt: skip
    with torch.no_grad():
        for b in batches:
            adapter.forward(model, b)
    for h in handles:
        h.remove()
    masked = deadneuron.audit(model, batches, adapter=adapter, progress=False)
    plain = deadneuron.audit(model, batches, adapter=adapter, progress=False, mask=None)
    assert masked.meta["mask"] == "adapter:arc-slot" and plain.meta["mask"] is None
    assert masked.slots == plain.slots and masked.metrics == plain.metrics
    encoder = [f"encoder.bn_layers.{i}>relu" for i in range(4)]
    decoder = [f"decoder.layers.{i}" for i in decoded]
    assert [n for n, s in masked.sites.items() if s.masked] == [*encoder, "encoder.mlp.1", *decoder]
    assert not any("padding is counted" in w for w in masked.meta["warnings"])
    for name, site in masked.sites.items():
        if name not in (*encoder, "encoder.mlp.1", *decoder):
            assert site == plain.sites[name], name  # sites the mask does not fit (the slots' MLP) are as before
    valid = [b.valid.numpy() for b in batches]
    for i, name in enumerate(encoder):
        calls = stored[i::4]
        z = np.concatenate([np.moveaxis(zz, 1, -1)[v] for (zz, _), v in zip(calls, valid, strict=True)])
        a = np.concatenate([np.moveaxis(aa, 1, -1)[v] for (_, aa), v in zip(calls, valid, strict=True)])
        got = masked.sites[name]
        assert got.n == z.shape[0] == sum(int(v.sum()) for v in valid)
        assert got.excluded == sum(v.size for v in valid) - got.n
        np.testing.assert_array_equal(np.rint(np.array(got.channel_flat) * got.n), (z <= 0).sum(0), err_msg=name)
        np.testing.assert_array_equal(np.rint(np.array(got.channel_zero) * got.n), (a == 0).sum(0), err_msg=name)
        assert list(got.dead_channels) == np.flatnonzero((z <= 0).all(0)).tolist()
    # the encoder MLP sees the grid flattened to tokens: the same mask, flattened
    z = np.concatenate([t[v.reshape(v.shape[0], -1)] for t, v in zip(tokens, valid, strict=True)])
    got = masked.sites["encoder.mlp.1"]
    assert got.n == z.shape[0] and got.excluded == sum(v.size for v in valid) - got.n
    np.testing.assert_array_equal(np.rint(np.array(got.channel_flat) * got.n), (z <= 0).sum(0))
    assert list(got.dead_channels) == np.flatnonzero((z <= 0).all(0)).tolist()
    # the decoder runs every slot at every cell: the grid's mask at each slot (the adapter's mask_dims)
    for i, name in zip(decoded, decoder, strict=True):
        z = np.concatenate([d[np.broadcast_to(v[:, None], d.shape[:4])] for d, v in zip(decoded[i], valid, strict=True)])
        got = masked.sites[name]
        assert got.n == z.shape[0] == sum(int(v.sum()) for v in valid) * model.slot_attention.num_slots, name
        np.testing.assert_array_equal(np.rint(np.array(got.channel_flat) * got.n), (z <= 0).sum(0), err_msg=name)
        assert list(got.dead_channels) == np.flatnonzero((z <= 0).all(0)).tolist()
        assert masked.meta["mask_dims"][name] == {"dims": [0, 2, 3], "how": "adapter", "options": []}


# -- a real BERT, where the transformers package is installed ---------------------------------------------

def test_bert_layers_padded_equal_unpadded() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(4)
    sents = [torch.randint(5, 64, (n,), generator=g) for n in (3, 9, 5, 12, 1, 7)]
    ids, mask = torch.zeros(6, 12, dtype=torch.long), torch.zeros(6, 12, dtype=torch.long)
    for i, s in enumerate(sents):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = deadneuron.audit(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    alone = deadneuron.audit(model, [{"input_ids": s[None]} for s in sents], progress=False)
    plain = deadneuron.audit(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, mask=None)
    gelu = [name for name, s in padded.sites.items() if s.kind == "gelu"]
    assert len(gelu) == 2 and padded.meta["mask"] == "attention_mask"
    for name in gelu:
        got, want = padded.sites[name], alone.sites[name]
        assert got.masked and got.n == want.n == sum(len(s) for s in sents) != plain.sites[name].n
        flat = np.rint(np.array(got.channel_flat) * got.n) - np.rint(np.array(want.channel_flat) * want.n)
        assert np.abs(flat).sum() <= 1, name  # float rounding of attention over a longer row, at most one element


# -- CUDA: the hooks stay free of host synchronisation with a mask ---------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_hooks_never_synchronise() -> None:
    model = TokenModel().cuda().eval()
    batches = [{k: v.cuda() for k, v in b.items()} for b in padded_batches()]
    with torch.inference_mode(), Recorder(model) as rec:
        for i, b in enumerate(batches):
            rec.start_batch(mask=b["attention_mask"])  # prepares the mask: one synchronisation per batch
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if i else "default")
            try:
                model(**b)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        results = rec.results()
    assert all(r.masked for r in results) and results[0].summary.n == sum(len(s) for s in sentences())


# -- CLI and renderers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tokens")
    torch.save(TokenModel().state_dict(), folder / "tokens.pth")
    (folder / "tokens.py").write_text(
        "from tests.test_masks import TokenModel, padded_batches\n"
        "def build():\n    return TokenModel()\n"
        "def batches():\n    return padded_batches()\n"
    )
    return folder / "tokens.pth", folder / "tokens.py"


def _cli(files: tuple[Path, Path], *extra: str) -> tuple[int, str, str]:
    ckpt, code = files
    args = ["audit", str(ckpt), "--model", f"{code}:build", "--data", f"{code}:batches", "--no-rules", *extra]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_cli_masks_by_default_and_counts_padding_with_no_mask(token_files: tuple[Path, Path]) -> None:
    code, out, err = _cli(token_files, "--format", "json")
    assert code == 0, err
    report = Report.from_dict(json.loads(out))
    assert report.meta["mask"] == "attention_mask" and report.sites["act1"].dead_channels == (3,)
    code, out, err = _cli(token_files, "--format", "json", "--no-mask")
    assert code == 0, err
    report = Report.from_dict(json.loads(out))
    assert report.meta["mask"] is None and report.sites["act1"].dead_channels == ()
    code, out, err = _cli(token_files)
    assert code == 0, err
    assert "mask     attention_mask masked 3 of 3 sites" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--mask", "valid"], "mask key 'valid' is not in the batch"),
     (["--mask", "attention_mask", "--no-mask"], "either --mask KEY or --no-mask")],
)
def test_cli_mask_errors_are_one_line_and_exit_2(token_files: tuple[Path, Path], extra: list[str], message: str) -> None:
    code, _, err = _cli(token_files, *extra)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_renderers_name_the_mask_and_the_sites_it_did_not_fit() -> None:
    from deadneuron.render.markdown import render_markdown
    from deadneuron.render.terminal import render

    tap = zoo.Tap()
    report = deadneuron.audit(GridNet(tap).eval(), grid_batches(), progress=False, mask=lambda x: x[:, 2] < 0.5)
    excluded = max(s.excluded for s in report.sites.values())
    line = f"callable masked 2 of 3 sites (<= {excluded} padded elements/channel); not fc>relu"
    assert f"| mask | {line} (its shape does not fit) |" in render_markdown(report)
    buf = io.StringIO()
    render(report, Console(file=buf, width=200, color_system=None))
    assert f"mask     {line}" in buf.getvalue()
    plain = deadneuron.audit(GridNet(tap).eval(), grid_batches(), progress=False, mask=None)
    assert "mask " not in render_markdown(plain) and "| mask |" not in render_markdown(plain)
