"""3D patch embedding (Conv3d with kernel == stride) with per-modality weights, channels-last output.

Reference semantics (the Triton kernel must match them):
  x        [V, Cin, D, H, W]         volumes; sides that are not multiples of the patch are zero-padded at the end
                                      (as MONAI's ``PatchEmbed``)
  weight   [M, C, Cin, pd, ph, pw]   one Conv3d weight per modality
  bias     [M, C] or None
  modality_ids [V] long in [0, M)    which weight each volume uses
  ln_weight, ln_bias [C] or None     with ``layer_norm=True``: LayerNorm over C (affine when given) fused at the end
  out      [V, D', H', W', C]        channels-last, D' = ceil(D / pd) ...; dtype ``out_dtype`` (default x.dtype)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medmap_fast.validation import fail

from ._backend import interpreting
from ._indexing import take_rows
from ._utils import jit as _jit
from ._utils import multiprocessors, on_device, padded_size, tl, triton


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """[V, Cin, D, H, W] -> zero-padded patches [V, D', H', W', Cin*pd*ph*pw] (Conv3d weight order)."""
    v, cin, d, h, w = x.shape
    pd, ph, pw = patch
    x = F.pad(x, (0, padded_size(w, pw) - w, 0, padded_size(h, ph) - h, 0, padded_size(d, pd) - d))
    dn, hn, wn = x.shape[2] // pd, x.shape[3] // ph, x.shape[4] // pw
    x = x.reshape(v, cin, dn, pd, hn, ph, wn, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(v, dn, hn, wn, cin * pd * ph * pw)


def patch_embed_3d_reference(
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
    """Plain-PyTorch patch embedding: patchify + (batched) matmul with the volume's modality weight."""
    m, c = weight.shape[:2]
    patches = patchify(x, weight.shape[3:])  # [V, D', H', W', K]
    v, dn, hn, wn, k = patches.shape
    w2d = weight.reshape(m, c, k)
    if m == 1:
        out = F.linear(patches, w2d[0], None if bias is None else bias[0])
    else:
        if modality_ids is None:
            fail("modality_ids", f"a [V] integer tensor choosing among {m} modality weights", "None")
        out = torch.bmm(patches.reshape(v, dn * hn * wn, k), take_rows(w2d, modality_ids).transpose(1, 2))
        if bias is not None:
            out = out + take_rows(bias, modality_ids)[:, None, :]
        out = out.reshape(v, dn, hn, wn, c)
    if layer_norm:  # in fp32 at least, as the kernel (and autocast's layer_norm) does it, also for bf16 inputs
        dtype = torch.promote_types(out.dtype, torch.float32)
        ln_w, ln_b = (None if t is None else t.to(dtype) for t in (ln_weight, ln_bias))
        out = F.layer_norm(out.to(dtype), (c,), ln_w, ln_b, eps)
    return out.to(out_dtype or x.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels (DESIGN §5.1).
#
# Forward, one pass: each program takes BLOCK_P output positions of one volume, gathers their patches straight from
# x (pointer arithmetic; masked loads are MONAI's end padding, no F.pad copy), multiplies by W[modality_ids[v]],
# adds the bias, optionally applies LayerNorm over C, casts and stores the channels-last rows once.
# Backward: the pre-norm activations are recomputed from x instead of being stored (x is 1/6 of the output at the
# paper shape), dx is stored directly (every voxel belongs to exactly one patch, so no atomics), and dW, db and the
# LayerNorm grads are summed per (volume, split) in registers, then reduced per modality in PyTorch: two stages, no
# atomics, deterministic.
# ------------------------------------------------------------------------------------------------------------------


@_jit
def _tile_positions(tile, NP, HN, WN, BLOCK_P: tl.constexpr):
    """Output positions of one tile of a volume: flat index [BLOCK_P], its mask and its (d', h', w')."""
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    return offs_p, offs_p < NP, offs_p // (HN * WN), (offs_p // WN) % HN, offs_p % WN


@_jit
def _patch_offsets(
    dn,
    hn,
    wn,
    p_mask,
    offs_k,
    K: tl.constexpr,
    D,
    H,
    W,
    s_c,
    s_d,
    s_h,
    s_w,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
):
    """Element offsets [BLOCK_P, BLOCK_K] of patch entry k (Conv3d weight order cin, di, hi, wi) of each position in
    a volume with strides s_*, and the mask of the entries inside the volume (the others are the zero padding)."""
    c = offs_k // (PD * PH * PW)
    di = (offs_k // (PH * PW)) % PD
    hi = (offs_k // PW) % PH
    wi = offs_k % PW
    d = dn[:, None] * PD + di[None, :]
    h = hn[:, None] * PH + hi[None, :]
    w = wn[:, None] * PW + wi[None, :]
    mask = p_mask[:, None] & (offs_k < K)[None, :] & (d < D) & (h < H) & (w < W)
    return c[None, :] * s_c + d * s_d + h * s_h + w * s_w, mask


@_jit
def _weight_tile(w_mod, offs_k, offs_c, K: tl.constexpr, c_mask):
    """W[m] as a [BLOCK_K, BLOCK_C] fp32 tile (the weight is stored [M, C, K])."""
    mask = (offs_k < K)[:, None] & c_mask[None, :]
    return tl.load(w_mod + offs_c[None, :] * K + offs_k[:, None], mask=mask, other=0.0).to(tl.float32)


@_jit
def _linear_tile(
    x_vol,
    w_mod,
    b_mod,
    dn,
    hn,
    wn,
    p_mask,
    offs_c,
    c_mask,
    K: tl.constexpr,
    D,
    H,
    W,
    s_c,
    s_d,
    s_h,
    s_w,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """patches @ W[m]^T + b[m] for one tile: [BLOCK_P, BLOCK_C] fp32, zero in the columns >= C."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        off, mask = _patch_offsets(dn, hn, wn, p_mask, offs_k, K, D, H, W, s_c, s_d, s_h, s_w, PD, PH, PW)
        patches = tl.load(x_vol + off, mask=mask, other=0.0).to(tl.float32)
        # K < 16 (the paper's 1x2x2x2 = 8) is zero-padded to BLOCK_K >= 16 by the masks: tl.dot needs dims >= 16
        acc = tl.dot(patches, _weight_tile(w_mod, offs_k, offs_c, K, c_mask), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_mod + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@_jit
def _layer_norm_rows(acc, c_mask, C: tl.constexpr, eps):
    """Affine-free LayerNorm of every row over its first C columns: (x_hat [BLOCK_P, BLOCK_C], rstd [BLOCK_P])."""
    mean = tl.sum(acc, axis=1) / C  # the columns >= C hold zeros
    diff = tl.where(c_mask[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    return diff * rstd[:, None], rstd


# K = Cin * pd * ph * pw and C are constexpr: they are fixed per model, and the loops over K then have static bounds
@_jit
def _patch_embed_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    lnw_ptr,
    lnb_ptr,
    y_ptr,
    K: tl.constexpr,
    C: tl.constexpr,
    D,
    H,
    W,
    DN,
    HN,
    WN,
    sx_v,
    sx_c,
    sx_d,
    sx_h,
    sx_w,
    eps,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    HAS_LNW: tl.constexpr,
    HAS_LNB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(NP, BLOCK_P), V): one tile of output positions of volume v -> y[v, tile, :C]."""
    v = tl.program_id(1).to(tl.int64)
    m = tl.load(ids_ptr + v)
    NP = DN * HN * WN
    offs_p, p_mask, dn, hn, wn = _tile_positions(tl.program_id(0), NP, HN, WN, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    out = _linear_tile(
        x_ptr + v * sx_v,
        w_ptr + m * C * K,
        b_ptr + m * C,
        dn,
        hn,
        wn,
        p_mask,
        offs_c,
        c_mask,
        K,
        D,
        H,
        W,
        sx_c,
        sx_d,
        sx_h,
        sx_w,
        PD,
        PH,
        PW,
        HAS_BIAS,
        BLOCK_P,
        BLOCK_K,
        BLOCK_C,
        DOT_PRECISION,
    )
    if LAYER_NORM:
        out, _ = _layer_norm_rows(out, c_mask, C, eps)
        if HAS_LNW:
            out *= tl.load(lnw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_LNB:
            out += tl.load(lnb_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    rows = v * NP + offs_p
    tl.store(
        y_ptr + rows[:, None] * C + offs_c[None, :],
        out.to(y_ptr.dtype.element_ty),
        mask=p_mask[:, None] & c_mask[None, :],
    )


@_jit
def _patch_embed_bwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    lnw_ptr,
    dy_ptr,
    dx_ptr,
    part_ptr,
    K: tl.constexpr,
    C: tl.constexpr,
    D,
    H,
    W,
    DN,
    HN,
    WN,
    sx_v,
    sx_c,
    sx_d,
    sx_h,
    sx_w,
    sdx_v,
    sdx_c,
    sdx_d,
    sdx_h,
    sdx_w,
    eps,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    HAS_LNW: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (S, V, cdiv(K, BLOCK_K)): program (s, v, kb) walks tiles s, s + S, ... of volume v; it writes dx for the
    patch entries of chunk kb and its partial sums into row (v, s) of part: dW[chunk kb] and (from kb = 0) db,
    dln_w, dln_b."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    v = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    m = tl.load(ids_ptr + v)
    NP = DN * HN * WN
    x_vol = x_ptr + v * sx_v
    w_mod = w_ptr + m * C * K
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    w_chunk = _weight_tile(w_mod, offs_k, offs_c, K, c_mask)
    if HAS_LNW:
        ln_w = tl.load(lnw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    dw_t = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)  # dW^T: the channels on a wgmma's rows (K may be 8)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dln_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dln_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(split, tl.cdiv(NP, BLOCK_P), splits):
        offs_p, p_mask, dn, hn, wn = _tile_positions(tile, NP, HN, WN, BLOCK_P)
        pc_mask = p_mask[:, None] & c_mask[None, :]
        rows = v * NP + offs_p
        g = tl.load(dy_ptr + rows[:, None] * C + offs_c[None, :], mask=pc_mask, other=0.0).to(tl.float32)
        if LAYER_NORM:  # back through y = x_hat * ln_w + ln_b, x_hat = (a - mean) * rstd, a recomputed from x
            a = _linear_tile(
                x_vol,
                w_mod,
                b_ptr + m * C,
                dn,
                hn,
                wn,
                p_mask,
                offs_c,
                c_mask,
                K,
                D,
                H,
                W,
                sx_c,
                sx_d,
                sx_h,
                sx_w,
                PD,
                PH,
                PW,
                HAS_BIAS,
                BLOCK_P,
                BLOCK_K,
                BLOCK_C,
                DOT_PRECISION,
            )
            x_hat, rstd = _layer_norm_rows(a, c_mask, C, eps)
            dln_w += tl.sum(g * x_hat, axis=0)
            dln_b += tl.sum(g, axis=0)
            if HAS_LNW:
                g = g * ln_w[None, :]
            mean_g = tl.sum(g, axis=1) / C
            mean_gx = tl.sum(g * x_hat, axis=1) / C
            g = tl.where(pc_mask, (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd[:, None], 0.0)
        off, mask = _patch_offsets(dn, hn, wn, p_mask, offs_k, K, D, H, W, sx_c, sx_d, sx_h, sx_w, PD, PH, PW)
        if NEED_DW:
            db += tl.sum(g, axis=0)
            patches = tl.load(x_vol + off, mask=mask, other=0.0).to(tl.float32)
            dw_t = tl.dot(tl.trans(g), patches, dw_t, input_precision=DOT_PRECISION)
        if NEED_DX:
            dx_off, _ = _patch_offsets(dn, hn, wn, p_mask, offs_k, K, D, H, W, sdx_c, sdx_d, sdx_h, sdx_w, PD, PH, PW)
            dpatches = tl.dot(g, tl.trans(w_chunk), input_precision=DOT_PRECISION)
            tl.store(dx_ptr + v * sdx_v + dx_off, dpatches.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        # row (v, split) of the partial sums: dW [K, C], db [C], then with LayerNorm dln_w [C], dln_b [C]
        part = part_ptr + (v * splits + split) * (K * C + (3 if LAYER_NORM else 1) * C)
        k_mask = offs_k < K
        tl.store(part + offs_k[None, :] * C + offs_c[:, None], dw_t, mask=k_mask[None, :] & c_mask[:, None])
        first = c_mask & (kb == 0)
        tl.store(part + K * C + offs_c, db, mask=first)
        if LAYER_NORM:
            tl.store(part + (K + 1) * C + offs_c, dln_w, mask=first)
            tl.store(part + (K + 2) * C + offs_c, dln_b, mask=first)


@dataclass(frozen=True)
class _LaunchConfig:
    """Block sizes (constexpr) and grid shape of one call."""

    block_p: int  # forward tile of output positions
    block_p_bwd: int  # backward tile: it keeps about three [BLOCK_P, BLOCK_C] fp32 tiles live, the forward one
    block_k: int  # chunk of the patch entries K = Cin * pd * ph * pw (>= 16 for tl.dot)
    block_c: int  # all C channels in one tile, so the fused LayerNorm sees whole rows
    num_warps: int
    num_warps_bwd: int
    splits: int  # backward programs per (volume, K chunk); each loops over tiles, summing dW in registers


def _launch_config(num_pos: int, k: int, c: int, volumes: int, device: torch.device) -> _LaunchConfig:
    block_c = max(16, triton.next_power_of_2(c))
    k_pow2 = max(16, triton.next_power_of_2(k))
    if interpreting():  # each block op costs milliseconds on CPU whatever its size: few, large blocks
        block_p = min(max(16, triton.next_power_of_2(num_pos)), max(16, 2**16 // block_c))
        return _LaunchConfig(block_p, block_p, min(k_pow2, 1024), block_c, 4, 4, 1)
    # GPU: an 8K-element fp32 accumulator per program (64 registers a thread at 4 warps) and a weight chunk of at
    # most 16K fp32 in shared memory; C = 48 -> 128 positions x 64 channels, C = 768 -> 16 x 1024 at 8 warps.
    block_p = max(16, min(256, 8192 // block_c))
    block_p_bwd = max(16, min(128, 4096 // block_c))
    block_k = max(16, min(k_pow2, 64, 16384 // block_c))
    tiles = triton.cdiv(num_pos, block_p_bwd)
    programs = 4 * multiprocessors(device)  # enough resident programs to cover the memory latency
    splits = min(tiles, max(1, triton.cdiv(programs, max(1, volumes) * triton.cdiv(k, block_k))))
    num_warps = 4 if block_c <= 256 else 8
    return _LaunchConfig(block_p, block_p_bwd, block_k, block_c, num_warps, num_warps, splits)


def _dot_precision(*tensors: torch.Tensor) -> str:
    """``tl.dot`` precision for fp32 operands: values that were fp16/bf16 fit tf32 exactly, so half inputs lose
    nothing in tf32; fp32 inputs follow torch's float32 matmul precision ("highest", the default, keeps IEEE)."""
    if all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _geometry(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """Runtime sizes and constexpr patch shape shared by the forward and backward launches."""
    pd, ph, pw = weight.shape[3:]
    d, h, w = x.shape[2:]
    return dict(
        K=weight.shape[2] * pd * ph * pw,
        C=weight.shape[1],
        D=d,
        H=h,
        W=w,
        DN=padded_size(d, pd) // pd,
        HN=padded_size(h, ph) // ph,
        WN=padded_size(w, pw) // pw,
        PD=pd,
        PH=ph,
        PW=pw,
    )


def patch_embed_3d_triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    modality_ids: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    layer_norm: bool,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The Triton forward: arguments as :func:`patch_embed_3d_reference` (validated by the public op, not float64)
    with ``modality_ids`` a [V] integer tensor, ``ln_weight``/``ln_bias`` None unless ``layer_norm`` and
    ``out_dtype`` resolved."""
    weight = weight.contiguous()
    geo = _geometry(x, weight)
    v, num_pos = x.shape[0], geo["DN"] * geo["HN"] * geo["WN"]
    y = torch.empty(v, geo["DN"], geo["HN"], geo["WN"], geo["C"], dtype=out_dtype, device=x.device)
    cfg = _launch_config(num_pos, geo["K"], geo["C"], v, x.device)
    if y.numel():
        with on_device(x):
            _patch_embed_fwd_kernel[(triton.cdiv(num_pos, cfg.block_p), v)](
                x,
                weight,
                _or(bias, weight),
                modality_ids,
                _or(ln_weight, weight),
                _or(ln_bias, weight),
                y,
                eps=eps,
                **_strides(x, "sx"),
                **geo,
                HAS_BIAS=bias is not None,
                LAYER_NORM=layer_norm,
                HAS_LNW=ln_weight is not None,
                HAS_LNB=ln_bias is not None,
                BLOCK_P=cfg.block_p,
                BLOCK_K=cfg.block_k,
                BLOCK_C=cfg.block_c,
                DOT_PRECISION=_dot_precision(x, weight),
                num_warps=cfg.num_warps,
            )
    return y


def patch_embed_3d_triton_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    layer_norm: bool,
    eps: float,
    need_dx: bool,
    need_params: bool,
) -> tuple[torch.Tensor | None, ...]:
    """dx (None unless ``need_dx``), then dW, db, d(ln_weight), d(ln_bias) (None unless ``need_params`` and the
    tensor exists), from the forward's arguments: the pre-norm activations are recomputed from x."""
    weight = weight.contiguous()
    geo = _geometry(x, weight)
    v, m, k, c = x.shape[0], weight.shape[0], geo["K"], geo["C"]
    num_pos = geo["DN"] * geo["HN"] * geo["WN"]
    cfg = _launch_config(num_pos, k, c, v, x.device)
    launch = v * num_pos > 0 and (need_dx or need_params)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    # Partial sums per (volume, split), one row each: dW [K*C], db [C] (+ dln_w, dln_b [C] with LayerNorm).
    # Every program stores its own slice, so they need no zeroing when launched.
    width = (k + (3 if layer_norm else 1)) * c
    part = (torch.empty if launch else torch.zeros)(v, cfg.splits, width, dtype=torch.float32, device=x.device)
    if launch:
        with on_device(x):
            _patch_embed_bwd_kernel[(cfg.splits, v, triton.cdiv(k, cfg.block_k))](
                x,
                weight,
                _or(bias, weight),
                ids,
                _or(ln_weight, weight),
                dy.contiguous(),
                _or(dx, x),
                part,
                eps=eps,
                **_strides(x, "sx"),
                **_strides(_or(dx, x), "sdx"),
                **geo,
                HAS_BIAS=bias is not None,
                LAYER_NORM=layer_norm,
                HAS_LNW=ln_weight is not None,
                NEED_DX=need_dx,
                NEED_DW=need_params,
                BLOCK_P=cfg.block_p_bwd,
                BLOCK_K=cfg.block_k,
                BLOCK_C=cfg.block_c,
                DOT_PRECISION=_dot_precision(x, weight),
                num_warps=cfg.num_warps_bwd,
            )
    dw = db = dln_w = dln_b = None
    if need_params:
        # Sum per modality as a one-hot matmul in fp64: deterministic (index_add_ uses atomics on CUDA) and
        # free of host syncs
        one_hot = (torch.arange(m, device=ids.device)[:, None] == ids[None, :]).double()  # [M, V]
        sums = one_hot @ part.sum(1).double()  # [M, width]
        dw = sums[:, : k * c].reshape(m, k, c).transpose(1, 2).reshape(weight.shape).to(weight.dtype)
        if bias is not None:
            db = sums[:, k * c : (k + 1) * c].to(bias.dtype)
        if ln_weight is not None:
            dln_w = sums[:, (k + 1) * c : (k + 2) * c].sum(0).to(ln_weight.dtype)
        if ln_bias is not None:
            dln_b = sums[:, (k + 2) * c :].sum(0).to(ln_bias.dtype)
    return dx, dw, db, dln_w, dln_b


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """``t``, or a stand-in pointer for an optional argument the kernel does not read (its constexpr flag is off)."""
    return dummy if t is None else t


def _strides(t: torch.Tensor, prefix: str) -> dict[str, int]:
    """The strides of a [V, Cin, D, H, W] tensor as the kernels' keyword arguments ``{prefix}_v`` ... ``{prefix}_w``."""
    return {f"{prefix}_{axis}": stride for axis, stride in zip("vcdhw", t.stride(), strict=True)}
