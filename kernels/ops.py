"""The Triton kernels as registered torch ops: ``torch.ops.medmap_fast.<op>`` and ``<op>_backward``.

Each forward is a ``torch.library.custom_op`` with a fake (meta) implementation; its backward is a custom op of its
own wired in with ``register_autograd``. So ``torch.compile(model, fullgraph=True)`` traces the models through the
Triton launches (Inductor calls them as opaque kernels) and autograd runs the same kernels eagerly and compiled. The
plain-PyTorch paths are not registered: they are ordinary torch code that Dynamo traces and autograd differentiates
natively (``interface.py`` calls them directly).

Not ``torch.library.triton_op``: that wants every launch wrapped in ``wrap_triton`` and traces the launchers' host
Python (config choice, grids, the interpreter's CPU path) when compiling; here they stay opaque, as they are.

Outputs are dense (contiguous, storage offset 0, never aliasing an input: the fakes say so). A gradient that is not
wanted comes back as an empty tensor (a custom op cannot return None); the autograd formulas turn it into None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._utils import padded_size
from .gated_attn import gated_attention_triton_backward, gated_attention_triton_forward
from .patch_embed import patch_embed_3d_triton_backward, patch_embed_3d_triton_forward
from .window_attn import (
    tokens_padded,
    window_attention_triton_backward,
    window_attention_triton_forward,
    windows_per_volume,
)


def _dense(t: Tensor) -> Tensor:
    """``t`` laid out as the fakes promise: contiguous, at the start of its storage (a gradient can be a slice)."""
    return t if t.is_contiguous() and t.storage_offset() == 0 else t.clone(memory_format=torch.contiguous_format)


def _grads_out(
    grads: Sequence[Tensor | None], needs: Sequence[bool], inputs: Sequence[Tensor | None], like: Tensor
) -> list[Tensor]:
    """A backward op's result: the wanted gradients, dense as the fake says (zeros for an input the output does not
    depend on), an empty tensor in every other slot."""
    return [
        (torch.zeros_like(t, memory_format=torch.contiguous_format) if g is None else _dense(g))
        if need and t is not None
        else like.new_empty(0)
        for g, need, t in zip(grads, needs, inputs, strict=True)
    ]


def _fake_grads(needs: Sequence[bool], inputs: Sequence[Tensor | None], like: Tensor) -> list[Tensor]:
    return [
        torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else like.new_empty(0)
        for need, t in zip(needs, inputs, strict=True)
    ]


def _grads_in(grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor | None]:
    """A backward op's result as autograd wants it: None for the gradients that were not asked for."""
    return [g if need else None for g, need in zip(grads, needs, strict=True)]


def _needs(wanted: Sequence[bool], inputs: Sequence[Tensor | None]) -> list[bool]:
    """Which gradients a backward computes: those autograd asks for, of the inputs that are present."""
    return [bool(w) and t is not None for w, t in zip(wanted, inputs, strict=True)]


# ---- patch_embed_3d ------------------------------------------------------------------------------------------------


@torch.library.custom_op("medmap_fast::patch_embed_3d", mutates_args=())
def patch_embed_3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    modality_ids: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    layer_norm: bool,
    eps: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """x [V, Cin, D, H, W], weight [M, C, Cin, pd, ph, pw], bias [M, C], modality_ids [V] integer ->
    [V, D', H', W', C] (see ``patch_embed.py``); ln_weight/ln_bias None unless ``layer_norm``."""
    return patch_embed_3d_triton_forward(x, weight, bias, modality_ids, ln_weight, ln_bias, layer_norm, eps, out_dtype)


@patch_embed_3d.register_fake
def _(x, weight, bias, modality_ids, ln_weight, ln_bias, layer_norm, eps, out_dtype):
    sizes = [padded_size(s, p) // p for s, p in zip(x.shape[2:], weight.shape[3:], strict=True)]
    return x.new_empty(x.shape[0], *sizes, weight.shape[1], dtype=out_dtype)


@torch.library.custom_op("medmap_fast::patch_embed_3d_backward", mutates_args=())
def patch_embed_3d_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    modality_ids: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    layer_norm: bool,
    eps: float,
    needs: list[bool],
) -> list[Tensor]:
    """[dx, dweight, dbias, dln_weight, dln_bias]; ``needs`` says which are wanted (the others are empty)."""
    grads = patch_embed_3d_triton_backward(
        dy, x, weight, bias, modality_ids, ln_weight, ln_bias, layer_norm, eps, needs[0], any(needs[1:])
    )
    return _grads_out(grads, needs, (x, weight, bias, ln_weight, ln_bias), dy)


@patch_embed_3d_backward.register_fake
def _(dy, x, weight, bias, modality_ids, ln_weight, ln_bias, layer_norm, eps, needs):
    return _fake_grads(needs, (x, weight, bias, ln_weight, ln_bias), dy)


def _patch_embed_setup(ctx, inputs, output) -> None:
    x, weight, bias, modality_ids, ln_weight, ln_bias, layer_norm, eps, _ = inputs
    ctx.save_for_backward(x, weight, bias, modality_ids, ln_weight, ln_bias)
    ctx.layer_norm, ctx.eps = layer_norm, eps


def _patch_embed_backward(ctx, dy):
    x, weight, bias, modality_ids, ln_weight, ln_bias = ctx.saved_tensors
    w = ctx.needs_input_grad
    needs = _needs((w[0], w[1], w[2], w[4], w[5]), (x, weight, bias, ln_weight, ln_bias))
    if not any(needs):
        return (None,) * 9
    dx, dw, db, dln_w, dln_b = _grads_in(
        patch_embed_3d_backward(dy, x, weight, bias, modality_ids, ln_weight, ln_bias, ctx.layer_norm, ctx.eps, needs),
        needs,
    )
    return dx, dw, db, None, dln_w, dln_b, None, None, None


patch_embed_3d.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


# ---- window_attention ----------------------------------------------------------------------------------------------


def _window_args(num_heads, window_size, shift_size, table_window, scale, dropout_p) -> dict:
    return dict(
        num_heads=num_heads,
        window_size=tuple(window_size),
        shift_size=tuple(shift_size),
        table_window=tuple(table_window),
        scale=scale,
        dropout_p=dropout_p,
    )


@torch.library.custom_op("medmap_fast::window_attention", mutates_args=())
def window_attention(
    qkv: Tensor,
    bias_table: Tensor | None,
    pad_kv: Tensor | None,
    gate_logits: Tensor | None,
    seed: Tensor | None,
    num_heads: int,
    window_size: list[int],
    shift_size: list[int],
    table_window: list[int],
    scale: float | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """qkv [B, D, H, W, 3C] -> (out [B, D, H, W, C], lse [B*nW, heads, NP] fp32, the log-sum-exp its backward reads)
    (see ``window_attn.py``); attention dropout with probability ``dropout_p`` > 0 draws its mask from ``seed``
    (int64 [1]; a pure function of it, so the op stays functional)."""
    return window_attention_triton_forward(
        qkv,
        bias_table,
        pad_kv,
        gate_logits,
        seed,
        **_window_args(num_heads, window_size, shift_size, table_window, scale, dropout_p),
    )


@window_attention.register_fake
def _(qkv, bias_table, pad_kv, gate_logits, seed, num_heads, window_size, shift_size, table_window, scale, dropout_p):
    b, d, h, w, c3 = qkv.shape
    dtype = qkv.dtype if gate_logits is None else torch.promote_types(qkv.dtype, gate_logits.dtype)
    windows = b * windows_per_volume((d, h, w), window_size)
    return (
        qkv.new_empty(b, d, h, w, c3 // 3, dtype=dtype),
        qkv.new_empty(windows, num_heads, tokens_padded(math.prod(window_size)), dtype=torch.float32),
    )


@torch.library.custom_op("medmap_fast::window_attention_backward", mutates_args=())
def window_attention_backward(
    dout: Tensor,
    qkv: Tensor,
    bias_table: Tensor | None,
    pad_kv: Tensor | None,
    gate_logits: Tensor | None,
    seed: Tensor | None,
    out: Tensor,
    lse: Tensor,
    num_heads: int,
    window_size: list[int],
    shift_size: list[int],
    table_window: list[int],
    scale: float | None,
    dropout_p: float,
    needs: list[bool],
) -> list[Tensor]:
    """[dqkv, dbias_table, dpad_kv, dgate_logits]; ``needs`` says which are wanted (the others are empty)."""
    inputs = (qkv, bias_table, pad_kv, gate_logits)
    grads = window_attention_triton_backward(
        dout,
        *inputs,
        seed,
        out,
        lse,
        **_window_args(num_heads, window_size, shift_size, table_window, scale, dropout_p),
        needs=needs,
    )
    return _grads_out(grads, needs, inputs, dout)


@window_attention_backward.register_fake
def _(
    dout,
    qkv,
    bias_table,
    pad_kv,
    gate_logits,
    seed,
    out,
    lse,
    num_heads,
    window_size,
    shift_size,
    table_window,
    scale,
    dropout_p,
    needs,
):
    return _fake_grads(needs, (qkv, bias_table, pad_kv, gate_logits), dout)


def _window_setup(ctx, inputs, output) -> None:
    qkv, bias_table, pad_kv, gate_logits, seed, *args = inputs
    ctx.save_for_backward(qkv, bias_table, pad_kv, gate_logits, seed, *output)
    ctx.args = args


def _window_backward(ctx, dout, _dlse):
    qkv, bias_table, pad_kv, gate_logits, seed, out, lse = ctx.saved_tensors
    needs = _needs(ctx.needs_input_grad[:4], (qkv, bias_table, pad_kv, gate_logits))
    if not any(needs):
        return (None,) * 11
    grads = window_attention_backward(dout, qkv, bias_table, pad_kv, gate_logits, seed, out, lse, *ctx.args, needs)
    return (*_grads_in(grads, needs), *(None,) * 7)


window_attention.register_autograd(_window_backward, setup_context=_window_setup)


# ---- gated_attention -----------------------------------------------------------------------------------------------


@torch.library.custom_op("medmap_fast::gated_attention", mutates_args=())
def gated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    pair_bias: Tensor | None,
    q_modality: Tensor | None,
    k_modality: Tensor | None,
    gate_logits: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> (out [B, Lq, H, Dh], lse [B*H, Lq] fp32, the log-sum-exp its backward
    reads) (see ``gated_attn.py``)."""
    out, lse = gated_attention_triton_forward(
        q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, scale
    )
    return _dense(out), lse


@gated_attention.register_fake
def _(q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, scale):
    b, lq, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(b * h, lq, dtype=torch.float32)


@torch.library.custom_op("medmap_fast::gated_attention_backward", mutates_args=())
def gated_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    pair_bias: Tensor | None,
    q_modality: Tensor | None,
    k_modality: Tensor | None,
    gate_logits: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float | None,
    needs: list[bool],
) -> list[Tensor]:
    """[dq, dk, dv, dpair_bias, dgate_logits]; ``needs`` says which are wanted (the others are empty)."""
    grads = gated_attention_triton_backward(
        dout, q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, out, lse, scale, needs[3]
    )
    return _grads_out(grads, needs, (q, k, v, pair_bias, gate_logits), dout)


@gated_attention_backward.register_fake
def _(dout, q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, out, lse, scale, needs):
    return _fake_grads(needs, (q, k, v, pair_bias, gate_logits), dout)


def _gated_setup(ctx, inputs, output) -> None:
    *tensors, scale = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.scale = scale


def _gated_backward(ctx, dout, _dlse):
    q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, out, lse = ctx.saved_tensors
    w = ctx.needs_input_grad
    needs = _needs((w[0], w[1], w[2], w[4], w[7]), (q, k, v, pair_bias, gate_logits))
    if not any(needs):
        return (None,) * 9
    dq, dk, dv, dpair, dgate = _grads_in(
        gated_attention_backward(
            dout, q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, out, lse, ctx.scale, needs
        ),
        needs,
    )
    return dq, dk, dv, None, dpair, None, None, dgate, None


gated_attention.register_autograd(_gated_backward, setup_context=_gated_setup)
