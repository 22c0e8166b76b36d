"""CPU fast path of the torch backend's window attention: the same maths as ``window_attention_reference``, a chunk
of windows at a time, with the backward recomputing the scores (flash-style) instead of saving them.

Why not SDPA on CPU: with a learnable bias table the mask needs a gradient, so SDPA takes its math path and
materialises the [B, nW, heads, n, n] scores several times; MONAI's -100 shift mask then makes exp() produce fp32
denormals, which run on the CPU's slow microcode path. Here the scores of ~1 MiB of windows stay in cache, the shift
mask is -inf (the softmax differs from -100's by < exp(-100) relative, below fp64 resolution), and windows that do
not straddle regions of the rolled grid skip the mask entirely.
"""

from __future__ import annotations

import functools
import itertools

import torch

from medmap_fast.validation import describe, fail

from .window_attn import apply_gate, padded_grid, shift_mask, triple, window_bias, window_merge, window_qkv

CHUNK_BYTES = 1 << 20  # scores per chunk: one 343-token window x 3 heads fits a core's L2


@functools.lru_cache(maxsize=64)
def _straddling(
    padded: tuple[int, int, int], window_size: tuple[int, int, int], shift_size: tuple[int, int, int]
) -> tuple[bool, ...]:
    """For every window of the rolled grid (raster order): does it hold tokens of more than one region (so needs the
    mask)? Along a shifted axis only the last window does (regions 1 and 2; all others lie in region 0). Plain
    Python, no tensor: torch.compile evaluates it while tracing instead of syncing on a mask."""
    counts = [p // w for p, w in zip(padded, window_size, strict=True)]
    return tuple(
        any(s and i == n - 1 for i, n, s in zip(idx, counts, shift_size, strict=True))
        for idx in itertools.product(*map(range, counts))
    )


def _scores(qs, k, bias, neg_inf, masked, sl) -> torch.Tensor:
    s = torch.matmul(qs, k.transpose(-2, -1))  # [windows, heads, n, n]
    if bias is not None:
        s.add_(bias)
    if any(masked[sl]):
        s.add_(neg_inf[sl])
    return s


def _draw_keep(out: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Fill the bool tensor ``out`` with a dropout keep mask from torch's generator: True where a uniform 16-bit
    number (a quarter of a random int64) reaches dropout_p * 2^16, i.e. with probability 1 - p for p a multiple of
    2^-16 (``rounded_dropout_p``); 2.5x faster than comparing torch.rand's floats."""
    bits = torch.randint(-(2**63), 2**63 - 1, (-(-out.numel() // 4),), dtype=torch.int64)  # Dynamo: not random_
    uniform = bits.view(torch.int16)[: out.numel()].view(out.shape)  # int16: the 16-bit number minus 2^15
    return torch.ge(uniform, round(dropout_p * 65536) - 32768, out=out)


class ChunkedWindowAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias + mask) v over q, k, v [B, nW, heads, n, d]; bias [heads, n, n] or None;
    neg_inf [nW, 1, n, n] (0 / -inf) or None with ``masked`` flags per window. Attention dropout with probability
    ``dropout_p``: keep [B, nW, heads, n, n] bool (True = kept) or None to draw it (:func:`_draw_keep`), a chunk at
    a time; the kept probabilities are scaled by 1 / (1 - p). The mask is saved for the backward (1 byte per score,
    a quarter of the fp32 scores that the backward recomputes instead)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, neg_inf, masked, scale, dropout_p, keep):
        b, nw, h, n, _ = q.shape
        qs, bias_d = q * scale, None if bias is None else bias.detach()
        out = torch.empty_like(q)
        draw = bool(dropout_p) and keep is None
        if draw:
            keep = torch.empty(b, nw, h, n, n, dtype=torch.bool)
        elif not dropout_p:
            keep = None
        cw = max(1, CHUNK_BYTES // (h * n * n * q.element_size()))
        for i in range(b):
            for w0 in range(0, nw, cw):
                sl = slice(w0, w0 + cw)
                p = torch.softmax(_scores(qs[i, sl], k[i, sl], bias_d, neg_inf, masked, sl), -1)
                if dropout_p:
                    if draw:
                        _draw_keep(keep[i, sl], dropout_p)
                    p.mul_(keep[i, sl])
                torch.matmul(p, v[i, sl], out=out[i, sl])
        if dropout_p:
            out.mul_(1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(qs, k, v, bias, neg_inf, keep)
        ctx.masked, ctx.scale, ctx.dropout_p = masked, scale, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, bias, neg_inf, keep = ctx.saved_tensors
        b, nw, h, n, _ = qs.shape
        grad, bias_d = grad.contiguous(), None if bias is None else bias.detach()
        if ctx.dropout_p:  # out = (P * keep / (1 - p)) v: the scale moves onto the output gradient
            grad = grad * (1.0 / (1.0 - ctx.dropout_p))
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        dbias = None
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32))
        cw = max(1, CHUNK_BYTES // (h * n * n * qs.element_size()))
        for i in range(b):
            for w0 in range(0, nw, cw):
                sl = slice(w0, w0 + cw)
                p = torch.softmax(_scores(qs[i, sl], k[i, sl], bias_d, neg_inf, ctx.masked, sl), -1)
                g = grad[i, sl]
                dp = torch.matmul(g, v[i, sl].transpose(-2, -1))
                if keep is None:
                    torch.matmul(p.transpose(-2, -1), g, out=dv[i, sl])
                else:  # dV = (P * keep)^T g, and only kept probabilities reach the output
                    torch.matmul((p * keep[i, sl]).transpose(-2, -1), g, out=dv[i, sl])
                    dp.mul_(keep[i, sl])
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
                if dbias is not None:
                    dbias += ds.sum(0)
                torch.matmul(ds, k[i, sl], out=dq[i, sl])
                torch.matmul(ds.transpose(-2, -1), qs[i, sl], out=dk[i, sl])
        dq.mul_(ctx.scale)
        return dq, dk, dv, None if dbias is None else dbias.to(bias.dtype), None, None, None, None, None


def window_attention_cpu(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int] = (0, 0, 0),
    bias_table: torch.Tensor | None = None,
    *,
    table_window: tuple[int, int, int] | None = None,
    pad_kv: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``window_attention_reference``'s signature and results, faster on CPU tensors (see the module docstring);
    attention dropout as there (``dropout_mask`` [B*nW, heads, n, n] bool, or None to draw one: then ``dropout_p``
    must be a multiple of 2^-16, as the public op passes it)."""
    b, d, h, w, c3 = qkv.shape
    window_size, shift_size = triple(window_size), triple(shift_size)
    padded = padded_grid((d, h, w), window_size)
    q, k, v = (
        t.unflatten(0, (b, -1)).contiguous() for t in window_qkv(qkv, num_heads, window_size, shift_size, pad_kv)
    )
    if dropout_mask is not None:
        if tuple(dropout_mask.shape) != (b * q.shape[1], *q.shape[2:4], q.shape[3]):
            fail(
                "dropout_mask",
                f"a bool tensor {(b * q.shape[1], *q.shape[2:4], q.shape[3])} (windows, heads, queries, keys)",
                describe(dropout_mask),
            )
        dropout_mask = dropout_mask.unflatten(0, (b, -1))
    bias = neg_inf = None
    masked = (False,) * q.shape[1]
    if bias_table is not None:
        bias = window_bias(bias_table, window_size, table_window, q.dtype)  # [h, n, n]
    if any(shift_size):
        neg_inf = shift_mask(padded, window_size, shift_size, float("-inf")).to(q.dtype)[:, None]
        masked = _straddling(padded, window_size, shift_size)
    scale = (c3 // 3 // num_heads) ** -0.5 if scale is None else scale
    out = ChunkedWindowAttention.apply(q, k, v, bias, neg_inf, masked, scale, dropout_p, dropout_mask)
    return apply_gate(window_merge(out.flatten(0, 1), (d, h, w), window_size, shift_size), gate_logits)
