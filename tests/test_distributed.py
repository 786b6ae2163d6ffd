"""Audits across processes: two gloo ranks on CPU give, on each rank, the report of one process over all
the data; the pure merge, the layout checks and the wrappers (DDP, torch.compile) without processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.distributed import Header, agree, merge_parts
from deadneuron.errors import AuditRuntimeError, UsageError
from deadneuron.part import Part, SiteInfo
from deadneuron.probe import Recorder
from deadneuron.slots import SlotStats, slot_health
from tests import dist_helpers as h
from tests import zoo


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("ranks")
    return h.spawn(2, tmp), tmp


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    """One process over all the data: the reports every rank's merged report must equal."""
    model, data = h.planted_model(), h.batches()
    return {
        "eager": deadneuron.audit(model, data, compile=False, histograms=True, progress=False, distributed=False).to_dict(),
        "native": deadneuron.audit(model, data, progress=False, distributed=False).to_dict(),
    }


def test_each_rank_gets_the_single_process_report(ranks: Any, single: dict[str, Any]) -> None:
    results, _ = ranks
    for rank, got in enumerate(results):
        # the default kernels (the C kernel here) and the float64 torch reference: counts exact, moments
        # to 1e-12 relative (each batch's statistics are float64 sums of that batch alone)
        assert got["native"]["meta"]["kernels"] == single["native"]["meta"]["kernels"] == _default_kernels()
        for kernel in ("native", "eager"):
            h.same_figures(h.figures(got[kernel]), h.figures(single[kernel]), rel=1e-12, path=f"rank{rank}.{kernel}")
        for key in ("batches", "samples", "mask", "warnings"):
            assert got["eager"]["meta"][key] == single["eager"]["meta"][key], key
        assert got["eager"]["meta"]["distributed"] == {"world_size": 2, "rank_batches": [3, 2]}


def _default_kernels() -> str:
    from deadneuron import _native

    return "native" if _native.load() is not None else "eager"


@pytest.mark.parametrize("kernel", ["native", "eager"])
def test_merged_report_equals_the_numpy_oracle_and_finds_the_planted_channels(ranks: Any, kernel: str) -> None:
    results, _ = ranks
    tap = zoo.Tap()
    model = h.planted_model()
    model.tap, tap.on = tap, True
    with torch.no_grad():
        for b in h.batches():
            model(b)
    report = deadneuron.Report.from_dict(results[1][kernel])
    for layer in range(4):
        name = f"bn_layers.{layer}>relu"
        site, want = report.sites[name], zoo.oracle(tap, name, "relu")
        a = np.concatenate([np.moveaxis(t, 1, -1).reshape(-1, t.shape[1]) for t in tap.a[name]])
        assert site.n == want.n == a.shape[0]
        np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), want.zero)
        assert list(site.dead_channels) == want.dead == h.PLANTED.get(layer, [])
        scale = a.std(0) + np.abs(a.mean(0)) + 1e-300
        assert np.all(np.abs(np.array(site.channel_mean) - a.mean(0)) <= 1e-12 * scale)
        assert np.all(np.abs(np.array(site.channel_std) - a.std(0)) <= 1e-12 * scale)
        np.testing.assert_array_equal(site.channel_max, a.max(0))


def test_a_rank_without_batches_contributes_nothing(ranks: Any) -> None:
    results, _ = ranks
    alone = deadneuron.audit(h.planted_model(), h.batches(), compile=False, progress=False).to_dict()
    for got in results:
        h.same_figures(h.figures(got["empty"]), h.figures(alone), rel=1e-12)
        assert got["empty"]["meta"]["distributed"]["rank_batches"] == [5, 0]


def test_ddp_wrapped_model_is_audited_under_its_own_names(ranks: Any) -> None:
    results, _ = ranks
    plain = [s["name"] for s in results[0]["eager"]["sites"]]
    assert plain == [f"bn_layers.{i}>relu" for i in range(4)]
    for got in results:
        assert [s["name"] for s in got["ddp"]["sites"]] == plain
        unbinned = [{**s, "histogram": None} for s in got["eager"]["sites"]]  # the DDP audit counted no histogram
        h.same_figures(got["ddp"]["sites"], unbinned, rel=1e-12, path="ddp")
        assert any("DistributedDataParallel" in note for note in got["ddp"]["meta"]["notes"])


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_fsdp_models_are_audited_under_their_own_names(ranks: Any, kind: str) -> None:
    """FSDP (nested units and the root: ``_fsdp_wrapped_module.`` levels) and FSDP2 (``fully_shard``): the
    plain model's site names and figures, the rules read the weights gathered whole (the BatchNorm
    findings name the plain modules), and the sharded parameters are left as they were."""
    results, _ = ranks
    for got in results:
        plain, sharded = got["sharded"]["plain"], got["sharded"][kind]
        assert [s["name"] for s in sharded["sites"]] == [s["name"] for s in plain["sites"]] == [
            f"bn_layers.{i}>relu" for i in range(4)
        ]
        h.same_figures(sharded["sites"], plain["sites"], rel=1e-12, path=kind)
        found = [(f["rule"], f["sites"], f["channels"], f["evidence"]) for f in sharded["findings"]]
        assert found == [(f["rule"], f["sites"], f["channels"], f["evidence"]) for f in plain["findings"]]
        # gamma and beta of a sharded BatchNorm, read whole: the planted channels
        assert ("bn-scale-collapse", ["bn_layers.1>relu"], {"bn_layers.1>relu": [0, 5]}) in [f[:3] for f in found]
        assert any("FSDP" in note or "FullyShardedDataParallel" in note for note in sharded["meta"]["notes"])
        assert got["sharded"]["left_as_found"]


def test_ranks_that_saw_different_sites_stop_on_every_rank(ranks: Any) -> None:
    results, _ = ranks
    for got in results:
        kind, message = got["branches"]
        assert kind == "UsageError"
        assert "rank 1 did not see up" in message and "rank 1 saw down" in message


def test_a_failing_rank_fails_every_rank_naming_it(ranks: Any) -> None:
    results, _ = ranks
    assert results[1]["failing"][0] == results[0]["failing"][0] == "AuditRuntimeError"
    assert results[1]["failing"][1].startswith("forward pass failed on batch 0")
    assert results[0]["failing"][1].startswith("rank 1: forward pass failed on batch 0")


def test_recorder_under_ddp_training_reduces_to_the_oracle(ranks: Any) -> None:
    results, tmp = ranks
    taps = [np.load(tmp / f"tap{r}.npz") for r in range(2)]
    z = np.concatenate([t["z"] for t in taps])
    a = np.concatenate([t["a"] for t in taps])
    for got in results:
        (site,) = got["training"]
        assert site["name"] == "act"  # not module.act
        assert site["n"] == a.shape[0] == 48
        np.testing.assert_array_equal(site["zero"], (a == 0).sum(0))
        np.testing.assert_array_equal(site["flat"], (z <= 0).sum(0))
        scale = a.std(0) + np.abs(a.mean(0)) + 1e-300
        assert np.all(np.abs(np.array(site["mean"]) - a.mean(0)) <= 1e-12 * scale)
        assert np.all(np.abs(np.array(site["std"]) - a.std(0)) <= 1e-12 * scale)
        np.testing.assert_array_equal(site["min"], a.min(0))


# -- without processes ---------------------------------------------------------------------------------


def _part(model: nn.Module, data: list[torch.Tensor], masks: list[torch.Tensor]) -> Part:
    slots = SlotStats(3) if masks else None
    with Recorder(model, compile=False, histograms=True) as rec, torch.no_grad():
        for b in data:
            rec.start_batch()
            model(b)
        for m in masks:
            assert slots is not None
            slots.update(m)
        metrics = {"correct": torch.tensor(float(len(data)), dtype=torch.float64)}
        return Part.of_recorder(rec, batches=len(data), samples=sum(len(b) for b in data), slots=slots,
                                metric_sums=metrics if data else {})  # fmt: skip


def test_merge_parts_equals_one_process_over_all_the_data() -> None:
    model, data = h.planted_model(), h.batches()
    masks = [torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)), 1) for i in range(3)]
    whole = _part(model, data, masks)
    merged = merge_parts([_part(model, data[0:2], masks[:1]), _part(model, [], []), _part(model, data[2:], masks[1:])])
    assert (merged.batches, merged.samples, merged.rank_batches) == (5, 19, (2, 0, 3))
    for want, got in zip(whole.results(), merged.results(), strict=True):
        assert (got.name, got.calls, got.example_shape, got.histogram) == (want.name, want.calls, want.example_shape, want.histogram)
        assert (got.summary.n, got.summary.zero, got.summary.flat) == (want.summary.n, want.summary.zero, want.summary.flat)
        for key in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(getattr(got.summary, key), getattr(want.summary, key), rtol=1e-12, atol=1e-300)
    assert merged.slots is not None
    assert merged.slots.compute() == slot_health(torch.cat(masks))
    assert float(merged.metric_sums["correct"]) == 5.0


def _info(key: str, channels: int = 4) -> SiteInfo:
    return SiteInfo((key,), key, key, None, False, "relu", "relu", 1, "producer", "z <= 0", channels, (2, channels))


def test_layout_names_what_each_rank_lacked() -> None:
    a, b, c = _info("enc.relu"), _info("dec.relu"), _info("head.relu")
    with pytest.raises(UsageError, match=r"rank 2 did not see dec\.relu; rank 2 saw head\.relu, which rank 0 did not"):
        agree([Header(0, 3, (a, b)), Header(1, 0), Header(2, 3, (a, c))])
    with pytest.raises(UsageError, match=r"enc\.relu has 4 channels on rank 0 and 8 on rank 1"):
        agree([Header(0, 1, (a,)), Header(1, 1, (_info("enc.relu", 8),))])
    layout = agree([Header(0, 0), Header(1, 2, (a, b)), Header(2, 2, (b, a))])  # rank 1 is the reference
    assert [i.name for i in layout.sites] == ["enc.relu", "dec.relu"]


def test_a_failed_rank_is_raised_with_its_error_class() -> None:
    with pytest.raises(UsageError, match="rank 1: bad mask"):
        agree([Header(0, 2, (_info("a"),)), Header(1, 0, error=("UsageError", "bad mask"))])
    with pytest.raises(AuditRuntimeError, match="rank 0 failed: RuntimeError: out of memory"):
        agree([Header(0, 0, error=("RuntimeError", "out of memory")), Header(1, 1)])


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.GELU()))


def test_checkpoint_wrapped_modules_are_audited_under_the_plain_names() -> None:
    """torch's activation-checkpoint wrapper runs its forward (no ``_checkpoint_wrapped_module.`` in any
    name, also in the findings), and is left on the model as it was."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    data = h.batches()
    plain = deadneuron.audit(h.planted_model(), data, progress=False)
    model = h.planted_model()
    model.bn_layers[1] = checkpoint_wrapper(model.bn_layers[1])
    wrapped = deadneuron.audit(model, data, progress=False)
    assert list(wrapped.sites) == list(plain.sites)
    h.same_figures(h.figures(wrapped.to_dict())["sites"], h.figures(plain.to_dict())["sites"], rel=1e-12)
    assert [(f.rule, f.sites) for f in wrapped.findings] == [(f.rule, f.sites) for f in plain.findings]
    assert "bn_layers.1" in " ".join(f.message for f in wrapped.findings)
    assert "_checkpoint_wrapped_module" not in wrapped.to_json().replace("no '_checkpoint_wrapped_module.' prefix", "")
    assert type(model.bn_layers[1]).__name__ == "CheckpointWrapper"


def test_compiled_models_are_audited_under_the_plain_names() -> None:
    data = zoo.image_batches(2, (2, 3, 8, 8))
    plain = deadneuron.audit(_small(), data, progress=False, compile=False)
    compiled = deadneuron.audit(torch.compile(_small()), data, progress=False, compile=False)
    nested = _small()
    nested[2] = torch.compile(nested[2])  # type: ignore[assignment]
    inner = deadneuron.audit(nested, data, progress=False, compile=False)
    assert list(plain.sites) == ["1", "2.1"]
    for report in (compiled, inner):
        assert list(report.sites) == list(plain.sites)
        h.same_figures(h.figures(report.to_dict()), h.figures(plain.to_dict()), rel=1e-12)
    assert any("OptimizedModule" in note for note in compiled.meta["notes"])
