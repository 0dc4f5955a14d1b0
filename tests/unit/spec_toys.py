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


class GruStack(nn.Module):
    """Five GRUs after the stem, then two Softmins: layers without a rule that repeat."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.rnns = nn.ModuleList([nn.GRU(8 * 16 if k == 0 else 8, 8, batch_first=True) for k in range(5)])
        self.acts = nn.ModuleList([nn.Softmin(dim=-1) for _ in range(2)])
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.stem(x).permute(0, 2, 1, 3).flatten(2)
        for rnn in self.rnns:
            seq, _ = rnn(seq)
        for act in self.acts:
            seq = act(seq)
        return self.head(seq[:, -1])


def gru_stack(num_classes: int = 2) -> nn.Module:
    return GruStack(num_classes)
