"""Softmax router: token -> fp32 probabilities over experts. No expert code lives here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # W_r, one row per expert

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # The product itself in fp32, even under bf16 autocast: thresholds compare these probabilities and the MI
        # loss takes their logs, so bf16-rounded logits would shift both.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TN = F.linear(x_TD.float(), self.weight.float())
        return torch.softmax(logits_TN, dim=-1)
