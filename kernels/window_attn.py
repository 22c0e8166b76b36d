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

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from ._backend import interpreting
from ._indexing import take_rows
from ._utils import jit as _jit
from ._utils import multiprocessors, on_device, padded_size, tl, triton

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


def _window_regions(
    padded: tuple[int, int, int], window_size: tuple[int, int, int], shift_size: tuple[int, int, int]
) -> torch.Tensor:
    """[nW, n] long: region id of every token of every window of the rolled grid (MONAI's compute_mask)."""
    rd, rh, rw = (shift_regions(p, w, s) for p, w, s in zip(padded, window_size, shift_size))
    ids = rd[:, None, None] * 9 + rh[None, :, None] * 3 + rw[None, None, :]
    return partition(ids[None, ..., None], window_size)[..., 0]


def _region_mask(regions: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """Region ids [nW, n] -> mask [nW, n, n] of ``dtype`` on their device: 0 within a region, ``value`` across."""
    across = regions[:, :, None] != regions[:, None, :]
    return torch.zeros(across.shape, dtype=dtype, device=across.device).masked_fill_(across, value)


@functools.lru_cache(maxsize=64)
def shift_mask(
    padded: tuple[int, int, int], window_size: tuple[int, int, int], shift_size: tuple[int, int, int],
    value: float = SHIFT_MASK_VALUE,
) -> torch.Tensor:
    """[nW, n, n] float32 on the CPU: 0 within a region of the rolled grid, ``value`` across regions (MONAI's
    compute_mask uses -100)."""
    return _region_mask(_window_regions(padded, window_size, shift_size), value, torch.float32)


@functools.lru_cache(maxsize=64)
def _device_regions(
    padded: tuple[int, int, int], window_size: tuple[int, int, int], shift_size: tuple[int, int, int],
    device: torch.device,
) -> torch.Tensor:
    """:func:`_window_regions` [nW, n] kept on ``device``: each call builds its mask there from these few KiB (no
    host-to-device copy), rather than caching the mask itself (hundreds of MiB at the paper's stage 1)."""
    return _window_regions(padded, window_size, shift_size).to(device)


@functools.lru_cache(maxsize=64)
def _device_index(window: tuple[int, ...], table_window: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """relative_position_index flattened to [n * n], kept on ``device`` (no host-to-device copy per call)."""
    return relative_position_index(window, table_window).to(device).reshape(-1)


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


def window_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int] = (0, 0, 0),
    pad_kv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad (padded voxels: q = 0, k/v = pad_kv), roll by -shift, partition: qkv -> q, k, v [B*nW, heads, n, d]."""
    b, d, h, w, c3 = qkv.shape
    c = c3 // 3
    padded = tuple(padded_size(s, k) for s, k in zip((d, h, w), window_size))
    x = qkv
    if padded != (d, h, w):
        kv = pad_kv if pad_kv is not None else qkv.new_zeros(2 * c)
        x = torch.cat([qkv.new_zeros(c), kv.to(qkv.dtype)]).expand(b, *padded, c3).clone()
        x[:, :d, :h, :w] = qkv
    if any(shift_size):
        x = torch.roll(x, shifts=tuple(-s for s in shift_size), dims=(1, 2, 3))
    win = partition(x, window_size)  # [B*nW, n, 3C]
    n = win.shape[1]
    return win.reshape(-1, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)


def window_merge(
    out: torch.Tensor, size: tuple[int, int, int], window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """Inverse of :func:`window_qkv` for an attention output [B*nW, heads, n, d] -> [B, D, H, W, heads*d]."""
    bnw, heads, n, hd = out.shape
    padded = tuple(padded_size(s, k) for s, k in zip(size, window_size))
    out = unpartition(out.transpose(1, 2).reshape(bnw, n, heads * hd), window_size, padded)
    if any(shift_size):
        out = torch.roll(out, shifts=tuple(shift_size), dims=(1, 2, 3))
    return out[:, : size[0], : size[1], : size[2]]


def window_bias(
    bias_table: torch.Tensor, window_size: tuple[int, int, int], table_window: tuple[int, int, int] | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The relative-position bias [heads, n, n] of an effective window, gathered from its table [T, heads]."""
    n = window_size[0] * window_size[1] * window_size[2]
    index = _device_index(window_size, tuple(table_window or window_size), bias_table.device)
    return take_rows(bias_table, index).view(n, n, -1).permute(2, 0, 1).to(dtype)


def apply_gate(out: torch.Tensor, gate_logits: torch.Tensor | None) -> torch.Tensor:
    """Head-wise gate: out [B, D, H, W, C], gate_logits [B, D, H, W, heads]; head h scaled by 2*sigmoid(logit)."""
    if gate_logits is None:
        return out
    heads = gate_logits.shape[-1]
    gated = out.unflatten(-1, (heads, -1)) * (2 * torch.sigmoid(gate_logits))[..., None]
    return gated.flatten(-2)


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
    b, d, h, w, _ = qkv.shape
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    padded = tuple(padded_size(s, k) for s, k in zip((d, h, w), window_size))
    q, k, v = window_qkv(qkv, num_heads, window_size, shift_size, pad_kv)  # [B*nW, h, n, hd]
    n, head_dim = q.shape[2:]
    mask = None  # [h, n, n] in q's dtype (as SDPA wants it), broadcast over the windows
    if bias_table is not None:
        mask = window_bias(bias_table, window_size, table_window, q.dtype)
    if any(shift_size):
        regions = _device_regions(padded, window_size, shift_size, qkv.device)
        smask = _region_mask(regions, SHIFT_MASK_VALUE, qkv.dtype)[:, None]
        mask = (smask if mask is None else mask + smask).expand(-1, num_heads, -1, -1)  # [nW, h, n, n]
        # SDPA's fused kernels take 4-D inputs: fold the windows into the heads, q [B, nW*h, n, hd], so that the
        # mask [nW*h, n, n] broadcasts over the batch instead of being copied per batch element
        q, k, v = (t.reshape(b, -1, n, head_dim) for t in (q, k, v))
        mask = mask.reshape(-1, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = out.reshape(-1, num_heads, n, head_dim)  # [B*nW, h, n, hd]
    return apply_gate(window_merge(out, (d, h, w), window_size, shift_size), gate_logits)


# ----------------------------------------------------------------------------------------------------------------------
# Triton implementation. Every program works on one window of one batch element and a group of G = HEADS_PER_PROGRAM
# consecutive heads, straight from the channels-last qkv tensor: token t of window `win` sits at position
# p = origin(win) + coords(t) of the rolled, padded grid, i.e. at voxel (p + shift) mod padded of the original grid (a
# padded voxel when that is past the volume). So padding, cyclic shift, partition and their reverses are index
# arithmetic; the bias row of a (query, key) pair is rel(query) - rel(key) + R0 (the table_window decomposition is
# separable); the shift mask compares region ids.
#
# The G heads share all of that: token positions, volume rows, the bias-table rows and the additive mask of a
# [BM, BN] block of pairs are computed once per block, then a static loop runs the G heads on 2-D tiles (per-head
# state is carried in tuples), reading each row's G heads as adjacent channel slices. Not one 3-D [G, T, HD] tile:
# Triton puts every warp of a batched tl.dot on the batch axis, so each warp would redo the shared index work
# (warps > G even duplicate the heads), and Hopper's wgmma does not take batched operands.
# ----------------------------------------------------------------------------------------------------------------------

_LOG2E = None if tl is None else tl.constexpr(math.log2(math.e))
_SHIFT_MASK = None if tl is None else tl.constexpr(SHIFT_MASK_VALUE)


@_jit
def _region(p, size, window, shift):
    """shift_regions along one rolled axis: 0, 1, 2 for position p, 0 everywhere when the axis is not shifted."""
    return tl.where(shift > 0, (p >= size - window).to(tl.int32) + (p >= size - shift).to(tl.int32), 0)


@_jit
def _tokens(t, b, win, n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW):
    """Tokens t [T] of window ``win`` of batch element b -> (in window, real voxel, row of the volume-major
    [B*D*H*W, ...] tensors, region id, table offset), all [T]."""
    pd = (win // (NWH * NWW)) * WD + t // (WH * WW)  # position in the rolled, padded grid
    ph = ((win // NWW) % NWH) * WH + (t // WW) % WH
    pw = (win % NWW) * WW + t % WW
    od = (pd + SD) % DP  # the voxel torch.roll(-shift) brought there
    oh = (ph + SH) % HP
    ow = (pw + SW) % WP
    valid = t < n
    real = valid & (od < D) & (oh < H) & (ow < W)
    row = b.to(tl.int64) * (D * H * W) + tl.where(real, (od * H + oh) * W + ow, 0)
    region = (_region(pd, DP, WD, SD) * 3 + _region(ph, HP, WH, SH)) * 3 + _region(pw, WP, WW, SW)
    return valid, real, row, region, _table_offset(t, TH, TW)


@_jit
def _table_offset(t, TH, TW):
    """Bias-table offset of tokens t decomposed in the table window: row(q, k) = offset(q) - offset(k) + R0
    (MONAI's relative_position_index[:n, :n], also when the effective window is smaller than the table's)."""
    return (t // (TH * TW)) * ((2 * TH - 1) * (2 * TW - 1)) + ((t // TW) % TH) * (2 * TW - 1) + t % TW


@_jit
def _repeat(x, G: tl.constexpr):
    """A tuple of G copies of x (the initial per-head state)."""
    xs = ()
    for _ in tl.static_range(G):
        xs = xs + (x,)
    return xs


@_jit
def _head_rows(ptr, row, stride, col, HD, dd, rows_mask, dmask, G: tl.constexpr):
    """G tiles [T, DPAD], head g's at channels col + g * HD + dd of rows ``row`` (zeros outside the masks): the loads
    of one row's heads are adjacent channel slices, issued back to back."""
    ptrs = ptr + row[:, None] * stride + col + dd[None, :]
    mask = rows_mask[:, None] & dmask[None, :]
    tiles = ()
    for g in tl.static_range(G):
        tiles = tiles + (tl.load(ptrs + g * HD, mask=mask, other=0.0),)
    return tiles


@_jit
def _store_head_rows(ptr, tiles, row, stride, col, HD, dd, rows_mask, dmask, G: tl.constexpr):
    """Store G tiles [T, DPAD] where :func:`_head_rows` reads them (cast to the pointer's type)."""
    ptrs = ptr + row[:, None] * stride + col + dd[None, :]
    mask = rows_mask[:, None] & dmask[None, :]
    for g in tl.static_range(G):
        tl.store(ptrs + g * HD, tiles[g].to(ptr.dtype.element_ty), mask=mask)


@_jit
def _pad_kv(PAD_KV, col, HD, dd, dmask, C, G: tl.constexpr):
    """k and v [DPAD] of padded voxels, a tuple of G each (PAD_KV is qkv itself, a harmless read, when unused)."""
    pad_k = ()
    pad_v = ()
    for g in tl.static_range(G):
        pad_k = pad_k + (tl.load(PAD_KV + col + g * HD + dd, mask=dmask, other=0.0),)
        pad_v = pad_v + (tl.load(PAD_KV + C + col + g * HD + dd, mask=dmask, other=0.0),)
    return pad_k, pad_v


@_jit
def _kv_rows(ptr, row, stride, col, HD, dd, real, dmask, pads, HAS_PAD: tl.constexpr, G: tl.constexpr):
    """G k or v tiles [T, DPAD] of a key block; padded voxels take ``pads[g]`` (MONAI: the qkv bias), else zeros."""
    tiles = _head_rows(ptr, row, stride, col, HD, dd, real, dmask, G)
    if HAS_PAD:
        padded = ()
        for g in tl.static_range(G):
            padded = padded + (tl.where(real[:, None], tiles[g], pads[g][None, :].to(tiles[g].dtype)),)
        tiles = padded
    return tiles


@_jit
def _key_block(QKV, offs, b, win, col, HD, dd, dmask, C, pad_k, pad_v,
               n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW,
               HAS_PAD: tl.constexpr, G: tl.constexpr):
    """A key block of one window: flags, rows, region ids, table offsets [T] and the G heads' k and v tiles."""
    valid, real, row, reg, rel = _tokens(offs, b, win, n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W,
                                         TH, TW)
    k = _kv_rows(QKV + C, row, 3 * C, col, HD, dd, real, dmask, pad_k, HAS_PAD, G)
    v = _kv_rows(QKV + 2 * C, row, 3 * C, col, HD, dd, real, dmask, pad_v, HAS_PAD, G)
    return valid, real, row, reg, rel, k, v


@_jit
def _bias_rows(BIAS, rel_q, rel_k, valid_q, valid_k, HEADS, R0):
    """Pointers [BM, BN] to head 0's bias of a block of (query, key) pairs in the table [rows, HEADS], and their mask;
    every head shares them (head h's bias is at pointer + h)."""
    return BIAS + (rel_q[:, None] - rel_k[None, :] + R0) * HEADS, valid_q[:, None] & valid_k[None, :]


@_jit
def _mask(reg_q, reg_k, valid_k, SHIFTED: tl.constexpr):
    """The additive mask every head shares [BM, BN] (or [1, BN]): MONAI's shift mask, -inf past the window."""
    if SHIFTED:
        mask = tl.where(valid_k[None, :], tl.where(reg_q[:, None] != reg_k[None, :], _SHIFT_MASK, 0.0), float("-inf"))
    else:
        mask = tl.where(valid_k, 0.0, float("-inf"))[None, :]
    return mask


@_jit
def _bias(bias_ptrs, bias_mask, h):
    """Relative-position bias [BM, BN] of head h gathered from the table [rows, HEADS]."""
    return tl.load(bias_ptrs + h, mask=bias_mask, other=0.0).to(tl.float32)


@_jit
def _scores(q, k, bias, mask, qk_scale, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """Scores of one head in the log2 domain [BM, BN]: (q.k * scale + bias + mask) * log2(e)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if HAS_BIAS:
        s += bias
    return (s + mask) * _LOG2E


@_jit
def _gate(GATE, row, real, h, HEADS):
    """2 * sigmoid(gate logit) of head h per row [T] (fp32)."""
    return 2.0 * tl.sigmoid(tl.load(GATE + row * HEADS + h, mask=real, other=0.0).to(tl.float32))


@_jit
def _split_pid(pid, tiles, HEADS, NWIN, G: tl.constexpr):
    """Program id -> (tile, first of the G heads, window over the batch, batch element, window); tiles vary
    fastest."""
    groups = HEADS // G
    bw = pid // (tiles * groups)
    return pid % tiles, ((pid // tiles) % groups) * G, bw, bw // NWIN, bw % NWIN


@_jit
def _query_grads(QKV, DOUT, GATE, LSE, DELTA, offs, row, valid, real, bw, h, dd, dmask, C, HD, HEADS, n,
                 HAS_GATE: tl.constexpr):
    """What the backward needs of head h in a query block: q and dO of the attention (gate applied) [T, DPAD],
    lse and delta [T]."""
    mask = real[:, None] & dmask[None, :]
    q = tl.load(QKV + row[:, None] * (3 * C) + h * HD + dd[None, :], mask=mask, other=0.0)
    do = tl.load(DOUT + row[:, None] * C + h * HD + dd[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        do = do * _gate(GATE, row, real, h, HEADS)[:, None]
    lse = tl.load(LSE + (bw * HEADS + h) * n + offs, mask=valid, other=float("inf"))  # p = 0 past the window
    delta = tl.load(DELTA + row * HEADS + h, mask=real, other=0.0)
    return q, do.to(q.dtype), lse, delta


@_jit
def _window_attention_fwd(
    QKV, BIAS, PAD_KV, GATE, OUT, LSE,
    n, NWIN, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW, R0,
    HEADS, HD, NQT, NKT, qk_scale,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_GATE: tl.constexpr, SHIFTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DPAD: tl.constexpr, PREC: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    """One query block of one window for G heads: online softmax over the window's key blocks; out [B,D,H,W,C],
    lse [B*nW, HEADS, n]."""
    G: tl.constexpr = HEADS_PER_PROGRAM
    qt, h0, bw, b, win = _split_pid(tl.program_id(0), NQT, HEADS, NWIN, G)
    C = HEADS * HD
    dd = tl.arange(0, DPAD)
    dmask = dd < HD
    offs_m = qt * BM + tl.arange(0, BM)
    valid_q, real_q, row_q, reg_q, rel_q = _tokens(offs_m, b, win, n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP,
                                                   D, H, W, TH, TW)
    q = _head_rows(QKV, row_q, 3 * C, h0 * HD, HD, dd, real_q, dmask, G)  # padded queries: zeros (output cropped)
    pad_k, pad_v = _pad_kv(PAD_KV, h0 * HD, HD, dd, dmask, C, G)
    m_i = _repeat(tl.full([BM], float("-inf"), tl.float32), G)  # key block 0 holds key 0: m_i turns finite
    l_i = _repeat(tl.zeros([BM], tl.float32), G)
    acc = _repeat(tl.zeros([BM, DPAD], tl.float32), G)
    for kt in range(0, NKT):
        valid_k, _, _, reg_k, rel_k, k, v = _key_block(
            QKV, kt * BN + tl.arange(0, BN), b, win, h0 * HD, HD, dd, dmask, C, pad_k, pad_v,
            n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW, HAS_PAD, G)
        bias_ptrs, bias_mask = _bias_rows(BIAS, rel_q, rel_k, valid_q, valid_k, HEADS, R0)
        mask = _mask(reg_q, reg_k, valid_k, SHIFTED)
        m_next, l_next, acc_next = (), (), ()
        for g in tl.static_range(G):
            bias = _bias(bias_ptrs, bias_mask, h0 + g) if HAS_BIAS else 0.0
            s = _scores(q[g], k[g], bias, mask, qk_scale, HAS_BIAS, PREC)
            m_new = tl.maximum(m_i[g], tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i[g] - m_new)
            m_next = m_next + (m_new,)
            l_next = l_next + (l_i[g] * alpha + tl.sum(p, 1),)
            acc_next = acc_next + (acc[g] * alpha[:, None] + tl.dot(p.to(v[g].dtype), v[g], input_precision=PREC),)
        m_i, l_i, acc = m_next, l_next, acc_next
    out = ()
    for g in tl.static_range(G):
        o = acc[g] / l_i[g][:, None]
        if HAS_GATE:
            o = o * _gate(GATE, row_q, real_q, h0 + g, HEADS)[:, None]
        out = out + (o,)
        tl.store(LSE + (bw * HEADS + h0 + g) * n + offs_m, m_i[g] + tl.log2(l_i[g]), mask=valid_q)
    _store_head_rows(OUT, out, row_q, C, h0 * HD, HD, dd, real_q, dmask, G)


@_jit
def _window_attention_bwd(
    QKV, BIAS, PAD_KV, GATE, DOUT, LSE, DELTA, DQKV, DQ, DPAD_PARTS,
    n, NWIN, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW, R0,
    HEADS, HD, NQT, NKT, qk_scale,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_GATE: tl.constexpr, SHIFTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DPAD: tl.constexpr, PREC: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    """One key block of one window for G heads: dk, dv over all query blocks (stored), dq by fp32 atomics into DQ,
    and the padded keys' dk/dv summed into this program's slot of DPAD_PARTS [B*nW, NKT, 2, C]."""
    G: tl.constexpr = HEADS_PER_PROGRAM
    kt, h0, bw, b, win = _split_pid(tl.program_id(0), NKT, HEADS, NWIN, G)
    C = HEADS * HD
    dd = tl.arange(0, DPAD)
    dmask = dd < HD
    pad_k, pad_v = _pad_kv(PAD_KV, h0 * HD, HD, dd, dmask, C, G)
    valid_k, real_k, row_k, reg_k, rel_k, k, v = _key_block(
        QKV, kt * BN + tl.arange(0, BN), b, win, h0 * HD, HD, dd, dmask, C, pad_k, pad_v,
        n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW, HAS_PAD, G)
    dk = _repeat(tl.zeros([BN, DPAD], tl.float32), G)
    dv = _repeat(tl.zeros([BN, DPAD], tl.float32), G)
    for qt in range(0, NQT):
        offs_m = qt * BM + tl.arange(0, BM)
        valid_q, real_q, row_q, reg_q, rel_q = _tokens(offs_m, b, win, n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP,
                                                       WP, D, H, W, TH, TW)
        bias_ptrs, bias_mask = _bias_rows(BIAS, rel_q, rel_k, valid_q, valid_k, HEADS, R0)
        mask = _mask(reg_q, reg_k, valid_k, SHIFTED)
        dk_next, dv_next = (), ()
        for g in tl.static_range(G):
            q, do, lse, delta = _query_grads(QKV, DOUT, GATE, LSE, DELTA, offs_m, row_q, valid_q, real_q, bw, h0 + g,
                                             dd, dmask, C, HD, HEADS, n, HAS_GATE)
            bias = _bias(bias_ptrs, bias_mask, h0 + g) if HAS_BIAS else 0.0
            p = tl.exp2(_scores(q, k[g], bias, mask, qk_scale, HAS_BIAS, PREC) - lse[:, None])
            dv_next = dv_next + (dv[g] + tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC),)
            dp = tl.dot(do, tl.trans(v[g]), input_precision=PREC)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk_next = dk_next + (dk[g] + tl.dot(tl.trans(ds), q, input_precision=PREC),)
            dq = tl.dot(ds, k[g], input_precision=PREC) * qk_scale
            tl.atomic_add(DQ + row_q[:, None] * C + (h0 + g) * HD + dd[None, :], dq,
                          mask=real_q[:, None] & dmask[None, :], sem="relaxed")
        dk, dv = dk_next, dv_next
    dk_scaled = ()
    for g in tl.static_range(G):
        dk_scaled = dk_scaled + (dk[g] * qk_scale,)
    _store_head_rows(DQKV + C, dk_scaled, row_k, 3 * C, h0 * HD, HD, dd, real_k, dmask, G)
    _store_head_rows(DQKV + 2 * C, dv, row_k, 3 * C, h0 * HD, HD, dd, real_k, dmask, G)
    if HAS_PAD:
        padded = (valid_k & ~real_k)[:, None]
        slot = DPAD_PARTS + (bw * NKT + kt) * (2 * C) + h0 * HD + dd
        for g in tl.static_range(G):
            tl.store(slot + g * HD, tl.sum(tl.where(padded, dk_scaled[g], 0.0), 0), mask=dmask)
            tl.store(slot + C + g * HD, tl.sum(tl.where(padded, dv[g], 0.0), 0), mask=dmask)


@_jit
def _window_attention_bwd_bias(
    QKV, BIAS, PAD_KV, GATE, DOUT, LSE, DELTA, DBIAS,
    n, NWIN, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW, R0,
    HEADS, HD, NQT, NKT, qk_scale, BW, WPC,
    HAS_PAD: tl.constexpr, HAS_GATE: tl.constexpr, SHIFTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DPAD: tl.constexpr, PREC: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    """dS of one (query block, key block) for G heads summed in registers over a chunk of WPC windows (the bias is
    the same in every window), then added into DBIAS [HEADS, n, n] (fp32 atomics, one per chunk)."""
    G: tl.constexpr = HEADS_PER_PROGRAM
    pid = tl.program_id(0)
    kt = pid % NKT
    qt = (pid // NKT) % NQT
    h0 = ((pid // (NKT * NQT)) % (HEADS // G)) * G
    chunk = pid // (NKT * NQT * (HEADS // G))
    C = HEADS * HD
    dd = tl.arange(0, DPAD)
    dmask = dd < HD
    offs_m = qt * BM + tl.arange(0, BM)
    offs_n = kt * BN + tl.arange(0, BN)
    bias_ptrs, bias_mask = _bias_rows(BIAS, _table_offset(offs_m, TH, TW), _table_offset(offs_n, TH, TW),
                                      offs_m < n, offs_n < n, HEADS, R0)
    bias = ()
    for g in tl.static_range(G):
        bias = bias + (_bias(bias_ptrs, bias_mask, h0 + g),)
    pad_k, pad_v = _pad_kv(PAD_KV, h0 * HD, HD, dd, dmask, C, G)
    acc = _repeat(tl.zeros([BM, BN], tl.float32), G)
    for bw in range(chunk * WPC, tl.minimum(chunk * WPC + WPC, BW)):
        b = bw // NWIN
        win = bw % NWIN
        valid_k, _, _, reg_k, _, k, v = _key_block(
            QKV, offs_n, b, win, h0 * HD, HD, dd, dmask, C, pad_k, pad_v,
            n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP, D, H, W, TH, TW, HAS_PAD, G)
        valid_q, real_q, row_q, reg_q, _ = _tokens(offs_m, b, win, n, NWH, NWW, WD, WH, WW, SD, SH, SW, DP, HP, WP,
                                                   D, H, W, TH, TW)
        mask = _mask(reg_q, reg_k, valid_k, SHIFTED)
        acc_next = ()
        for g in tl.static_range(G):
            q, do, lse, delta = _query_grads(QKV, DOUT, GATE, LSE, DELTA, offs_m, row_q, valid_q, real_q, bw, h0 + g,
                                             dd, dmask, C, HD, HEADS, n, HAS_GATE)
            p = tl.exp2(_scores(q, k[g], bias[g], mask, qk_scale, True, PREC) - lse[:, None])
            dp = tl.dot(do, tl.trans(v[g]), input_precision=PREC)
            acc_next = acc_next + (acc[g] + p * (dp - delta[:, None]),)
        acc = acc_next
    for g in tl.static_range(G):
        tl.atomic_add(DBIAS + ((h0 + g) * n + offs_m[:, None]) * n + offs_n[None, :], acc[g], mask=bias_mask,
                      sem="relaxed")


# (BM, BN, num_warps, num_stages) per (heads per program, head_dim <= 16) and kernel, for 16-bit inputs. Chosen from
# sm_90 compiles of the all-features variants (bias + shift + pad + gate, specialised as the launcher does): no
# register spills, wgmma for the heads' tl.dots, at most 8 warps per program. Not yet timed on a GPU.
_GPU_CONFIGS = {
    (1, True): dict(fwd=(64, 32, 4, 2), bwd=(64, 64, 8, 2), bias=(64, 64, 8, 2)),
    (2, True): dict(fwd=(64, 32, 4, 2), bwd=(64, 64, 8, 2), bias=(64, 64, 8, 2)),
    (3, True): dict(fwd=(64, 16, 4, 2), bwd=(32, 64, 8, 2), bias=(64, 32, 8, 2)),
    (4, True): dict(fwd=(64, 16, 4, 2), bwd=(32, 64, 8, 2), bias=(64, 32, 8, 2)),
    (1, False): dict(fwd=(64, 32, 8, 2), bwd=(32, 64, 8, 2), bias=(64, 32, 8, 2)),
    (2, False): dict(fwd=(64, 32, 8, 2), bwd=(16, 64, 8, 2), bias=(64, 32, 8, 2)),
}
_FP32_CONFIG = (16, 32, 4, 2)  # IEEE-fp32 tl.dot runs on the FMA units: small tiles keep register spills small
_CHANNELS_PER_PROGRAM = 64  # heads per program: 4 of head dim 16 (or less), 2 of 32, 1 of 64 or more


def _head_tile(head_dim: int) -> int:
    """DPAD: the head dim padded to a power of 2 >= 16 (tl.dot's minimum on a GPU)."""
    return max(16, triton.next_power_of_2(head_dim))


def _heads_per_program(head_dim: int, heads: int) -> int:
    """G: the largest divisor of ``heads`` with G * DPAD <= 64 channels (12 heads of 16 -> 4, 6 -> 3, 2 -> 2)."""
    g = max(1, _CHANNELS_PER_PROGRAM // _head_tile(head_dim))
    while heads % g:
        g -= 1
    return g


def _launch_config(kernel: str, n: int, head_dim: int, heads: int, dtype: torch.dtype) -> dict:
    """BM (query tile), BN (key tile), num_warps, num_stages and HEADS_PER_PROGRAM of ``kernel`` ("fwd", "bwd" or
    "bias") for windows of n tokens and ``heads`` heads of ``head_dim``; tiles are powers of 2 >= 16 (tl.dot's
    minimum on a GPU), masked past n."""
    g = _heads_per_program(head_dim, heads)
    if interpreting():  # few, large blocks: each interpreted block op costs milliseconds
        block = min(512, max(16, triton.next_power_of_2(n)))
        bm, bn, warps, stages = block, block, 4, 1
    elif dtype == torch.float32:
        bm, bn, warps, stages = _FP32_CONFIG
    else:
        bm, bn, warps, stages = _GPU_CONFIGS[(g, head_dim <= 16)][kernel]
    return dict(BM=bm, BN=bn, num_warps=warps, num_stages=stages, HEADS_PER_PROGRAM=g)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Geometry of one window_attention call (all derived from shapes and the window arguments)."""

    batch: int
    size: tuple[int, int, int]
    padded: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    table_window: tuple[int, int, int]
    heads: int
    head_dim: int
    scale: float

    @classmethod
    def of(cls, qkv: torch.Tensor, num_heads: int, window_size, shift_size, table_window, scale) -> "_Geometry":
        b, d, h, w, c3 = qkv.shape
        head_dim = c3 // 3 // num_heads
        window = tuple(window_size)
        return cls(b, (d, h, w), tuple(padded_size(s, k) for s, k in zip((d, h, w), window)), window,
                   tuple(shift_size), tuple(table_window), num_heads, head_dim,
                   head_dim**-0.5 if scale is None else float(scale))

    @property
    def n(self) -> int:
        return math.prod(self.window)

    @property
    def windows(self) -> int:
        """Windows of all batch elements (B * nW)."""
        return self.batch * math.prod(p // k for p, k in zip(self.padded, self.window))

    @property
    def is_padded(self) -> bool:
        return self.padded != self.size

    def head_groups(self, cfg: dict) -> int:
        """Programs per (window, tile): one per group of HEADS_PER_PROGRAM heads."""
        return self.heads // cfg["HEADS_PER_PROGRAM"]

    def config(self, kernel: str, dtype: torch.dtype) -> tuple[dict, int, int]:
        """Launch config of ``kernel`` and its numbers of query and key tiles per window."""
        cfg = _launch_config(kernel, self.n, self.head_dim, self.heads, dtype)
        return cfg, triton.cdiv(self.n, cfg["BM"]), triton.cdiv(self.n, cfg["BN"])

    def args(self, q_tiles: int, k_tiles: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        """Runtime scalars in signature order (n ... qk_scale) and the constexprs every kernel takes."""
        (td, th, tw), (dp, hp, wp) = self.table_window, self.padded
        r0 = (td - 1) * (2 * th - 1) * (2 * tw - 1) + (th - 1) * (2 * tw - 1) + (tw - 1)
        scalars = (self.n, self.windows // self.batch, hp // self.window[1], wp // self.window[2], *self.window,
                   *self.shift, dp, hp, wp, *self.size, th, tw, r0, self.heads, self.head_dim, q_tiles, k_tiles,
                   self.scale)
        constexprs = dict(DPAD=_head_tile(self.head_dim), SHIFTED=any(self.shift),
                          PREC="ieee" if dtype == torch.float32 else "tf32")
        return scalars, constexprs


def _windows_per_program(programs: int, windows: int, device: torch.device) -> int:
    """Windows each d(bias) program sums over: enough programs to fill the GPU, as few atomics as possible."""
    if device.type != "cuda":
        return windows
    target = 4 * multiprocessors(device)
    return triton.cdiv(windows, max(1, min(windows, triton.cdiv(target, programs))))


def window_attention_triton_forward(
    qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_kv: torch.Tensor | None, gate_logits: torch.Tensor | None,
    num_heads: int, window_size: tuple[int, int, int], shift_size: tuple[int, int, int],
    table_window: tuple[int, int, int], scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward with the contract (and output dtype) of :func:`window_attention_reference`, arguments as
    validated by the public op: out [B, D, H, W, C] and the log2-unit log-sum-exp [B*nW, heads, n] fp32 of every
    query, which the backward reads."""
    qkv, bias_table, pad_kv, gate_logits = (None if t is None else t.contiguous()
                                            for t in (qkv, bias_table, pad_kv, gate_logits))
    geo = _Geometry.of(qkv, num_heads, window_size, shift_size, table_window, scale)
    b, d, h, w, c3 = qkv.shape
    out_dtype = qkv.dtype if gate_logits is None else torch.promote_types(qkv.dtype, gate_logits.dtype)
    out = qkv.new_empty(b, d, h, w, c3 // 3, dtype=out_dtype)  # the reference's type promotion by the gate
    lse = torch.empty(geo.windows, geo.heads, geo.n, device=qkv.device, dtype=torch.float32)
    has_pad = pad_kv is not None and geo.is_padded
    cfg, q_tiles, k_tiles = geo.config("fwd", qkv.dtype)
    scalars, constexprs = geo.args(q_tiles, k_tiles, qkv.dtype)
    with on_device(qkv):
        _window_attention_fwd[(geo.windows * geo.head_groups(cfg) * q_tiles,)](
            qkv, qkv if bias_table is None else bias_table, pad_kv if has_pad else qkv,
            qkv if gate_logits is None else gate_logits, out, lse, *scalars,
            HAS_BIAS=bias_table is not None, HAS_PAD=has_pad, HAS_GATE=gate_logits is not None, **constexprs, **cfg,
        )
    return out, lse


def window_attention_triton_backward(
    dout: torch.Tensor, qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_kv: torch.Tensor | None,
    gate_logits: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
    window_size: tuple[int, int, int], shift_size: tuple[int, int, int], table_window: tuple[int, int, int],
    scale: float | None, needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """d(qkv), d(bias_table), d(pad_kv), d(gate_logits) from the forward's inputs, ``out`` and ``lse``; ``needs``
    says which of the four are wanted (the others, and those of absent tensors, are None)."""
    qkv, bias_table, pad_kv, gate_logits = (None if t is None else t.contiguous()
                                            for t in (qkv, bias_table, pad_kv, gate_logits))
    geo = _Geometry.of(qkv, num_heads, window_size, shift_size, table_window, scale)
    b, d, h, w, c3 = qkv.shape
    c = c3 // 3
    dout = dout.contiguous()
    # softmax backward's rowsum(dO_attn * O) per (token, head) equals rowsum(dout * out) with the gate folded in
    delta = (dout.float() * out.float()).view(b, d, h, w, geo.heads, geo.head_dim).sum(-1)
    has_pad = pad_kv is not None and geo.is_padded
    tensors = (qkv, qkv if bias_table is None else bias_table, pad_kv if has_pad else qkv,
               qkv if gate_logits is None else gate_logits, dout, lse, delta)
    flags = dict(HAS_PAD=has_pad, HAS_GATE=gate_logits is not None)
    dqkv = dbias = dpad = dgate = None
    need_dpad = pad_kv is not None and needs[2]
    with on_device(qkv):
        if needs[0] or need_dpad:
            cfg, q_tiles, k_tiles = geo.config("bwd", qkv.dtype)
            scalars, constexprs = geo.args(q_tiles, k_tiles, qkv.dtype)
            dqkv = torch.empty_like(qkv)
            dq = torch.zeros(b, d, h, w, c, device=qkv.device, dtype=torch.float32)
            dpad_parts = torch.empty(geo.windows, k_tiles, 2 * c, device=qkv.device, dtype=torch.float32)
            _window_attention_bwd[(geo.windows * geo.head_groups(cfg) * k_tiles,)](
                *tensors, dqkv, dq, dpad_parts, *scalars, HAS_BIAS=bias_table is not None, **flags, **constexprs,
                **cfg,
            )
            dqkv[..., :c] = dq
            if need_dpad:
                dpad = dpad_parts.sum((0, 1)).to(pad_kv.dtype) if has_pad else torch.zeros_like(pad_kv)
            if not needs[0]:
                dqkv = None
        if bias_table is not None and needs[1]:
            cfg, q_tiles, k_tiles = geo.config("bias", qkv.dtype)
            scalars, constexprs = geo.args(q_tiles, k_tiles, qkv.dtype)
            dense = torch.zeros(geo.heads, geo.n, geo.n, device=qkv.device, dtype=torch.float32)
            tiles = q_tiles * k_tiles * geo.head_groups(cfg)
            per_program = _windows_per_program(tiles, geo.windows, qkv.device)
            grid = (tiles * triton.cdiv(geo.windows, per_program),)
            _window_attention_bwd_bias[grid](
                *tensors, dense, *scalars, geo.windows, per_program, **flags, **constexprs, **cfg,
            )
            index = _device_index(geo.window, geo.table_window, qkv.device)
            dbias = torch.zeros(bias_table.shape, device=qkv.device, dtype=torch.float32)
            dbias = dbias.index_add_(0, index, dense.reshape(geo.heads, -1).t()).to(bias_table.dtype)
    if gate_logits is not None and needs[3]:
        # out = 2 sigmoid(x) o, so d x = rowsum(dout * o) * 2 sigmoid(x) (1 - sigmoid(x)) = delta (1 - sigmoid(x))
        dgate = (delta * (1.0 - torch.sigmoid(gate_logits.float()))).to(gate_logits.dtype)
    return dqkv, dbias, dpad, dgate
