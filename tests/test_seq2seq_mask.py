"""An encoder-decoder batch without the decoder's own ids: the decoder runs on ``labels`` or on the encoder's
``input_ids`` shifted right, whose padding is not where the encoder's ``attention_mask`` says. The default mask
fits the decoder sites by shape, so the audit says that it is the encoder's (it said so only where the batch
held ``decoder_input_ids``). A model without a decoder gets no such warning, token-classification labels
included."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import deadneuron

transformers = pytest.importorskip("transformers")


def _padded(n: int = 3, length: int = 10, vocab: int = 60) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids = torch.randint(4, vocab, (n, length), generator=g) * mask + (1 - mask)  # pad id 1
    return {"input_ids": ids, "attention_mask": mask}


def _bart() -> Any:
    cfg = transformers.BartConfig(vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                                  max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, activation_function="relu")  # fmt: skip
    return transformers.BartModel(cfg).eval()


def _t5() -> Any:
    cfg = transformers.T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _decoder_warnings(report: deadneuron.Report) -> list[str]:
    return [w for w in report.meta["warnings"] if "feed a decoder too" in w]


def test_bart_shifting_its_own_input_ids_is_named() -> None:
    torch.manual_seed(0)
    model, batch = _bart(), _padded()
    report = deadneuron.audit(model, [batch], progress=False)
    (warning,) = _decoder_warnings(report)
    assert "('input_ids', shifted right by the model)" in warning and "'decoder.*'" in warning
    # why: the decoder reads the start token, then the tokens one position on, so a padded sample's last
    # token sits where the encoder's mask says padding; the mask fits by shape and leaves it out
    lengths = batch["attention_mask"].sum(1).tolist()
    decoder = [s for s in report.sites.values() if s.name.startswith("decoder.")]
    assert decoder and all(s.masked and s.n == sum(lengths) for s in decoder)
    assert sum(min(n + 1, 10) for n in lengths) == sum(lengths) + 2  # the decoder's own valid positions


def test_t5_labels_are_named_as_the_decoders_input() -> None:
    torch.manual_seed(0)
    batch = _padded()
    batch["labels"] = batch["input_ids"].flip(1)  # padded on their own
    report = deadneuron.audit(_t5(), [batch], progress=False)
    (warning,) = _decoder_warnings(report)
    assert "('labels', shifted right by the model)" in warning


def test_a_model_without_a_decoder_gets_no_such_warning() -> None:
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, num_labels=3)  # fmt: skip
    model = transformers.BertForTokenClassification(cfg).eval()
    batch = _padded()
    batch["labels"] = torch.zeros_like(batch["input_ids"])  # token classification: (N, L) labels, no decoder
    report = deadneuron.audit(model, [batch], progress=False)
    assert not _decoder_warnings(report) and all(s.masked for s in report.sites.values() if len(s.shape) == 3)
