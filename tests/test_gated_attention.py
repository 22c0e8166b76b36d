"""gated_attention: the reference against a brute-force softmax, the Triton kernel against the reference (output and
every gradient), the public op's validation and dispatch.

The fp32 tests run on CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), or on the GPU
where there is one. The GPU tests add bf16/fp16 under the flash-attention rule: the kernel's error against an fp64
reference is at most twice the error of the reference evaluated in the same dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import medmap_fast as mf
from medmap_fast.kernels import gated_attention, gated_attention_reference, ops
from medmap_fast.kernels._utils import flash_errors

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("q", "k", "v", "pair_bias", "gate_logits")


@dataclass(frozen=True)
class Case:
    """B batch elements, Lq queries and Lk keys in H heads of Dh; Mq x Mk modality pairs (0: no pair bias)."""

    b: int
    lq: int
    lk: int
    h: int
    dh: int
    mq: int = 0
    mk: int = 0
    padding: bool = False  # random missing keys
    empty_row: bool = False  # the last batch element has no key at all
    gate: bool = False

    def __str__(self) -> str:
        extras = ("pad" * self.padding, "empty" * self.empty_row, "gate" * self.gate)
        return "-".join([f"B{self.b}-{self.lq}x{self.lk}-H{self.h}-d{self.dh}-M{self.mq}x{self.mk}",
                         *filter(None, extras)])


def make_inputs(case: Case, dtype=torch.float32, device=DEVICE, seed=0) -> dict:
    """Keyword arguments of the op: random leaves (requiring grad) and index tensors; None where the case has none.

    pair_bias is at least fp32 (a parameter under autocast); the gate logits follow ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()

    kwargs = dict(q=leaf(case.b, case.lq, case.h, case.dh), k=leaf(case.b, case.lk, case.h, case.dh),
                  v=leaf(case.b, case.lk, case.h, case.dh), key_padding_mask=None, pair_bias=None,
                  q_modality=None, k_modality=None, gate_logits=None)
    if case.padding or case.empty_row:
        mask = torch.rand(case.b, case.lk, generator=g) < (0.3 if case.padding else 0.0)
        mask[-1] |= case.empty_row
        kwargs["key_padding_mask"] = mask.to(device)
    if case.mq:
        kwargs["pair_bias"] = leaf(case.h, case.mq, case.mk, dt=torch.promote_types(dtype, torch.float32), scale=2.0)
        kwargs["q_modality"] = torch.randint(0, case.mq, (case.b, case.lq), generator=g).to(device)
        kwargs["k_modality"] = torch.randint(0, case.mk, (case.b, case.lk), generator=g).to(device)
    if case.gate:
        kwargs["gate_logits"] = leaf(case.b, case.lq, case.h, scale=2.0)
    return kwargs


def leaves(kwargs: dict) -> list[torch.Tensor]:
    """The differentiable inputs present, in GRAD_NAMES order."""
    return [kwargs[n] for n in GRAD_NAMES if kwargs[n] is not None]


def run(fn, kwargs: dict, seed: int = 1) -> list[torch.Tensor]:
    """[out, *gradients of every leaf] for a fixed random upstream gradient."""
    out = fn(**kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return [out, *torch.autograd.grad(out, [t for t in leaves(kwargs) if t.requires_grad], dout)]


def names(kwargs: dict) -> list[str]:
    return ["out", *(n for n in GRAD_NAMES if kwargs[n] is not None and kwargs[n].requires_grad)]


def brute_force(q, k, v, key_padding_mask=None, pair_bias=None, q_modality=None, k_modality=None, gate_logits=None,
                scale=None):
    """The textbook formula, one explicit softmax; rows without any key give zeros."""
    b, lq, h, dh = q.shape
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * (dh ** -0.5 if scale is None else scale)
    if pair_bias is not None:
        logits = logits + torch.stack([
            torch.stack([pair_bias[hh][q_modality[bb]][:, k_modality[bb]] for hh in range(h)]) for bb in range(b)])
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    if key_padding_mask is not None:
        weights = weights * (~key_padding_mask)[:, None, None, :]
    total = weights.sum(-1, keepdim=True)
    probs = torch.where(total > 0, weights / total.clamp_min(1e-300), 0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    if gate_logits is not None:
        out = out * 2 * torch.sigmoid(gate_logits)[..., None]
    return out


def assert_all_close(got: list, want: list, labels: list, atol: float, rtol: float) -> None:
    for label, a, e in zip(labels, got, want):
        assert torch.isfinite(a).all(), f"{label}: non-finite values"
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, label=label: f"{label}: {m}")


# ------------------------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    Case(3, 7, 11, 2, 8, mq=3, mk=4, padding=True, empty_row=True, gate=True),
    Case(2, 9, 5, 3, 4),
], ids=str)
def test_reference_matches_brute_force(case):
    kwargs = make_inputs(case, dtype=torch.float64, device="cpu")
    assert_all_close(run(gated_attention_reference, kwargs), run(brute_force, kwargs), names(kwargs), 1e-10, 1e-10)


# ------------------------------------------------------------------------------------------------------------------
# the Triton kernel under the interpreter (fp32), through the public op
# ------------------------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    Case(2, 33, 33, 2, 16),  # plain self-attention, odd length
    Case(2, 37, 70, 2, 32, mq=3, mk=4, padding=True, empty_row=True, gate=True),  # everything; 2 key tiles
    Case(1, 80, 9, 3, 64, mq=2, mk=5),  # Lq > Lk, 2 query tiles, bias only
    Case(3, 5, 130, 1, 24, padding=True, gate=True),  # head dim not a power of two, 3 key tiles
    Case(2, 20, 26, 2, 32, mq=12, mk=13, padding=True),  # twelve modalities (and a text one on the key side)
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_kernel_matches_reference(case):
    kwargs = make_inputs(case)
    want = run(gated_attention_reference, kwargs)
    with mf.backend("triton"):
        got = run(gated_attention, kwargs)
    assert_all_close(got, want, names(kwargs), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_missing_keys_give_zeros_and_zero_gradients(backend):
    kwargs = make_inputs(Case(2, 9, 12, 2, 16, mq=2, mk=2, padding=True, empty_row=True, gate=True))
    with mf.backend(backend):
        out, dq, dk, dv, dbias, dgate = run(gated_attention, kwargs)
    assert torch.isfinite(out).all() and out[-1].abs().max() == 0 and out[0].abs().max() > 0
    for grad in (dq, dk, dv, dgate):
        assert torch.isfinite(grad).all() and grad[-1].abs().max() == 0
    assert torch.isfinite(dbias).all()


def test_strided_inputs_and_explicit_scale():
    """k/v sliced from a packed projection (row stride 3*H*Dh), q with a head-dim stride of H (copied by the op)."""
    case = Case(2, 17, 23, 2, 16, mq=2, mk=3, gate=True)
    kwargs = make_inputs(case)
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(case.b, case.lk, 3, case.h, case.dh, generator=g).to(DEVICE).requires_grad_()
    q_t = torch.randn(case.b, case.lq, case.dh, case.h, generator=g).to(DEVICE).requires_grad_()
    kwargs.update(q=q_t.transpose(-1, -2), k=packed[:, :, 0], v=packed[:, :, 2], scale=0.3)
    wrt = [q_t, packed, kwargs["pair_bias"], kwargs["gate_logits"]]

    def run_strided(fn):
        out = fn(**kwargs)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        return [out, *torch.autograd.grad(out, wrt, dout)]

    want = run_strided(gated_attention_reference)
    with mf.backend("triton"):
        got = run_strided(gated_attention)
    assert_all_close(got, want, ["out", "q", "packed k/v", "pair_bias", "gate_logits"], atol=2e-5, rtol=2e-4)


def test_triton_op_takes_int32_ids_and_expanded_masks():
    """The registered op called directly (no validation copies): int32 modality ids and a mask broadcast over the
    batch (stride 0)."""
    kwargs = make_inputs(Case(3, 10, 14, 2, 16, mq=2, mk=3, padding=True))
    kwargs["key_padding_mask"] = kwargs["key_padding_mask"][:1].expand(3, 14)
    want = run(gated_attention_reference, kwargs)
    kwargs.update(q_modality=kwargs["q_modality"].int(), k_modality=kwargs["k_modality"].int())

    def triton_op(q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits):
        return ops.gated_attention(q, k, v, key_padding_mask, pair_bias, q_modality, k_modality, gate_logits, None)[0]

    assert_all_close(run(triton_op, kwargs), want, names(kwargs), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("frozen", [("pair_bias", "gate_logits"), ("q", "k", "v")], ids="-".join)
def test_gradient_subsets(frozen):
    """Frozen inputs get no gradient (no d(pair_bias) reduction when the table is frozen); the others still match."""
    kwargs = make_inputs(KERNEL_CASES[1])
    for name in frozen:
        kwargs[name].requires_grad_(False)
    # the reference on CPU: torch 2.11's CUDA memory-efficient SDPA backward fails ("LSE is not correctly aligned")
    # when only the mask needs a gradient at odd lengths
    want = run(gated_attention_reference, {n: t.cpu() if torch.is_tensor(t) else t for n, t in kwargs.items()})
    with mf.backend("triton"):
        got = run(gated_attention, kwargs)
    assert_all_close([t.cpu() for t in got], want, names(kwargs), atol=2e-5, rtol=2e-4)


def test_backward_is_deterministic():
    """No atomics: the same inputs give bit-identical gradients (d(pair_bias) is a two-stage reduction)."""
    kwargs = make_inputs(KERNEL_CASES[1])
    with mf.backend("triton"):
        first, second = run(gated_attention, kwargs), run(gated_attention, kwargs)
    for label, a, b in zip(names(kwargs), first, second):
        assert torch.equal(a, b), label


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter's bf16 work-around")
def test_bf16_under_the_interpreter_is_computed_in_fp32():
    """The interpreter computes bf16 wrongly, so the Triton path runs its fp32 kernels and casts the result."""
    kwargs = make_inputs(Case(1, 12, 20, 2, 16, mq=2, mk=2, padding=True, gate=True), dtype=torch.bfloat16)
    with mf.backend("triton"):
        got = gated_attention(**kwargs)
    want = gated_attention_reference(**{n: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
                                        for n, t in kwargs.items()})
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------------------------
# the public op: dispatch and validation
# ------------------------------------------------------------------------------------------------------------------

def test_auto_backend_on_cpu_and_float64_use_the_reference():
    kwargs = make_inputs(Case(2, 6, 7, 2, 8, mq=2, mk=2, padding=True, gate=True), dtype=torch.float64, device="cpu")
    with mf.backend("auto"):
        assert torch.equal(gated_attention(**kwargs), gated_attention_reference(**kwargs))
    kwargs = {n: t.to(DEVICE) if torch.is_tensor(t) else t for n, t in kwargs.items()}
    with mf.backend("triton"):  # the kernels accumulate in fp32: float64 stays on the exact reference
        assert torch.equal(gated_attention(**kwargs), gated_attention_reference(**kwargs))


def test_modality_ids_shared_by_the_batch():
    kwargs = make_inputs(Case(3, 6, 7, 2, 8, mq=2, mk=3), device="cpu")
    kwargs["q_modality"] = kwargs["q_modality"][0]
    kwargs["k_modality"] = kwargs["k_modality"][0]
    expanded = dict(kwargs, q_modality=kwargs["q_modality"].expand(3, 6), k_modality=kwargs["k_modality"].expand(3, 7))
    with mf.backend("torch"):
        torch.testing.assert_close(gated_attention(**kwargs), gated_attention(**expanded), rtol=0, atol=0)


BAD_ARGUMENTS = [
    ("q", dict(q=torch.randn(2, 5, 2))),  # 3-D
    ("k", dict(k=torch.randn(2, 7, 3, 8))),  # wrong head count
    ("v", dict(v=torch.randn(2, 6, 2, 8))),  # Lk differs from k
    ("k", dict(k=torch.randn(2, 7, 2, 8, dtype=torch.float64))),  # dtype differs from q
    ("key_padding_mask", dict(key_padding_mask=torch.zeros(2, 7))),  # float, not bool
    ("pair_bias", dict(pair_bias=torch.randn(3, 2, 2))),  # one table per head: H = 2
    ("k_modality", dict(pair_bias=torch.randn(2, 2, 3), q_modality=torch.zeros(2, 5, dtype=torch.long))),  # missing
    ("pair_bias", dict(q_modality=torch.zeros(2, 5, dtype=torch.long))),  # ids without a table
    ("gate_logits", dict(gate_logits=torch.randn(2, 5, 3))),
]


@pytest.mark.parametrize("name,bad", BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_invalid_arguments_name_the_argument(name, bad):
    kwargs = dict(q=torch.randn(2, 5, 2, 8), k=torch.randn(2, 7, 2, 8), v=torch.randn(2, 7, 2, 8)) | bad
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        gated_attention(**kwargs)


def test_modality_id_range_is_not_checked_per_call():
    """A range check syncs with the host: the models check ids once per step, the op checks only their type and
    shape (on the torch path an id past the table then fails in the gather)."""
    kwargs = dict(q=torch.randn(2, 5, 2, 8), k=torch.randn(2, 7, 2, 8), v=torch.randn(2, 7, 2, 8),
                  pair_bias=torch.randn(2, 2, 3), q_modality=torch.full((2, 5), 2),  # id 2 with Mq = 2
                  k_modality=torch.zeros(2, 7, dtype=torch.long))
    with mf.backend("torch"), pytest.raises(IndexError):
        gated_attention(**kwargs)


def test_kernels_compile_for_hopper(compiled_for_hopper):
    """The three kernels at the CCT shapes (bench/sass_profile.py's cases: bf16, key padding, the pair bias and its
    gradient, the gate) compiled for sm_90: no register spills, every product a wgmma (no mma.sync: the pair-bias
    gradient's product in the dk/dv loop has the key block on its rows), no atomics; and the profile's MUFU floor
    is positive and within 8 issue slots' time per MUFU of its issue floor."""
    kernels = compiled_for_hopper("sass_profile.py", "--kernels", "gated_attention")["kernels"]
    assert {r["kernel"] for r in kernels} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}, kernels
    for r in kernels:
        assert 0 < r["regs"] <= 255 and r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert r["loops"] >= 1 and r["mix"]["HGMMA"] > 0 and r["mix"]["HMMA"] == r["mix"]["atomic"] == 0, r
        assert 0 < r["mufu_floor_us"] < r["issue_floor_us"] * 8, r


# ------------------------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 under the flash-attention rule
# ------------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(4, 200, 131, 4, 32, mq=3, mk=4, padding=True, empty_row=True, gate=True),
    Case(3, 130, 130, 2, 16, mq=12, mk=12, padding=True, gate=True),
    Case(2, 64, 259, 3, 64, mq=2, mk=3, gate=True),
    Case(2, 77, 40, 2, 24),
]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_flash_rule(case, dtype):
    kwargs = make_inputs(case, dtype=dtype, device="cuda")
    exact = {n: t.detach().double().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
             for n, t in kwargs.items()}
    want = [t.double() for t in run(gated_attention_reference, exact)]
    eager = run(gated_attention_reference, kwargs)
    with mf.backend("triton"):
        got = run(gated_attention, kwargs)
    for a, e in zip(got, eager):
        assert a.dtype == e.dtype
    for result in flash_errors(names(kwargs), got, eager, want):
        assert result.ok, str(result)
