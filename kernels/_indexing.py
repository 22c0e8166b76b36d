"""Row gathers whose gradient is bit-reproducible on CPU."""

from __future__ import annotations

import torch


def take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a long ``index`` of any shape: [*index.shape, *table.shape[1:]].

    Advanced indexing backpropagates through ``index_put_(accumulate=True)``, whose CPU kernel adds the rows of
    repeated indices in a thread-dependent order (last-bit differences that made seeded CPU training runs diverge);
    the gradient of ``index_select`` (``index_add_``) adds them in a fixed order.
    """
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])
