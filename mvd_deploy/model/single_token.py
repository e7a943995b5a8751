"""Cross-attention over a single context token, without the attention.

SVD conditions on one token, the CLIP image embedding. Softmax over one key is exactly 1, so
cross-attention returns to_out(to_v(context)) for every query: to_q, to_k, the similarity map and
the softmax do nothing. This module keeps only ``to_v`` and ``to_out`` and broadcasts.
"""

from __future__ import annotations

import torch
from torch import nn


class SingleTokenCrossAttention(nn.Module):
    def __init__(self, to_v: nn.Linear, to_out: nn.Module):
        super().__init__()
        self.to_v = to_v
        self.to_out = to_out  # diffusers' ModuleList [Linear, Dropout]: parameter names unchanged

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, attention_mask=None):
        """hidden_states (R·G, N, C); encoder_hidden_states (R, 1, D) → (R·G, N, C_out).

        R context rows serve G consecutive query rows each: G = 1 in spatial blocks (one context row
        per frame), G = H·W in temporal blocks (one context row per video instead of per pixel).
        """
        if attention_mask is not None:
            raise ValueError("single-token cross-attention takes no attention mask")
        rows, queries = hidden_states.shape[0], hidden_states.shape[1]
        out = self.to_v(encoder_hidden_states)
        for layer in self.to_out:
            out = layer(out)
        group = rows // out.shape[0]
        out = out[:, None].expand(-1, group, -1, -1).reshape(rows, 1, out.shape[-1])
        return out.expand(-1, queries, -1)
