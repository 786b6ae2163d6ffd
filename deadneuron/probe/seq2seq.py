"""Encoder-decoder batches: the default padding mask is the encoder's.

A dict batch's ``attention_mask`` marks the padding of the encoder's input. An encoder-decoder model (T5,
BART, Whisper...) also runs a decoder on another sequence: ``decoder_input_ids`` where the batch gives them,
else ``labels`` shifted right (T5, BART), else, in BART, the encoder's own ``input_ids`` shifted right. The
encoder's mask fits every decoder site as long as the encoder's input (by shape), but the decoder's padding
lies elsewhere (one position on for a shifted sequence; anywhere for labels padded on their own), so those
figures would leave data out and count padding without a word. The audit cannot build the decoder's mask
itself (how a model shifts its labels is its own); it says so once, with how to audit each side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_OWN = "decoder_attention_mask"


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` says it is an encoder-decoder (a Hugging Face model's ``config.is_encoder_decoder``)."""
    return getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True


def decoder_warning(batch: Mapping[Any, Any], *, seq2seq: bool = False) -> str | None:
    """The warning for a dict batch that feeds a decoder too: its ``decoder_input_ids`` (or
    ``decoder_inputs_embeds``), or, for a model that ``seq2seq`` says is an encoder-decoder, its ``labels`` or
    its ``input_ids`` shifted right; None otherwise."""
    given = next((k for k in ("decoder_input_ids", "decoder_inputs_embeds") if isinstance(batch.get(k), torch.Tensor)), None)
    if given is not None:
        source = repr(given)
    elif not seq2seq:
        return None
    elif isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() >= 2:
        source = "'labels', shifted right by the model"
    else:
        source = "'input_ids', shifted right by the model"
    side = (f"mask={_OWN!r} / --mask {_OWN}" if isinstance(batch.get(_OWN), torch.Tensor)
            else "a mask of the decoder's positions (mask=KEY or a callable)")  # fmt: skip
    return (f"the batches feed a decoder too ({source}): the default mask, 'attention_mask', is the encoder's; it "
            "applies at every site whose shape fits it, decoder sites as long as the encoder's input included, and "
            f"the decoder's padding counts as data: audit each side on its own, the encoder's sites (select, e.g. "
            f"'encoder.*') with the default mask and the decoder's (e.g. 'decoder.*') with {side}")
