"""Dense multi-head attention with key padding, a per-head modality-pair bias and a head-wise gate (CCT, DESIGN §5.3).

Reference semantics (the Triton kernel must match them):
  q                 [B, Lq, H, Dh]
  k, v              [B, Lk, H, Dh]          Lq != Lk allowed
  key_padding_mask  [B, Lk] bool or None    True = the key is missing (the tokens of a missing modality)
  pair_bias         [H, Mq, Mk] or None     the logit of query i and key j in head h gets
                                            pair_bias[h, q_modality[b, i], k_modality[b, j]]
  q_modality        [B, Lq] long            modality of every query token (needed with pair_bias)
  k_modality        [B, Lk] long            modality of every key token
  gate_logits       [B, Lq, H] or None      head h of query i is scaled by 2*sigmoid(gate_logits[b, i, h])
  scale             float or None           default Dh ** -0.5
  out               [B, Lq, H, Dh]          dtype of q; a query whose keys are all missing outputs zeros and passes
                                            zero gradients (never NaN)

The Triton path is flash-style: the forward keeps only the log-sum-exp per query (no [Lq, Lk] scores in memory);
the backward recomputes the probabilities tile by tile. The pair bias is gathered in-kernel from the tiny per-head
table with one-hot matrix products, and its gradient is reduced the same way, per program, then summed in PyTorch
(deterministic, no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmap_fast.validation import fail

from ._backend import interpreting
from ._indexing import take_rows
from ._utils import jit as _jit
from ._utils import on_device, tl, triton


def gated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    pair_bias: torch.Tensor | None = None,
    q_modality: torch.Tensor | None = None,
    k_modality: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch: SDPA with the gathered pair bias and the key padding folded into one float mask [B, H, Lq, Lk]."""
    mask = None
    if pair_bias is not None:
        if q_modality is None or k_modality is None:
            fail("q_modality, k_modality", "modality ids [B, Lq] and [B, Lk] with pair_bias", "None")
        pair = q_modality[:, :, None] * pair_bias.shape[-1] + k_modality[:, None, :]  # [B, Lq, Lk]
        mask = take_rows(pair_bias.flatten(1).T, pair).permute(0, 3, 1, 2)  # [B, H, Lq, Lk]
    empty = None
    if key_padding_mask is not None:
        empty = key_padding_mask.all(dim=1)  # [B]: batch elements without a single key
        # an all -inf row makes SDPA return NaN: leave those rows unmasked here and zero their output below
        missing = key_padding_mask & ~empty[:, None]
        pad = torch.zeros(missing.shape, dtype=q.dtype, device=q.device).masked_fill(missing, float("-inf"))
        mask = pad[:, None, None, :] if mask is None else mask + pad[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask.to(q.dtype),
        scale=scale,
    ).transpose(1, 2)  # [B, Lq, H, Dh]
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    if gate_logits is not None:
        out = out * (2 * torch.sigmoid(gate_logits))[..., None].to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. Logits are kept in log2 units (exp2 is the fast path): s2 = log2(e) * (scale * q.k + bias).
# Every kernel takes the same leading arguments (see ``_common_args``); q/k/v/out rows have a unit inner stride.
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)


@_jit
def _load_rows(base, rows, row_ok, stride_l, offs_d, DH):
    """[len(rows), BLOCK_D] tile of one (batch, head) slice; rows past the end and head-dim padding read as 0."""
    return tl.load(
        base + rows[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < DH), other=0.0
    )


@_jit
def _gate(GATE, b, h, rows, row_ok, sg_b, sg_l, sg_h):
    """sigmoid(gate logit) of every query row [BLOCK_M] in fp32 (the gate itself is twice this)."""
    logit = tl.load(GATE + b * sg_b + h * sg_h + rows * sg_l, mask=row_ok, other=0.0)
    return tl.sigmoid(logit.to(tl.float32))


@_jit
def _key_add(KPM, b, cols, col_ok, skp_b, HAS_KPM: tl.constexpr):
    """[BLOCK_N] additive key mask: 0 for a present key, -inf for a missing (padding mask != 0) or out-of-range one."""
    ok = col_ok
    if HAS_KPM:
        ok = ok & (tl.load(KPM + b * skp_b + cols, mask=col_ok, other=1) == 0)
    return tl.where(ok, 0.0, float("-inf"))


@_jit
def _ids(IDS, b, s_b, s_l, idx, ok, HAS_BIAS: tl.constexpr):
    """Modality id (int64) of every token in ``idx``; 0 past the end, and everywhere without a pair bias."""
    ids = tl.zeros_like(idx).to(tl.int64)
    if HAS_BIAS:
        ids = tl.load(IDS + b * s_b + idx * s_l, mask=ok, other=0).to(tl.int64)
    return ids


@_jit
def _key_tile(
    K,
    V,
    KPM,
    KM,
    b,
    h,
    cols,
    offs_d,
    LK,
    DH,
    sk_b,
    sk_l,
    sk_h,
    sv_b,
    sv_l,
    sv_h,
    skp_b,
    skm_b,
    skm_l,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One key tile: k, v [BLOCK_N, BLOCK_D], the additive key mask [BLOCK_N] and the key modality ids [BLOCK_N]."""
    col_ok = cols < LK
    k = _load_rows(K + b * sk_b + h * sk_h, cols, col_ok, sk_l, offs_d, DH)
    v = _load_rows(V + b * sv_b + h * sv_h, cols, col_ok, sv_l, offs_d, DH)
    return k, v, _key_add(KPM, b, cols, col_ok, skp_b, HAS_KPM), _ids(KM, b, skm_b, skm_l, cols, col_ok, HAS_BIAS)


@_jit
def _onehot(ids, BLOCK: tl.constexpr):
    """[len(ids), BLOCK] fp32 one-hot rows of modality ids."""
    return (ids[:, None] == tl.arange(0, BLOCK)[None, :]).to(tl.float32)


@_jit
def _bias_table(BIAS, h, sb_h, sb_q, MQ, MK, BLOCK_MQ: tl.constexpr, BLOCK_MK: tl.constexpr):
    """pair_bias[h] in log2 units as a zero-padded [BLOCK_MQ, BLOCK_MK] fp32 tile."""
    mq = tl.arange(0, BLOCK_MQ)
    mk = tl.arange(0, BLOCK_MK)
    table = tl.load(
        BIAS + h * sb_h + mq[:, None] * sb_q + mk[None, :], mask=(mq[:, None] < MQ) & (mk[None, :] < MK), other=0.0
    )
    return table.to(tl.float32) * _LOG2E


@_jit
def _logits(
    q,
    k,
    kadd,
    qk_scale,
    bias_left,
    bias_right,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BIAS_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] logits in log2 units: scale * q k^T + key mask (0 or -inf) + pair bias.

    The bias tile is bias_left @ bias_right^T: a one-hot side times the table rows (or columns) that the program
    gathered once. A tensor-core product instead of a [BLOCK_M, BLOCK_N] tile of gathered pointers, which took
    255 registers and spilled on sm_90; BIAS_PRECISION is 3-pass tf32 (fp32-accurate) for fp32 inputs.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + kadd[None, :]
    if HAS_BIAS:
        s += tl.dot(bias_left, tl.trans(bias_right), input_precision=BIAS_PRECISION)
    return s


@_jit
def _fwd_kernel(
    Q,
    K,
    V,
    KPM,
    BIAS,
    QM,
    KM,
    GATE,
    sq_b,
    sq_l,
    sq_h,
    sk_b,
    sk_l,
    sk_h,
    sv_b,
    sv_l,
    sv_h,
    skp_b,
    sb_h,
    sb_q,
    sqm_b,
    sqm_l,
    skm_b,
    skm_l,
    sg_b,
    sg_l,
    sg_h,
    H,
    LQ,
    LK,
    DH,
    MQ,
    MK,
    qk_scale,
    OUT,
    LSE,
    so_b,
    so_l,
    so_h,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_MQ: tl.constexpr,
    BLOCK_MK: tl.constexpr,
    BIAS_PRECISION: tl.constexpr,
):
    """One (batch*head, query block): online softmax over all key blocks; writes out and the log2-sum-exp."""
    pid_bh = tl.program_id(0)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H  # int64: batch offsets may pass 2**31 elements
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sq_b + h * sq_h, rows, row_ok, sq_l, offs_d, DH)
    bias_q = tl.zeros([BLOCK_M, BLOCK_MK], tl.float32)
    if HAS_BIAS:  # pair_bias[h, qm[i], :] for every query row
        bias_q = tl.dot(
            _onehot(_ids(QM, b, sqm_b, sqm_l, rows, row_ok, HAS_BIAS), BLOCK_MQ),
            _bias_table(BIAS, h, sb_h, sb_q, MQ, MK, BLOCK_MQ, BLOCK_MK),
            input_precision=BIAS_PRECISION,
        )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + offs_n
        k, v, kadd, km = _key_tile(
            K,
            V,
            KPM,
            KM,
            b,
            h,
            cols,
            offs_d,
            LK,
            DH,
            sk_b,
            sk_l,
            sk_h,
            sv_b,
            sv_l,
            sv_h,
            skp_b,
            skm_b,
            skm_l,
            HAS_KPM,
            HAS_BIAS,
        )
        s = _logits(q, k, kadd, qk_scale, bias_q, _onehot(km, BLOCK_MK), HAS_BIAS, PRECISION, BIAS_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep exp2 away from -inf - -inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # every key missing: zero output, and lse = +inf makes the backward's p exactly 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_GATE:
        out = out * (2.0 * _gate(GATE, b, h, rows, row_ok, sg_b, sg_l, sg_h))[:, None]
    tl.store(
        OUT + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < DH),
    )
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + pid_bh * LQ + rows, lse, mask=row_ok)


@_jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    KPM,
    BIAS,
    QM,
    KM,
    GATE,
    sq_b,
    sq_l,
    sq_h,
    sk_b,
    sk_l,
    sk_h,
    sv_b,
    sv_l,
    sv_h,
    skp_b,
    sb_h,
    sb_q,
    sqm_b,
    sqm_l,
    skm_b,
    skm_l,
    sg_b,
    sg_l,
    sg_h,
    H,
    LQ,
    LK,
    DH,
    MQ,
    MK,
    qk_scale,
    OUT,
    DOUT,
    LSE,
    DELTA,
    DQ,
    DGATE,
    so_b,
    so_l,
    so_h,
    sdo_b,
    sdo_l,
    sdo_h,
    sdq_b,
    sdq_l,
    sdq_h,
    sm_scale,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_MQ: tl.constexpr,
    BLOCK_MK: tl.constexpr,
    BIAS_PRECISION: tl.constexpr,
):
    """One (batch*head, query block): delta = rowsum(dout * out) and d(gate) for its rows, then dq over all keys."""
    pid_bh = tl.program_id(0)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H  # int64: batch offsets may pass 2**31 elements
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sq_b + h * sq_h, rows, row_ok, sq_l, offs_d, DH)
    do = _load_rows(DOUT + b * sdo_b + h * sdo_h, rows, row_ok, sdo_l, offs_d, DH).to(tl.float32)
    o = _load_rows(OUT + b * so_b + h * so_h, rows, row_ok, so_l, offs_d, DH).to(tl.float32)
    # with out = g * O (g = 2 sigmoid): the softmax delta rowsum(dO * O) with dO = g * dout equals rowsum(dout * out),
    # and d(logit) = rowsum(dout * O) * 2 sig (1 - sig) = rowsum(dout * out) * (1 - sig): no division by g
    delta = tl.sum(do * o, 1)
    tl.store(DELTA + pid_bh * LQ + rows, delta, mask=row_ok)
    if HAS_GATE:
        sig = _gate(GATE, b, h, rows, row_ok, sg_b, sg_l, sg_h)
        tl.store(
            DGATE + b * sg_b + h * sg_h + rows * sg_l, (delta * (1.0 - sig)).to(DGATE.dtype.element_ty), mask=row_ok
        )
        do = do * (2.0 * sig)[:, None]
    do = do.to(Q.dtype.element_ty)
    lse = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=float("inf"))
    bias_q = tl.zeros([BLOCK_M, BLOCK_MK], tl.float32)
    if HAS_BIAS:  # pair_bias[h, qm[i], :] for every query row
        bias_q = tl.dot(
            _onehot(_ids(QM, b, sqm_b, sqm_l, rows, row_ok, HAS_BIAS), BLOCK_MQ),
            _bias_table(BIAS, h, sb_h, sb_q, MQ, MK, BLOCK_MQ, BLOCK_MK),
            input_precision=BIAS_PRECISION,
        )
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + offs_n
        k, v, kadd, km = _key_tile(
            K,
            V,
            KPM,
            KM,
            b,
            h,
            cols,
            offs_d,
            LK,
            DH,
            sk_b,
            sk_l,
            sk_h,
            sv_b,
            sv_l,
            sv_h,
            skp_b,
            skm_b,
            skm_l,
            HAS_KPM,
            HAS_BIAS,
        )
        s = _logits(q, k, kadd, qk_scale, bias_q, _onehot(km, BLOCK_MK), HAS_BIAS, PRECISION, BIAS_PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < DH),
    )


@_jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    KPM,
    BIAS,
    QM,
    KM,
    GATE,
    sq_b,
    sq_l,
    sq_h,
    sk_b,
    sk_l,
    sk_h,
    sv_b,
    sv_l,
    sv_h,
    skp_b,
    sb_h,
    sb_q,
    sqm_b,
    sqm_l,
    skm_b,
    skm_l,
    sg_b,
    sg_l,
    sg_h,
    H,
    LQ,
    LK,
    DH,
    MQ,
    MK,
    qk_scale,
    DOUT,
    LSE,
    DELTA,
    DK,
    DV,
    DBIAS,
    sdo_b,
    sdo_l,
    sdo_h,
    sdk_b,
    sdk_l,
    sdk_h,
    sm_scale,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_MQ: tl.constexpr,
    BLOCK_MK: tl.constexpr,
    BIAS_PRECISION: tl.constexpr,
):
    """One (batch*head, key block): dk, dv over all query blocks, and this program's share of d(pair_bias).

    dk and dv have the layout of k ([B, Lk, H, Dh], strides sdk_*); DBIAS holds fp32 partial sums
    [B*H, key blocks, MQ, MK].
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H  # int64: batch offsets may pass 2**31 elements
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, kadd, km = _key_tile(
        K,
        V,
        KPM,
        KM,
        b,
        h,
        cols,
        offs_d,
        LK,
        DH,
        sk_b,
        sk_l,
        sk_h,
        sv_b,
        sv_l,
        sv_h,
        skp_b,
        skm_b,
        skm_l,
        HAS_KPM,
        HAS_BIAS,
    )
    onehot_k = _onehot(km, BLOCK_MK)  # [BLOCK_N, BLOCK_MK]
    bias_k = tl.zeros([BLOCK_N, BLOCK_MQ], tl.float32)
    if HAS_BIAS:  # pair_bias[h, :, km[j]] for every key
        bias_k = tl.dot(
            onehot_k,
            tl.trans(_bias_table(BIAS, h, sb_h, sb_q, MQ, MK, BLOCK_MQ, BLOCK_MK)),
            input_precision=BIAS_PRECISION,
        )
    ds_per_q = tl.zeros([BLOCK_N, BLOCK_MQ], tl.float32)  # per key, ds summed over the queries of each modality
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, LQ, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < LQ
        q = _load_rows(Q + b * sq_b + h * sq_h, rows, row_ok, sq_l, offs_d, DH)
        do = _load_rows(DOUT + b * sdo_b + h * sdo_h, rows, row_ok, sdo_l, offs_d, DH)
        if HAS_GATE:
            do = do.to(tl.float32) * (2.0 * _gate(GATE, b, h, rows, row_ok, sg_b, sg_l, sg_h))[:, None]
        do = do.to(Q.dtype.element_ty)
        lse = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * LQ + rows, mask=row_ok, other=0.0)
        onehot_q = _onehot(_ids(QM, b, sqm_b, sqm_l, rows, row_ok, HAS_BIAS), BLOCK_MQ)  # [BLOCK_M, BLOCK_MQ]
        p = tl.exp2(_logits(q, k, kadd, qk_scale, onehot_q, bias_k, HAS_BIAS, PRECISION, BIAS_PRECISION) - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # gradient of the natural-unit logits
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if BIAS_GRAD:  # d(pair_bias)[mq, mk] = onehot(qm)^T @ ds @ onehot(km): no scattered atomics; the keys'
            # one-hot is the program's own, so it is applied once after the loop, and the loop's product has the
            # key block on a wgmma's rows (onehot(qm)^T first would put the 16 modalities there: mma.sync)
            ds_per_q = tl.dot(tl.trans(ds), onehot_q, ds_per_q, input_precision=BIAS_PRECISION)
    dk_base = b * sdk_b + h * sdk_h + cols[:, None] * sdk_l + offs_d[None, :]
    tile_ok = col_ok[:, None] & (offs_d[None, :] < DH)
    tl.store(DK + dk_base, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + dk_base, dv.to(DV.dtype.element_ty), mask=tile_ok)
    if BIAS_GRAD:  # once per program, exact fp32 on the FMA units
        dbias = tl.dot(tl.trans(ds_per_q), onehot_k, input_precision="ieee")  # [BLOCK_MQ, BLOCK_MK]
        mq = tl.arange(0, BLOCK_MQ)
        mk = tl.arange(0, BLOCK_MK)
        part = DBIAS + (pid_bh * tl.num_programs(1) + pid_n) * MQ * MK
        tl.store(part + mq[:, None] * MK + mk[None, :], dbias, mask=(mq[:, None] < MQ) & (mk[None, :] < MK))


# ----------------------------------------------------------------------------------------------------------------
# Launchers and the autograd.Function
# ----------------------------------------------------------------------------------------------------------------

BLOCK_M = 64  # query rows per tile; also large enough under the interpreter for the short CCT sequences
BLOCK_N = 64  # key rows per tile
MAX_HEAD_DIM = 128


def _unit_inner(x: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride and assume a contiguous head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _config(q: torch.Tensor, pair_bias: torch.Tensor | None) -> dict:
    """Tile sizes (powers of two, >= 16 for tl.dot) and launch options shared by the three kernels.

    fp16/bf16 operands go to tl.dot as they are (fp32 accumulation); fp32 ones use 3-pass tf32 (about fp32 accuracy)
    unless torch's float32 matmul precision allows plain tf32.
    """
    dh = q.shape[-1]
    mq, mk = (1, 1) if pair_bias is None else pair_bias.shape[1:]
    fp32_precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dict(
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(dh)),
        BLOCK_MQ=max(16, triton.next_power_of_2(mq)),
        BLOCK_MK=max(16, triton.next_power_of_2(mk)),
        PRECISION=fp32_precision if q.dtype == torch.float32 else "tf32",
        # one-hot products with the bias table and with ds: tf32 rounding (2**-11) is below fp16/bf16 logit error
        BIAS_PRECISION=fp32_precision if q.dtype == torch.float32 else "tf32",
        num_warps=4 if dh <= 32 else 8,
        num_stages=2,  # 8 warps keep Dh = 64 free of register spills (sm_90)
    )


def _strides(x: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if x is None else tuple(x.stride()[:n])


# The op's tensors as the kernels read them: q, k, v, then key padding (uint8), pair bias, query and key modality
# ids and gate logits, each None when absent.
KernelArgs = tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
]


def _common_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    pair_bias: torch.Tensor | None,
    q_modality: torch.Tensor | None,
    k_modality: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float,
) -> list[object]:
    """The leading arguments of every kernel (tensors, their strides, sizes and the log2-unit scale)."""
    _, lq, h, dh = q.shape
    return [
        q,
        k,
        v,
        key_padding,
        pair_bias,
        q_modality,
        k_modality,
        gate_logits,
        *_strides(q, 3),
        *_strides(k, 3),
        *_strides(v, 3),
        *_strides(key_padding, 1),
        *_strides(pair_bias, 2),
        *_strides(q_modality, 2),
        *_strides(k_modality, 2),
        *_strides(gate_logits, 3),
        h,
        lq,
        k.shape[1],
        dh,
        *((1, 1) if pair_bias is None else pair_bias.shape[1:]),
        scale * 1.4426950408889634,
    ]


def _kernel_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    pair_bias: torch.Tensor | None,
    q_modality: torch.Tensor | None,
    k_modality: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
) -> KernelArgs:
    """The op's arguments as the kernels read them, without conversion launches (the op is host-bound at CCT sizes):
    the bool mask as bytes, the modality ids in whatever integer type they come, unit inner strides."""
    key_padding = None if key_padding_mask is None else _unit_inner(key_padding_mask).view(torch.uint8)
    if pair_bias is None:
        q_modality = k_modality = None
    else:
        pair_bias = pair_bias.contiguous()
    gate_logits = None if gate_logits is None else gate_logits.contiguous()  # d(gate) is written with its strides
    return _unit_inner(q), _unit_inner(k), _unit_inner(v), key_padding, pair_bias, q_modality, k_modality, gate_logits


def _interpreted_bf16(q: torch.Tensor) -> bool:
    """The interpreter computes bf16 wrongly: there the kernels run on fp32 copies, cast back at the end."""
    return interpreting() and q.dtype == torch.bfloat16


def gated_attention_triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    pair_bias: torch.Tensor | None,
    q_modality: torch.Tensor | None,
    k_modality: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-style forward with the reference's arguments (validated by the public op; Dh <= 128, not float64):
    out [B, Lq, H, Dh] in q's dtype and the log2-unit log-sum-exp [B*H, Lq] fp32 that the backward reads."""
    if _interpreted_bf16(q):
        out, lse = gated_attention_triton_forward(
            q.float(), k.float(), v.float(), key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, scale
        )
        return out.to(q.dtype), lse
    args = _kernel_args(q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits)
    q, pair_bias = args[0], args[4]
    b, lq, h, _ = q.shape
    cfg = _config(q, pair_bias)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
    with on_device(q):
        _fwd_kernel[(b * h, triton.cdiv(lq, cfg["BLOCK_M"]))](
            *_common_args(*args, _scale(q, scale)),
            out,
            lse,
            *_strides(out, 3),
            HAS_KPM=args[3] is not None,
            HAS_BIAS=pair_bias is not None,
            HAS_GATE=args[7] is not None,
            **cfg,
        )
    return out, lse


def gated_attention_triton_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    pair_bias: torch.Tensor | None,
    q_modality: torch.Tensor | None,
    k_modality: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float | None,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dq, dk, dv, d(pair_bias) (None unless ``bias_grad``) and d(gate_logits) (None without a gate) from the
    forward's ``out`` and ``lse``: the probabilities are recomputed tile by tile."""
    if _interpreted_bf16(q):
        dq, dk, dv, dbias, dgate = gated_attention_triton_backward(
            dout.float(),
            q.float(),
            k.float(),
            v.float(),
            key_padding_mask,
            pair_bias,
            q_modality,
            k_modality,
            gate_logits,
            out.float(),
            lse,
            scale,
            bias_grad,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _like(dbias, pair_bias), _like(dgate, gate_logits)
    args = _kernel_args(q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits)
    q, k, pair_bias, gate_logits = args[0], args[1], args[4], args[7]
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    cfg = _config(q, pair_bias)
    dout, out = _unit_inner(dout), _unit_inner(out)
    scale = _scale(q, scale)
    common = _common_args(*args, scale)
    flags = dict(HAS_KPM=args[3] is not None, HAS_BIAS=pair_bias is not None, HAS_GATE=gate_logits is not None)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    delta = torch.empty_like(lse)
    dgate = None if gate_logits is None else torch.empty_like(gate_logits)
    bias_grad = bias_grad and pair_bias is not None
    mq, mk = (1, 1) if pair_bias is None else pair_bias.shape[1:]
    n_blocks = triton.cdiv(lk, cfg["BLOCK_N"])
    dbias = torch.empty(b * h, n_blocks, mq, mk, dtype=torch.float32, device=q.device) if bias_grad else None
    with on_device(q):
        _bwd_dq_kernel[(b * h, triton.cdiv(lq, cfg["BLOCK_M"]))](
            *common,
            out,
            dout,
            lse,
            delta,
            dq,
            dgate,
            *_strides(out, 3),
            *_strides(dout, 3),
            *_strides(dq, 3),
            scale,
            **flags,
            **cfg,
        )
        _bwd_dkdv_kernel[(b * h, n_blocks)](
            *common,
            dout,
            lse,
            delta,
            dk,
            dv,
            dbias,
            *_strides(dout, 3),
            *_strides(dk, 3),
            scale,
            **flags,
            BIAS_GRAD=bias_grad,
            **cfg,
        )
    if dbias is not None and pair_bias is not None:  # (bias_grad) deterministic reduction of the partial sums
        dbias = dbias.view(b, h, n_blocks, mq, mk).sum(dim=(0, 2)).to(pair_bias.dtype)
    return dq, dk, dv, dbias, dgate


def _like(grad: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    """``grad`` in x's dtype; None when there is no gradient (or no tensor)."""
    return None if grad is None or x is None else grad.to(x.dtype)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)
