"""The ARC slot-attention autoencoder: ARCEncoder -> SlotAttention -> SpatialBroadcastDecoder.

Each part's activation comes from the config (ACTIVATION for the encoder conv stack, ENCODER_MLP_ACTIVATION,
SLOT_MLP_ACTIVATION, DECODER_ACTIVATION); the defaults are ReLU everywhere, the user's model.
The encoder keeps the user's shape on purpose (``self.conv_layers``, ``self.bn_layers``, one shared
``self.relu`` applied after every conv layer, ``self.dropout``): deadneuron must report the four call
sites of that one module separately (``encoder.bn_layers.0>relu`` ... ``encoder.bn_layers.3>relu``).
Slot attention follows Locatello et al. 2020; padding cells never attend. About 194k parameters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from arc_model.config import TrainConfig
from arc_model.data import INPUT_CHANNELS, NUM_COLOURS
from deadneuron.replacements import REPLACEMENTS

MAX_GRID = 30  # ARC grids are at most 30x30; positions are absolute, so cropping changes nothing
EVAL_NOISE_SEED = 0  # eval-mode slot initialisation is fixed: audits are reproducible


class SlotOutput(NamedTuple):
    """``logits`` (N, 10, H, W): log-probabilities of the alpha-mixed colour distribution (valid logits);
    ``masks`` (N, K, H, W): alpha softmaxed over slots; ``slots`` (N, K, D)."""

    logits: torch.Tensor
    masks: torch.Tensor
    slots: torch.Tensor


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    """The activation module for one of the config's activation names (``TrainConfig.ACTIVATION``...), made
    as deadneuron's patches make it (a PReLU: one slope, shared where the module is shared)."""
    if name not in REPLACEMENTS:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(REPLACEMENTS)}")
    return REPLACEMENTS[name].module(negative_slope=negative_slope)


def position_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W, 4) absolute coordinates [y, x, 1 - y, 1 - x] on the 30x30 ARC canvas."""
    ys = torch.arange(height, device=device, dtype=torch.float32) / (MAX_GRID - 1)
    xs = torch.arange(width, device=device, dtype=torch.float32) / (MAX_GRID - 1)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([y, x, 1 - y, 1 - x], dim=-1)


FOURIER_PERIODS = (2, 4, 8, 16, 32, 64)  # in cells: period 2 tells neighbouring cells apart


def fourier_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W, 4 * len(FOURIER_PERIODS)) sin and cos of the row and column index at each period."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    angles = [2 * math.pi * axis / period for axis in (y, x) for period in FOURIER_PERIODS]
    return torch.stack([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=-1)


class PositionEmbedding(nn.Module):
    """Learned soft position embedding: a linear map of the absolute coordinates (``fourier``: and of
    sin/cos features of the cell index, which resolve single cells)."""

    def __init__(self, dim: int, *, fourier: bool = False) -> None:
        super().__init__()
        self.fourier = fourier
        self.proj = nn.Linear(4 + 4 * len(FOURIER_PERIODS) if fourier else 4, dim)

    def forward(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        coords = position_grid(height, width, device)
        if self.fourier:
            coords = torch.cat([coords, fourier_grid(height, width, device)], dim=-1)
        return self.proj(coords)  # (H, W, dim)


class ARCEncoder(nn.Module):
    """conv3x3 -> BatchNorm (or Identity) -> shared activation, NUM_CONV times; position, LayerNorm, MLP."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        channels = config.CHANNELS
        widths = [INPUT_CHANNELS] + [channels] * config.NUM_CONV
        self.conv_layers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1) for c_in, c_out in itertools.pairwise(widths)
        )
        # Identity keeps the user's encoder shape when BatchNorm is switched off (MEASURED.md).
        self.bn_layers = nn.ModuleList(
            nn.BatchNorm2d(channels) if config.BATCH_NORM else nn.Identity() for _ in range(config.NUM_CONV)
        )
        self.relu = make_activation(config.ACTIVATION, config.NEGATIVE_SLOPE)
        self.dropout = nn.Dropout(config.DROPOUT)
        self.dropout_between_convs = config.DROPOUT_BETWEEN_CONVS
        self.position = PositionEmbedding(channels, fourier=config.POSITION == "fourier")
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels),
            make_activation(config.ENCODER_MLP_ACTIVATION, config.NEGATIVE_SLOPE),
            nn.Linear(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 11, H, W) -> features (N, H*W, C)."""
        # The user's loop, verbatim (the lists have equal length by construction).
        for conv, bn in zip(self.conv_layers, self.bn_layers):  # noqa: B905
            x = self.relu(bn(conv(x)))
            if self.dropout_between_convs:
                x = self.dropout(x)
        if not self.dropout_between_convs:
            x = self.dropout(x)  # the user's single dropout, after the conv stack
        height, width = x.shape[-2:]
        x = x + self.position(height, width, x.device).permute(2, 0, 1)
        x = x.flatten(2).transpose(1, 2)
        return self.mlp(self.norm(x))


class SlotAttention(nn.Module):
    """Iterative attention with competition between slots (softmax over slots), Locatello et al. 2020."""

    def __init__(self, num_slots: int, dim: int, input_dim: int, *, iters: int = 3, hidden: int = 128,
                 eps: float = 1e-8, activation: nn.Module | None = None, init: str = "shared") -> None:
        super().__init__()
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.scale = dim**-0.5
        self.learned_init = init == "learned"
        if self.learned_init:  # one query per slot, no noise (BO-QSA, Jia et al. 2023)
            self.slots_init = nn.Parameter(torch.randn(1, num_slots, dim) * dim**-0.5)
        else:  # one Gaussian shared by all slots (Locatello et al. 2020)
            self.slots_mu = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
            self.slots_log_sigma = nn.Parameter(torch.full((1, 1, dim), math.log(dim**-0.5)))
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), activation or nn.ReLU(), nn.Linear(hidden, dim))

    def initial_slots(self, batch: int, device: torch.device) -> torch.Tensor:
        """mu + sigma * noise (the noise is fixed in eval mode so that audits are reproducible), or the
        learned per-slot queries."""
        if self.learned_init:
            return self.slots_init.expand(batch, -1, -1)
        if self.training:
            noise = torch.randn(batch, self.num_slots, self.dim, device=device)
        else:
            generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
            noise = torch.randn(1, self.num_slots, self.dim, generator=generator).to(device)
            noise = noise.expand(batch, -1, -1)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def forward(self, inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """inputs (N, L, input_dim), valid (N, L) bool -> slots (N, K, dim)."""
        return self.attend(inputs, valid)[0]

    def attend(self, inputs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> slots (N, K, dim) and the last iteration's attention (N, K, L), softmaxed over slots."""
        inputs = self.norm_inputs(inputs)
        keys, values = self.to_k(inputs), self.to_v(inputs)
        keep = valid.unsqueeze(1).to(inputs.dtype)  # (N, 1, L): padding cells never attend
        init = slots = self.initial_slots(inputs.shape[0], inputs.device)
        for step in range(self.iters):
            if self.learned_init and step == self.iters - 1:
                slots = slots.detach() + init - init.detach()  # gradient through the last iteration only
            queries = self.to_q(self.norm_slots(slots))
            shares = torch.einsum("nkd,nld->nkl", queries, keys).mul(self.scale).softmax(dim=1)
            attn = (shares + self.eps) * keep
            attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(self.eps)
            updates = torch.einsum("nkl,nld->nkd", attn, values)
            slots = self._update(slots, updates)
        return slots, shares

    def _update(self, slots: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        shape = slots.shape
        slots = self.gru(updates.reshape(-1, self.dim), slots.reshape(-1, self.dim)).reshape(shape)
        return slots + self.mlp(self.norm_mlp(slots))


class SpatialBroadcastDecoder(nn.Module):
    """Each slot broadcast over the grid's own size, plus positions, through a per-pixel MLP (1x1 convs,
    written as channels-last Linear layers: 2-3x faster on CPU) -> per-slot colour logits and alpha."""

    def __init__(self, slot_dim: int, hidden: int, *, depth: int = 3,
                 activation: Callable[[], nn.Module] = nn.ReLU, colour_per_slot: bool = False,
                 fourier: bool = False, norm: bool = False) -> None:
        super().__init__()
        self.position = PositionEmbedding(slot_dim, fourier=fourier)
        # norm: slots leave the GRU with norms near 20 and would drown the position embedding (norm 1-3)
        self.norm = nn.LayerNorm(slot_dim) if norm else nn.Identity()
        # colour_per_slot: the colour logits come from the slot alone (one colour per slot), only the
        # alpha is broadcast over positions; else both are.
        self.colour = nn.Linear(slot_dim, NUM_COLOURS) if colour_per_slot else None
        layers: list[nn.Module] = []
        width = slot_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, 1 if colour_per_slot else NUM_COLOURS + 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, slots: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (N, K, D) -> colour logits (N, K, H, W, 10), alpha logits (N, K, H, W)."""
        position = self.position(height, width, slots.device)  # (H, W, D)
        out = self.layers(self.norm(slots)[:, :, None, None, :] + position)
        if self.colour is not None:
            colours = self.colour(slots)[:, :, None, None, :].expand(-1, -1, height, width, -1)
            return colours, out[..., 0]
        return out[..., :NUM_COLOURS], out[..., NUM_COLOURS]


class SlotAutoencoder(nn.Module):
    """Grid in, alpha-mixed colour distribution out; ``forward(x)`` reads validity from the pad channel."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.encoder = ARCEncoder(config)
        slope = config.NEGATIVE_SLOPE
        self.slot_attention = SlotAttention(
            config.NUM_SLOTS, config.SLOT_DIM, config.CHANNELS, iters=config.SLOT_ITERS,
            activation=make_activation(config.SLOT_MLP_ACTIVATION, slope), init=config.SLOT_INIT,
        )
        self.decoder = SpatialBroadcastDecoder(
            config.SLOT_DIM, config.CHANNELS, activation=lambda: make_activation(config.DECODER_ACTIVATION, slope),
            colour_per_slot=config.COLOUR_HEAD == "slot", fourier=config.POSITION == "fourier",
            norm=config.DECODER_NORM,
        )
        self.attention_masks = config.MASKS == "attention"

    def forward(self, x: torch.Tensor) -> SlotOutput:
        height, width = x.shape[-2:]
        valid = x[:, NUM_COLOURS] < 0.5  # the pad channel is 1 outside the grid
        features = self.encoder(x)
        slots, shares = self.slot_attention.attend(features, valid.flatten(1))
        colour_logits, alpha = self.decoder(slots, height, width)
        if self.attention_masks:
            log_masks = shares.clamp_min(1e-12).log().unflatten(2, (height, width))
        else:
            log_masks = alpha.log_softmax(dim=1)
        log_probs = torch.logsumexp(log_masks.unsqueeze(-1) + colour_logits.log_softmax(dim=-1), dim=1)
        return SlotOutput(logits=log_probs.permute(0, 3, 1, 2), masks=log_masks.exp(), slots=slots)


def build_model(config: TrainConfig) -> SlotAutoencoder:
    return SlotAutoencoder(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
