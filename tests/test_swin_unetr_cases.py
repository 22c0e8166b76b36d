"""MONAI's own SwinUNETR shape cases through ``mf.patch_monai``: eval-mode outputs equal the unpatched model's, and
training mode (attention dropout on) runs forward and backward with the right shapes.

The cases are built from the parameters of MONAI 1.6.1's SwinUNETR shape test (tests/networks/nets/
test_swin_unetr.py): attention dropout 0.4, depths [2, 1, 1, 1] and [1, 2, 1, 1], feature size 12, 1 input and 2
output channels, instance norm, images 2 x 1 x 64 x 32 x 192 (3-D) and 2 x 1 x 96 x 32 (2-D), activation
checkpointing on and off; case i downsamples with the i-th of "mergingv2", "merging", PatchMerging, PatchMergingV2
(cyclically, in the order depths > image > checkpointing, as MONAI enumerates them), so the 3-D cases use the two
strings and the 2-D cases the two classes. All run on the PyTorch path (the CPU default); the Triton kernels on 2-D
and 3-D MONAI Swins are tested under the interpreter in test_monai_patch.py (tiny trunks: the interpreter is slow).

What is compared, and why (CPU, one thread, busy 2-core machine): the 2-D cases in full at MONAI's shapes, outputs
in float64 (under 1 s per case). A 3-D case at MONAI's 64 x 32 x 192 costs about 50 s for one float64 SwinUNETR
forward pair (MONAI's float64 convolutions at full resolution dominate), so the 3-D cases compare what patch_monai
replaces, the Swin trunk's five maps that the untouched MONAI decoder reads (test_patching_keeps_the_decoder), in
float64 on one of the two volumes, and train the whole patched SwinUNETR on one volume: about 10 s per 3-D case.
One 3-D case also compares the whole SwinUNETR's outputs in float64 (test_one_3d_case_equals_monai_in_full).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_monai_patch import patched_copy, perturbed

import medmap_fast as mf
from medmap_fast.models.monai_patch import MonaiPatchEmbed, MonaiSwinStage

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr", reason="MONAI is needed for the parity tests")

pytestmark = pytest.mark.usefixtures("one_thread")


def monai_cases() -> list:
    """(SwinUNETR arguments, image size) of every MONAI shape case, with a readable id."""
    merging = ("mergingv2", "merging", swin_unetr.PatchMerging, swin_unetr.PatchMergingV2)
    cases = []
    grid = itertools.product(([2, 1, 1, 1], [1, 2, 1, 1]), ((64, 32, 192), (96, 32)), (True, False))
    for i, (depths, image, checkpoint) in enumerate(grid):
        downsample = merging[i % len(merging)]
        kwargs = dict(in_channels=1, out_channels=2, feature_size=12, depths=depths, norm_name="instance",
                      attn_drop_rate=0.4, use_checkpoint=checkpoint, spatial_dims=len(image), downsample=downsample)
        name = downsample if isinstance(downsample, str) else downsample.__name__
        ids = f"{len(image)}d-depths{''.join(map(str, depths))}-{'ckpt' if checkpoint else 'nockpt'}-{name}"
        cases.append(pytest.param(kwargs, image, id=ids))
    return cases


CASES = monai_cases()


@pytest.mark.parametrize("kwargs, image", CASES)
def test_eval_outputs_equal_monai(kwargs: dict, image: tuple[int, ...]) -> None:
    """float64, eval mode (so attention dropout is off): 2-D, the SwinUNETR outputs of MONAI's input shape; 3-D, the
    Swin trunk's maps (SwinUNETR's ``swinViT(x, normalize)``, all that patch_monai replaces) of one volume."""
    torch.manual_seed(0)
    ref = perturbed(swin_unetr.SwinUNETR(**kwargs))
    model = patched_copy(ref)
    trunk = model.swinViT
    assert isinstance(trunk.patch_embed, MonaiPatchEmbed)
    assert all(isinstance(getattr(trunk, f"layers{i}")[0], MonaiSwinStage) for i in range(1, 5))
    assert type(trunk.layers1[0].downsample) is type(ref.swinViT.layers1[0].downsample)  # MONAI's merging, kept
    ref, model = ref.double(), model.double()
    if len(image) == 2:
        run_ref, run_ours, x = ref, model, torch.randn(2, 1, *image, dtype=torch.float64)
    else:
        run_ref, run_ours = (lambda t, m=m: m.swinViT(t, m.normalize) for m in (ref, model))
        x = torch.randn(1, 1, *image, dtype=torch.float64)
    with torch.no_grad():
        expected, got = run_ref(x), run_ours(x)
    expected, got = ([t] if torch.is_tensor(t) else t for t in (expected, got))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item(), msg=lambda m: f"{i}: {m}")


@pytest.mark.parametrize("kwargs, image", CASES)
def test_train_mode_runs_forward_and_backward(kwargs: dict, image: tuple[int, ...]) -> None:
    """Train mode, attention dropout 0.4 in the fused op (and checkpointing where the case has it): the patched
    SwinUNETR maps [B, 1, *image] to [B, 2, *image] and every parameter gets a finite gradient of its shape (B = 2,
    MONAI's, in 2-D; one volume in 3-D)."""
    torch.manual_seed(0)
    model = patched_copy(swin_unetr.SwinUNETR(**kwargs)).train()
    batch = 2 if len(image) == 2 else 1
    x = torch.randn(batch, 1, *image, requires_grad=True)
    out = model(x)
    assert out.shape == (batch, 2, *image)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and bool(torch.isfinite(p.grad).all()), name


def test_one_3d_case_equals_monai_in_full() -> None:
    """The first 3-D case end to end, as MONAI's test runs it (one volume of 64 x 32 x 192, float64, eval mode): the
    SwinUNETR outputs themselves, decoder included, not only the trunk maps the other 3-D cases compare."""
    kwargs, image = CASES[0].values
    torch.manual_seed(0)
    ref = perturbed(swin_unetr.SwinUNETR(**kwargs)).eval()
    ref, model = ref.double(), patched_copy(ref).double()
    x = torch.randn(1, 1, *image, dtype=torch.float64)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert got.shape == expected.shape == (1, 2, *image)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


def test_the_cases_are_monais() -> None:
    """8 cases: 2 depths x 2 images x checkpointing on/off; every merging mode used, the strings in 3-D."""
    assert len(CASES) == 8
    modes = {(len(image), kwargs["downsample"]) for kwargs, image in (c.values for c in CASES)}
    assert modes == {(3, "mergingv2"), (3, "merging"), (2, swin_unetr.PatchMerging), (2, swin_unetr.PatchMergingV2)}
    assert {c.values[0]["use_checkpoint"] for c in CASES} == {True, False}
    assert all(c.values[0]["attn_drop_rate"] == 0.4 for c in CASES)


def test_patching_keeps_the_decoder() -> None:
    """patch_monai touches only the Swin trunk: every other child of a SwinUNETR is the same object after it, so
    equal trunk maps mean equal SwinUNETR outputs (what the 3-D cases above rely on)."""
    model = swin_unetr.SwinUNETR(**CASES[0].values[0])
    others = {name: m for name, m in model.named_children() if name != "swinViT"}
    mf.patch_monai(model)
    assert {name: m for name, m in model.named_children() if name != "swinViT"} == others
    assert isinstance(model.swinViT.patch_embed, MonaiPatchEmbed)
