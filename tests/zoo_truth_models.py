"""The zoo for tests/test_truth_zoo.py: everyday layouts, each model tapping its own sites.

Each builder returns a `Net` whose forward stores z and a at every site with the channel axis its
author knows (`tests.zoo_truth.Tap`); `ZOO` names every case, `make` builds one (seeded), makes its
batches and records them. Planted dead channels make a misread axis give a visibly different answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo_truth import BIG, SEED, Case, ConvWrap, MyAct, Net, Site, gen, plant, randn, record, shapes

# --- 1-D conv nets ----------------------------------------------------------------------------------

def conv1d_dropout_relu() -> Net:
    m = Net(lambda m, x: m.tap("act", m.drop(m.conv(x)), m.act, 1),
            {"act": Site("relu", "act", "relu", planted=(1, 4), trap=True)},
            conv=nn.Conv1d(3, 6, 3, padding=1), drop=nn.Dropout(0.2), act=nn.ReLU())  # fmt: skip
    plant(m.conv.bias, (1, 4))
    return m


def _resblock(m: Net, x: torch.Tensor) -> torch.Tensor:
    out = m.tap("relu", m.bn1(m.conv1(x)), m.relu, 1)
    out = m.bn2(m.conv2(out))
    return m.tap("out", out + x, F.relu, 1)


def resnet1d_block() -> Net:
    m = Net(_resblock, {"relu": Site("relu", "relu", "relu", planted=(0,), trap=True),
                        "out": Site("relu", "", "relu", planted=(2,), trap=True)},
            conv1=nn.Conv1d(5, 5, 3, padding=1), bn1=nn.BatchNorm1d(5), relu=nn.ReLU(),
            conv2=nn.Conv1d(5, 5, 3, padding=1), bn2=nn.BatchNorm1d(5))  # fmt: skip
    plant(m.bn1.bias, (0,))
    plant(m.bn2.bias, (2,))
    return m


def wrapper_conv1d_relu() -> Net:
    m = Net(lambda m, x: m.tap("act", m.wrap(x), m.act, 1),
            {"act": Site("relu", "act", "relu", planted=(0, 5), trap=True)},
            wrap=ConvWrap(nn.Conv1d(4, 7, 3)), act=nn.ReLU())  # fmt: skip
    plant(m.wrap.conv.bias, (0, 5))
    return m


def _varlen(m: Net, x: torch.Tensor) -> torch.Tensor:
    h = m.tap("act", m.drop(m.conv(x)), m.act, 1)
    return m.tap("head", m.conv2(h), F.relu, 1)


def conv1d_variable_lengths() -> Net:
    m = Net(_varlen, {"act": Site("relu", "act", "relu", planted=(2,), trap=True),
                      "head": Site("relu", "", "relu", planted=(3,), trap=True)},
            conv=nn.Conv1d(3, 6, 3, padding=1), drop=nn.Dropout(0.1), act=nn.ReLU(), conv2=nn.Conv1d(6, 4, 1))  # fmt: skip
    plant(m.conv.bias, (2,))
    plant(m.conv2.bias, (3,))
    return m


def conv1d_pool_relu(pool: Callable[[], nn.Module], functional: bool) -> Callable[[], Net]:
    """Conv1d -> pooling -> ReLU (a module, or torch.relu in the root's forward)."""
    def build() -> Net:
        layers = {"conv": nn.Conv1d(3, 6, 3, padding=1), "pool": pool()} | ({} if functional else {"act": nn.ReLU()})
        m = Net(lambda m, x: m.tap("act", m.pool(m.conv(x)), torch.relu if functional else m.act, 1),
                {"act": Site("relu", "" if functional else "act", "relu", planted=(0, 3), trap=True)}, **layers)
        plant(m.conv.bias, (0, 3))
        return m
    return build


def conv1d_bn_leaky() -> Net:
    m = Net(lambda m, x: m.tap("act", m.bn(m.conv(x)), m.act, 1),
            {"act": Site("leaky_relu", "act", "leaky_relu", planted=(1,), trap=True)},
            conv=nn.Conv1d(2, 5, 3, padding=1), bn=nn.BatchNorm1d(5), act=nn.LeakyReLU(0.01))  # fmt: skip
    plant(m.bn.bias, (1,))
    return m


def linear_transposed() -> Net:
    """(N, L, C) from a Linear, transposed to (N, C, L), scaled, then ReLU: channels on dim 1."""
    m = Net(lambda m, x: m.tap("act", m.fc(x).transpose(1, 2) * 2.0, m.act, 1),
            {"act": Site("relu", "act", "relu", planted=(0, 3), trap=True)}, fc=nn.Linear(4, 5), act=nn.ReLU())
    plant(m.fc.bias, (0, 3))
    return m


def conv1d_cat_length() -> Net:
    m = Net(lambda m, x: m.tap("act", torch.cat([m.conv_a(x), m.conv_b(x)], dim=2), m.act, 1),
            {"act": Site("relu", "act", "relu", planted=(2,), trap=True)},
            conv_a=nn.Conv1d(3, 4, 3, padding=1), conv_b=nn.Conv1d(3, 4, 1), act=nn.ReLU())  # fmt: skip
    for conv in (m.conv_a, m.conv_b):
        plant(conv.bias, (2,))
    return m


def conv1d_slice_tanh() -> Net:
    m = Net(lambda m, x: m.tap("act", m.conv(x)[:, :, 1:-1], torch.tanh, 1),
            {"act": Site("tanh", "", "tanh", planted=(0, 4), trap=True)}, conv=nn.Conv1d(3, 5, 3, padding=1))
    plant(m.conv.bias, (0,))
    plant(m.conv.bias, (4,), BIG)  # saturated at +1: flat too
    return m


# --- 2-D conv nets ----------------------------------------------------------------------------------

def conv2d(conv: Callable[[], nn.Module], act: Callable[[], nn.Module], kind: str, low: tuple[int, ...],
           high: tuple[int, ...] = (), bn: bool = False) -> Callable[[], Net]:  # fmt: skip
    """conv [-> BatchNorm] -> activation module; ``low``/``high`` channels get a bias of -/+ BIG."""
    def build() -> Net:
        c = conv()
        layers = {"conv": c} | ({"bn": nn.BatchNorm2d(c.out_channels)} if bn else {})
        m = Net(lambda m, x: m.tap("act", m.bn(m.conv(x)) if bn else m.conv(x), m.act, 1),
                {"act": Site(kind, "act", kind, planted=tuple(sorted(low + high)))}, **layers, act=act())
        target = m.bn.bias if bn else m.conv.bias
        plant(target, low)
        if high:
            plant(target, high, BIG)
        return m
    return build


def _perm_add(m: Net, x: torch.Tensor) -> torch.Tensor:
    z = m.conv(x).permute(0, 2, 3, 1) + x.permute(0, 2, 3, 1)[..., :1]  # (N, H, W, C) + broadcast residual
    return m.tap("act", z, F.relu, 3)


def channels_last_add() -> Net:
    m = Net(_perm_add, {"act": Site("relu", "", "relu", planted=(2,), trap=True)}, conv=nn.Conv2d(3, 5, 3, padding=1))
    plant(m.conv.bias, (2,))
    return m


def _convnext(m: Net, x: torch.Tensor) -> torch.Tensor:
    h = m.dw(x).permute(0, 2, 3, 1)
    h = m.tap("act", m.pw1(m.norm(h)), m.act, -1)
    h = m.pw2(h).permute(0, 3, 1, 2)
    return m.tap("out", x + h, F.relu, 1)


def convnext_block() -> Net:
    m = Net(_convnext, {"act": Site("gelu", "act", "gelu", planted=(3, 10)),
                        "out": Site("relu", "", "relu", planted=(1,))},
            dw=nn.Conv2d(4, 4, 3, padding=1, groups=4), norm=nn.LayerNorm(4), pw1=nn.Linear(4, 16), act=nn.GELU(),
            pw2=nn.Linear(16, 4))  # fmt: skip
    plant(m.pw1.bias, (3, 10))
    plant(m.pw2.bias, (1,))
    return m


def conv2d_flatten() -> Net:
    m = Net(lambda m, x: m.tap("act", m.conv(x).flatten(2), m.act, 1),
            {"act": Site("relu", "act", "relu", planted=(1, 4), trap=True)}, conv=nn.Conv2d(3, 5, 3, padding=1), act=nn.ReLU())
    plant(m.conv.bias, (1, 4))
    return m


def linear_relu() -> Net:
    """Channel 2 is dead; channel 4 fires only on the one outlier of `linear_batches`: dormant."""
    m = Net(lambda m, x: m.tap("act", m.fc(x), m.act, -1), {"act": Site("relu", "act", "relu", planted=(2,), dormant=(4,))},
            fc=nn.Linear(6, 5), act=nn.ReLU())  # fmt: skip
    plant(m.fc.bias, (2,))
    with torch.no_grad():
        m.fc.weight[4], m.fc.bias[4] = torch.tensor([1.0, 0, 0, 0, 0, 0]), -5.0
    return m


def linear_batches() -> list[torch.Tensor]:
    g = gen()
    batches = [randn(64, 6, g=g) for _ in range(2)]
    batches[0][0, 0] = 10.0  # 1 element in 128 above 5
    return batches


def no_site() -> Net:
    return Net(lambda m, x: m.fc2(m.fc1(x)), {}, fc1=nn.Linear(6, 8), fc2=nn.Linear(8, 2))


# --- padded token batches ---------------------------------------------------------------------------

VOCAB, PAD = 12, 0
LENGTHS = ((6, 2, 4), (7, 1), (3, 4, 2, 1))  # padded lengths 6, 7, 4: none equals a channel count


def sentences() -> list[list[torch.Tensor]]:
    g = gen()
    return [[torch.randint(1, VOCAB, (n,), generator=g) for n in group] for group in LENGTHS]


def padded() -> list[dict[str, torch.Tensor]]:
    out = []
    for group in sentences():
        ids = torch.full((len(group), max(len(s) for s in group)), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(group):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def unpadded() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
            for group in sentences() for s in group]  # fmt: skip


def _token_mlp(m: Net, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    a = m.tap("emb", m.emb(input_ids), m.act0, -1, attention_mask)
    a = m.tap("mlp", m.fc1(a), m.act, -1, attention_mask)
    pooled = a.mean(1)
    return m.tap("head", m.head(pooled - pooled.mean(0)), F.relu, -1)  # (N, 5): no token dim, never masked


def token_mlp(kind: str) -> Callable[[], Net]:
    """Embedding -> ReLU -> Linear -> GELU/ReLU per token, and a pooled head. Channel 2 of the embedding and
    channel 5 of the MLP fire only on the pad token: dead on real tokens, alive if padding counts."""
    def build() -> Net:
        m = Net(_token_mlp, {"emb": Site("relu", "act0", "relu", planted=(2,)),
                             "mlp": Site(kind, "act", kind, planted=(3, 5, 7)),
                             "head": Site("relu", "", "relu", planted=(1,))},
                emb=nn.Embedding(VOCAB, 6), act0=nn.ReLU(), fc1=nn.Linear(6, 10),
                act=nn.GELU() if kind == "gelu" else nn.ReLU(), head=nn.Linear(10, 5))  # fmt: skip
        with torch.no_grad():
            m.emb.weight[1:, 2] = -m.emb.weight[1:, 2].abs() - 0.5
            m.emb.weight[PAD, 2] = 5.0
            m.fc1.bias.fill_(0.5)
            m.fc1.weight[5] = 0.0
            m.fc1.weight[5, 2], m.fc1.bias[5] = 10.0, -5.0
        plant(m.fc1.bias, (3, 7))
        plant(m.head.bias, (1,))
        return m
    return build


def _attention(m: Net, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    x = m.emb(input_ids)
    s = m.q(x) @ m.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
    s = s.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
    h = m.norm(x + m.o(torch.softmax(s, -1) @ m.v(x)))
    return h + m.fc2(m.tap("mlp", m.fc1(h), m.act, -1, attention_mask))


def attention_block() -> Net:
    """Self-attention over real tokens only, then a ReLU MLP; channel 4 fires only on the pad token."""
    m = Net(_attention, {"mlp": Site("relu", "act", "relu", planted=(1, 4, 9))},
            emb=nn.Embedding(VOCAB, 8), q=nn.Linear(8, 8), k=nn.Linear(8, 8), v=nn.Linear(8, 8), o=nn.Linear(8, 8),
            norm=nn.LayerNorm(8), fc1=nn.Linear(8, 12), act=nn.ReLU(), fc2=nn.Linear(12, 8))  # fmt: skip
    with torch.no_grad():
        m.emb.weight[1:, 0], m.emb.weight[PAD, 0] = -1.0, 30.0
        m.fc1.weight[4] = 0.0
        m.fc1.weight[4, 0], m.fc1.bias[4] = 2.0, -4.0
    plant(m.fc1.bias, (1, 9))
    return m


# --- non-finite, unknown activations, numerics, unknown axis ----------------------------------------

def nonfinite(value: float, act: Callable[[], nn.Module], kind: str) -> Callable[[], Net]:
    """Channel 1 of the pre-activation is ``value`` everywhere (a broadcast sum); channel 3 is planted dead."""
    def build() -> Net:
        m = Net(lambda m, x: m.tap("act", m.fc(x) + m.offset, m.act, -1),
                {"act": Site(kind, "act", kind, planted=(3,))}, fc=nn.Linear(4, 5), act=act())
        m.register_buffer("offset", torch.tensor([0.0, value, 0.0, 0.0, 0.0]))
        plant(m.fc.bias, (3,))
        return m
    return build


def unknown(kind: str, name: str, planted: tuple[int, ...], make: Callable[[], nn.Module] | None = None,
            fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], Net]:  # fmt: skip
    """Linear -> ReLU (a known site) -> Linear -> an activation deadneuron does not know: module ``name``
    (``make``) or a function called in the root's forward (``fn``, warned as ``name``)."""
    def build() -> Net:
        def body(m: Net, x: torch.Tensor) -> torch.Tensor:
            h = m.tap("relu", m.fc1(x), m.relu, -1)
            return m.tap("unknown", m.fc2(h), getattr(m, name) if make else fn, -1)

        extra = {name: make()} if make else {}
        m = Net(body, {"relu": Site("relu", "relu", "relu", planted=(0,)),
                       "unknown": Site(kind, name if make else "", None, planted=planted, recognised=False, warn=name)},
                fc1=nn.Linear(6, 5), relu=nn.ReLU(), fc2=nn.Linear(5, 4), **extra)  # fmt: skip
        with torch.no_grad():
            m.fc2.bias.fill_(0.3)
        plant(m.fc1.bias, (0,))
        plant(m.fc2.bias, (1,))
        plant(m.fc2.bias, tuple(c for c in planted if c != 1), BIG)  # saturating kinds: flat on the right
        return m
    return build


def _big_mean(m: Net, x: torch.Tensor) -> torch.Tensor:
    m.tap("conv", m.conv(x), m.act_conv, 1)
    return m.tap("fc", m.fc(x[:, :, 0]), m.act_fc, -1)


def big_mean() -> Net:
    """Channels with mean 1e4 and std about 1 (and one planted dead channel per site)."""
    m = Net(_big_mean, {"conv": Site("relu", "act_conv", "relu", planted=(1,)), "fc": Site("relu", "act_fc", "relu", planted=(2,))},
            conv=nn.Conv1d(2, 3, 1), act_conv=nn.ReLU(), fc=nn.Linear(2, 4), act_fc=nn.ReLU())  # fmt: skip
    with torch.no_grad():  # rows of unit norm: std 1 on standard-normal inputs
        m.conv.weight.copy_(torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.8, -0.6]])[:, :, None])
        m.fc.weight.copy_(torch.tensor([[0.6, 0.8], [-0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]))
        m.conv.bias.copy_(torch.tensor([1e4, -1e4, 1e4]))
        m.fc.bias.copy_(torch.tensor([1e4, 1e4, -1e4, 1e4]))
    return m


SLOPES = (2.0**-7, 0.25, 0.0, 2.0**-5)  # exact in fp16 and bf16; 0.25 is not flat


def low_precision(dtype: torch.dtype) -> Callable[[], Net]:
    def build() -> Net:
        m = Net(lambda m, x: m.tap("prelu", m.conv2(m.tap("act", m.conv(x), m.act, 1)), m.prelu, 1),
                {"act": Site("relu", "act", "relu", planted=(1,)),
                 "prelu": Site("prelu", "prelu", "prelu", planted=(0,), params=SLOPES)},
                conv=nn.Conv1d(3, 4, 3, padding=1), act=nn.ReLU(), conv2=nn.Conv1d(4, 4, 1), prelu=nn.PReLU(4))  # fmt: skip
        with torch.no_grad():
            m.prelu.weight.copy_(torch.tensor(SLOPES))
        plant(m.conv.bias, (1,))
        plant(m.conv2.bias, (0, 1))  # channel 1's slope is 0.25: negative but not flat
        return m.to(dtype)
    return build


def _einsum(m: Net, x: torch.Tensor) -> torch.Tensor:
    m.tap("pre", m.pre(x), m.pre_act, -1)
    # (N, D, L), from no layer: a copy of the weight is no parameter, so nothing says which dim D is (with the
    # parameter itself, the product fixes it: tests/test_axis_weight_products.py)
    return m.tap("act", torch.einsum("nlc,dc->ndl", x, m.mix.weight.clone()), m.act, 1)


def einsum_net() -> Net:
    m = Net(_einsum, {"pre": Site("relu", "pre_act", "relu", planted=(0,)),
                      "act": Site("relu", "act", "relu", planted=(1, 3), axis_known=False, trap=True)},
            pre=nn.Linear(3, 4), pre_act=nn.ReLU(), mix=nn.Linear(3, 5, bias=False), act=nn.ReLU())  # fmt: skip
    with torch.no_grad():  # inputs are positive: rows 1 and 3 (all negative) never fire, the others do
        m.pre.weight.copy_(torch.tensor([[1, 1, 1], [1, -1, 0], [-1, 1, 0.5], [0.5, -1, 1.0]]))
        m.pre.bias.zero_()
        m.mix.weight.copy_(torch.tensor([[1, -1, 0.5], [-1, -1, -1], [-0.5, 1, -0.5], [-1, -0.5, -1], [1, 1, -2.0]]))
    plant(m.pre.bias, (0,))
    return m


def einsum_batches() -> list[torch.Tensor]:
    return [x.abs() + 0.1 for x in shapes(*[(3, 7, 3)] * 3)()]


# --- the registry -----------------------------------------------------------------------------------

ZOO: dict[str, Case] = {
    "conv1d-dropout-relu": Case(conv1d_dropout_relu, shapes(*[(4, 3, 10)] * 3)),
    "resnet1d-relu-of-residual-sum": Case(resnet1d_block, shapes(*[(4, 5, 9)] * 3)),
    "wrapper-module-conv1d-relu": Case(wrapper_conv1d_relu, shapes(*[(3, 4, 11)] * 3)),
    "conv1d-lengths-7-1-12-3": Case(conv1d_variable_lengths, shapes((2, 3, 7), (3, 3, 1), (1, 3, 12), (4, 3, 3))),
    "conv1d-maxpool-relu": Case(conv1d_pool_relu(lambda: nn.MaxPool1d(2), False), shapes(*[(3, 3, 10)] * 3)),
    "conv1d-avgpool-functional-relu": Case(conv1d_pool_relu(lambda: nn.AvgPool1d(2), True), shapes(*[(3, 3, 14)] * 3)),
    "conv1d-batchnorm-leaky": Case(conv1d_bn_leaky, shapes(*[(6, 2, 8)] * 3)),
    "linear-transposed-to-channels-first": Case(linear_transposed, shapes(*[(3, 8, 4)] * 3)),
    "conv1d-cat-along-length": Case(conv1d_cat_length, shapes(*[(3, 3, 6)] * 3)),
    "conv1d-sliced-length-tanh": Case(conv1d_slice_tanh, shapes(*[(4, 3, 9)] * 3)),
    "conv2d-bn-inplace-relu": Case(conv2d(lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: nn.ReLU(inplace=True), "relu", (3,), bn=True),
                                   shapes(*[(4, 3, 5, 5)] * 3)),
    "grouped-conv2d-relu": Case(conv2d(lambda: nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU, "relu", (1, 6)),
                                shapes(*[(3, 8, 5, 6)] * 3)),
    "depthwise-conv2d-relu6": Case(conv2d(lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU6, "relu6", (0,), (5,)),
                                   shapes(*[(3, 6, 5, 5)] * 3)),
    "channels-last-permute-add-relu": Case(channels_last_add, shapes(*[(3, 3, 4, 6)] * 3)),
    "convnext-block": Case(convnext_block, shapes(*[(2, 4, 5, 5)] * 3)),
    "conv2d-flatten-relu": Case(conv2d_flatten, shapes(*[(3, 3, 3, 4)] * 3)),
    "linear-relu": Case(linear_relu, linear_batches),
    "padded-tokens-mlp-gelu": Case(token_mlp("gelu"), padded, padded=True),
    "padded-tokens-mlp-relu": Case(token_mlp("relu"), padded, padded=True),
    "padded-tokens-attention": Case(attention_block, padded, padded=True),
    "plus-inf-channel-relu": Case(nonfinite(math.inf, nn.ReLU, "relu"), shapes(*[(16, 4)] * 3)),
    "minus-inf-channel-leaky": Case(nonfinite(-math.inf, lambda: nn.LeakyReLU(0.01), "leaky_relu"), shapes(*[(16, 4)] * 3)),
    "nan-channel-relu": Case(nonfinite(math.nan, nn.ReLU, "relu"), shapes(*[(16, 4)] * 3)),
    "hardsigmoid-module": Case(unknown("hardsigmoid", "gate_hsig", (1, 3), make=nn.Hardsigmoid), shapes(*[(16, 6)] * 3)),
    "softsign-module": Case(unknown("softsign", "squash_softsign", (1, 3), make=nn.Softsign), shapes(*[(16, 6)] * 3)),
    "rrelu-eval-module": Case(unknown("rrelu", "noisy_rrelu", (1,), make=lambda: nn.RReLU(0.01, 0.05)), shapes(*[(16, 6)] * 3)),
    "custom-module-clamp": Case(unknown("clamp0", "my_act", (1,), make=MyAct), shapes(*[(16, 6)] * 3)),
    "functional-clamp-min-0": Case(unknown("clamp0", "clamp", (1,), fn=lambda z: z.clamp(min=0)), shapes(*[(16, 6)] * 3)),
    "functional-hardsigmoid": Case(unknown("hardsigmoid", "hardsigmoid", (1, 3), fn=F.hardsigmoid), shapes(*[(16, 6)] * 3)),
    "mean-1e4-std-1": Case(big_mean, shapes(*[(16, 2, 64)] * 4)),
    "fp16-conv1d-relu-prelu": Case(low_precision(torch.float16), shapes(*[(2, 3, 4201)] * 2, dtype=torch.float16)),
    "bf16-conv1d-relu-prelu": Case(low_precision(torch.bfloat16), shapes(*[(2, 3, 601)] * 2, dtype=torch.bfloat16)),
    "einsum-axis-unknown": Case(einsum_net, einsum_batches),
}


def make(name: str) -> tuple[Net, list[Any]]:
    """Build a zoo model (seeded), its batches, and record its own z and a."""
    torch.manual_seed(SEED)
    case = ZOO[name]
    model, batches = case.build(), case.data()
    record(model, batches)
    return model, batches
