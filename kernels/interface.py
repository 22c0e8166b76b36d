"""The public functional ops: validate, then dispatch to the Triton kernel or the plain-PyTorch reference.

Layouts (flash-attention style, one place documents them all):
  patch_embed_3d    x [V, Cin, D, H, W] -> [V, D', H', W', C] channels-last (see ``patch_embed_3d.py``)
  window_attention  qkv [B, D, H, W, 3C] -> [B, D, H, W, C] (see ``window_attention.py``)
  gated_attention   q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh] (see ``gated_attention.py``)
"""

from __future__ import annotations

import torch

from medmap_fast.validation import check_index, describe, fail

from ._backend import use_triton
from .patch_embed_3d import patch_embed_3d_reference
from .window_attention import window_attention_reference

Triple = tuple[int, int, int]


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
    bias [M, C] (or [C]); modality_ids [V] long in [0, M) (may be None when M = 1). Sides that are not multiples of
    the patch are zero-padded at the end. Returns [V, ceil(D/pd), ceil(H/ph), ceil(W/pw), C].
    """
    if weight.ndim == 5:
        weight = weight[None]
        bias = None if bias is None else bias[None]
    if x.ndim != 5 or weight.ndim != 6 or x.shape[1] != weight.shape[2]:
        fail("x", f"[V, Cin, D, H, W] with Cin = weight.shape[-4] for weight {tuple(weight.shape)}", describe(x))
    m, c = weight.shape[:2]
    if bias is not None and tuple(bias.shape) != (m, c):
        fail("bias", f"shape {(m, c)}", describe(bias))
    if modality_ids is None:
        if m != 1:
            fail("modality_ids", f"a [V] tensor choosing one of the {m} weights", "None")
        modality_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    modality_ids = check_index(modality_ids, "modality_ids", x.shape[0], m, what="modality ids")
    kwargs = dict(layer_norm=layer_norm, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps, out_dtype=out_dtype)
    if use_triton(x, "patch_embed_3d"):
        from .patch_embed_3d import patch_embed_3d_triton

        return patch_embed_3d_triton(x, weight, bias, modality_ids, **kwargs)
    return patch_embed_3d_reference(x, weight, bias, modality_ids, **kwargs)


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: Triple,
    shift_size: Triple = (0, 0, 0),
    bias_table: torch.Tensor | None = None,
    *,
    table_window: Triple | None = None,
    pad_kv: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Shifted-window 3D attention on a channels-last qkv tensor [B, D, H, W, 3C] -> [B, D, H, W, C].

    ``window_size``/``shift_size`` are the effective ones (MONAI's get_window_size); ``table_window`` is the window
    ``bias_table`` [(2td-1)(2th-1)(2tw-1), heads] was built for; ``pad_kv`` [2C] are the k/v of padded voxels (the
    qkv bias in MONAI); ``gate_logits`` [B, D, H, W, heads] scale head h by 2*sigmoid(logit).
    """
    if qkv.ndim != 5 or qkv.shape[-1] % (3 * num_heads):
        fail("qkv", f"[B, D, H, W, 3C] with 3C divisible by 3 * num_heads = {3 * num_heads}", describe(qkv))
    b, d, h, w, c3 = qkv.shape
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    table_window = tuple(table_window or window_size)
    if any(s >= k for s, k in zip(shift_size, window_size)) or any(k > t for k, t in zip(window_size, table_window)):
        fail("window_size/shift_size", f"shift < window <= table_window {table_window}", f"{window_size}/{shift_size}")
    if bias_table is not None:
        rows = (2 * table_window[0] - 1) * (2 * table_window[1] - 1) * (2 * table_window[2] - 1)
        if tuple(bias_table.shape) != (rows, num_heads):
            fail("bias_table", f"shape {(rows, num_heads)}", describe(bias_table))
    if pad_kv is not None and tuple(pad_kv.shape) != (2 * c3 // 3,):
        fail("pad_kv", f"shape {(2 * c3 // 3,)}", describe(pad_kv))
    if gate_logits is not None and tuple(gate_logits.shape) != (b, d, h, w, num_heads):
        fail("gate_logits", f"shape {(b, d, h, w, num_heads)}", describe(gate_logits))
    args = (qkv, num_heads, window_size, shift_size, bias_table)
    kwargs = dict(table_window=table_window, pad_kv=pad_kv, gate_logits=gate_logits, scale=scale)
    if use_triton(qkv, "window_attention"):
        from .window_attention import window_attention_triton

        return window_attention_triton(*args, **kwargs)
    return window_attention_reference(*args, **kwargs)
