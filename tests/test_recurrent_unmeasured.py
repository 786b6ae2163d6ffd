"""nn.RNN, LSTM and GRU (and their cells) apply their nonlinearities inside torch's recurrent kernel, where no
hook or probe runs: an audit names them instead of reporting the model's other layers as if they were all
(DESIGN section 3, unknown activations are never skipped silently). The layers around them are measured
as usual."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.errors import UsageError


class RecurrentTagger(nn.Module):
    """A recurrent layer, then a Linear + ReLU head per time step; the head stores its ReLU's input."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(16, 12)
        self.act = nn.ReLU()
        self.out = nn.Linear(12, 3)
        self.seen: list[torch.Tensor] = []
        with torch.no_grad():
            self.head.bias[:4] = -50.0  # four dead channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(x)[0]
        z = self.head(h)
        self.seen.append(z.detach().clone())
        return self.out(self.act(z))


class CellLoop(nn.Module):
    """An LSTMCell stepped in Python over the time axis: the cell's gates are inside its kernel too."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(8, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.out(h)


@pytest.mark.parametrize("rnn", [nn.GRU(8, 16, batch_first=True), nn.LSTM(8, 16, batch_first=True),
                                 nn.RNN(8, 16, nonlinearity="relu", batch_first=True)], ids=["gru", "lstm", "rnn"])
def test_recurrent_layer_is_named_and_the_head_measured(rnn: nn.Module) -> None:
    torch.manual_seed(0)
    model = RecurrentTagger(rnn).eval()
    batches = [torch.randn(4, 7, 8) for _ in range(3)]
    report = deadneuron.audit(model, batches, progress=False)
    model.seen.clear()
    with torch.no_grad():
        for b in batches:
            model(b)
    z = torch.cat(model.seen).reshape(-1, 12).double().numpy()  # the head's ReLU input, as the model stored it
    site = report.sites["act"]
    assert site.n == z.shape[0] == 3 * 4 * 7
    assert list(site.dead_channels) == [c for c in range(12) if (z[:, c] <= 0).all()]
    assert {0, 1, 2, 3} <= set(site.dead_channels)
    np.testing.assert_allclose(site.channel_zero, (z <= 0).mean(0), rtol=0, atol=1e-12)
    named = [w for w in report.warnings if "'rnn'" in w]
    assert len(named) == 1, report.warnings
    assert type(rnn).__name__ in named[0] and "recurrent kernel" in named[0] and "not measured" in named[0]
    assert ("relu" if isinstance(rnn, nn.RNN) else "sigmoid") in named[0]
    assert "register_activation" not in named[0]  # registering a function cannot reach inside the kernel


def test_a_model_of_recurrent_cells_alone_says_why_nothing_was_measured() -> None:
    with pytest.raises(UsageError) as err:
        deadneuron.audit(CellLoop().eval(), [torch.randn(3, 5, 8)], progress=False)
    message = str(err.value)
    assert message.startswith("no activation site was measured")
    assert "'cell' (LSTMCell)" in message and "recurrent kernel" in message
    assert "register_activation" not in message
