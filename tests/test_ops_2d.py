"""The Swin ops on 2-D images (MONAI's spatial_dims=2), which run as the 3-D ops with a unit last axis: against MONAI
1.6.1's 2-D layers (window attention inside its SwinTransformerBlock, PatchEmbed with a Conv2d), outputs and every
gradient, on the PyTorch paths (float64) and the Triton kernels (float32, the interpreter on CPU).

Sizes: 9 x 11 pixels, window (4, 5) shifted by (2, 2): padded to 12 x 15, 3 x 3 windows, the last row and column
straddling regions of the rolled grid; a window shrunk below the table's (MONAI's get_window_size).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import medmap_fast as mf
from medmap_fast.kernels import patch_embed_3d, window_attention
from medmap_fast.kernels import window_attn as wa

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr", reason="MONAI is needed for the parity tests")

# triton 3.6's interpreter converts 1-element arrays to loop indices, which numpy >= 1.25 deprecates
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (mf.kernels.triton_available() and (mf.kernels.interpreting() or torch.cuda.is_available())),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)")


@pytest.mark.parametrize("window", [(7, 7), (5, 3), (2, 6), (1, 4)])
def test_unit_depth_index_and_mask_are_monais_2d(window) -> None:
    """The relative-position index of a (wh, ww, 1) window is MONAI's 2-D index (same table rows and order), and the
    unit-depth shift mask is MONAI's 2-D compute_mask."""
    attn = swin_unetr.WindowAttention(12, 3, window)
    assert attn.relative_position_bias_table.shape[0] == math.prod(2 * w - 1 for w in (*window, 1))
    assert torch.equal(wa.relative_position_index((*window, 1), (*window, 1)), attn.relative_position_index)
    shift = tuple(w // 2 for w in window)
    padded = [3 * w for w in window]
    assert torch.equal(wa.shift_mask((*padded, 1), (*window, 1), (*shift, 0)),
                       swin_unetr.compute_mask(padded, window, shift, "cpu"))


def monai_block(window, shift, dtype) -> torch.nn.Module:
    """A 2-D MONAI SwinTransformerBlock whose norm1 is the identity (its attention part is what the op replaces),
    with a non-zero qkv bias (the k/v of padded pixels) and a random bias table."""
    torch.manual_seed(0)
    block = swin_unetr.SwinTransformerBlock(24, 3, window, shift, norm_layer=torch.nn.Identity)
    with torch.no_grad():
        block.attn.qkv.bias.normal_(0.0, 0.5)
        block.attn.relative_position_bias_table.normal_()
    return block.to(DEVICE, dtype)


def op_block(block: torch.nn.Module, x: torch.Tensor, window, shift) -> torch.Tensor:
    """The block's attention part through the 2-D op: qkv Linear -> window_attention (2-D) -> projection."""
    attn, c = block.attn, x.shape[-1]
    win, sh = swin_unetr.get_window_size(x.shape[1:3], block.window_size, block.shift_size)
    out = window_attention(F.linear(x, attn.qkv.weight, attn.qkv.bias), attn.num_heads, win, sh,
                           attn.relative_position_bias_table, table_window=window, pad_kv=attn.qkv.bias[c:],
                           scale=attn.scale)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def outputs_and_grads(fn, block, x) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    out = fn(x)
    leaves = [x, *block.attn.parameters()]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return [out, *torch.autograd.grad(out, leaves, dout)]


CASES = [((9, 11), (4, 5), (2, 2)), ((9, 11), (4, 5), (0, 0)), ((3, 11), (4, 5), (2, 2))]
IDS = ["shifted-padded", "unshifted-padded", "shrunk-height"]


def monai_mask(size, block) -> torch.Tensor | None:
    win, sh = swin_unetr.get_window_size(size, block.window_size, block.shift_size)
    padded = [-(-s // w) * w for s, w in zip(size, win)]
    return swin_unetr.compute_mask(padded, win, sh, DEVICE).to(block.attn.qkv.weight.dtype) if any(sh) else None


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("size, window, shift", CASES, ids=IDS)
def test_2d_window_attention_equals_monai(backend, size, window, shift) -> None:
    """float64: the op on [B, H, W, 3C] (the CPU path, or the plain reference) equals MONAI's pad / roll /
    partition / WindowAttention / reverse, output and the gradients of x and every attention weight."""
    block = monai_block(window, shift, torch.float64)
    x = torch.randn(2, *size, 24, dtype=torch.float64, device=DEVICE)
    mask = monai_mask(size, block)
    expected = outputs_and_grads(lambda t: block.forward_part1(t, mask), block, x)
    if backend == "reference":  # the reference takes the unit-depth 3-D form itself
        def fn(t):
            attn, c = block.attn, t.shape[-1]
            win, sh = swin_unetr.get_window_size(size, window, shift)
            out = wa.window_attention_reference(F.linear(t, attn.qkv.weight, attn.qkv.bias)[:, :, :, None],
                                                attn.num_heads, (*win, 1), (*sh, 0), attn.relative_position_bias_table,
                                                table_window=(*window, 1), pad_kv=attn.qkv.bias[c:], scale=attn.scale)
            return F.linear(out[:, :, :, 0], attn.proj.weight, attn.proj.bias)
    else:
        def fn(t):
            with mf.backend("torch"):
                return op_block(block, t, window, shift)
    got = outputs_and_grads(fn, block, x)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item(), msg=lambda m: f"{i}: {m}")


@needs_triton
@pytest.mark.parametrize("size, window, shift", CASES[:1] + CASES[2:], ids=IDS[:1] + IDS[2:])
def test_2d_window_attention_triton_equals_torch(size, window, shift) -> None:
    """float32: the Triton kernels on the unit-depth grid equal the PyTorch path, output and gradients, with a gate."""
    block = monai_block(window, shift, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, *size, 24, generator=gen).to(DEVICE)
    gate = torch.randn(2, *size, 3, generator=gen).to(DEVICE).requires_grad_()

    def run(backend):
        with mf.backend(backend):
            def fn(t):
                attn, c = block.attn, t.shape[-1]
                win, sh = swin_unetr.get_window_size(size, window, shift)
                out = window_attention(F.linear(t, attn.qkv.weight, attn.qkv.bias), 3, win, sh,
                                       attn.relative_position_bias_table, table_window=window,
                                       pad_kv=attn.qkv.bias[c:], gate_logits=gate)
                return F.linear(out, attn.proj.weight, attn.proj.bias)
            t = x.detach().requires_grad_()
            out = fn(t)
            leaves = [t, gate, *block.attn.parameters()]
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            return [out, *torch.autograd.grad(out, leaves, dout)]

    for i, (a, b) in enumerate(zip(run("triton"), run("torch"), strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{i}: {m}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("norm", [True, False], ids=["layernorm", "no-norm"])
def test_2d_patch_embed_equals_monai(backend, norm) -> None:
    """A MONAI 2-D PatchEmbed (Conv2d weight [C, Cin, ph, pw], odd sides padded, LayerNorm) gives the output and
    gradients of patch_embed_3d on [V, Cin, H, W] (channels-last [V, H', W', C])."""
    blocks = pytest.importorskip("monai.networks.blocks", reason="needs monai for the parity check")
    torch.manual_seed(0)
    module = blocks.PatchEmbed(patch_size=(2, 3), in_chans=2, embed_dim=16,
                               norm_layer=torch.nn.LayerNorm if norm else None, spatial_dims=2).to(DEVICE)
    if norm:
        with torch.no_grad():
            module.norm.weight.normal_()
            module.norm.bias.normal_()
    x = torch.randn(3, 2, 9, 10, device=DEVICE, requires_grad=True)
    params = [x, *module.parameters()]
    expected = module(x).permute(0, 2, 3, 1)
    dy = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, params, dy)
    extra = dict(layer_norm=True, ln_weight=module.norm.weight, ln_bias=module.norm.bias) if norm else {}
    with mf.backend(backend):
        out = patch_embed_3d(x, module.proj.weight, module.proj.bias, **extra)
    assert out.shape == expected.shape == (3, 5, 4, 16)
    grads = torch.autograd.grad(out, params, dy)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_2d_patch_embed_per_modality_weights() -> None:
    """weight [M, C, Cin, ph, pw]: each image uses its modality's weight."""
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(3, 1, 6, 8, generator=gen), torch.randn(2, 8, 1, 2, 2, generator=gen)
    bias = torch.randn(2, 8, generator=gen)
    ids = torch.tensor([1, 0, 1])
    out = patch_embed_3d(x, weight, bias, ids)
    for v in range(3):
        ref = F.conv2d(x[v:v + 1], weight[ids[v]], bias[ids[v]], stride=2).permute(0, 2, 3, 1)[0]
        torch.testing.assert_close(out[v], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, pattern", [
    (lambda: window_attention(torch.randn(1, 4, 4, 36), 3, (4, 4, 4)),
     r"^window_size: expected 2 non-negative ints, got \(4, 4, 4\)$"),
    (lambda: window_attention(torch.randn(1, 4, 4, 36), 3, (4, 4), (0, 0, 0)),
     r"^shift_size: expected 2 non-negative ints, got \(0, 0, 0\)$"),
    (lambda: window_attention(torch.randn(1, 4, 4, 36), 3, (4, 4), bias_table=torch.zeros(343, 3)),
     r"^bias_table: expected a float tensor \(49, 3\), got shape \(343, 3\)"),
    (lambda: window_attention(torch.randn(1, 4, 4, 36), 3, (4, 4), gate_logits=torch.zeros(1, 4, 4, 1, 3)),
     r"^gate_logits: expected a float tensor \(1, 4, 4, 3\), got shape \(1, 4, 4, 1, 3\)"),
    (lambda: window_attention(torch.randn(1, 4, 4, 36), 3, (4, 4), (2, 4)),
     r"^window_size/shift_size: expected shift < window <= table_window \(4, 4\), got \(4, 4\)/\(2, 4\)$"),
    (lambda: patch_embed_3d(torch.randn(2, 1, 8, 8), torch.randn(12, 1, 2, 2, 2, 2)),
     r"^weight: expected a float tensor \[M, C, Cin, ph, pw\] or \[C, Cin, ph, pw\], got shape \(12, 1, 2, 2, 2, 2\)"),
    (lambda: patch_embed_3d(torch.randn(2, 3, 8, 8), torch.randn(12, 1, 2, 2)),
     r"^x: expected a float tensor \[V, 1, H, W\] \(Cin as in weight\), got shape \(2, 3, 8, 8\)"),
], ids=["3d-window", "3d-shift", "3d-table", "unit-axis-gate", "shift-too-big", "6d-weight", "cin"])
def test_2d_arguments_are_checked(call, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()
