"""In-house architectures for the model-spec tests, reached through ``arch = "spec_toys:…"``
(pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import torch
from torch import nn


class LstmNet(nn.Module):
    """A conv stem followed by an LSTM over the rows: a layer the LRP engine has no rule for."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.rnn = nn.LSTM(8 * 16, 16, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)  # (B, 8, 16, 16)
        seq = f.permute(0, 2, 1, 3).flatten(2)  # rows as a sequence
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


def lstm_net(num_classes: int = 2) -> nn.Module:
    return LstmNet(num_classes)
