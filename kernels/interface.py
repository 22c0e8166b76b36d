"""The public functional ops: validate, then run the Triton kernel (a registered torch op) or the plain-PyTorch path.

Layouts (flash-attention style, one place documents them all):
  patch_embed_3d    x [V, Cin, D, H, W] -> [V, D', H', W', C] channels-last (see ``patch_embed.py``)
  window_attention  qkv [B, D, H, W, 3C] -> [B, D, H, W, C] (see ``window_attn.py``)
  gated_attention   q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh] (see ``gated_attn.py``)
The two Swin ops also take 2-D images (x [V, Cin, H, W], qkv [B, H, W, 3C], 2-D windows, patches and weights): they
run as volumes with a unit last axis (window (wh, ww, 1), shift (sh, sw, 0), patch (ph, pw, 1)) through the same
kernels and PyTorch paths. The kernels' window geometry lives in host-side tables, so a unit axis costs nothing in
them, and the relative-position index of a (wh, ww, 1) window is MONAI's 2-D index (the unit axis adds 0).

The Triton path is one registered torch op per call (``ops.py``); the PyTorch path is ordinary torch code. Either way
``torch.compile(fullgraph=True)`` traces through the op. The checks here read shapes and dtypes only: no value scans
and no id range checks, which would sync with the host on every call of the hot path (the models check their inputs
and ids once per step, at their entry). Out-of-range modality ids are an IndexError on the PyTorch path and
undefined on the Triton path.

Autocast: under ``torch.autocast`` for the inputs' device, each op is a lower-precision op like SDPA or a matmul: its
activations and matmul operands (float64 aside) are cast to the autocast dtype, the small parameters that the ops
convert themselves (bias table, pad_kv, pair bias, LayerNorm affine) are left as they are, and the op runs with
autocast off, in those dtypes, on every backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TypeVar

import torch

from medmap_fast.validation import check_index, describe, fail, is_integer_dtype

from . import ops
from ._backend import use_triton
from .gated_attn import MAX_HEAD_DIM, gated_attention_reference
from .patch_embed import patch_embed_3d_reference
from .window_attn import draw_dropout_seed, rounded_dropout_p, triple, window_attention_reference
from .window_attn_cpu import window_attention_cpu

Triple = tuple[int, int, int]


# A tensor argument, required or optional: _cast returns the same kind. Constrained, not bound: a bound TypeVar would
# not accept the new tensor t.to(dtype) as its result.
_MaybeTensor = TypeVar("_MaybeTensor", torch.Tensor, torch.Tensor | None)


def _autocast(device_type: str) -> tuple[torch.dtype | None, contextlib.AbstractContextManager]:
    """The dtype torch.autocast hands a lower-precision op on ``device_type`` (None when autocast is off there; see
    :func:`_cast`), and the context to run the op in: autocast off, so that every backend computes in that dtype."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return None, contextlib.nullcontext()
    return torch.get_autocast_dtype(device_type), torch.autocast(device_type, enabled=False)


def _cast(t: _MaybeTensor, dtype: torch.dtype | None) -> _MaybeTensor:
    """``t`` as torch.autocast hands it to a lower-precision op: a floating tensor other than float64 in ``dtype``;
    unchanged otherwise (and when ``dtype`` is None); None stays None."""
    if dtype is None or t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _check_float(name: str, t: object, expected: str, ndims: tuple[int, ...]) -> None:
    """A floating-point tensor with one of ``ndims`` dimensions (values are not checked: the ops sit on hot paths,
    and a NaN scan costs a pass and a host sync per call; the model entry points check their inputs' values)."""
    if not isinstance(t, torch.Tensor):
        fail(name, expected, type(t).__name__)
    if t.ndim not in ndims or not t.is_floating_point():
        fail(name, expected, describe(t))


def _spatial(value: object, name: str, dims: int, unit: int) -> Triple:
    """``dims`` (2 or 3) non-negative ints (a window, shift or table size) as a 3-tuple: a 2-D one gets the unit last
    axis, ``unit`` (1 for a window, 0 for a shift)."""
    if not (
        isinstance(value, (tuple, list))
        and len(value) == dims
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        fail(name, f"{dims} non-negative ints", repr(value))
    return triple([*value, unit][:3])


def patch_embed_3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    modality_ids: torch.Tensor | None = None,
    *,
    layer_norm: bool = False,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Patch embedding with per-modality weights, channels-last output.

    x [V, Cin, D, H, W]; weight [M, C, Cin, pd, ph, pw] (or a plain Conv3d weight [C, Cin, pd, ph, pw], M = 1);
    bias [M, C] (or [C]); modality_ids [V] long in [0, M) (may be None when M = 1; the range is the caller's to
    check). Sides that are not multiples of the patch are zero-padded at the end. Returns
    [V, ceil(D/pd), ceil(H/ph), ceil(W/pw), C]. 2-D images: x [V, Cin, H, W] with weight [M, C, Cin, ph, pw] (or a
    Conv2d weight [C, Cin, ph, pw]) -> [V, ceil(H/ph), ceil(W/pw), C], run as volumes with a unit last axis.
    """
    dims = 2 if isinstance(x, torch.Tensor) and x.ndim == 4 else 3
    patch = "ph, pw" if dims == 2 else "pd, ph, pw"
    expected = f"a float tensor [M, C, Cin, {patch}] or [C, Cin, {patch}]"
    _check_float("weight", weight, expected, (dims + 2, dims + 3))
    if bias is not None:
        _check_float(
            "bias", bias, f"a float tensor [M, C] (or [C] for a {dims + 2}-D weight)", (weight.ndim - dims - 1,)
        )
    if weight.ndim == dims + 2:
        weight = weight[None]
        bias = None if bias is None else bias[None]
    sides = "H, W" if dims == 2 else "D, H, W"
    expected = f"a float tensor [V, {weight.shape[2]}, {sides}] (Cin as in weight)"
    _check_float("x", x, expected, (dims + 2,))
    if x.shape[1] != weight.shape[2]:
        fail("x", expected, describe(x))
    if dims == 2:  # a unit last axis: patch (ph, pw, 1)
        x, weight = x[..., None], weight[..., None]
    m, c = weight.shape[:2]
    if bias is not None and tuple(bias.shape) != (m, c):
        fail("bias", f"shape {(m, c)}", describe(bias))
    if modality_ids is None:
        if m != 1:
            fail("modality_ids", f"a [V] tensor choosing one of the {m} weights", "None")
        modality_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    modality_ids = check_index(modality_ids, "modality_ids", x.shape[0], m, what="modality ids", values=False)
    dtype, autocast_off = _autocast(x.device.type)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            fail(name, f"the dtype of x, {x.dtype}", describe(t))
    # float64 runs the reference on every backend: the kernels accumulate in fp32
    triton = use_triton(x, "patch_embed_3d") and torch.float64 not in (x.dtype, weight.dtype)
    with autocast_off:
        if not triton:
            out = patch_embed_3d_reference(
                x,
                weight,
                bias,
                modality_ids,
                layer_norm=layer_norm,
                ln_weight=ln_weight,
                ln_bias=ln_bias,
                eps=eps,
                out_dtype=out_dtype,
            )
        else:
            ln_weight, ln_bias = (ln_weight, ln_bias) if layer_norm else (None, None)
            out = ops.patch_embed_3d(
                x, weight, bias, modality_ids, ln_weight, ln_bias, layer_norm, eps, out_dtype or x.dtype
            )
    return out.squeeze(3) if dims == 2 else out


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: Sequence[int],
    shift_size: Sequence[int] | None = None,
    bias_table: torch.Tensor | None = None,
    *,
    table_window: Sequence[int] | None = None,
    pad_kv: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Shifted-window 3D attention on a channels-last qkv tensor [B, D, H, W, 3C] -> [B, D, H, W, C].

    ``window_size``/``shift_size`` (None: no shift) are the effective ones (MONAI's get_window_size);
    ``table_window`` is the window ``bias_table`` [(2td-1)(2th-1)(2tw-1), heads] was built for; ``pad_kv`` [2C] are
    the k/v of padded voxels (the qkv bias in MONAI); ``gate_logits`` [B, D, H, W, heads] scale head h by
    2*sigmoid(logit). ``dropout_p`` in [0, 1): attention dropout, MONAI's ``attn_drop`` (pass 0 in eval mode): each
    softmax probability is dropped with probability p (rounded to a multiple of 2^-16:
    ``window_attn.rounded_dropout_p``) and the kept ones are scaled by 1 / (1 - p), before @ v; the masks come from
    torch's generator of qkv's device (the Triton path draws one Philox seed per call from it), so
    ``torch.manual_seed`` reproduces them.

    2-D (MONAI's spatial_dims=2 Swin): qkv [B, H, W, 3C] -> [B, H, W, C] with 2-D windows, shifts and table window
    (table [(2th-1)(2tw-1), heads], MONAI's 2-D index) and gate_logits [B, H, W, heads]; it runs as the 3-D op with
    a unit last axis.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        fail("num_heads", "a positive int", repr(num_heads))
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        fail("dropout_p", "a probability in [0, 1) (1 would drop every attention weight)", repr(dropout_p))
    dropout_p = rounded_dropout_p(dropout_p)
    expected = (
        "a float tensor [B, D, H, W, 3C] (2-D: [B, H, W, 3C]) with every size >= 1 and 3C divisible by "
        f"3 * num_heads = {3 * num_heads}"
    )
    _check_float("qkv", qkv, expected, (4, 5))
    if 0 in qkv.shape or qkv.shape[-1] % (3 * num_heads):
        fail("qkv", expected, describe(qkv))
    dims, c3 = qkv.ndim - 2, qkv.shape[-1]
    window = _spatial(window_size, "window_size", dims, 1)
    shift = _spatial([0] * dims if shift_size is None else shift_size, "shift_size", dims, 0)
    table = window if table_window is None else _spatial(table_window, "table_window", dims, 1)
    if any(s >= k for s, k in zip(shift, window, strict=True)) or any(
        k > t for k, t in zip(window, table, strict=True)
    ):
        fail(
            "window_size/shift_size",
            f"shift < window <= table_window {table[:dims]}",
            f"{window[:dims]}/{shift[:dims]}",
        )
    if bias_table is not None:
        rows = (2 * table[0] - 1) * (2 * table[1] - 1) * (2 * table[2] - 1)
        _check_float("bias_table", bias_table, f"a float tensor {(rows, num_heads)}", (2,))
        if tuple(bias_table.shape) != (rows, num_heads):
            fail("bias_table", f"a float tensor {(rows, num_heads)}", describe(bias_table))
    if pad_kv is not None and tuple(pad_kv.shape) != (2 * c3 // 3,):
        fail("pad_kv", f"shape {(2 * c3 // 3,)}", describe(pad_kv))
    if gate_logits is not None:
        gate_shape = (*qkv.shape[:-1], num_heads)
        _check_float("gate_logits", gate_logits, f"a float tensor {gate_shape}", (dims + 2,))
        if tuple(gate_logits.shape) != gate_shape:
            fail("gate_logits", f"a float tensor {gate_shape}", describe(gate_logits))
    if dims == 2:  # the unit last axis: views, no copy
        qkv = qkv.unsqueeze(3)
        gate_logits = None if gate_logits is None else gate_logits.unsqueeze(3)
    dtype, autocast_off = _autocast(qkv.device.type)
    qkv, gate_logits = _cast(qkv, dtype), _cast(gate_logits, dtype)
    with autocast_off:
        if use_triton(qkv, "window_attention"):
            seed = draw_dropout_seed(qkv.device) if dropout_p else None
            out = ops.window_attention(
                qkv,
                bias_table,
                pad_kv,
                gate_logits,
                seed,
                num_heads,
                list(window),
                list(shift),
                list(table),
                scale,
                dropout_p,
            )[0]
        else:
            fn = window_attention_cpu if qkv.device.type == "cpu" else window_attention_reference
            out = fn(
                qkv,
                num_heads,
                window,
                shift,
                bias_table,
                table_window=table,
                pad_kv=pad_kv,
                gate_logits=gate_logits,
                scale=scale,
                dropout_p=dropout_p,
            )
    return out.squeeze(3) if dims == 2 else out


def _modality_ids(ids: object, name: str, batch: int, length: int, upper: int) -> torch.Tensor:
    """Modality ids [batch, length] (a [length] tensor is shared by the batch), each in [0, upper) (not checked
    here: see the module docstring)."""
    expected = (
        f"integer modality ids [{batch}, {length}] (or [{length}] shared by the batch) with values in [0, {upper})"
    )
    if not isinstance(ids, torch.Tensor):
        fail(name, expected, type(ids).__name__)
    if not is_integer_dtype(ids.dtype):
        fail(name, expected, describe(ids))
    if ids.ndim == 1 and ids.shape[0] == length:
        ids = ids.expand(batch, length)
    if tuple(ids.shape) != (batch, length):
        fail(name, expected, describe(ids))
    return check_index(
        ids.reshape(-1), name, batch * length, upper, length_of="token", what="modality ids", values=False
    ).view(batch, length)


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    pair_bias: torch.Tensor | None = None,
    q_modality: torch.Tensor | None = None,
    k_modality: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense multi-head attention with key padding, a per-head modality-pair bias and a head-wise gate (CCT).

    q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] (same dtype and device); key_padding_mask [B, Lk] bool, True = missing key;
    pair_bias [H, Mq, Mk] adds pair_bias[h, q_modality[b, i], k_modality[b, j]] to the logits, with q_modality
    [B, Lq] / k_modality [B, Lk] long (or [Lq] / [Lk] shared by the batch); gate_logits [B, Lq, H] scale head h of
    query i by 2*sigmoid(logit); scale defaults to Dh ** -0.5. Returns [B, Lq, H, Dh]; a query with every key
    missing gets zeros (see ``gated_attention.py``).
    """
    if not isinstance(q, torch.Tensor) or q.ndim != 4 or 0 in q.shape or not q.is_floating_point():
        fail(
            "q",
            "a float tensor [B, Lq, H, Dh] with every size >= 1",
            describe(q) if isinstance(q, torch.Tensor) else type(q).__name__,
        )
    b, lq, h, dh = q.shape
    for name, t in (("k", k), ("v", v)):
        if (
            not isinstance(t, torch.Tensor)
            or t.ndim != 4
            or t.shape[0] != b
            or t.shape[2:] != q.shape[2:]
            or t.shape[1] == 0
            or t.dtype != q.dtype
            or t.device != q.device
        ):
            fail(
                name,
                f"[{b}, Lk >= 1, {h}, {dh}] of dtype {q.dtype} on {q.device} (as q)",
                describe(t) if isinstance(t, torch.Tensor) else type(t).__name__,
            )
    lk = k.shape[1]
    if v.shape[1] != lk:
        fail("v", f"as many tokens as k ({lk})", describe(v))
    if key_padding_mask is not None:
        expected = f"a bool tensor [{b}, {lk}] on {q.device} (True = missing key)"
        if not isinstance(key_padding_mask, torch.Tensor):
            fail("key_padding_mask", expected, type(key_padding_mask).__name__)
        if (
            key_padding_mask.dtype != torch.bool
            or tuple(key_padding_mask.shape) != (b, lk)
            or key_padding_mask.device != q.device
        ):
            fail("key_padding_mask", expected, describe(key_padding_mask))
    if pair_bias is not None:
        _check_float("pair_bias", pair_bias, f"a float tensor [{h}, Mq, Mk] (one table per head)", (3,))
        if pair_bias.shape[0] != h or 0 in pair_bias.shape:
            fail("pair_bias", f"a float tensor [{h}, Mq, Mk] (one table per head)", describe(pair_bias))
        q_modality = _modality_ids(q_modality, "q_modality", b, lq, pair_bias.shape[1])
        k_modality = _modality_ids(k_modality, "k_modality", b, lk, pair_bias.shape[2])
    elif q_modality is not None or k_modality is not None:
        fail("pair_bias", "a tensor [H, Mq, Mk] when q_modality / k_modality are given", "None")
    if gate_logits is not None:
        _check_float("gate_logits", gate_logits, f"a float tensor [{b}, {lq}, {h}]", (3,))
        if tuple(gate_logits.shape) != (b, lq, h):
            fail("gate_logits", f"a float tensor [{b}, {lq}, {h}]", describe(gate_logits))
    dtype, autocast_off = _autocast(q.device.type)
    q, k, v, gate_logits = _cast(q, dtype), _cast(k, dtype), _cast(v, dtype), _cast(gate_logits, dtype)
    # float64 runs the reference on every backend: the kernels accumulate in fp32
    triton = use_triton(q, "gated_attention") and q.dtype != torch.float64
    if triton and dh > MAX_HEAD_DIM:
        fail("q", f"a head dim <= {MAX_HEAD_DIM} for the Triton kernel", describe(q))
    args = (q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, scale)
    with autocast_off:
        return ops.gated_attention(*args)[0] if triton else gated_attention_reference(*args)
