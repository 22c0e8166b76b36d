"""The torch backend's CPU path of window attention (chunked, recomputing backward) equals the reference in fp64:
output and every gradient, shifted / padded / shrunk windows, with and without bias, pad_kv and gate, and with
attention dropout given the same mask."""

from __future__ import annotations

import math

import pytest
import torch

from medmap_fast.kernels import backend, interface, window_attention
from medmap_fast.kernels.window_attn import window_attention_reference
from medmap_fast.kernels.window_attn_cpu import window_attention_cpu

CASES = [  # size, heads, head_dim, window, shift, table_window
    ((9, 10, 11), 3, 16, (7, 7, 7), (3, 3, 3), (7, 7, 7)),   # padded and shifted
    ((7, 7, 7), 2, 8, (7, 7, 7), (0, 0, 0), (7, 7, 7)),      # one full window
    ((6, 8, 14), 2, 8, (6, 7, 7), (0, 3, 3), (7, 7, 7)),     # shrunk window on one axis (MONAI's table quirk)
    ((4, 4, 4), 1, 8, (2, 2, 2), (1, 1, 1), (2, 2, 2)),      # many small windows: several chunks
]


@pytest.mark.parametrize("size,heads,head_dim,window,shift,table", CASES)
@pytest.mark.parametrize("extras", [True, False])
def test_cpu_path_equals_reference(size, heads, head_dim, window, shift, table, extras) -> None:
    g = torch.Generator().manual_seed(0)
    c = heads * head_dim
    rows = (2 * table[0] - 1) * (2 * table[1] - 1) * (2 * table[2] - 1)
    qkv = torch.randn(2, *size, 3 * c, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(rows, heads, generator=g, dtype=torch.float64, requires_grad=True) if extras else None
    pad_kv = torch.randn(2 * c, generator=g, dtype=torch.float64, requires_grad=True) if extras else None
    gate = torch.randn(2, *size, heads, generator=g, dtype=torch.float64, requires_grad=True) if extras else None
    leaves = [t for t in (qkv, bias, pad_kv, gate) if t is not None]
    kwargs = dict(table_window=table, pad_kv=pad_kv, gate_logits=gate)
    dout = torch.randn(2, *size, c, generator=g, dtype=torch.float64)
    results = []
    for fn in (window_attention_reference, window_attention_cpu):
        out = fn(qkv, heads, window, shift, bias, **kwargs)
        results.append((out, torch.autograd.grad(out, leaves, dout, allow_unused=True)))  # pad_kv: unused unpadded
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size,heads,head_dim,window,shift,table", [CASES[1], CASES[3]])
def test_cpu_path_dropout_equals_reference_with_the_same_mask(size, heads, head_dim, window, shift, table) -> None:
    """Attention dropout (p = 0.3) with one keep mask given to both paths: output and every gradient equal in fp64;
    and without a mask the CPU path draws from torch's generator, so torch.manual_seed reproduces it."""
    g = torch.Generator().manual_seed(0)
    c = heads * head_dim
    rows = (2 * table[0] - 1) * (2 * table[1] - 1) * (2 * table[2] - 1)
    qkv = torch.randn(2, *size, 3 * c, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(rows, heads, generator=g, dtype=torch.float64, requires_grad=True)
    windows = 2 * math.prod(-(-s // w) for s, w in zip(size, window, strict=True))
    n = math.prod(window)
    keep = torch.rand(windows, heads, n, n, generator=g) >= 0.3
    dout = torch.randn(2, *size, c, generator=g, dtype=torch.float64)
    results = []
    for fn in (window_attention_reference, window_attention_cpu):
        out = fn(qkv, heads, window, shift, bias, table_window=table, dropout_p=0.3, dropout_mask=keep)
        results.append((out, torch.autograd.grad(out, (qkv, bias), dout)))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    drawn = []
    for _ in range(2):
        torch.manual_seed(7)
        drawn.append(window_attention_cpu(qkv, heads, window, shift, bias, table_window=table, dropout_p=0.3))
    assert torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[0], ref)


def test_torch_backend_uses_cpu_path(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(interface, "window_attention_cpu", lambda *a, **k: calls.append(1) or "cpu-path")
    with backend("torch"):
        assert window_attention(torch.randn(1, 7, 7, 7, 24), 2, (7, 7, 7)) == "cpu-path"
    assert calls == [1]
