"""patch_embed_3d: the Triton kernel against the plain-PyTorch reference, output and every gradient.

The fp32 tests run on CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), or on the GPU
where there is one. The GPU tests add bf16/fp16 under the flash-attention rule: the kernel's error against an fp64
reference is at most twice the error of the reference evaluated in the same dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import medmap_fast as mf

# the op module (the package attribute of the same name is the public function)
from medmap_fast.kernels import patch_embed as pe
from medmap_fast.kernels._utils import flash_errors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GRAD_NAMES = ("x", "weight", "bias", "ln_weight", "ln_bias")


@dataclass(frozen=True)
class Case:
    """One problem: V volumes of Cin channels, patch p, C channels, M modality weights."""

    volumes: int
    cin: int
    size: tuple[int, int, int]
    patch: tuple[int, int, int]
    channels: int
    modalities: int
    layer_norm: bool
    affine: tuple[bool, bool] = (True, True)  # ln_weight, ln_bias given
    bias: bool = True

    @property
    def positions(self) -> int:
        """Output positions per volume, D' * H' * W'."""
        return -(-self.size[0] // self.patch[0]) * -(-self.size[1] // self.patch[1]) * -(-self.size[2] // self.patch[2])

    @property
    def k(self) -> int:
        """Patch entries Cin * pd * ph * pw."""
        return self.cin * self.patch[0] * self.patch[1] * self.patch[2]

    def __str__(self) -> str:
        ln = ("ln" + "w" * self.affine[0] + "b" * self.affine[1]) if self.layer_norm else "noln"
        return (f"V{self.volumes}-cin{self.cin}-{'x'.join(map(str, self.size))}-p{''.join(map(str, self.patch))}"
                f"-C{self.channels}-M{self.modalities}-{ln}{'' if self.bias else '-nobias'}")


CASES = [
    Case(3, 1, (9, 10, 11), (2, 2, 2), 48, 2, True),  # the paper's patch embedding (K = 8), odd sides padded
    Case(3, 1, (9, 10, 11), (2, 2, 2), 48, 3, False),
    Case(2, 4, (9, 10, 11), (4, 4, 4), 96, 3, True),  # K = 256
    Case(2, 2, (5, 7, 9), (1, 2, 3), 20, 2, True, affine=(True, False), bias=False),  # anisotropic, C not 2^n
    Case(2, 2, (5, 7, 9), (1, 2, 3), 20, 2, True, affine=(False, True)),
    Case(2, 4, (4, 8, 8), (4, 4, 4), 768, 2, True, affine=(False, False)),  # C = 768, affine-free LayerNorm
]
# cases for the GPU-sized tiling: several tiles per volume, several backward splits, several K chunks
GPU_TILING_CASES = [
    Case(2, 1, (13, 14, 15), (2, 2, 2), 48, 2, True),
    Case(2, 4, (9, 10, 11), (4, 4, 4), 96, 2, True),
    Case(2, 4, (9, 10, 11), (4, 4, 4), 96, 2, False),
]


def make_inputs(case: Case, dtype=torch.float32, device=DEVICE, seed=0) -> dict:
    """Random leaf tensors of a case (fresh values per seed); None for the optional ones the case leaves out."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    c, m = case.channels, case.modalities
    return dict(
        x=rand(case.volumes, case.cin, *case.size),
        weight=rand(m, c, case.cin, *case.patch, scale=case.k**-0.5),
        bias=rand(m, c) if case.bias else None,
        ln_weight=rand(c) if case.layer_norm and case.affine[0] else None,
        ln_bias=rand(c) if case.layer_norm and case.affine[1] else None,
        modality_ids=torch.randint(0, m, (case.volumes,), generator=g).to(device),
    )


def forward_backward(inputs: dict, case: Case, backend: str, out_dtype=None, dy_dtype=None):
    """Output and the gradients of every leaf that requires them, for a fixed random upstream gradient (drawn in
    ``dy_dtype``, default the output's, so runs in several precisions can share its values)."""
    with mf.backend(backend):
        out = mf.kernels.patch_embed_3d(
            inputs["x"], inputs["weight"], inputs["bias"], inputs["modality_ids"], layer_norm=case.layer_norm,
            ln_weight=inputs["ln_weight"], ln_bias=inputs["ln_bias"], out_dtype=out_dtype,
        )
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dy_dtype or out.dtype).to(out)
    leaves = {n: inputs[n] for n in GRAD_NAMES if inputs[n] is not None and inputs[n].requires_grad}
    grads = torch.autograd.grad(out, list(leaves.values()), dy)
    return out, dict(zip(leaves, grads))


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale, so sums over many terms
    and values near zero are judged alike)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    if not expected.numel():
        return
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale + 1e-30, f"{name}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def check_against_reference(case: Case, out_dtype=None, tol=2e-5) -> None:
    inputs = make_inputs(case)
    out, grads = forward_backward(inputs, case, "triton", out_dtype)
    ref_out, ref_grads = forward_backward(inputs, case, "torch", out_dtype)
    assert out.shape == (case.volumes, *(-(-s // p) for s, p in zip(case.size, case.patch)), case.channels)
    assert out.dtype == (out_dtype or inputs["x"].dtype)
    assert_scaled_close(out, ref_out, tol, "out")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_scaled_close(grads[name], ref_grads[name], tol, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_autocast_runs_in_the_autocast_dtype(case):
    """Under torch.autocast("cpu", bf16) the op runs in bf16, as a Conv3d would: bf16 output close to the fp32
    result, fp32 gradients for the fp32 leaves (torch backend)."""
    inputs = make_inputs(case, device="cpu")
    ref_out, ref_grads = forward_backward(inputs, case, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = forward_backward(inputs, case, "torch", dy_dtype=torch.float32)
    assert out.dtype == torch.bfloat16
    assert_scaled_close(out.float(), ref_out, 2e-2, "out")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_scaled_close(grads[name], ref_grads[name], 2e-2, f"d{name}")


@pytest.mark.parametrize("case", GPU_TILING_CASES, ids=str)
def test_gpu_tiling_matches_reference(case, monkeypatch):
    """The block sizes and grid the GPU uses (small tiles, split reductions, K in chunks), run by the interpreter."""
    monkeypatch.setattr(pe, "interpreting", lambda: False)
    cfg = pe._launch_config(case.positions, case.k, case.channels, case.volumes, torch.device("cpu"))
    assert case.positions > cfg.block_p_bwd or case.k > cfg.block_k  # several tiles per volume or several K chunks
    check_against_reference(case)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_out_dtype(out_dtype):
    """fp32 math, cast at the store: equal to the reference up to one rounding of the output dtype."""
    check_against_reference(CASES[0], out_dtype=out_dtype, tol=torch.finfo(out_dtype).eps)


@pytest.mark.parametrize("frozen", ["x", "weight", "params"])
def test_gradient_subsets(frozen):
    """Only the gradients asked for are computed (no dx for input volumes, no dW for a frozen embedding)."""
    case = CASES[0]
    inputs = make_inputs(case)
    for name in ("weight", "bias", "ln_weight", "ln_bias") if frozen == "params" else (frozen,):
        inputs[name].requires_grad_(False)
    _, grads = forward_backward(inputs, case, "triton")
    _, ref_grads = forward_backward(inputs, case, "torch")
    assert grads.keys() == ref_grads.keys() and frozen not in grads
    for name in grads:
        assert_scaled_close(grads[name], ref_grads[name], 2e-5, f"d{name}")


def test_backward_is_deterministic():
    """Two-stage reductions without atomics: the same inputs give bit-identical gradients."""
    case = GPU_TILING_CASES[0]
    inputs = make_inputs(case)
    first = forward_backward(inputs, case, "triton")[1]
    second = forward_backward(inputs, case, "triton")[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_empty_batch():
    """No volumes: an empty output and zero parameter gradients, as the reference."""
    case = Case(0, 1, (4, 4, 4), (2, 2, 2), 16, 2, True)
    check_against_reference(case)


def test_matches_monai_patch_embed():
    """A MONAI PatchEmbed (Conv3d weight [C, Cin, p, p, p], LayerNorm) gives the same output and gradients."""
    blocks = pytest.importorskip("monai.networks.blocks", reason="needs monai for the parity check")
    torch.manual_seed(0)
    module = blocks.PatchEmbed(patch_size=2, in_chans=1, embed_dim=48, norm_layer=torch.nn.LayerNorm, spatial_dims=3)
    with torch.no_grad():
        module.norm.weight.normal_()
        module.norm.bias.normal_()
    module.to(DEVICE)
    x = torch.randn(2, 1, 7, 10, 9, device=DEVICE, requires_grad=True)
    params = [x, module.proj.weight, module.proj.bias, module.norm.weight, module.norm.bias]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full fp32 convolution on a GPU
        expected = module(x).permute(0, 2, 3, 4, 1)
        dy = torch.randn_like(expected)
        ref_grads = torch.autograd.grad(expected, params, dy)
    with mf.backend("triton"):
        out = mf.kernels.patch_embed_3d(x, module.proj.weight, module.proj.bias, layer_norm=True,
                                        ln_weight=module.norm.weight, ln_bias=module.norm.bias)
    grads = torch.autograd.grad(out, params, dy)
    assert_scaled_close(out, expected.contiguous(), 2e-5, "out")
    for name, got, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert_scaled_close(got, ref, 2e-5, f"d{name}")


def test_float64_runs_the_reference():
    """The kernels accumulate in fp32, so fp64 inputs (gradcheck-style checks) take the exact reference path."""
    inputs = make_inputs(CASES[1], dtype=torch.float64)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["modality_ids"])
    with mf.backend("triton"):
        out = mf.kernels.patch_embed_3d(*args)
    assert torch.equal(out, pe.patch_embed_3d_reference(*args))


def test_imports_without_triton():
    """Triton is an optional extra: without it the package imports and the reference runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, medmap_fast as mf\n"
        "out = mf.kernels.patch_embed_3d(torch.randn(1, 1, 4, 4, 4), torch.randn(8, 1, 2, 2, 2))\n"
        "assert out.shape == (1, 2, 2, 2, 8)\n"
        "try:\n    with mf.backend('triton'):\n"
        "        mf.kernels.patch_embed_3d(torch.randn(1, 1, 4, 4, 4), torch.randn(1, 8, 1, 2, 2, 2))\n"
        "except RuntimeError as e:\n    assert 'triton' in str(e)\nelse:\n    raise AssertionError('no error')\n"
    )
    env = {**os.environ, "MEDMAP_FAST_BACKEND": "torch"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_kernels_compile_for_hopper(compiled_for_hopper):
    """Forward and backward at the paper's volumes (bench/sass_profile.py's cases: bf16, patch 2^3, C 48, two
    modalities) compiled for sm_90: no register spills, every product a wgmma (no mma.sync: the backward sums dW^T,
    the channels on its rows, as dW would put the 8 patch entries there), no atomics."""
    kernels = compiled_for_hopper("sass_profile.py", "--kernels", "patch_embed_3d")["kernels"]
    assert {r["kernel"] for r in kernels} == {"_patch_embed_fwd_kernel", "_patch_embed_bwd_kernel"}, kernels
    for r in kernels:
        assert 0 < r["regs"] <= 255 and r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert r["mix"]["HGMMA"] > 0 and r["mix"]["HMMA"] == r["mix"]["atomic"] == 0, r


# ---- GPU: bf16 / fp16 under the flash-attention rule -----------------------------------------------------------

GPU_CASES = [
    Case(3, 1, (37, 40, 41), (2, 2, 2), 48, 2, True),
    Case(3, 1, (37, 40, 41), (2, 2, 2), 48, 2, False),
    Case(2, 4, (33, 30, 29), (4, 4, 4), 96, 3, True),
    Case(2, 4, (16, 20, 24), (4, 4, 4), 768, 2, True, affine=(False, False)),
]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_flash_rule(case, dtype):
    """Kernel error vs fp64 <= 2x the error of the same-dtype PyTorch reference, for the output and every grad."""
    inputs = make_inputs(case, dtype=dtype, device="cuda", seed=3)
    out, grads = forward_backward(inputs, case, "triton")
    ref_out, ref_grads = forward_backward(inputs, case, "torch")
    exact = {k: v if v is None or not v.is_floating_point() else v.detach().double().requires_grad_()
             for k, v in inputs.items()}
    out64, grads64 = forward_backward(exact, case, "torch", dy_dtype=dtype)
    names = ["out", *(f"d{n}" for n in grads)]
    for result in flash_errors(names, [out, *grads.values()], [ref_out, *ref_grads.values()],
                               [out64, *grads64.values()]):
        assert result.ok, str(result)
