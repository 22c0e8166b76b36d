"""Shifted-window 3D multi-head attention read from a channels-last qkv tensor (Swin-3D, MONAI semantics).

Reference semantics (the Triton kernel must match them):
  qkv          [B, D, H, W, 3C]  output of the qkv Linear, last dim ordered (3, heads, head_dim) as in MONAI
  window_size  (wd, wh, ww)      effective window (already shrunk to the feature size, as MONAI's get_window_size)
  shift_size   (sd, sh, sw)      effective cyclic shift; all zero for non-shifted blocks
  bias_table   [(2td-1)(2th-1)(2tw-1), heads] or None   relative-position bias table
  table_window (td, th, tw)      window the table was built for (MONAI's configured window). Token t of the
                                 effective window takes its table coordinates from t decomposed in this window,
                                 which reproduces MONAI's ``relative_position_index[:n, :n]`` when the window shrinks
  pad_kv       [2C] or None      k and v of voxels added by padding to a multiple of the window. MONAI pads the
                                 normalised tokens with zeros *before* the qkv Linear, so its padded keys and values
                                 equal the qkv bias; None means zeros (a qkv Linear without bias)
  gate_logits  [B, D, H, W, heads] or None   head-wise modality gate: head h of token x is scaled by 2*sigmoid(.)
  scale        float or None     default head_dim ** -0.5
  out          [B, D, H, W, C]   attention output per head (before the output projection), un-shifted, cropped
Shifted windows mask pairs of tokens from different regions of the rolled grid with -100 (MONAI's compute_mask).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .patch_embed_3d import padded_size

SHIFT_MASK_VALUE = -100.0


@functools.lru_cache(maxsize=64)
def relative_position_index(
    window_size: tuple[int, int, int], table_window: tuple[int, int, int]
) -> torch.Tensor:
    """[n, n] long: row of the bias table for every (query, key) pair of an effective window of n tokens."""
    n = window_size[0] * window_size[1] * window_size[2]
    td, th, tw = table_window
    t = torch.arange(n)
    coords = torch.stack((t // (th * tw), (t // tw) % th, t % tw), dim=1)  # coordinates in the table window
    rel = coords[:, None, :] - coords[None, :, :] + torch.tensor([td - 1, th - 1, tw - 1])
    return rel[..., 0] * (2 * th - 1) * (2 * tw - 1) + rel[..., 1] * (2 * tw - 1) + rel[..., 2]


def shift_regions(size: int, window: int, shift: int) -> torch.Tensor:
    """Region id (0, 1, 2) of every position along one rolled axis; a constant where the axis is not shifted."""
    r = torch.arange(size)
    if shift == 0:
        return torch.zeros(size, dtype=torch.long)
    return (r >= size - window).long() + (r >= size - shift).long()


@functools.lru_cache(maxsize=64)
def shift_mask(
    padded: tuple[int, int, int], window_size: tuple[int, int, int], shift_size: tuple[int, int, int]
) -> torch.Tensor:
    """[nW, n, n] float: 0 within a region of the rolled grid, -100 across regions (MONAI's compute_mask)."""
    rd, rh, rw = (shift_regions(p, w, s) for p, w, s in zip(padded, window_size, shift_size))
    ids = rd[:, None, None] * 9 + rh[None, :, None] * 3 + rw[None, None, :]
    wins = partition(ids[None, ..., None], window_size)[..., 0]  # [nW, n]
    diff = wins[:, :, None] != wins[:, None, :]
    return torch.where(diff, SHIFT_MASK_VALUE, 0.0)


def partition(x: torch.Tensor, window_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, Dp, Hp, Wp, K] -> [B*nW, n, K], windows in raster order, tokens in raster order within a window."""
    b, dp, hp, wp, k = x.shape
    wd, wh, ww = window_size
    x = x.reshape(b, dp // wd, wd, hp // wh, wh, wp // ww, ww, k).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, k)


def unpartition(x: torch.Tensor, window_size: tuple[int, int, int], padded: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`partition`: [B*nW, n, K] -> [B, Dp, Hp, Wp, K]."""
    wd, wh, ww = window_size
    dp, hp, wp = padded
    k = x.shape[-1]
    x = x.reshape(-1, dp // wd, hp // wh, wp // ww, wd, wh, ww, k).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, dp, hp, wp, k)


def window_attention_reference(
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
) -> torch.Tensor:
    """Plain-PyTorch shifted-window attention: pad, roll, partition, SDPA with bias + shift mask, reverse."""
    b, d, h, w, c3 = qkv.shape
    c = c3 // 3
    head_dim = c // num_heads
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    padded = tuple(padded_size(s, k) for s, k in zip((d, h, w), window_size))
    x = qkv
    if padded != (d, h, w):
        kv = pad_kv if pad_kv is not None else qkv.new_zeros(2 * c)
        x = torch.cat([qkv.new_zeros(c), kv.to(qkv.dtype)]).expand(b, *padded, c3).clone()
        x[:, :d, :h, :w] = qkv
    shifted = any(shift_size)
    if shifted:
        x = torch.roll(x, shifts=tuple(-s for s in shift_size), dims=(1, 2, 3))
    n = window_size[0] * window_size[1] * window_size[2]
    win = partition(x, window_size)  # [B*nW, n, 3C]
    nw = win.shape[0] // b
    q, k, v = win.reshape(b, nw, n, 3, num_heads, head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)  # [B, nW, h, n, d]
    mask = None
    if bias_table is not None:
        index = relative_position_index(window_size, tuple(table_window or window_size)).to(qkv.device)
        mask = bias_table[index].permute(2, 0, 1)  # [h, n, n]
    if shifted:
        smask = shift_mask(padded, window_size, shift_size).to(device=qkv.device, dtype=qkv.dtype)[:, None]
        mask = smask if mask is None else mask + smask  # [nW, h, n, n]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale
    )  # [B, nW, h, n, d]
    out = unpartition(out.permute(0, 1, 3, 2, 4).reshape(b * nw, n, c), window_size, padded)
    if shifted:
        out = torch.roll(out, shifts=shift_size, dims=(1, 2, 3))
    out = out[:, :d, :h, :w]
    if gate_logits is not None:
        out = (out.reshape(b, d, h, w, num_heads, head_dim) * (2 * torch.sigmoid(gate_logits))[..., None])
    return out.reshape(b, d, h, w, c)
