"""Head-wise modality gate shared by the Swin blocks and the Cross-Cognition Transformer.

For a token x of modality m the gate of head h is ``2 * sigmoid(x . Wg[m, :, h] + bg[m, h])``; ``Wg`` and ``bg``
start at zero so every gate is exactly 1 at initialisation and a pre-trained trunk's outputs are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from medmap_fast.kernels._indexing import take_rows


class ModalityGate(nn.Module):
    """Gate logits [..., heads] for tokens [..., dim] of per-token (or broadcastable) modality ids.

    The logits of all modalities come from one matmul against ``Wg`` viewed as [dim, M*heads] and the token's own
    modality is then gathered, so a batch of mixed modalities is one pass with no Python loop over modalities.
    """

    def __init__(self, num_modalities: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_modalities, self.num_heads = num_modalities, num_heads
        self.weight = nn.Parameter(torch.zeros(num_modalities, dim, num_heads))
        self.bias = nn.Parameter(torch.zeros(num_modalities, num_heads))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """x [..., dim]; modality long, broadcastable to x.shape[:-1] -> logits [..., heads]."""
        m, h = self.num_modalities, self.num_heads
        modality = modality.expand(x.shape[:-1])
        if m == 1:
            return x @ self.weight[0] + self.bias[0]
        all_logits = (x @ self.weight.permute(1, 0, 2).reshape(x.shape[-1], m * h)).unflatten(-1, (m, h))
        index = modality[..., None, None].expand(*modality.shape, 1, h)
        return all_logits.gather(-2, index).squeeze(-2) + take_rows(self.bias, modality)
