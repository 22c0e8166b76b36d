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
  dropout_p    float in [0, 1)   attention dropout (MONAI's attn_drop): softmax probabilities dropped with
                                 probability p, the kept ones scaled by 1 / (1 - p), before @ v. The Triton kernels
                                 draw the mask from a Philox stream of a per-call seed and regenerate it in the
                                 backward; the reference takes it from SDPA or as ``dropout_mask``
  out          [B, D, H, W, C]   attention output per head (before the output projection), un-shifted, cropped
Shifted windows mask pairs of tokens from different regions of the rolled grid with -100 (MONAI's compute_mask).
2-D windows (MONAI's spatial_dims=2) arrive here as (wh, ww, 1) on a [B, H, W, 1, 3C] grid (``interface.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medmap_fast.validation import describe, fail

from ._backend import interpreting
from ._indexing import take_rows
from ._utils import constexpr_function, multiprocessors, on_device, padded_size, tl, triton
from ._utils import jit as _jit

SHIFT_MASK_VALUE = -100.0


@functools.lru_cache(maxsize=64)
def relative_position_index(window_size: tuple[int, int, int], table_window: tuple[int, int, int]) -> torch.Tensor:
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


def triple(values: Sequence[int]) -> tuple[int, int, int]:
    """Three ints (a window, shift or grid size; callers may pass a list) as the hashable tuple the cached tables
    key on."""
    a, b, c = values
    return a, b, c


def padded_grid(size: Sequence[int], window: Sequence[int]) -> tuple[int, int, int]:
    """A 3D grid ``size`` padded at the end of each axis to a multiple of ``window`` (MONAI pads at the end)."""
    return triple([padded_size(s, k) for s, k in zip(size, window, strict=True)])


def windows_per_volume(size: Sequence[int], window: Sequence[int]) -> int:
    """nW: the windows of one batch element's grid ``size`` padded to a multiple of ``window``."""
    return math.prod(p // k for p, k in zip(padded_grid(size, window), window, strict=True))


def _window_regions(
    padded: tuple[int, int, int], window_size: tuple[int, int, int], shift_size: tuple[int, int, int]
) -> torch.Tensor:
    """[nW, n] long: region id of every token of every window of the rolled grid (MONAI's compute_mask)."""
    rd, rh, rw = (shift_regions(p, w, s) for p, w, s in zip(padded, window_size, shift_size, strict=True))
    ids = rd[:, None, None] * 9 + rh[None, :, None] * 3 + rw[None, None, :]
    return partition(ids[None, ..., None], window_size)[..., 0]


def _region_mask(regions: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """Region ids [nW, n] -> mask [nW, n, n] of ``dtype`` on their device: 0 within a region, ``value`` across."""
    across = regions[:, :, None] != regions[:, None, :]
    return torch.zeros(across.shape, dtype=dtype, device=across.device).masked_fill_(across, value)


@functools.lru_cache(maxsize=64)
def shift_mask(
    padded: tuple[int, int, int],
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int],
    value: float = SHIFT_MASK_VALUE,
) -> torch.Tensor:
    """[nW, n, n] float32 on the CPU: 0 within a region of the rolled grid, ``value`` across regions (MONAI's
    compute_mask uses -100)."""
    return _region_mask(_window_regions(padded, window_size, shift_size), value, torch.float32)


@functools.lru_cache(maxsize=64)
def _device_regions(
    padded: tuple[int, int, int],
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int],
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
    padded = padded_grid((d, h, w), window_size)
    x = qkv
    if padded != (d, h, w):
        kv = pad_kv if pad_kv is not None else qkv.new_zeros(2 * c)
        x = torch.cat([qkv.new_zeros(c), kv.to(qkv.dtype)]).expand(b, *padded, c3).clone()
        x[:, :d, :h, :w] = qkv
    if any(shift_size):
        x = torch.roll(x, shifts=tuple(-s for s in shift_size), dims=(1, 2, 3))
    win = partition(x, window_size)  # [B*nW, n, 3C]
    n = win.shape[1]
    q, k, v = win.reshape(-1, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def window_merge(
    out: torch.Tensor,
    size: tuple[int, int, int],
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """Inverse of :func:`window_qkv` for an attention output [B*nW, heads, n, d] -> [B, D, H, W, heads*d]."""
    bnw, heads, n, hd = out.shape
    padded = padded_grid(size, window_size)
    out = unpartition(out.transpose(1, 2).reshape(bnw, n, heads * hd), window_size, padded)
    if any(shift_size):
        out = torch.roll(out, shifts=tuple(shift_size), dims=(1, 2, 3))
    return out[:, : size[0], : size[1], : size[2]]


def window_bias(
    bias_table: torch.Tensor,
    window_size: tuple[int, int, int],
    table_window: tuple[int, int, int] | None,
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


def rounded_dropout_p(dropout_p: float) -> float:
    """The attention dropout probability the op applies for ``dropout_p`` on every backend: rounded to a multiple of
    2^-16 (the Triton kernels and the CPU path keep a weight where a uniform 16-bit number reaches p * 2^16), at most
    1 - 2^-16; the kept weights are scaled by 1 / (1 - that), so the expected output is the undropped one.
    |change| <= 2^-17."""
    return min(round(dropout_p * 65536), 65535) / 65536


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
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch shifted-window attention: pad, roll, partition, SDPA with bias + shift mask, reverse.

    Attention dropout with probability ``dropout_p`` (MONAI's ``attn_drop``: the softmax output dropped, the kept
    entries scaled by 1 / (1 - p), before @ v) draws its mask inside SDPA, or takes ``dropout_mask``
    [B*nW, heads, n, n] bool (True = kept; e.g. :func:`window_dropout_mask`, the Triton kernels' mask)."""
    b, d, h, w, _ = qkv.shape
    window_size, shift_size = triple(window_size), triple(shift_size)
    padded = padded_grid((d, h, w), window_size)
    q, k, v = window_qkv(qkv, num_heads, window_size, shift_size, pad_kv)  # [B*nW, h, n, hd]
    n, head_dim = q.shape[2:]
    if dropout_mask is not None and tuple(dropout_mask.shape) != (q.shape[0], num_heads, n, n):
        fail(
            "dropout_mask",
            f"a bool tensor {(q.shape[0], num_heads, n, n)} (windows, heads, queries, keys)",
            describe(dropout_mask),
        )
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
    if dropout_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    else:  # SDPA's maths, with the given keep mask (folded into q's layout like the windows)
        attn = torch.matmul(q, k.transpose(-2, -1)) * (head_dim**-0.5 if scale is None else scale)
        attn = torch.softmax(attn if mask is None else attn + mask, -1)
        keep = dropout_mask.reshape(*q.shape[:-1], n)
        out = torch.matmul(attn * keep / (1.0 - dropout_p), v)
    out = out.reshape(-1, num_heads, n, head_dim)  # [B*nW, h, n, hd]
    return apply_gate(window_merge(out, (d, h, w), window_size, shift_size), gate_logits)


# ----------------------------------------------------------------------------------------------------------------------
# Triton implementation (v2). The window geometry is resolved on the host, once per (grid, window, shift), into small
# tables, so the kernels' inner loops do attention, not index arithmetic:
#   rows    [nW, NP] int32   voxel (d * H + h) * W + w of token t of window `win` of the rolled, padded grid (the
#                            roll, the padding and the partition in one gather), -1 for a padded voxel or t >= n;
#   classes [nW] int32       the window's class: which tokens lie in which region of the rolled grid (MONAI's
#                            compute_mask). Unshifted there is one class; shifted at most 8 (interior, and the last
#                            window along any subset of the shifted axes);
#   tile    [K, heads, NP, NP]  per class, bias + shift mask in log2 units (bias gathered from the table once per
#                            call), _PAST_WINDOW for keys t >= n, read as contiguous [BM, BN] tiles (a few MiB,
#                            L2-resident);
#   regions [K, NP, 16]      per class, each token's shift region one-hot: the d(bias) kernel, which sums over
#                            windows and so takes the bias out of its loop, rebuilds the mask as their product.
# Padding is by pointer: a padded voxel's row pointer is that of `pad_row` = [0 (q), pad_kv (k, v)], so padded keys
# take the qkv bias and padded queries are zeros; query tiles of padding only are skipped (their outputs are cropped).
# The forward's key loop takes whole BN-wide key tiles and the keys left in narrower ones (full_key_tiles, key_tail:
# 343 keys as 5 x 64 + 32, not 6 x 64); the backward cannot (its dk and dv products take the key tile as the 64
# rows a wgmma needs). The log2 scale and the softmax scale are folded into q once per tile. Every program handles
# G = HEADS_PER_PROGRAM heads of one window, whose loads and stores are adjacent channel slices of the same rows;
# per-head state is carried in tuples of 2-D tiles (a batched 3-D tl.dot would not be a Hopper wgmma).
# ----------------------------------------------------------------------------------------------------------------------

_LOG2E = math.log2(math.e)
# the bias + mask tile's value for keys past the window (natural units): its exp2 underflows to 0 like -inf's, but it
# is finite in 16 bits, so that the forward's product tile @ I (0 times it) stays 0 where -inf would give NaN
_PAST_WINDOW = -16384.0
# the d(bias) kernel's shift mask in the scores' log2 units (SHIFT_MASK_VALUE log2(e), rounded to be exact in 16
# bits), and the width of a window's regions one-hot (at most 8 regions; 16, tl.dot's least K on a GPU)
_SHIFT_MASK_LOG2, _REGION_SLOTS = -144.0, 16
if triton is not None:
    _SHIFT_MASK, _SLOTS = tl.constexpr(_SHIFT_MASK_LOG2), tl.constexpr(_REGION_SLOTS)


@constexpr_function
def full_key_tiles(n: int, bn: int) -> int:
    """Key tiles of ``bn`` keys that the forward's loop takes for windows of n tokens: the keys rounded up to 16
    (tl.dot's least K on a GPU) in whole tiles; :func:`key_tail` keys remain."""
    return -(-n // 16) * 16 // bn


@constexpr_function
def key_tail(n: int, bn: int) -> int:
    """Keys (a multiple of 16 below ``bn``) after the :func:`full_key_tiles` that narrower tiles take, one per set
    bit, widest first: a window of 343 tokens, BN 64, takes 5 tiles and one of 32 (a 6th of 64 would hold 23 keys,
    40 of padding); BN 128: 2 tiles, then 64 and 32."""
    return -(-n // 16) * 16 % bn


@_jit
def _split_pid(pid, tiles, HEADS: tl.constexpr, NWIN, G: tl.constexpr):
    """Program id -> (tile, first of the G heads, window over the batch, batch element, window); tiles vary
    fastest, so the programs of one window run together and share its k and v in L2."""
    groups: tl.constexpr = HEADS // G
    bw = pid // (tiles * groups)
    return pid % tiles, ((pid // tiles) % groups) * G, bw, bw // NWIN, bw % NWIN


@_jit
def _row_ptrs(BASE, PAD_ROW, rows, voxel0, STRIDE: tl.constexpr):
    """Row pointers [T] of tokens whose voxel rows are ``rows`` (-1: padding) in a [B * voxels, STRIDE] tensor:
    real voxels in BASE, padding at PAD_ROW (the padding is chosen by pointer, not by value)."""
    return tl.where(rows >= 0, BASE + (voxel0 + rows) * STRIDE, PAD_ROW)


@_jit
def _load_heads(ptrs, col, HD: tl.constexpr, DPAD: tl.constexpr, G: tl.constexpr, rows_mask=None):
    """G tiles [T, DPAD], head g's from channels col + g * HD of the rows ``ptrs`` point to (zeros past HD and,
    given ``rows_mask``, in rows outside it): one row's heads are adjacent slices, loaded back to back."""
    dd = tl.arange(0, DPAD)
    tiles = ()
    for g in tl.static_range(G):
        p = ptrs[:, None] + col + g * HD + dd[None, :]
        if DPAD == HD and rows_mask is None:
            tiles = tiles + (tl.load(p),)
        elif rows_mask is None:
            tiles = tiles + (tl.load(p, mask=(dd < HD)[None, :], other=0.0),)
        else:
            tiles = tiles + (tl.load(p, mask=rows_mask[:, None] & (dd < HD)[None, :], other=0.0),)
    return tiles


@_jit
def _store_head(ptrs, tile, col, rows_mask, HD: tl.constexpr, DPAD: tl.constexpr):
    """Store one head's [T, DPAD] tile at channels col .. col + HD of the rows ``ptrs`` point to, where rows_mask."""
    dd = tl.arange(0, DPAD)
    tl.store(
        ptrs[:, None] + col + dd[None, :], tile.to(ptrs.dtype.element_ty), mask=rows_mask[:, None] & (dd < HD)[None, :]
    )


@_jit
def _gate(GATE, voxel0, rows, real, h, HEADS: tl.constexpr):
    """2 * sigmoid(gate logit) of head h per query [T] (fp32)."""
    return 2.0 * tl.sigmoid(tl.load(GATE + (voxel0 + rows) * HEADS + h, mask=real, other=0.0).to(tl.float32))


@_jit
def _scaled(q, qk_scale):
    """q * scale * log2(e) in q's dtype: the scores come out of the product in log2 units."""
    return (q.to(tl.float32) * qk_scale).to(q.dtype)


@_jit
def _scores(
    q,
    k,
    tile_ptrs,
    offs_n,
    N: tl.constexpr,
    NP: tl.constexpr,
    HAS_TILE: tl.constexpr,
    PREC: tl.constexpr,
    TILE_PRODUCT: tl.constexpr = False,
):
    """Scores of one head in log2 units [BM, BN]: q (pre-scaled) . k plus the window class's bias + mask tile, or
    -inf for keys past the window where there is no tile. TILE_PRODUCT: the tile enters as the product tile @ I
    (exact), a wgmma reading both from shared memory, instead of as fp32 registers unpacked from 16 bits."""
    if HAS_TILE and TILE_PRODUCT:
        BN: tl.constexpr = k.shape[0]
        eye = (tl.arange(0, BN)[:, None] == tl.arange(0, BN)[None, :]).to(q.dtype)
        tile = tl.dot(tl.load(tile_ptrs), eye, input_precision=PREC)
        return tl.dot(q, tl.trans(k), tile, input_precision=PREC)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if HAS_TILE:
        s += tl.load(tile_ptrs).to(tl.float32)
    elif N != NP:
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
    return s


@_jit
def _tile_ptrs(TILE, cls, h, offs_m, n0, BN: tl.constexpr, HEADS: tl.constexpr, NP: tl.constexpr):
    """Pointers [BM, BN] into head h's [NP, NP] tile ``cls`` of TILE [K, HEADS, NP, NP] (the bias + mask tile of a
    window class; the bias; a chunk's dS sums), queries offs_m, keys n0 .. n0+BN."""
    return TILE + ((cls * HEADS + h) * NP * NP + n0) + (offs_m[:, None] * NP + tl.arange(0, BN)[None, :])


@_jit
def _dropout_setup(SEED, dropout_p):
    """The call's Philox seed (loaded once per program), the 16-bit threshold a random half-word must reach for its
    score to be kept (p is a multiple of 2^-16: see :func:`rounded_dropout_p`) and the 1 / (1 - p) scale of the kept
    probabilities."""
    p = tl.cast(dropout_p, tl.float32)
    return tl.load(SEED), (p * 65536.0).to(tl.uint32), 1.0 / (1.0 - p)


@_jit
def _keep(seed, threshold, bw, h, offs_m, n0, HEADS: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr):
    """Dropout keep mask [BM, BN] of head h of window ``bw`` (over the batch), queries ``offs_m``, keys n0 .. n0+BN.

    One Philox4x32-7 draw (FlashAttention-2's rounds) per 8 adjacent keys: counter (query * NP/8 + key // 8,
    bw * HEADS + h, 0, 0) keyed by the call's seed; key 8k + 2t + e takes half e (low, high) of word t, a uniform
    16-bit number, and is kept where it is >= threshold. A pure function of (seed, window, head, query, key): the
    backward kernels regenerate the forward's mask, and :func:`window_dropout_mask` materialises it. (Interleaving
    the halves back into key order costs layout conversions, but computing the words in the scores' layout repeats
    each Philox draw per element: 1.5x the instructions.)"""
    BM: tl.constexpr = offs_m.shape[0]
    octets = n0 // 8 + tl.arange(0, BN // 8)
    w0, w1, w2, w3 = tl.philox(seed, offs_m[:, None] * (NP // 8) + octets[None, :], bw * HEADS + h, 0, 0, 7)
    # word t at [..., t // 2, t % 2], half e after it: [BM, BN/8, 2, 2, 2] flattens to key 8k + 2t + e (tl.join, a
    # builtin, as tl.interleave would: that one is a jit function, slow to call under the interpreter)
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), [BM, BN]) >= threshold


@_jit
def _attend_key_tile(
    softmax,
    query,
    n0,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    G: tl.constexpr,
    HAS_TILE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    TILE_PRODUCT: tl.constexpr,
):
    """The forward's online softmax over keys n0 .. n0 + BN of a window for G heads: ``softmax`` = (running max,
    running sum [BM], output sum [BM, DPAD]), tuples per head, updated; ``query`` = (QKV, PAD_ROW, ROWS, TILE, qs
    (the query tile pre-scaled, per head), offs_m, cls, win, voxel0, bw, h0, seed, threshold)."""
    m_i, l_i, acc = softmax
    QKV, PAD_ROW, ROWS, TILE, qs, offs_m, cls, win, voxel0, bw, h0, seed, threshold = query
    C: tl.constexpr = HEADS * HD
    offs_n = n0 + tl.arange(0, BN)
    kv = _row_ptrs(QKV, PAD_ROW, tl.load(ROWS + win * NP + offs_n), voxel0, 3 * C)
    k = _load_heads(kv, C + h0 * HD, HD, DPAD, G)
    v = _load_heads(kv, 2 * C + h0 * HD, HD, DPAD, G)
    m_next, l_next, acc_next = (), (), ()
    for g in tl.static_range(G):
        s = _scores(
            qs[g],
            k[g],
            _tile_ptrs(TILE, cls, h0 + g, offs_m, n0, BN, HEADS, NP),
            offs_n,
            N,
            NP,
            HAS_TILE,
            PREC,
            TILE_PRODUCT,
        )
        m_new = tl.maximum(m_i[g], tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i[g] - m_new)
        m_next = m_next + (m_new,)
        l_next = l_next + (l_i[g] * alpha + tl.sum(p, 1),)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, threshold, bw, h0 + g, offs_m, n0, HEADS, NP, BN), p, 0.0)
        acc_next = acc_next + (acc[g] * alpha[:, None] + tl.dot(p.to(v[g].dtype), v[g], input_precision=PREC),)
    return m_next, l_next, acc_next


@_jit
def _window_attention_fwd(
    QKV,
    PAD_ROW,
    ROWS,
    CLASSES,
    TILE,
    GATE,
    OUT,
    LSE,
    NWIN,
    VOXELS,
    qk_scale,
    SEED,
    dropout_p,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    HAS_TILE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    PREC: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    TILE_PRODUCT: tl.constexpr,
):
    """One query tile of one window for G heads: online softmax over the window's key tiles; out [B, D, H, W, C],
    lse [B*nW, HEADS, NP] (log2 units, of the probabilities before dropout; not written for tiles of padding only).
    With HAS_DROPOUT (SEED [1] int64, dropout_p; None without) the probabilities multiplying v are dropped by
    :func:`_keep`'s mask and the kept ones scaled by 1 / (1 - p); the softmax sum is taken before dropping.
    TILE_PRODUCT: the bias + mask tile enters the scores as a product (:func:`_scores`)."""
    G: tl.constexpr = HEADS_PER_PROGRAM
    C: tl.constexpr = HEADS * HD
    qt, h0, bw, b, win = _split_pid(tl.program_id(0), NP // BM, HEADS, NWIN, G)
    offs_m = qt * BM + tl.arange(0, BM)
    rows_q = tl.load(ROWS + win * NP + offs_m)
    if tl.max(rows_q, 0) >= 0:
        if HAS_DROPOUT:
            seed, threshold, drop_scale = _dropout_setup(SEED, dropout_p)
        else:
            seed, threshold, drop_scale = None, None, None
        voxel0 = b.to(tl.int64) * VOXELS
        q = _load_heads(_row_ptrs(QKV, PAD_ROW, rows_q, voxel0, 3 * C), h0 * HD, HD, DPAD, G)
        qs = ()
        for g in tl.static_range(G):
            qs = qs + (_scaled(q[g], qk_scale),)
        cls = tl.load(CLASSES + win)
        m_i, l_i, acc = (), (), ()
        for _g in tl.static_range(G):
            m_i = m_i + (tl.full([BM], float("-inf"), tl.float32),)  # the first key tile holds key 0: m_i turns finite
            l_i = l_i + (tl.zeros([BM], tl.float32),)
            acc = acc + (tl.zeros([BM, DPAD], tl.float32),)
        softmax = (m_i, l_i, acc)
        query = (QKV, PAD_ROW, ROWS, TILE, qs, offs_m, cls, win, voxel0, bw, h0, seed, threshold)
        FULL: tl.constexpr = full_key_tiles(N, BN)
        for kt in tl.range(0, FULL):
            softmax = _attend_key_tile(
                softmax, query, kt * BN, HEADS, HD, N, NP, BN, DPAD, G, HAS_TILE, HAS_DROPOUT, PREC, TILE_PRODUCT
            )
        TAIL: tl.constexpr = key_tail(N, BN)
        tl.static_assert(TAIL % (BN // 8) == 0, "the tail tiles below cover the keys left")
        for i in tl.static_range(1, 4):  # the tail's tiles, widest first: BN / 2, BN / 4, BN / 8 where its bits say
            if TAIL & (BN >> i):
                softmax = _attend_key_tile(
                    softmax,
                    query,
                    FULL * BN + TAIL - TAIL % (2 * (BN >> i)),
                    HEADS,
                    HD,
                    N,
                    NP,
                    BN >> i,
                    DPAD,
                    G,
                    HAS_TILE,
                    HAS_DROPOUT,
                    PREC,
                    TILE_PRODUCT,
                )
        m_i, l_i, acc = softmax
        real = rows_q >= 0
        out_ptrs = OUT + (voxel0 + rows_q) * C
        for g in tl.static_range(G):
            row_scale = 1.0 / l_i[g]  # the rows' factors first: one multiply per element, no division
            if HAS_DROPOUT:
                row_scale = row_scale * drop_scale
            if HAS_GATE:
                row_scale = row_scale * _gate(GATE, voxel0, rows_q, real, h0 + g, HEADS)
            _store_head(out_ptrs, acc[g] * row_scale[:, None], (h0 + g) * HD, real, HD, DPAD)
            tl.store(LSE + (bw * HEADS + h0 + g) * NP + offs_m, m_i[g] + tl.log2(l_i[g]))


@_jit
def _attention_dout(do, gate, drop_scale, HAS_GATE: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """dO of the attention [T, DPAD] (fp32) from a head's tile of dout: times its gate [T] (2 sigmoid(logit)) and,
    with dropout, 1 / (1 - p), the scale of every kept probability, which dV and dP then carry."""
    do = do.to(tl.float32)
    if HAS_GATE:
        do = do * gate[:, None]
    if HAS_DROPOUT:
        do = do * drop_scale
    return do


@_jit
def _query_head(
    QKV,
    PAD_ROW,
    GATE,
    DOUT,
    LSE,
    DELTA,
    q_ptrs,
    rows_q,
    offs_m,
    voxel0,
    bw,
    h,
    qk_scale,
    drop_scale,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    NP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DPAD: tl.constexpr,
):
    """What the backward needs of head h in a query tile: q pre-scaled and dO of the attention [BM, DPAD] in q's
    dtype, lse and delta [BM]. One head at a time keeps the registers of the others free."""
    C: tl.constexpr = HEADS * HD
    real = rows_q >= 0
    q = _load_heads(q_ptrs, h * HD, HD, DPAD, 1)[0]
    do = _load_heads(DOUT + (voxel0 + rows_q) * C, h * HD, HD, DPAD, 1, real)[0]
    gate = _gate(GATE, voxel0, rows_q, real, h, HEADS) if HAS_GATE else None
    do = _attention_dout(do, gate, drop_scale, HAS_GATE, HAS_DROPOUT)
    lse = tl.load(LSE + (bw * HEADS + h) * NP + offs_m)
    delta = tl.load(DELTA + (bw * HEADS + h) * NP + offs_m)
    return _scaled(q, qk_scale), do.to(q.dtype), lse, delta


@_jit
def _negated_columns(x, dtype: tl.constexpr):
    """[BM, 16] in ``dtype``: -x [BM] (fp32) in columns 0 .. 2 as three parts, each the rest of x rounded to dtype
    (in bf16 their sum is x to fp32 precision), zeros after. Times :func:`_ones_rows` in a tl.dot it subtracts x
    from every column of the product's accumulator: one wgmma instead of BM * BN subtractions."""
    high = x.to(dtype)
    rest = x - high.to(tl.float32)
    mid = rest.to(dtype)
    low = (rest - mid.to(tl.float32)).to(dtype)
    col = tl.arange(0, 16)[None, :]
    parts = tl.where(col == 0, high[:, None], tl.where(col == 1, mid[:, None], tl.where(col == 2, low[:, None], 0)))
    return -parts


@_jit
def _ones_rows(dtype: tl.constexpr, BN: tl.constexpr):
    """[16, BN] in ``dtype``: ones in rows 0 .. 2 (:func:`_negated_columns`' parts), zeros after."""
    return tl.where(tl.arange(0, 16)[:, None] < 3, tl.full([16, BN], 1.0, dtype), tl.zeros([16, BN], dtype))


@_jit
def _pair_grads(
    qs,
    do,
    lse,
    delta,
    k,
    v,
    dv,
    dk,
    dq,
    tile_ptrs,
    offs_m,
    offs_n,
    kt,
    seed,
    threshold,
    bw,
    h,
    HEADS: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    HAS_TILE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    FOLD: tl.constexpr,
):
    """One head's (query tile, key tile) added to the sums dv, dk [BN, DPAD] and dq [BM, DPAD] (fp32; dk and dq in
    the scores' log2 units), from q pre-scaled, dO of the attention, lse and delta of the query tile ([BM], or with
    FOLD as :func:`_negated_columns`, subtracted by the products); also returns the tile's dS [BM, BN] (fp32), the
    gradient of the relative-position bias there."""
    s = _scores(qs, k, tile_ptrs, offs_n, N, NP, HAS_TILE, PREC)
    if FOLD:
        ones = _ones_rows(qs.dtype, BN)
        p = tl.exp2(tl.dot(lse, ones, s, input_precision=PREC))
    else:
        p = tl.exp2(s - lse[:, None])
    if HAS_DROPOUT:
        keep = _keep(seed, threshold, bw, h, offs_m, kt * BN, HEADS, NP, BN)
        pv = tl.where(keep, p, 0.0)
    else:
        pv = p
    dv += tl.dot(tl.trans(pv.to(do.dtype)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if HAS_DROPOUT:
        dp = tl.where(keep, dp, 0.0)
    if FOLD:
        dp = tl.dot(delta, ones, dp, input_precision=PREC)
    else:
        dp -= delta[:, None]
    ds = p * dp
    ds_low = ds.to(qs.dtype)
    dk += tl.dot(tl.trans(ds_low), qs, input_precision=PREC)
    dq += tl.dot(ds_low, k, input_precision=PREC)
    return dv, dk, dq, ds


@_jit
def _key_tile(
    QKV,
    PAD_ROW,
    ROWS,
    win,
    voxel0,
    h0,
    kt,
    C: tl.constexpr,
    HD: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    G: tl.constexpr,
):
    """Key tile kt of a window for G heads: offs_n, row ids [BN], k and v [BN, DPAD] per head, zero dk and dv sums."""
    offs_n = kt * BN + tl.arange(0, BN)
    rows_k = tl.load(ROWS + win * NP + offs_n)
    kv = _row_ptrs(QKV, PAD_ROW, rows_k, voxel0, 3 * C)
    dk, dv = (), ()
    for _g in tl.static_range(G):
        dk, dv = dk + (tl.zeros([BN, DPAD], tl.float32),), dv + (tl.zeros([BN, DPAD], tl.float32),)
    return (
        offs_n,
        rows_k,
        _load_heads(kv, C + h0 * HD, HD, DPAD, G),
        _load_heads(kv, 2 * C + h0 * HD, HD, DPAD, G),
        dk,
        dv,
    )


@_jit
def _store_key_grads(
    DQKV,
    DPAD_PARTS,
    rows_k,
    dk,
    dv,
    voxel0,
    bw,
    kt,
    h0,
    C: tl.constexpr,
    HD: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    G: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """dk and dv of key tile kt (G heads) into DQKV; padded keys' sums into DPAD_PARTS [B*nW, NP // BN, 2C]."""
    dd = tl.arange(0, DPAD)
    real_k = rows_k >= 0
    out_k = DQKV + (voxel0 + rows_k) * (3 * C)
    for g in tl.static_range(G):
        # scores are scale * q.k: dk = dS^T (scale q) = dS^T qs * ln 2
        _store_head(out_k, dk[g] * 0.6931471805599453, C + (h0 + g) * HD, real_k, HD, DPAD)
        _store_head(out_k, dv[g], 2 * C + (h0 + g) * HD, real_k, HD, DPAD)
        if HAS_PAD:  # padded keys are the qkv bias: their gradients sum into d(pad_kv)
            slot = DPAD_PARTS + (bw * (NP // BN) + kt) * (2 * C) + (h0 + g) * HD + dd
            pad = (rows_k < 0)[:, None]
            tl.store(slot, tl.sum(tl.where(pad, dk[g] * 0.6931471805599453, 0.0), 0), mask=dd < HD)
            tl.store(slot + C, tl.sum(tl.where(pad, dv[g], 0.0), 0), mask=dd < HD)


@_jit
def _key_sum_ptrs(KEY_SUMS, bw, h, kt, HEADS: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr, DPAD: tl.constexpr):
    """Pointers [BN, DPAD] to head h's dk sums of key tile kt in KEY_SUMS [B*nW, HEADS, 2, NP, DPAD] (fp32; dv's
    are NP * DPAD further): where a key tile's sums wait between passes over a window's query tiles. A scalar base
    plus a fixed pattern, as in :func:`_tile_ptrs`."""
    base = KEY_SUMS + ((bw * HEADS + h) * 2 * NP + kt * BN) * DPAD
    return base + (tl.arange(0, BN)[:, None] * DPAD + tl.arange(0, DPAD)[None, :])


@_jit
def _on_chip_key_loop(
    query,
    key,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    G: tl.constexpr,
    HAS_TILE: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    LIVE: tl.constexpr,
    T0: tl.constexpr,
    TILES: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BIAS_SUMS: tl.constexpr,
    FOLD: tl.constexpr,
):
    """The backward's key loop over query tiles T0 .. T0 + TILES - 1 of a window (those below NP // BM), held on
    chip: ``query`` = (qs, dos, lses, deltas, dqs, dss), tuples per (tile - T0) * G + head (dss per head, empty
    without BIAS_SUMS); ``key`` = (QKV, PAD_ROW, ROWS, TILE, DQKV, DPAD_PARTS, KEY_SUMS, cls, win, voxel0, bw, h0,
    seed, threshold). Each key tile meets those query tiles in an unrolled pass, the tiles of padding only left out
    at compile time (bit qt of LIVE clear); its dk and dv sums start from zero (FIRST) or from the previous pass's
    in KEY_SUMS, and go to DQKV (LAST) or back to KEY_SUMS. With BIAS_SUMS (windows of one tile pair) dS is added
    to the head's sum [BM, BN] in dss. Returns the dq sums and dss."""
    tl.static_assert(not BIAS_SUMS or (NP == BM and NP == BN), "dS sums: windows of one (query, key) tile pair")
    qs, dos, lses, deltas, dqs, dss = query
    QKV, PAD_ROW, ROWS, TILE, DQKV, DPAD_PARTS, KEY_SUMS, cls, win, voxel0, bw, h0, seed, threshold = key
    C: tl.constexpr = HEADS * HD
    for kt in tl.range(0, NP // BN):
        offs_n, rows_k, k, v, dk, dv = _key_tile(QKV, PAD_ROW, ROWS, win, voxel0, h0, kt, C, HD, NP, BN, DPAD, G)
        dq_next, ds_next = (), ()
        for qt in tl.static_range(T0, T0 + TILES):
            if qt < NP // BM:
                offs_m = qt * BM + tl.arange(0, BM)
                dk_next, dv_next = (), ()
                for g in tl.static_range(G):
                    dq_g, dk_g, dv_g = dqs[(qt - T0) * G + g], dk[g], dv[g]
                    if BIAS_SUMS:
                        ds_g = dss[g]
                    if (LIVE >> qt) & 1:
                        tile_ptrs = _tile_ptrs(TILE, cls, h0 + g, offs_m, kt * BN, BN, HEADS, NP)
                        dv_g, dk_g, dq_g, ds = _pair_grads(
                            qs[(qt - T0) * G + g],
                            dos[(qt - T0) * G + g],
                            lses[(qt - T0) * G + g],
                            deltas[(qt - T0) * G + g],
                            k[g],
                            v[g],
                            dv_g,
                            dk_g,
                            dq_g,
                            tile_ptrs,
                            offs_m,
                            offs_n,
                            kt,
                            seed,
                            threshold,
                            bw,
                            h0 + g,
                            HEADS,
                            N,
                            NP,
                            BN,
                            HAS_TILE,
                            HAS_DROPOUT,
                            PREC,
                            FOLD,
                        )
                        if BIAS_SUMS:
                            ds_g += ds
                    dk_next, dv_next, dq_next = dk_next + (dk_g,), dv_next + (dv_g,), dq_next + (dq_g,)
                    if BIAS_SUMS:
                        ds_next = ds_next + (ds_g,)
                dk, dv = dk_next, dv_next
        dqs, dss = dq_next, ds_next
        if not FIRST:  # add the earlier passes' sums (loaded here, where the scores no longer hold registers)
            dk_all, dv_all = (), ()
            for g in tl.static_range(G):
                sums = _key_sum_ptrs(KEY_SUMS, bw, h0 + g, kt, HEADS, NP, BN, DPAD)
                dk_all, dv_all = dk_all + (dk[g] + tl.load(sums),), dv_all + (dv[g] + tl.load(sums + NP * DPAD),)
            dk, dv = dk_all, dv_all
        if LAST:
            _store_key_grads(DQKV, DPAD_PARTS, rows_k, dk, dv, voxel0, bw, kt, h0, C, HD, NP, BN, DPAD, G, HAS_PAD)
        else:
            for g in tl.static_range(G):
                sums = _key_sum_ptrs(KEY_SUMS, bw, h0 + g, kt, HEADS, NP, BN, DPAD)
                tl.store(sums, dk[g])
                tl.store(sums + NP * DPAD, dv[g])
    return dqs, dss


@_jit
def _query_side(
    tensors,
    win,
    voxel0,
    bw,
    h0,
    qk_scale,
    drop_scale,
    T0: tl.constexpr,
    TILES: tl.constexpr,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    NP: tl.constexpr,
    BM: tl.constexpr,
    DPAD: tl.constexpr,
    G: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ON_CHIP: tl.constexpr,
    LIVE: tl.constexpr,
    FOLD: tl.constexpr,
):
    """Query tiles T0 .. T0 + TILES - 1 of a window (those below NP // BM, and with bit qt of LIVE set: the others
    hold padding only) for G heads, ``tensors`` = (QKV, PAD_ROW, ROWS, GATE, OUT, DOUT, LSE, DELTA, DGATE): delta =
    rowsum(dout * out) per query (stored for the bias kernel) and d(gate logits); with ON_CHIP, returns what the key
    loop holds of them, tuples per (tile - T0) * G + head: q pre-scaled, dO of the attention, lse, delta (with FOLD
    as :func:`_negated_columns`) and a zero dq sum (all empty without; zeros in a left-out tile's places)."""
    QKV, PAD_ROW, ROWS, GATE, OUT, DOUT, LSE, DELTA, DGATE = tensors
    C: tl.constexpr = HEADS * HD
    qs, dos, lses, deltas, dqs = (), (), (), (), ()
    for qt in tl.static_range(T0, T0 + TILES):
        if qt < NP // BM and not (LIVE >> qt) & 1:
            for _g in tl.static_range(G if ON_CHIP else 0):  # a left-out tile's places, never read
                unused = tl.zeros([BM], tl.float32)
                qs, dos, lses, deltas, dqs = (
                    qs + (unused,),
                    dos + (unused,),
                    lses + (unused,),
                    deltas + (unused,),
                    dqs + (unused,),
                )
        elif qt < NP // BM:
            offs_m = qt * BM + tl.arange(0, BM)
            rows_q = tl.load(ROWS + win * NP + offs_m)
            real = rows_q >= 0
            o = _load_heads(OUT + (voxel0 + rows_q) * C, h0 * HD, HD, DPAD, G, real)
            do = _load_heads(DOUT + (voxel0 + rows_q) * C, h0 * HD, HD, DPAD, G, real)
            if ON_CHIP:
                q = _load_heads(_row_ptrs(QKV, PAD_ROW, rows_q, voxel0, 3 * C), h0 * HD, HD, DPAD, G)
            for g in tl.static_range(G):
                # rowsum(dO_attn * O_attn) with the gate folded in: (dout * gate) . (out / gate)
                delta = tl.sum(o[g].to(tl.float32) * do[g].to(tl.float32), 1)
                tl.store(DELTA + (bw * HEADS + h0 + g) * NP + offs_m, delta)
                gate = None
                if HAS_GATE:  # out = 2 sigmoid(x) o: d x = rowsum(dout * out) (1 - sigmoid(x))
                    grow = (voxel0 + rows_q) * HEADS + h0 + g
                    sig = tl.sigmoid(tl.load(GATE + grow, mask=real, other=0.0).to(tl.float32))
                    tl.store(DGATE + grow, (delta * (1.0 - sig)).to(DGATE.dtype.element_ty), mask=real)
                    gate = 2.0 * sig
                if ON_CHIP:
                    do_attn = _attention_dout(do[g], gate, drop_scale, HAS_GATE, HAS_DROPOUT)
                    qs, dos = qs + (_scaled(q[g], qk_scale),), dos + (do_attn.to(q[g].dtype),)
                    lse = tl.load(LSE + (bw * HEADS + h0 + g) * NP + offs_m)
                    if FOLD:  # subtracted by the key loop's products: see _pair_grads
                        lse, delta = _negated_columns(lse, q[g].dtype), _negated_columns(delta, q[g].dtype)
                    lses, deltas, dqs = lses + (lse,), deltas + (delta,), dqs + (tl.zeros([BM, DPAD], tl.float32),)
    return qs, dos, lses, deltas, dqs


@_jit
def _store_dq(
    DQKV, rows_q, dq, voxel0, h0, dq_scale, C: tl.constexpr, HD: tl.constexpr, DPAD: tl.constexpr, G: tl.constexpr
):
    """A query tile's dq sums [BM, DPAD] of G heads (fp32, in the scores' log2 units), scaled, into DQKV."""
    for g in tl.static_range(G):
        _store_head(DQKV + (voxel0 + rows_q) * (3 * C), dq[g] * dq_scale, (h0 + g) * HD, rows_q >= 0, HD, DPAD)


@_jit
def _on_chip_window(
    tensors,
    CLASSES,
    TILE,
    outputs,
    scalars,
    window_id,
    b,
    NWIN,
    VOXELS,
    h0,
    dss,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    G: tl.constexpr,
    HAS_TILE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    LIVE: tl.constexpr,
    QUERY_TILES: tl.constexpr,
    BIAS_SUMS: tl.constexpr,
    FOLD: tl.constexpr,
):
    """The backward of one window for heads h0 .. h0 + G - 1, its query side on chip QUERY_TILES query tiles per pass
    (see :func:`_window_attention_bwd`): ``tensors`` as :func:`_query_side` takes them, ``outputs`` = (DQKV,
    DPAD_PARTS, KEY_SUMS), ``scalars`` = (qk_scale, dq_scale, seed, threshold, drop_scale), window_id a pointer into
    the launch's window list (of batch element b). Returns dss, the heads' dS sums with this window's added
    (BIAS_SUMS), or ()."""
    QKV, PAD_ROW, ROWS = tensors[0], tensors[1], tensors[2]
    DQKV, DPAD_PARTS, KEY_SUMS = outputs
    qk_scale, dq_scale, seed, threshold, drop_scale = scalars
    C: tl.constexpr = HEADS * HD
    NQT: tl.constexpr = NP // BM
    PASSES: tl.constexpr = (NQT + QUERY_TILES - 1) // QUERY_TILES
    win = tl.load(window_id)
    bw = b * NWIN + win
    voxel0 = b.to(tl.int64) * VOXELS
    cls = tl.load(CLASSES + win)
    key = (QKV, PAD_ROW, ROWS, TILE, DQKV, DPAD_PARTS, KEY_SUMS, cls, win, voxel0, bw, h0, seed, threshold)
    for p in tl.static_range(PASSES):
        qs, dos, lses, deltas, dqs = _query_side(
            tensors,
            win,
            voxel0,
            bw,
            h0,
            qk_scale,
            drop_scale,
            p * QUERY_TILES,
            QUERY_TILES,
            HEADS,
            HD,
            NP,
            BM,
            DPAD,
            G,
            HAS_GATE,
            HAS_DROPOUT,
            True,
            LIVE,
            FOLD,
        )
        dqs, dss = _on_chip_key_loop(
            (qs, dos, lses, deltas, dqs, dss),
            key,
            HEADS,
            HD,
            N,
            NP,
            BM,
            BN,
            DPAD,
            G,
            HAS_TILE,
            HAS_PAD,
            HAS_DROPOUT,
            PREC,
            LIVE,
            p * QUERY_TILES,
            QUERY_TILES,
            p == 0,
            p == PASSES - 1,
            BIAS_SUMS,
            FOLD,
        )
        for qt in tl.static_range(p * QUERY_TILES, p * QUERY_TILES + QUERY_TILES):
            if qt < NQT and (LIVE >> qt) & 1:
                rows_q = tl.load(ROWS + win * NP + qt * BM + tl.arange(0, BM))
                dq = ()
                for g in tl.static_range(G):
                    dq = dq + (dqs[(qt - p * QUERY_TILES) * G + g],)
                _store_dq(DQKV, rows_q, dq, voxel0, h0, dq_scale, C, HD, DPAD, G)
        if p + 1 < PASSES:
            tl.debug_barrier()  # this pass's KEY_SUMS stores before the next pass's loads (other threads)
    return dss


@_jit
def _window_attention_bwd(
    QKV,
    PAD_ROW,
    ROWS,
    CLASSES,
    TILE,
    GATE,
    OUT,
    DOUT,
    LSE,
    DELTA,
    DQ,
    KEY_SUMS,
    DQKV,
    DGATE,
    DPAD_PARTS,
    PARTS,
    WINDOW_IDS,
    NIDS,
    SLOTS,
    WPC,
    NWIN,
    VOXELS,
    qk_scale,
    dq_scale,
    SEED,
    dropout_p,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    HAS_TILE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_PAD: tl.constexpr,
    GRADS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WINDOWS: tl.constexpr,
    LIVE: tl.constexpr,
    QUERY_TILES: tl.constexpr,
    BIAS_SUMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    PREC: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    FOLD: tl.constexpr,
):
    """One whole window for G heads. delta = rowsum(dout * out) per query (stored for the bias kernel) and d(gate
    logits); with GRADS, per key tile (k, v, dk, dv on chip) a pass over the window's query tiles: dv, dk and dq,
    in a fixed order (no atomics), and dq scaled into DQKV. Padded keys' dk/dv go, summed, to DPAD_PARTS
    [B*nW, NP // BN, 2C].

    The programs take the windows WINDOW_IDS [NIDS] of every batch element. WINDOWS 0 (all of them): the query side
    streamed: each (key tile, query tile) pair loads the query tile's q, dO, lse and delta from L2 and dq accumulates in
    DQ [B*voxels, C] fp32, which only this program touches; query tiles of padding only are skipped by a branch. WINDOWS
    1 (with GRADS): the window's query side (per query tile and head: q pre-scaled, dO of the attention, lse, delta and
    the dq sum) is loaded once and held on chip (q and dO in shared memory, the rest in registers) through the key loop,
    whose pass over the query tiles is unrolled; one launch per pattern of query tiles holding a real token (bit qt of
    LIVE), so that no loop branches on padding and the tiles of padding only cost nothing. Where the dq sums of every
    query tile would not fit the registers, the query tiles go on chip QUERY_TILES at a time, one key loop each: a key
    tile's dk and dv sums wait in KEY_SUMS [B*nW, HEADS, 2, NP, DPAD] (fp32, only this program's) from one pass to the
    next, and k and v are read once per pass. BIAS_SUMS (on chip, windows of one query tile and one key tile): each
    program takes WPC of the launch's SLOTS (B * NIDS) windows in turn and sums their dS per head in registers, into
    PARTS [chunks, HEADS, NP, NP] (the bias gradient from the scores already on chip: no d(bias) kernel). FOLD (on
    chip): each query tile's lse and delta are held as [BM, 16] columns (:func:`_negated_columns`) that a second wgmma
    on the scores and on dP subtracts, instead of 2 * BM * BN subtractions per tile pair.

    Dropout (HAS_DROPOUT; the forward's SEED and dropout_p), with P the softmax, K the forward's keep mask (regenerated
    by :func:`_keep`, never stored) and s = 1 / (1 - p): out = (P * K * s) v, so dV = (P * K)^T (s dO) and the
    gradient reaching P is dP = K * (s dO) v^T; delta = rowsum(dP * P) = rowsum(dO * out) still holds, so
    dS = P * (dP - delta) as without dropout (the bias kernel takes the same dS)."""
    G: tl.constexpr = HEADS_PER_PROGRAM
    C: tl.constexpr = HEADS * HD
    NQT: tl.constexpr = NP // BM
    QUERY_ON_CHIP: tl.constexpr = GRADS and WINDOWS != 0
    # slot: the program's window b * NIDS + i, or with BIAS_SUMS its chunk of WPC windows
    _, h0, slot, b, i = _split_pid(tl.program_id(0), 1, HEADS, NIDS, G)
    if HAS_DROPOUT:
        seed, threshold, drop_scale = _dropout_setup(SEED, dropout_p)
    else:
        seed, threshold, drop_scale = None, None, None
    tensors = (QKV, PAD_ROW, ROWS, GATE, OUT, DOUT, LSE, DELTA, DGATE)
    if QUERY_ON_CHIP:
        outputs = (DQKV, DPAD_PARTS, KEY_SUMS)
        scalars = (qk_scale, dq_scale, seed, threshold, drop_scale)
        dss = ()  # with BIAS_SUMS, per head the dS sums of the program's WPC windows: PARTS [chunks, HEADS, NP, NP]
        for _g in tl.static_range(G if BIAS_SUMS else 0):
            dss = dss + (tl.zeros([BM, BN], tl.float32),)
        for j in tl.range(0, WPC):  # WPC 1 without BIAS_SUMS, which Triton specialises: no loop
            window = slot * WPC + j
            if window < SLOTS:
                dss = _on_chip_window(
                    tensors,
                    CLASSES,
                    TILE,
                    outputs,
                    scalars,
                    WINDOW_IDS + window % NIDS,
                    window // NIDS,
                    NWIN,
                    VOXELS,
                    h0,
                    dss,
                    HEADS,
                    HD,
                    N,
                    NP,
                    BM,
                    BN,
                    DPAD,
                    G,
                    HAS_TILE,
                    HAS_GATE,
                    HAS_PAD,
                    HAS_DROPOUT,
                    PREC,
                    LIVE,
                    QUERY_TILES,
                    BIAS_SUMS,
                    FOLD,
                )
        for g in tl.static_range(G if BIAS_SUMS else 0):
            tl.store(_tile_ptrs(PARTS, slot, h0 + g, tl.arange(0, BM), 0, BN, HEADS, NP), dss[g])
    else:
        win = tl.load(WINDOW_IDS + i)
        bw = b * NWIN + win
        voxel0 = b.to(tl.int64) * VOXELS
        _query_side(
            tensors,
            win,
            voxel0,
            bw,
            h0,
            qk_scale,
            drop_scale,
            0,
            NQT,
            HEADS,
            HD,
            NP,
            BM,
            DPAD,
            G,
            HAS_GATE,
            HAS_DROPOUT,
            False,
            LIVE,
            False,
        )
        if GRADS:
            tl.debug_barrier()  # delta written above is read below by other threads of the program
            cls = tl.load(CLASSES + win)
            dd = tl.arange(0, DPAD)
            for kt in tl.range(0, NP // BN):
                offs_n, rows_k, k, v, dk, dv = _key_tile(
                    QKV, PAD_ROW, ROWS, win, voxel0, h0, kt, C, HD, NP, BN, DPAD, G
                )
                for qtile in tl.range(0, NQT):
                    offs_m = qtile * BM + tl.arange(0, BM)
                    rows_q = tl.load(ROWS + win * NP + offs_m)
                    if tl.max(rows_q, 0) >= 0:  # the forward wrote no lse for a tile of padding only
                        q_ptrs = _row_ptrs(QKV, PAD_ROW, rows_q, voxel0, 3 * C)
                        dq_ptrs = DQ + (voxel0 + rows_q)[:, None] * C + h0 * HD + dd[None, :]
                        dq_mask = (rows_q >= 0)[:, None] & (dd < HD)[None, :]
                        dk_next, dv_next = (), ()
                        for g in tl.static_range(G):
                            q_g, do_g, lse, delta = _query_head(
                                QKV,
                                PAD_ROW,
                                GATE,
                                DOUT,
                                LSE,
                                DELTA,
                                q_ptrs,
                                rows_q,
                                offs_m,
                                voxel0,
                                bw,
                                h0 + g,
                                qk_scale,
                                drop_scale,
                                HEADS,
                                HD,
                                NP,
                                HAS_GATE,
                                HAS_DROPOUT,
                                DPAD,
                            )
                            tile_ptrs = _tile_ptrs(TILE, cls, h0 + g, offs_m, kt * BN, BN, HEADS, NP)
                            prev = tl.load(dq_ptrs + g * HD, mask=dq_mask & (kt > 0), other=0.0)
                            dv_g, dk_g, dq_g, _ds = _pair_grads(
                                q_g,
                                do_g,
                                lse,
                                delta,
                                k[g],
                                v[g],
                                dv[g],
                                dk[g],
                                prev,
                                tile_ptrs,
                                offs_m,
                                offs_n,
                                kt,
                                seed,
                                threshold,
                                bw,
                                h0 + g,
                                HEADS,
                                N,
                                NP,
                                BN,
                                HAS_TILE,
                                HAS_DROPOUT,
                                PREC,
                                False,
                            )
                            dk_next, dv_next = dk_next + (dk_g,), dv_next + (dv_g,)
                            tl.store(dq_ptrs + g * HD, dq_g, mask=dq_mask)
                        dk, dv = dk_next, dv_next
                tl.debug_barrier()  # this key tile's dq stores before the next one's loads (other threads)
                _store_key_grads(DQKV, DPAD_PARTS, rows_k, dk, dv, voxel0, bw, kt, h0, C, HD, NP, BN, DPAD, G, HAS_PAD)
            for qt in tl.static_range(NQT):
                rows_q = tl.load(ROWS + win * NP + qt * BM + tl.arange(0, BM))
                dq = _load_heads(DQ + (voxel0 + rows_q) * C, h0 * HD, HD, DPAD, G, rows_q >= 0)
                _store_dq(DQKV, rows_q, dq, voxel0, h0, dq_scale, C, HD, DPAD, G)


@_jit
def _window_attention_bwd_bias(
    QKV,
    PAD_ROW,
    ROWS,
    CLASSES,
    REGIONS_Q,
    REGIONS_K,
    BIAS,
    GATE,
    DOUT,
    LSE,
    DELTA,
    PARTS,
    NWIN,
    VOXELS,
    BW,
    WPC,
    qk_scale,
    SEED,
    dropout_p,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DPAD: tl.constexpr,
    PREC: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    """dS of one (query tile, key tile) for G heads, summed in registers over a chunk of WPC windows and stored
    (no atomics) in PARTS [chunks, HEADS, NP, NP]; the host sums the chunks and gathers the sum into the table.
    With dropout, dS as in :func:`_window_attention_bwd` (the same regenerated mask).

    The relative-position bias B (BIAS [HEADS, NP, NP], log2 units, the same for every window) is factored out of
    the sum: dS = 2^(B + 64) * 2^(s - lse - 64) * (dP - delta), with s the scores without it (the shift mask as the
    product of the class's regions one-hot, REGIONS_Q and REGIONS_K [K, NP, 16] in qkv's dtype, -_SHIFT_MASK and 1
    where a token is in a region), so the loop reads no bias tile and the sum is scaled once. A probability P is
    at most 1, so s - lse <= -B: the terms summed, P 2^(-B - 64), stay below 1 wherever the bias is above -64
    (log2 units) and overflow only where a score exceeds lse by 192; they lose only what P lies below
    2^(B - 62) (below 2e-19 at B = 0)."""
    G: tl.constexpr = HEADS_PER_PROGRAM
    C: tl.constexpr = HEADS * HD
    NKT: tl.constexpr = NP // BN
    tile, h0, chunk, _, _ = _split_pid(tl.program_id(0), (NP // BM) * NKT, HEADS, 1, G)
    offs_m = (tile // NKT) * BM + tl.arange(0, BM)
    offs_n = (tile % NKT) * BN + tl.arange(0, BN)
    if HAS_DROPOUT:
        seed, threshold, drop_scale = _dropout_setup(SEED, dropout_p)
    else:
        seed, threshold, drop_scale = None, None, None
    acc = ()
    for _g in tl.static_range(G):
        acc = acc + (tl.zeros([BM, BN], tl.float32),)
    for bw in tl.range(chunk * WPC, tl.minimum(chunk * WPC + WPC, BW)):
        win = bw % NWIN
        voxel0 = (bw // NWIN).to(tl.int64) * VOXELS
        rows_q = tl.load(ROWS + win * NP + offs_m)
        if tl.max(rows_q, 0) >= 0:
            q_ptrs = _row_ptrs(QKV, PAD_ROW, rows_q, voxel0, 3 * C)
            kv = _row_ptrs(QKV, PAD_ROW, tl.load(ROWS + win * NP + offs_n), voxel0, 3 * C)
            k = _load_heads(kv, C + h0 * HD, HD, DPAD, G)
            v = _load_heads(kv, 2 * C + h0 * HD, HD, DPAD, G)
            if HAS_SHIFT:  # the class's regions one-hot: their product is -_SHIFT_MASK within a region, 0 across
                cls = tl.load(CLASSES + win)
                slots = tl.arange(0, _SLOTS)[None, :]
                onehot_q = tl.load(REGIONS_Q + cls * NP * _SLOTS + (offs_m[:, None] * _SLOTS + slots))
                onehot_k = tl.load(REGIONS_K + cls * NP * _SLOTS + (offs_n[:, None] * _SLOTS + slots))
            acc_next = ()
            for g in tl.static_range(G):
                qs, do, lse, delta = _query_head(
                    QKV,
                    PAD_ROW,
                    GATE,
                    DOUT,
                    LSE,
                    DELTA,
                    q_ptrs,
                    rows_q,
                    offs_m,
                    voxel0,
                    bw,
                    h0 + g,
                    qk_scale,
                    drop_scale,
                    HEADS,
                    HD,
                    NP,
                    HAS_GATE,
                    HAS_DROPOUT,
                    DPAD,
                )
                s = tl.dot(qs, tl.trans(k[g]), input_precision=PREC)
                shift = -lse - 64.0
                if HAS_SHIFT:  # the mask: _SHIFT_MASK across regions, 0 within
                    s = tl.dot(onehot_q, tl.trans(onehot_k), s, input_precision=PREC)
                    shift += _SHIFT_MASK
                s += shift[:, None]
                if N != NP:
                    s = tl.where((offs_n < N)[None, :], s, float("-inf"))
                dp = tl.dot(do, tl.trans(v[g]), input_precision=PREC)
                if HAS_DROPOUT:
                    dp = tl.where(_keep(seed, threshold, bw, h0 + g, offs_m, (tile % NKT) * BN, HEADS, NP, BN), dp, 0.0)
                acc_next = acc_next + (acc[g] + tl.exp2(s) * (dp - delta[:, None]),)
            acc = acc_next
    for g in tl.static_range(G):
        n0 = (tile % NKT) * BN
        scale = tl.exp2(tl.load(_tile_ptrs(BIAS, 0, h0 + g, offs_m, n0, BN, HEADS, NP)).to(tl.float32) + 64.0)
        tl.store(_tile_ptrs(PARTS, chunk, h0 + g, offs_m, n0, BN, HEADS, NP), acc[g] * scale)


@_jit
def _window_dropout_keep(
    SEED, KEEP, dropout_p, HEADS: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):
    """KEEP [B*nW, HEADS, NP, NP] int8: :func:`_keep`'s mask, one [BM, BN] tile of one (window, head) per program
    (program ids: window * HEADS + head, tile)."""
    wh, tile = tl.program_id(0), tl.program_id(1)
    offs_m = (tile // (NP // BN)) * BM + tl.arange(0, BM)
    n0 = (tile % (NP // BN)) * BN
    seed, threshold, _ = _dropout_setup(SEED, dropout_p)
    keep = _keep(seed, threshold, wh // HEADS, wh % HEADS, offs_m, n0, HEADS, NP, BN)
    tl.store(KEEP + (wh * NP + offs_m[:, None]) * NP + n0 + tl.arange(0, BN)[None, :], keep.to(tl.int8))


# ---------------------------------------------------------------------------------------------------------- launchers

# (BM, BN, num_warps, num_stages) per kernel for 16-bit inputs: BM 64 = one warpgroup's wgmma rows, so every product
# of the backward (dv, dk: BN rows; dq, dp, s: BM rows) is a wgmma; BN 64 keeps a head's [64, 64] fp32 scores at 32
# registers per thread beside G heads' state (BN 128 spills in the forward); the bias kernel, one head per program,
# takes BN 128 to halve its per-window overhead (issue floor 387 -> 293 µs at stage 1). The forward runs one stage:
# with the tile product, 2 stages take 189 registers (2 CTAs per SM) for 149 (3) with one, whose loads are not
# pipelined, so the SM's other CTAs are to hide their latency: for a GPU sweep to confirm (tune_window_attention.py
# --time). Chosen from sm_90 compiles (bench/sass_profile.py); not yet timed on a GPU.
_GPU_CONFIGS = dict(fwd=(64, 64, 4, 1), bwd=(64, 64, 4, 1), bias=(64, 128, 4, 1))
# channels of heads per program: the backward holds its window's dq sums (fp32) and, per key tile, dk and dv beside
# the scores, the bias kernel a [BM, BN] fp32 sum per head, so they take fewer heads than the forward (the backward
# at least one, and as many as its query side on chip holds: see _launch_config)
_CHANNELS = dict(fwd=64, bwd=16, bias=16)
# the backward holds the window's query tiles on chip in one pass where their dq sums take at most this many fp32
# registers per thread-row (tiles x G x DPAD): at 7^3 windows one head of 16 (stage 1: issue floor 444 -> 295 µs,
# loop bytes 5.07 -> 2.16 GB against the streamed 3 heads per program); 2-D windows (one tile) take 3 heads of 16
# or 2 of 32. In several passes the key tile's sums move in and out of KEY_SUMS beside the dq sums, which then get
# fewer: head dim 32 spilled with 6 tiles (372 B) and with passes of 3 (12 B), not with 2; with dropout 2 tiles
# of 16 (3 spilled 4 B), so there head dim 32 streams.
_QUERY_ON_CHIP_COLUMNS = 96
_PASS_COLUMNS = 64
_DROPOUT_PASS_COLUMNS = 32
# With attention dropout the mask's Philox words take registers too: the forward runs one head per program, the
# backward holds fewer query tiles per pass and the bias kernel takes 64-wide key tiles, the sm_90 compiles' largest
# without spills (3 heads spilled in the fp16 forward and the backward, BN 128 in the bias kernel, more than 2 query
# tiles of 16 per pass in the backward; their issue floors were within 7% of these)
_DROPOUT_GPU_CONFIGS = {**_GPU_CONFIGS, "bias": (64, 64, 4, 1)}
_DROPOUT_CHANNELS = {**_CHANNELS, "fwd": 16}
_FP32_CONFIG = (32, 32, 4, 1)  # IEEE-fp32 tl.dot runs on the FMA units: small tiles keep register spills small
# ... and keeps its operand tiles in registers beside the sums, so the fp32 backward holds one head per program and
# passes of at most 2 query tiles (stage 1: 180 B of spills with passes of 4; 2-D windows: 1,368 B with 3 heads)
_FP32_PASS_TILES = 2


def _fma_dots(dtype: torch.dtype) -> bool:
    """Whether the GPU kernels' tl.dot runs on the FMA units (IEEE fp32) rather than wgmma."""
    return dtype == torch.float32 and not interpreting()


def _folds_lse_and_delta(dtype: torch.dtype, key_tiles: int) -> bool:
    """Whether the backward's key loop, its query side on chip, takes lse and delta as products
    (:func:`_negated_columns`): two wgmma per (tile pair, head) for 2 * BM * BN subtractions, about 55 fewer
    instructions per thread at head dim 16, for about 140 more per (query tile, head) to build the columns once (sm_90,
    bf16): worth it from 3 key tiles per window. In bf16, and in fp32 under the interpreter (how the tests reach it);
    not fp16, whose 65504 does not hold every delta = rowsum(dO * O), nor FMA dots, where the products cost more than
    the subtractions."""
    return key_tiles >= 3 and (dtype == torch.bfloat16 or (dtype == torch.float32 and not _fma_dots(dtype)))


def _adds_tile_by_product(dtype: torch.dtype, key_tiles: int) -> bool:
    """Whether the forward adds the bias + mask tile to the scores as the product tile @ I (:func:`_scores`): a
    wgmma on operands the loads put in shared memory, for the registers' unpacking of the 16-bit tile and the
    per-element pointers of its load (sm_90, bf16, stage 1, one stage: 810 -> 676 instructions per key tile of 3
    heads). From 2 key tiles per window: with one (2-D windows) the identity costs more than it saves. Not FMA dots,
    where the product costs more than the additions."""
    return key_tiles >= 2 and not _fma_dots(dtype)


def _head_tile(head_dim: int) -> int:
    """DPAD: the head dim padded to a power of 2 >= 16 (tl.dot's minimum on a GPU)."""
    return max(16, triton.next_power_of_2(head_dim))


def _heads_per_program(head_dim: int, heads: int, channels: int = _CHANNELS["fwd"]) -> int:
    """G: the largest divisor of ``heads`` with G * DPAD <= ``channels`` (the forward's 64: 12 heads of 16 -> 4,
    6 -> 3, 2 -> 2)."""
    g = max(1, channels // _head_tile(head_dim))
    while heads % g:
        g -= 1
    return g


def _query_tiles_per_pass(geo: _Geometry, cfg: dict, dropout: bool, dtype: torch.dtype) -> int:
    """How many query tiles the backward holds on chip per pass over the window's keys (0: it streams the query
    side). Their dq sums [BM, G * DPAD] fp32 may take _QUERY_ON_CHIP_COLUMNS registers per thread-row where all the
    window's tiles fit in one pass, _PASS_COLUMNS where they take several passes (each key tile's sums then move
    between passes) and _DROPOUT_PASS_COLUMNS with dropout (the mask's Philox words take registers too), at most
    _FP32_PASS_TILES where the dots run on the FMA units; the tiles are spread evenly over the passes. A pass of one
    tile would move more (k, v and their sums per query tile) than streaming dq does."""
    tiles = geo.np // cfg["BM"]
    columns = cfg["HEADS_PER_PROGRAM"] * _head_tile(geo.head_dim)
    if not dropout and tiles * columns <= _QUERY_ON_CHIP_COLUMNS:
        return tiles
    most = (_DROPOUT_PASS_COLUMNS if dropout else _PASS_COLUMNS) // columns
    if _fma_dots(dtype):
        most = min(most, _FP32_PASS_TILES)
    if most >= tiles:
        return tiles
    return triton.cdiv(tiles, triton.cdiv(tiles, most)) if most >= 2 else 0


def tokens_padded(n: int) -> int:
    """NP: the tokens of a window rounded up to the tile grid every kernel shares (a power of 2 >= 16 up to 128,
    then a multiple of 128: 343 -> 384)."""
    return max(16, 1 << (n - 1).bit_length()) if n <= 128 else -(-n // 128) * 128


def _launch_config(
    kernel: str, n: int, head_dim: int, heads: int, dtype: torch.dtype, dropout: bool = False, bias_grad: bool = False
) -> dict:
    """BM (query tile), BN (key tile), num_warps, num_stages and HEADS_PER_PROGRAM of ``kernel`` ("fwd", "bwd" or
    "bias") for windows of n tokens, with or without attention dropout, and for "bwd" with or without the bias
    table's gradient (windows of one tile pair sum it there); BM and BN divide tokens_padded(n)."""
    np_ = tokens_padded(n)
    if interpreting():  # few, large blocks: each interpreted block op costs milliseconds
        bm = bn = min(np_, 128)
        warps, stages = 4, 1
    else:
        configs = _DROPOUT_GPU_CONFIGS if dropout else _GPU_CONFIGS
        bm, bn, warps, stages = _FP32_CONFIG if _fma_dots(dtype) else configs[kernel]
        bm, bn = min(bm, np_), min(bn, np_)
    channels = (_DROPOUT_CHANNELS if dropout else _CHANNELS)[kernel]
    if kernel == "bwd" and not dropout and not _fma_dots(dtype):  # as many heads as its query side holds (2-D: 3)
        columns = _QUERY_ON_CHIP_COLUMNS // (np_ // bm)
        if bias_grad and np_ == bm == bn:  # each head's dS sum [BM, BN] beside its dq sum: 1 head in 2-D windows
            dpad = _head_tile(head_dim)
            columns = columns * dpad // (dpad + bn)
        channels = max(channels, min(_CHANNELS["fwd"], columns))
    return dict(
        BM=bm,
        BN=bn,
        num_warps=warps,
        num_stages=stages,
        HEADS_PER_PROGRAM=_heads_per_program(head_dim, heads, channels),
    )


@functools.lru_cache(maxsize=64)
def window_rows(size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]) -> torch.Tensor:
    """[nW, n] int32 on the CPU: the voxel (d * H + h) * W + w of a grid ``size`` that token t of window ``win`` of
    the rolled grid padded to a multiple of ``window`` holds (the roll, the padding and the partition of
    :func:`window_qkv` as one index), -1 for a padded voxel."""
    padded = padded_grid(size, window)
    voxels = torch.full(padded, -1, dtype=torch.int32)
    voxels[: size[0], : size[1], : size[2]] = torch.arange(math.prod(size), dtype=torch.int32).view(size)
    if any(shift):
        voxels = torch.roll(voxels, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    return partition(voxels[None, ..., None], window)[..., 0]


def _padded_rows(size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]) -> torch.Tensor:
    """:func:`window_rows` [nW, NP] int32 on the CPU, -1 for the tokens t >= n that pad a window to NP."""
    rows = window_rows(size, window, shift)
    return F.pad(rows, (0, tokens_padded(rows.shape[1]) - rows.shape[1]), value=-1)


@functools.lru_cache(maxsize=64)
def _window_tables(
    size: tuple[int, int, int],
    window: tuple[int, int, int],
    shift: tuple[int, int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows [nW, NP] int32, classes [nW] int32, the classes' shift masks [K, NP, NP] fp32 (0 within a region, -100
    across, _PAST_WINDOW for keys past the window) and their regions one-hot [K, NP, 16] fp32 (none past the window) on
    ``device``; see the comment above the kernels."""
    n = math.prod(window)
    np_ = tokens_padded(n)
    padded = padded_grid(size, window)
    rows = _padded_rows(size, window, shift)
    patterns, classes = torch.unique(_window_regions(padded, window, shift), dim=0, return_inverse=True)
    masks = torch.zeros(len(patterns), np_, np_)
    masks[:, :n, :n] = _region_mask(patterns, SHIFT_MASK_VALUE, torch.float32)
    masks[..., n:] = _PAST_WINDOW
    # each class's region ids ranked 0 .. 7 (a window meets at most 2 regions per axis), one-hot [K, NP, 16]
    ranks = torch.stack([torch.unique(p, return_inverse=True)[1] for p in patterns])
    regions = F.one_hot(F.pad(ranks, (0, np_ - n), value=_REGION_SLOTS), _REGION_SLOTS + 1)[..., :_REGION_SLOTS]
    return rows.to(device), classes.to(device, torch.int32), masks.to(device), regions.to(device, torch.float32)


@functools.lru_cache(maxsize=64)
def _region_onehots(
    size: tuple[int, int, int],
    window: tuple[int, int, int],
    shift: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes' regions one-hot [K, NP, 16] in ``dtype`` as the d(bias) kernel multiplies them: the query side
    times -_SHIFT_MASK_LOG2, the key side as is."""
    regions = _window_tables(size, window, shift, device)[3]
    return (regions * -_SHIFT_MASK_LOG2).to(dtype), regions.to(dtype)


@functools.lru_cache(maxsize=64)
def _window_launches(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], bm: int, device: torch.device
) -> tuple[torch.Tensor, tuple[tuple[int, torch.Tensor], ...]]:
    """Windows of one batch element as int32 index lists on ``device``: all of them (the streamed backward), and
    per pattern of query tiles of ``bm`` tokens holding a real token (bit t: tile t does), the pattern and its
    windows (the on-chip backward's launches), the full pattern first. At stage 1 (64^3, 7^3 windows, shifted by 3)
    800 windows of each volume are full, 100 have tiles 0-3 and 100 tiles 3-5."""
    rows = _padded_rows(size, window, shift)
    live = rows.view(rows.shape[0], -1, bm).amax(-1) >= 0
    masks = (live.long() << torch.arange(live.shape[1])).sum(-1)
    ids = torch.arange(rows.shape[0], dtype=torch.int32)
    groups = tuple((m, ids[masks == m].to(device)) for m in sorted(set(masks.tolist()), reverse=True))
    return ids.to(device), groups


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Geometry of one window_attention call (all derived from shapes and the window arguments)."""

    batch: int
    size: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    table_window: tuple[int, int, int]
    heads: int
    head_dim: int
    scale: float

    @classmethod
    def of(cls, qkv: torch.Tensor, num_heads: int, window_size, shift_size, table_window, scale) -> _Geometry:
        b, d, h, w, c3 = qkv.shape
        head_dim = c3 // 3 // num_heads
        return cls(
            b,
            (d, h, w),
            triple(window_size),
            triple(shift_size),
            triple(table_window),
            num_heads,
            head_dim,
            head_dim**-0.5 if scale is None else float(scale),
        )

    @property
    def n(self) -> int:
        return math.prod(self.window)

    @property
    def np(self) -> int:
        return tokens_padded(self.n)

    @property
    def windows_per_batch(self) -> int:
        return windows_per_volume(self.size, self.window)

    @property
    def windows(self) -> int:
        """Windows of all batch elements (B * nW)."""
        return self.batch * self.windows_per_batch

    def config(self, kernel: str, dtype: torch.dtype, dropout: bool = False, bias_grad: bool = False) -> dict:
        return _launch_config(kernel, self.n, self.head_dim, self.heads, dtype, dropout, bias_grad)

    def tables(
        self, qkv: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """rows, classes, the [K, heads, NP, NP] bias + mask tile in log2 units and qkv's dtype (None without bias
        or shift: the kernels then only mask keys past the window); ``bias`` from :meth:`bias`, or None."""
        rows, classes, masks, _ = _window_tables(self.size, self.window, self.shift, qkv.device)
        tile = None
        if bias is not None:
            tile = masks[:, None] + bias[None]
        elif any(self.shift):
            tile = masks[:, None].expand(-1, self.heads, -1, -1)
        if tile is not None:
            tile = (tile * _LOG2E).to(qkv.dtype).contiguous()
        return rows, classes, tile

    def bias(self, bias_table: torch.Tensor) -> torch.Tensor:
        """The relative-position bias [heads, NP, NP] fp32 (zero past the window), the same for every window."""
        pad = self.np - self.n
        return F.pad(window_bias(bias_table, self.window, self.table_window, torch.float32), (0, pad, 0, pad))

    def args(self, cfg: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
        """Runtime scalars (windows per batch element, voxels per batch element, the score scale in log2 units) and
        the constexprs every kernel takes."""
        constexprs = dict(
            HEADS=self.heads,
            HD=self.head_dim,
            N=self.n,
            NP=self.np,
            DPAD=_head_tile(self.head_dim),
            PREC="ieee" if dtype == torch.float32 else "tf32",
            **cfg,
        )
        return (self.windows_per_batch, math.prod(self.size), self.scale * _LOG2E), constexprs


def _pad_row(qkv: torch.Tensor, pad_kv: torch.Tensor | None) -> torch.Tensor:
    """[3C] in qkv's dtype: what a padded voxel reads (q = 0; k, v = pad_kv, or 0 without it)."""
    c = qkv.shape[-1] // 3
    row = qkv.new_zeros(3 * c)
    if pad_kv is not None:
        row[c:] = pad_kv.to(qkv.dtype)
    return row


def _bias_chunks(tiles: int, windows: int, device: torch.device) -> int:
    """Windows each program that sums dS takes (the d(bias) kernel's; the backward's in windows of one tile pair),
    ``tiles`` programs per chunk of windows: enough programs to fill the GPU, as few partial sums as possible."""
    if device.type != "cuda":
        return windows
    target = 4 * multiprocessors(device)
    return triton.cdiv(windows, max(1, min(windows, triton.cdiv(target, tiles))))


def _dropout_args(seed: torch.Tensor | None, dropout_p: float) -> dict:
    """The kernels' dropout arguments: the seed tensor and p (see :func:`rounded_dropout_p`) with HAS_DROPOUT, or
    None (nothing passed: the kernels without dropout compile as if the arguments did not exist)."""
    on = seed is not None and dropout_p > 0.0
    return dict(SEED=seed if on else None, dropout_p=rounded_dropout_p(dropout_p) if on else None, HAS_DROPOUT=on)


def window_attention_triton_forward(
    qkv: torch.Tensor,
    bias_table: torch.Tensor | None,
    pad_kv: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    seed: torch.Tensor | None,
    num_heads: int,
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int],
    table_window: tuple[int, int, int],
    scale: float | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward with the contract (and output dtype) of :func:`window_attention_reference`, arguments as
    validated by the public op: out [B, D, H, W, C] and the log2-unit log-sum-exp [B*nW, heads, NP] fp32 of every
    query, which the backward reads. With ``dropout_p`` > 0, ``seed`` (int64 [1], see :func:`draw_dropout_seed`)
    picks the keep mask (:func:`window_dropout_mask` materialises it)."""
    qkv = qkv.contiguous()
    gate_logits = None if gate_logits is None else gate_logits.contiguous()
    geo = _Geometry.of(qkv, num_heads, window_size, shift_size, table_window, scale)
    b, d, h, w, c3 = qkv.shape
    out_dtype = qkv.dtype if gate_logits is None else torch.promote_types(qkv.dtype, gate_logits.dtype)
    out = qkv.new_empty(b, d, h, w, c3 // 3, dtype=out_dtype)  # the reference's type promotion by the gate
    lse = torch.empty(geo.windows, geo.heads, geo.np, device=qkv.device, dtype=torch.float32)
    bias = None if bias_table is None else geo.bias(bias_table)
    rows, classes, tile = geo.tables(qkv, bias)
    drop = _dropout_args(seed, dropout_p)
    cfg = geo.config("fwd", qkv.dtype, drop["HAS_DROPOUT"])
    scalars, constexprs = geo.args(cfg, qkv.dtype)
    grid = (geo.windows * (geo.heads // cfg["HEADS_PER_PROGRAM"]) * (geo.np // cfg["BM"]),)
    with on_device(qkv):
        _window_attention_fwd[grid](
            qkv,
            _pad_row(qkv, pad_kv),
            rows,
            classes,
            qkv if tile is None else tile,
            qkv if gate_logits is None else gate_logits,
            out,
            lse,
            *scalars,
            **drop,
            HAS_TILE=tile is not None,
            HAS_GATE=gate_logits is not None,
            TILE_PRODUCT=_adds_tile_by_product(qkv.dtype, triton.cdiv(geo.n, cfg["BN"])),
            **constexprs,
        )
    return out, lse


def window_attention_triton_backward(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    bias_table: torch.Tensor | None,
    pad_kv: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    seed: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    window_size: tuple[int, int, int],
    shift_size: tuple[int, int, int],
    table_window: tuple[int, int, int],
    scale: float | None,
    dropout_p: float,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """d(qkv), d(bias_table), d(pad_kv), d(gate_logits) from the forward's inputs (its seed and dropout_p
    included), ``out`` and ``lse``; ``needs`` says which of the four are wanted (the others, and those of absent
    tensors, are None)."""
    qkv, dout, out = qkv.contiguous(), dout.contiguous(), out.contiguous()
    gate_logits = None if gate_logits is None else gate_logits.contiguous()
    geo = _Geometry.of(qkv, num_heads, window_size, shift_size, table_window, scale)
    c = qkv.shape[-1] // 3
    bias = None if bias_table is None else geo.bias(bias_table)
    rows, classes, tile = geo.tables(qkv, bias)
    pad_row = _pad_row(qkv, pad_kv)
    need_dqkv, need_dbias, need_dpad, need_dgate = needs
    has_pad = pad_kv is not None and need_dpad and padded_grid(geo.size, geo.window) != geo.size
    delta = torch.empty(geo.windows, geo.heads, geo.np, device=qkv.device, dtype=torch.float32)
    dgate = None if gate_logits is None else torch.empty_like(gate_logits)  # written with delta, wanted or not
    dqkv = dbias = dpad = None
    drop = _dropout_args(seed, dropout_p)
    cfg = geo.config("bwd", qkv.dtype, drop["HAS_DROPOUT"], bias is not None and need_dbias)
    scalars, constexprs = geo.args(cfg, qkv.dtype)
    grads = need_dqkv or has_pad
    query_tiles = _query_tiles_per_pass(geo, cfg, drop["HAS_DROPOUT"], qkv.dtype) if grads else 0
    on_chip = query_tiles > 0
    dq = key_sums = delta  # placeholders where unused
    if grads:
        dqkv = torch.empty_like(qkv)
        if not on_chip:
            dq = torch.empty(qkv.shape[:-1].numel(), c, device=qkv.device, dtype=torch.float32)
        elif query_tiles < geo.np // cfg["BM"]:  # the key tiles' dk, dv sums between passes
            shape = (geo.windows, geo.heads, 2, geo.np, _head_tile(geo.head_dim))
            key_sums = torch.empty(shape, device=qkv.device, dtype=torch.float32)
        dpad_parts = torch.empty(geo.windows, geo.np // cfg["BN"], 2 * c, device=qkv.device, dtype=torch.float32)
    # windows of one tile pair sum dS in the backward itself, their scores on chip; others in the d(bias) kernel
    bias_sums = bias is not None and need_dbias and on_chip and geo.np == cfg["BM"] == cfg["BN"]
    head_groups = geo.heads // cfg["HEADS_PER_PROGRAM"]
    common = (qkv, pad_row, rows, classes, qkv if tile is None else tile, qkv if gate_logits is None else gate_logits)
    with on_device(qkv):
        # on chip: a launch per pattern of query tiles holding a real token (each its own compiled loop)
        every, groups = _window_launches(geo.size, geo.window, geo.shift, cfg["BM"], qkv.device)
        streamed = (0, (1 << geo.np // cfg["BM"]) - 1, every)  # every tile's delta; padding skipped in the loop
        plan = []  # per launch: WINDOWS, LIVE, window ids, windows per program, programs per head group
        for windows, live, ids in [(1, *group) for group in groups] if on_chip else [streamed]:
            per_program = _bias_chunks(head_groups, geo.batch * len(ids), qkv.device) if bias_sums else 1
            plan.append((windows, live, ids, per_program, triton.cdiv(geo.batch * len(ids), per_program)))
        parts = delta  # the programs' dS sums (bias_sums), or a placeholder
        if bias_sums:
            shape = (sum(p[-1] for p in plan), geo.heads, geo.np, geo.np)
            parts = torch.empty(shape, device=qkv.device, dtype=torch.float32)
        first = 0
        for windows, live, ids, per_program, programs in plan:
            _window_attention_bwd[(programs * head_groups,)](
                *common,
                out,
                dout,
                lse,
                delta,
                dq,
                key_sums,
                dqkv if grads else qkv,
                qkv if dgate is None else dgate,
                dpad_parts if has_pad else delta,
                parts[first:] if bias_sums else delta,
                ids,
                len(ids),
                geo.batch * len(ids),
                per_program,
                *scalars,
                geo.scale,
                **drop,
                HAS_TILE=tile is not None,
                HAS_GATE=gate_logits is not None,
                HAS_PAD=has_pad,
                GRADS=grads,
                WINDOWS=windows,
                LIVE=live,
                QUERY_TILES=query_tiles or geo.np // cfg["BM"],
                BIAS_SUMS=bias_sums,
                FOLD=on_chip and _folds_lse_and_delta(qkv.dtype, geo.np // cfg["BN"]),
                **constexprs,
            )
            first += programs
        if bias is not None and need_dbias and not bias_sums:
            cfg = geo.config("bias", qkv.dtype, drop["HAS_DROPOUT"])
            scalars, constexprs = geo.args(cfg, qkv.dtype)
            tiles = (geo.np // cfg["BM"]) * (geo.np // cfg["BN"]) * (geo.heads // cfg["HEADS_PER_PROGRAM"])
            per_program = _bias_chunks(tiles, geo.windows, qkv.device)
            chunks = triton.cdiv(geo.windows, per_program)
            parts = torch.empty(chunks, geo.heads, geo.np, geo.np, device=qkv.device, dtype=torch.float32)
            _window_attention_bwd_bias[(tiles * chunks,)](
                *common[:4],
                *_region_onehots(geo.size, geo.window, geo.shift, qkv.dtype, qkv.device),
                (bias * _LOG2E).to(qkv.dtype),  # rounded as the tile is where no mask adds to it
                common[5],
                dout,
                lse,
                delta,
                parts,
                scalars[0],
                scalars[1],
                geo.windows,
                per_program,
                scalars[2],
                **drop,
                HAS_GATE=gate_logits is not None,
                HAS_SHIFT=any(geo.shift),
                **constexprs,
            )
        if bias_table is not None and need_dbias:
            dense = parts.sum(0)[:, : geo.n, : geo.n]  # [heads, n, n]: dS summed over every window
            index = _device_index(geo.window, geo.table_window, qkv.device)
            dbias = torch.zeros(bias_table.shape, device=qkv.device, dtype=torch.float32)
            dbias = dbias.index_add_(0, index, dense.reshape(geo.heads, -1).t()).to(bias_table.dtype)
    if pad_kv is not None and need_dpad:
        dpad = dpad_parts.sum((0, 1)).to(pad_kv.dtype) if has_pad else torch.zeros_like(pad_kv)
    return dqkv if need_dqkv else None, dbias, dpad, dgate if need_dgate else None


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """The int64 [1] Philox seed of one call with dropout, drawn from torch's generator of ``device`` (so
    ``torch.manual_seed`` reproduces it; under torch.compile the draw is a graph op, and activation checkpointing,
    which restores the generators before recomputing, draws the same seed again)."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device)


def window_dropout_mask(
    seed: torch.Tensor,
    dropout_p: float,
    batch: int,
    size: tuple[int, int, int],
    window_size: tuple[int, int, int],
    num_heads: int,
) -> torch.Tensor:
    """The keep mask [B*nW, heads, n, n] bool that the Triton kernels draw for a call with ``seed`` and
    ``dropout_p`` on qkv [batch, *size, 3C] (effective ``window_size``), windows and tokens in the reference's order
    (:func:`window_qkv`): pass it as ``dropout_mask``, with ``rounded_dropout_p(dropout_p)`` as ``dropout_p``, to
    :func:`window_attention_reference` to run the same dropout there. Runs a Triton kernel: on a CUDA seed, or a CPU
    one under TRITON_INTERPRET=1."""
    n, np_ = math.prod(window_size), tokens_padded(math.prod(window_size))
    windows = batch * windows_per_volume(size, window_size)
    keep = torch.empty(windows, num_heads, np_, np_, dtype=torch.int8, device=seed.device)
    tile = min(np_, 128)
    with on_device(seed):
        _window_dropout_keep[(windows * num_heads, (np_ // tile) ** 2)](
            seed, keep, rounded_dropout_p(dropout_p), HEADS=num_heads, NP=np_, BM=tile, BN=tile
        )
    return keep[:, :, :n, :n].bool()
