"""No false alarms on healthy real models (audited with deadneuron.audit), and the verdicts on the demo
checkpoints of the bundled ARC model (skipped until they exist)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.rules import Finding, RulesConfig, Severity, builtin_rules, context_from, evaluate
from tests.test_rules_factory import warnings_or_worse

ROOT = Path(__file__).resolve().parent.parent
SICK = ROOT / "checkpoints" / "slot_attention.pth"
HEALTHY = ROOT / "checkpoints" / "slot_attention_healthy.pth"
# Rules that speak about the whole model, whichever sites they name.
WHOLE_MODEL_RULES = ("nonfinite", "audit-caveats")


def findings_for(model: nn.Module, data: list[Any], checkpoint: dict[str, Any] | None = None) -> list[Finding]:
    report = deadneuron.audit(model, data)
    return evaluate(report, context_from(checkpoint or {}, model), rules=builtin_rules(), config=RulesConfig())


def cnn(width: int = 16, classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes),
    )  # fmt: skip


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: which quadrant holds a bright square, on noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen) * 0.5
    y = torch.randint(0, 4, (n,), generator=gen)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, :, 8 * r + 2 : 8 * r + 6, 8 * c + 2 : 8 * c + 6] += 2.0
    return x, y


def describe(findings: list[Finding]) -> str:
    return "\n".join(f"[{f.severity.value}] {f.rule}: {f.message}" for f in findings)


def test_fresh_cnn_after_batchnorm_warmup_has_no_warning() -> None:
    torch.manual_seed(0)
    model = cnn()
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(images(32, seed)[0])
    findings = findings_for(model.eval(), [images(32, 100 + i)[0] for i in range(4)])
    assert not warnings_or_worse(findings), describe(findings)
    assert {f.rule for f in findings} <= {"sparse-healthy"}  # BatchNorm+ReLU: about half zeros, healthy


def _train(model: nn.Module, steps: int, lr: float) -> tuple[dict[str, Any], float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_held, y_held = images(256, 999)
    history, correct = [], 0.0
    for step in range(1, steps + 1):
        model.train()
        x, y = images(32, step)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct += float((logits.argmax(1) == y).float().mean())
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                held = float((model(x_held).argmax(1) == y_held).float().mean())
            history.append({"epoch": step // 50, "loss": float(loss.detach()), "train_accuracy": correct / 50, "heldout_accuracy": held})
            correct = 0.0
    checkpoint = {"config": {"LEARNING_RATE": lr, "NUM_EPOCHS": steps // 50, "BATCH_SIZE": 32},
                  "optimizer_state": optimizer.state_dict(), "history": history}
    return checkpoint, history[-1]["heldout_accuracy"]


def test_small_cnn_trained_a_few_hundred_steps_has_no_warning() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = cnn(width=12)
    checkpoint, heldout = _train(model, steps=300, lr=1e-3)
    assert heldout > 0.9  # it learned the task
    findings = findings_for(model.eval(), [images(64, 500 + i)[0] for i in range(3)], checkpoint)
    assert not warnings_or_worse(findings), describe(findings)


def test_gelu_mlp_has_no_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    gen = torch.Generator().manual_seed(1)
    findings = findings_for(model.eval(), [torch.randn(64, 32, generator=gen) for _ in range(4)])
    assert not warnings_or_worse(findings), describe(findings)


# -- the bundled model's demo checkpoints ------------------------------------------------------------------------


def audit_checkpoint(path: Path) -> tuple[Any, list[Finding]]:
    from deadneuron.adapters import get_adapter
    from deadneuron.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    adapter = get_adapter(str(checkpoint["adapter"]))
    model = adapter.load(checkpoint)
    data = adapter.batches("heldout", checkpoint["config"], max_grids=256)  # type: ignore[call-arg]
    report = deadneuron.audit(model, data, adapter=adapter, meta={"source": str(path)})
    return report, evaluate(report, context_from(checkpoint, model), rules=builtin_rules(), config=RulesConfig())


@pytest.mark.slow
@pytest.mark.skipif(not SICK.exists(), reason="checkpoints/slot_attention.pth not built yet")
def test_sick_demo_leads_with_its_dead_encoder_channels() -> None:
    report, findings = audit_checkpoint(SICK)
    assert findings, "no finding on the sick demo"
    top = findings[0]
    assert top.severity >= Severity.WARNING, describe(findings)
    assert top.channels, describe(findings)
    for site, ids in top.channels.items():
        assert site.startswith("encoder."), site
        assert set(ids) <= set(report.sites[site].dead_channels) | set(report.sites[site].dormant_channels)
    assert any("--activation" in c or "--lr" in c for c in top.commands), top.commands
    assert str(SICK) in top.commands[0]


@pytest.mark.slow
@pytest.mark.skipif(not HEALTHY.exists(), reason="checkpoints/slot_attention_healthy.pth not built yet")
def test_healthy_demo_has_no_warning_about_its_encoder() -> None:
    # "Healthy" is the encoder's BatchNorm configuration. Measured on that config (64 grids, lr 1e-3, 120
    # steps): the decoder's 1x1-conv ReLUs (no BatchNorm) still had 5, 6 and 15 of 64 channels dead, and
    # the model sat below the most-common-colour baseline with collapsed slots, so dead-relu (decoder),
    # below-baseline and the slot rules may rightly fire here; nothing may be said against the encoder.
    report, findings = audit_checkpoint(HEALTHY)
    encoder = {name for name in report.sites if name.startswith("encoder.")}
    bad = [f for f in warnings_or_worse(findings) if f.rule in WHOLE_MODEL_RULES or encoder & set(f.sites)]
    assert not bad, describe(findings)
    assert any(f.rule == "sparse-healthy" and encoder & set(f.sites) for f in findings), describe(findings)
