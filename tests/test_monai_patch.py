"""``mf.patch_monai`` against the unpatched MONAI 1.6.1 model: outputs, input and parameter gradients (fp32), the same
Parameter objects and state_dict, checkpoints loading either way, the Triton backend, and the errors.

Sizes: SwinUNETR (feature 12, window 7 or 5x6x7) on 2 x C x 32 x 32 x 64, the smallest volumes it accepts (sides
divisible by 32, more than one voxel at the bottleneck): stage grids 16x16x32 and 8x8x16 are padded and shifted,
4x4x8 and 2x2x4 shrink the window below 7 (MONAI's get_window_size); in 2-D (spatial_dims=2, window 5x6) on
2 x 2 x 32 x 64 images, stage grids 16x32 down to 1x2 alike. The bare trunk runs on 19 x 24 x 27 (padded patch
embedding), the Triton interpreter cases on tiny trunks, 3-D and 2-D. MONAI's own SwinUNETR cases:
test_swin_unetr_cases.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_swin3d import assert_close, loss_of, spy_triton_forwards

import medmap_fast as mf
from medmap_fast.models.monai_patch import MonaiPatchEmbed, MonaiSwinBlock, MonaiSwinStage

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr", reason="MONAI is needed for the parity tests")

pytestmark = pytest.mark.usefixtures("one_thread")
TRUNK = dict(in_chans=1, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
             num_heads=(3, 6, 12, 24))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its initial value (LayerNorms start at 1 and 0), eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def patched_copy(ref: torch.nn.Module) -> torch.nn.Module:
    """A patched deep copy of ``ref``, checked to keep its Parameter objects and its state_dict (keys and values)."""
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    assert mf.patch_monai(model) is model
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(p is params[name] for name, p in after.items())
    state, ref_state = model.state_dict(), ref.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())
    return model


def outputs_and_gradients(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output, the input gradient and every parameter gradient of a fixed linear loss of ``model(x)``."""
    x = x.clone().requires_grad_()
    out = model(x)
    out = [out] if torch.is_tensor(out) else out
    loss_of(out).backward()
    grads = {f"gradient of {name}": p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [name for name, g in grads.items() if g is None]
    return {**{f"output {i}": o.detach() for i, o in enumerate(out)}, "input gradient": x.grad, **grads}


def assert_parity(ref: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    """The patched ``model``'s fp32 outputs and gradients are as close to an fp64 run of ``ref`` as ``ref``'s own fp32
    ones: at most twice their error plus 1e-5 of the values' scale and 1e-6 (for gradients that are exactly zero,
    e.g. of a bias table seen by 1-token windows): CONTRIBUTING's tolerance rule. A plain fp32 tolerance does not hold
    for SwinUNETR: its InstanceNorm over the 2-voxel bottleneck amplifies rounding to ~1e-3 relative error, in MONAI's
    own fp32 run as much as in the patched one."""
    exact = outputs_and_gradients(copy.deepcopy(ref).double(), x.double())
    theirs, ours = outputs_and_gradients(ref, x), outputs_and_gradients(model, x)
    assert ours.keys() == exact.keys()
    for what, truth in exact.items():
        assert ours[what].shape == truth.shape, what
        scale = truth.abs().max().item()
        err_ref, err_ours = ((t[what].double() - truth).abs().max().item() for t in (theirs, ours))
        assert err_ours <= 2 * err_ref + 1e-5 * scale + 1e-6, (
            f"{what}: error {err_ours:.2e}, MONAI fp32's {err_ref:.2e}, values up to {scale:.2e}")


@pytest.mark.parametrize(
    "kwargs, size",
    [
        (dict(in_channels=1, window_size=7), (32, 32, 64)),
        (dict(in_channels=2, window_size=(5, 6, 7), downsample="mergingv2", use_v2=True, patch_norm=True,
              qkv_bias=False, use_checkpoint=True, dropout_path_rate=0.2, normalize=False), (32, 32, 64)),
        (dict(in_channels=2, window_size=(5, 6), spatial_dims=2, use_v2=True, patch_norm=True, use_checkpoint=True),
         (32, 64)),
    ],
    ids=["in1-window7", "in2-aniso-v2-patchnorm-nobias-ckpt", "2d-in2-aniso-v2-patchnorm-ckpt"],
)
def test_patched_swinunetr_equals_monai(kwargs: dict, size: tuple[int, ...]) -> None:
    """Outputs and every gradient equal MONAI's in float64. Not the float32 rule of :func:`assert_parity`: SwinUNETR's
    InstanceNorm over its 2-voxel bottleneck amplifies float32 rounding to ~1e-3 relative, so the max-error ratio of
    two float32 runs swings past 2x with the seed (the trunk alone meets the float32 rule, tested below)."""
    torch.manual_seed(0)
    ref = perturbed(swin_unetr.SwinUNETR(out_channels=3, feature_size=12, **kwargs))
    model = patched_copy(ref)
    trunk = model.swinViT
    assert isinstance(trunk.patch_embed, MonaiPatchEmbed)
    assert all(isinstance(getattr(trunk, f"layers{i}")[0], MonaiSwinStage) for i in range(1, 5))
    x = torch.randn(2, kwargs["in_channels"], *size, dtype=torch.float64)
    exact = outputs_and_gradients(copy.deepcopy(ref).double(), x)
    ours = outputs_and_gradients(copy.deepcopy(model).double(), x)
    assert ours.keys() == exact.keys()
    for what, truth in exact.items():
        scale = truth.abs().max().item()
        torch.testing.assert_close(ours[what], truth, rtol=1e-10, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


def test_patches_a_swin_inside_any_model() -> None:
    """Eval mode, so MONAI's attention dropout (attn_drop_rate 0.4, as in MONAI's own SwinUNETR tests) is off."""
    trunk = swin_unetr.SwinTransformer(**TRUNK, attn_drop_rate=0.4)
    ref = perturbed(torch.nn.ModuleDict({"trunk": trunk, "head": torch.nn.Linear(3, 3)}))
    model = patched_copy(ref)
    assert isinstance(model["trunk"].layers4[0].blocks[1], MonaiSwinBlock)
    assert_parity(ref["trunk"], model["trunk"], torch.randn(2, 1, 19, 24, 27))  # odd sides: padded patches


def test_train_mode_drop_path_draws_as_monai() -> None:
    ref = perturbed(swin_unetr.SwinTransformer(**TRUNK, drop_path_rate=0.5)).train()
    model = patched_copy(ref)
    x = torch.randn(2, 1, 20, 18, 22)
    torch.manual_seed(5)
    expected = outputs_and_gradients(ref, x)
    torch.manual_seed(5)  # the per-sample masks are the only random draws
    got = outputs_and_gradients(model, x)
    for what, value in expected.items():
        assert_close(got[what], value, f"{what} in train mode")


def test_train_mode_attention_dropout_runs_in_the_fused_op() -> None:
    """MONAI's attn_drop_rate drives the fused op's dropout: in train mode the patched model drops attention weights
    (outputs differ from eval mode's, the same seed repeats them, every parameter gets a gradient); in eval mode it
    equals MONAI (test_patched_swinunetr_equals_monai)."""
    model = patched_copy(perturbed(swin_unetr.SwinTransformer(**{**TRUNK, "depths": (2, 1, 1, 1)},
                                                              attn_drop_rate=0.4)))
    x = torch.randn(1, 1, 20, 18, 22)
    with torch.no_grad():
        evaluated = model(x)[1]
    model.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(outputs_and_gradients(model, x))
        model.zero_grad(set_to_none=True)
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert runs[0]["output 1"].shape == evaluated.shape and not torch.allclose(runs[0]["output 1"], evaluated)


def test_checkpoints_load_before_and_after_patching() -> None:
    ref = perturbed(swin_unetr.SwinTransformer(**TRUNK))
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)  # saved before patching
    model = mf.patch_monai(swin_unetr.SwinTransformer(**TRUNK).eval())  # other random weights
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer))
    unpatched = swin_unetr.SwinTransformer(**TRUNK).eval()
    unpatched.load_state_dict(model.state_dict())  # saved after patching
    x = torch.randn(1, 1, 24, 20, 22)
    with torch.no_grad():
        expected = ref(x)[-1]
        for other in (model, unpatched, mf.SwinViT3D.from_monai(model).eval()):
            assert_close(other(x)[-1], expected, type(other).__name__)


def test_patching_twice_changes_nothing_and_a_bare_block_is_returned() -> None:
    model = mf.patch_monai(swin_unetr.SwinTransformer(**TRUNK))
    modules = list(model.modules())
    assert mf.patch_monai(model) is model and list(model.modules()) == modules
    block = swin_unetr.SwinTransformerBlock(12, 3, (7, 7, 7), (3, 3, 3))
    assert isinstance(mf.patch_monai(block), MonaiSwinBlock)


def test_bare_2d_block_takes_monais_2d_tokens() -> None:
    """A bare 2-D SwinTransformerBlock, patched, takes and returns MONAI's [B, H, W, C] (shifted, padded windows)."""
    ref = perturbed(swin_unetr.SwinTransformerBlock(12, 3, (4, 5), (2, 2)))
    block = mf.patch_monai(copy.deepcopy(ref))
    x = torch.randn(2, 9, 11, 12)
    mask = swin_unetr.compute_mask([12, 15], (4, 5), (2, 2), "cpu")
    with torch.no_grad():
        assert_close(block(x, mask), ref(x, mask), "bare 2-D block")


def _subclassed_block(trunk: torch.nn.Module) -> None:
    class MyBlock(swin_unetr.SwinTransformerBlock):
        pass

    trunk.layers2[0].blocks[1].__class__ = MyBlock


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: torch.nn.Sequential(swin_unetr.WindowAttention(12, 3, (7, 7, 7))),
         TypeError, r"0 is a WindowAttention outside a SwinTransformerBlock"),
        (lambda: torch.nn.Linear(3, 3), TypeError, "Linear contains no MONAI"),
        (lambda: mf.SwinViT3D(**TRUNK), TypeError, "SwinViT3D contains no MONAI"),
        (lambda: "swin.pt", TypeError, "expected a torch.nn.Module"),
    ],
    ids=["bare-window-attention", "no-swin", "medmap-fast-swin", "not-a-module"],
)
def test_unsupported_models_raise(build, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        mf.patch_monai(build())


@pytest.mark.parametrize(
    "alter, match",
    [
        (_subclassed_block, r"layers2\.0\.blocks\.1 is not MONAI 1\.6\.1's SwinTransformerBlock layout: its class is "
                            r".*MyBlock"),
        (lambda t: t.layers3[0].blocks[0].attn.add_module("extra", torch.nn.Identity()),
         r"layers3\.0\.blocks\.0\.attn is not .* children \['attn_drop', 'extra'"),
        (lambda t: t.patch_embed.register_buffer("scale", torch.ones(1)),
         r"patch_embed is not .* own buffers \['scale'\], expected \[\]"),
    ],
    ids=["subclass", "extra-child", "extra-buffer"],
)
def test_other_layouts_raise_naming_the_module_and_change_nothing(alter, match: str) -> None:
    trunk = swin_unetr.SwinTransformer(**TRUNK)
    alter(trunk)
    modules = list(trunk.modules())
    with pytest.raises(TypeError, match=match):
        mf.patch_monai(trunk)
    assert list(trunk.modules()) == modules


@pytest.mark.skipif(not mf.kernels.triton_available(), reason="Triton is not installed")
@pytest.mark.skipif(not mf.kernels.interpreting(), reason="runs the kernels on CPU tensors, which needs "
                    "TRITON_INTERPRET=1 (conftest sets it when no GPU is present)")
@pytest.mark.parametrize(
    "overrides, shape",
    [
        # window 3 on 3x3x4 tokens: shrunk along D and H, padded and shifted along W (the interpreter is slow)
        (dict(window_size=(3, 3, 3)), (2, 1, 5, 6, 7)),
        # 2-D, window 3 on 6x7 tokens: padded and shifted along both axes, then shrunk
        (dict(window_size=(3, 3), patch_size=(2, 2), spatial_dims=2, downsample="mergingv2", patch_norm=True),
         (2, 1, 11, 14)),
    ],
    ids=["3d", "2d"],
)
def test_patched_model_runs_the_triton_kernels(monkeypatch: pytest.MonkeyPatch, overrides: dict, shape) -> None:
    """Under ``backend("triton")`` (the interpreter on CPU) both ops run their kernels; MONAI parity with gradients."""
    calls = spy_triton_forwards(monkeypatch)
    ref = perturbed(swin_unetr.SwinTransformer(**{**TRUNK, "depths": (2, 1, 1, 1), **overrides}))
    with mf.backend("triton"):
        assert_parity(ref, patched_copy(ref), torch.randn(shape))
    assert calls.count("patch_embed_3d") == 1 and calls.count("window_attention") == 5
