"""take_rows: the row gather of per-modality weights and bias tables, with a gradient that repeats bit for bit."""

from __future__ import annotations

import torch

from medmap_fast.kernels._indexing import take_rows


def test_take_rows_equals_indexing_and_its_gradient_repeats() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 24, 64, generator=g, requires_grad=True)
    index = torch.randint(0, 12, (64, 64), generator=g)  # many repeats of each row
    upstream = torch.randn(64, 64, 24, 64, generator=g)
    out = take_rows(table, index)
    assert torch.equal(out, table[index])
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the summation order of repeated rows only varies with several threads
    try:
        grads = [torch.autograd.grad((take_rows(table, index) * upstream).sum(), table)[0] for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    expected = torch.zeros(12, 24, 64, dtype=torch.float64).index_add_(
        0, index.reshape(-1), upstream.double().reshape(-1, 24, 64))
    assert torch.allclose(grads[0].double(), expected, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(grads[0], x) for x in grads[1:])
