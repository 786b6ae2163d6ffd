"""The models of the overhead suite, each with its batches and how to feed them (benchmarks/overhead.py).

Every model is built here from code (no download): ResNet-18 and a ConvNeXt-style stack written inline,
the ARC-like CNN, a transformer whose attention is written as tensor ops, a Hugging Face BERT built from a
``BertConfig``, and the bundled slot model (``checkpoints/slot_attention.pth``) on ARC grids.
Activations are modules where the architecture has them as modules, so that hook-based peers can hook the
same sites; the attention and the residual arithmetic run as plain tensor ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
Forward = Callable[[nn.Module, Any], Any]


def plain_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input, a dict is passed as keyword arguments."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


@dataclass
class Case:
    """One model of the suite: the model in eval mode, its batches, and how the audit and the peers feed it."""

    key: str
    name: str
    shape: str
    model: nn.Module
    batches: list[Any]
    forward: Forward = plain_forward
    audit_kwargs: dict[str, Any] = field(default_factory=dict)

    def first_tensor(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, dict):
            return next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return batch.x  # an ARC GridBatch


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    """The ResNet-18 layout, written inline (no torchvision)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class ArcCNN(nn.Module):
    """4 x (conv 64 + BN + ReLU), the shape of the ARC encoder, one shared ReLU (four sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(10 if i == 0 else 64, 64, 3, padding=1) for i in range(4))
        self.bn_layers = nn.ModuleList(nn.BatchNorm2d(64) for _ in range(4))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.conv_layers, self.bn_layers, strict=True):
            x = self.relu(bn(conv(x)))
        return x


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, then channels-last LayerNorm + Linear 4x + GELU + Linear, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def convnext_stack(dims: tuple[int, ...] = (64, 128), depth: int = 2) -> nn.Module:
    """A stem (4x4 conv, stride 4), then per stage ``depth`` ConvNeXt blocks and a 2x2 downsampling conv."""
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4)]
    for i, dim in enumerate(dims):
        layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        if i + 1 < len(dims):
            layers.append(nn.Conv2d(dim, dims[i + 1], 2, 2))
    return nn.Sequential(*layers)


class TensorOpBlock(nn.Module):
    """Pre-norm transformer block; attention written as tensor ops (matmul, softmax), GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dim // self.heads))
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, dim)
        x = x + self.proj(y)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def tensor_op_transformer(dim: int = 256, heads: int = 8, blocks: int = 6) -> nn.Module:
    return nn.Sequential(*(TensorOpBlock(dim, heads) for _ in range(blocks)), nn.LayerNorm(dim))


def bert(hidden: int = 256, layers: int = 4) -> nn.Module:
    """A Hugging Face BERT built from a BertConfig (random weights, nothing downloaded)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=8000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=128)  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


def bert_batches(count: int, batch: int, length: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Token ids with a padded tail of random length in each row (an attention mask of 0/1)."""
    out = []
    for _ in range(count):
        ids = torch.randint(1, 8000, (batch, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def slot_case(count: int, *, batch: int) -> Case:
    """The bundled slot model, loaded as the CLI loads it, fed through its adapter, on held-out ARC grids in
    shuffled batches of similar-sized grids (as training batches them; the audit's own order is by size)."""
    from arc_model import data
    from arc_model.adapter import ArcSlotAdapter
    from deadneuron.checkpoint import load_checkpoint

    adapter = ArcSlotAdapter()
    checkpoint = load_checkpoint(ROOT / "checkpoints" / "slot_attention.pth")
    assert isinstance(checkpoint, dict)
    batches = []
    for b in data.epoch_batches(data.load_grids("heldout"), batch, seed=0, epoch=0):
        batches.append(b)
        if len(batches) == count:
            break
    sizes = sorted(b.x.shape[-1] * b.x.shape[-2] for b in batches)
    shape = f"{batch}x11xHxW, {sizes[0]}-{sizes[-1]} cells"
    return Case("slot", "slot model (bundled), ARC grids", shape, adapter.load(checkpoint), batches, adapter.forward,
                {"adapter": adapter})  # fmt: skip


def build_case(key: str, *, quick: bool) -> Case:
    """One model of the suite in eval mode, with its batches; ``quick`` shrinks every batch and the batch
    count (a smoke run, not a measurement)."""
    g = torch.Generator().manual_seed(CASE_KEYS.index(key))
    torch.manual_seed(CASE_KEYS.index(key))
    count = 2 if quick else 6
    s = 4 if quick else 1  # batch size divisor

    def randn(*shape: int) -> list[torch.Tensor]:
        return [torch.randn(*shape, generator=g) for _ in range(count)]

    makers: dict[str, Callable[[], Case]] = {
        "resnet18": lambda: Case("resnet18", "ResNet-18 (inline)", f"{16 // s}x3x64x64", resnet18(), randn(16 // s, 3, 64, 64)),
        "arc_cnn": lambda: Case("arc_cnn", "ARC-like CNN, 4 x conv64+BN+ReLU", f"{32 // s}x10x30x30", ArcCNN(),
                                randn(32 // s, 10, 30, 30)),
        "convnext": lambda: Case("convnext", "ConvNeXt-style stack, channels-last MLPs", f"{16 // s}x3x64x64",
                                 convnext_stack(), randn(16 // s, 3, 64, 64)),
        "transformer": lambda: Case("transformer", "transformer, 6 blocks, attention as tensor ops", f"{8 // s}x64x256",
                                    tensor_op_transformer(), randn(8 // s, 64, 256)),
        "bert": lambda: Case("bert", "Hugging Face BERT (BertConfig, 4 layers, 256 wide)", f"{16 // s}x64 tokens", bert(),
                             bert_batches(count, 16 // s, 64, g)),
        "slot": lambda: slot_case(count, batch=16 // s),
    }  # fmt: skip
    case = makers[key]()
    case.model.eval()
    return case


CASE_KEYS = ("resnet18", "arc_cnn", "convnext", "transformer", "bert", "slot")
