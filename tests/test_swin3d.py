"""SwinViT3D against MONAI 1.6.1's SwinTransformer: keys, outputs, gradients, loading, unsupported arguments, the
modality extras (per-modality patch embedding, head-wise gate) and the Triton backend dispatch, in 3-D and 2-D.

Small fp32 models (feature 12, window 5) on 2 x 1 x 30 x 28 x 34 volumes: stage grids 15x14x17, 8x7x9, 4x4x5, 2x2x3,
1x1x2, so windows are padded, shifted, and shrunk below the configured window (MONAI's table_window quirk). The
paper's window 7 (343-token windows) runs once on the same volumes (a window of 7 fits stage 2's side 7 exactly).
2-D (spatial_dims=2, window 5 x 4, two input channels) on 2 x 2 x 37 x 50 images: stage grids 19x25, 10x13, 5x7,
3x4, 2x2, padded, shifted and shrunk alike.
"""

from __future__ import annotations

import pytest
import torch

import medmap_fast.kernels as K
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.swin3d import SwinViT3D

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr", reason="MONAI is needed for the parity tests")

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(in_chans=1, embed_dim=12, window_size=(5, 5, 5), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
             num_heads=(3, 6, 12, 24))
SHAPE = (2, 1, 30, 28, 34)
SMALL_2D = dict(in_chans=2, window_size=(5, 4), patch_size=(2, 2), spatial_dims=2)  # overrides of SMALL
SHAPE_2D = (2, 2, 37, 50)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def monai_swin(**overrides) -> torch.nn.Module:
    model = swin_unetr.SwinTransformer(**{**SMALL, **overrides})
    with torch.no_grad():  # perturb every weight (LayerNorms start at 1 and 0) so that none is trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def loss_of(outs: list[torch.Tensor]) -> torch.Tensor:
    """A fixed random linear functional of every stage map, so every output feeds the gradients."""
    gen = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 2e-4) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3e} for values up to {scale:.3e}"


def run_both(ours: torch.nn.Module, ref: torch.nn.Module, normalize: bool = True, shape: tuple = SHAPE):
    x = torch.randn(shape)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_ref = ours(x_ours, normalize), ref(x_ref, normalize)
    loss_of(out_ours).backward()
    loss_of(out_ref).backward()
    return x_ours, x_ref, out_ours, out_ref


@pytest.mark.parametrize(
    "overrides, normalize, shape",
    [
        (dict(downsample="merging", window_size=(7, 7, 7)), True, SHAPE),
        (dict(downsample="merging", use_v2=True), False, SHAPE),
        (dict(downsample="mergingv2", window_size=(4, 6, 5)), False, SHAPE),
        (dict(downsample="mergingv2", use_v2=True), True, SHAPE),
        (dict(patch_norm=True, qkv_bias=False, use_checkpoint=True, drop_rate=0.1, attn_drop_rate=0.4,
              drop_path_rate=0.2), True, SHAPE),
        (dict(SMALL_2D, downsample="merging"), True, SHAPE_2D),
        (dict(SMALL_2D, downsample="mergingv2", use_v2=True, patch_norm=True, qkv_bias=False, use_checkpoint=True,
              attn_drop_rate=0.4), False, SHAPE_2D),
        (dict(SMALL_2D, window_size=(7, 7), patch_size=(1, 3)), True, SHAPE_2D),
    ],
    ids=["merging-window7", "merging-v2-raw", "mergingv2-anisotropic-raw", "mergingv2-v2", "patchnorm-nobias-ckpt-drop",
         "2d-merging", "2d-mergingv2-v2-patchnorm-nobias-ckpt-raw", "2d-window7-patch1x3"],
)
def test_outputs_and_gradients_match_monai(overrides: dict, normalize: bool, shape: tuple) -> None:
    ref = monai_swin(**overrides)
    ours = SwinViT3D.from_monai(ref).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    x_ours, x_ref, out_ours, out_ref = run_both(ours, ref, normalize, shape)
    assert [o.shape for o in out_ours] == [o.shape for o in out_ref]
    for i, (a, b) in enumerate(zip(out_ours, out_ref)):
        assert_close(a, b, f"stage {i} output")
    assert_close(x_ours.grad, x_ref.grad, "input gradient")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, ref_params[name].grad, f"gradient of {name}")


def test_train_mode_stochastic_depth_matches_monai_with_the_same_seed() -> None:
    """Per-sample drop-path masks draw the same random numbers as MONAI's (element-wise dropout masks do not: our
    tensors are channels-last, MONAI's are not, so the same stream lands on other elements)."""
    ref = monai_swin(drop_path_rate=0.5).train()
    ours = SwinViT3D.from_monai(ref).train()
    x = torch.randn(SHAPE[:1] + (1, 20, 18, 22))
    with torch.no_grad():
        torch.manual_seed(5)
        expected = ref(x)
        torch.manual_seed(5)
        got = ours(x)
        torch.manual_seed(6)
        other = ours(x)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, f"stage {i} output in train mode")
    assert not torch.allclose(other[-1], got[-1])  # the masks are random: another seed drops other paths


def test_state_dict_keys_and_shapes_equal_monai() -> None:
    for overrides in (dict(), dict(use_v2=True, patch_norm=True), dict(qkv_bias=False, downsample="mergingv2"),
                      dict(SMALL_2D, use_v2=True, patch_norm=True), dict(SMALL_2D, downsample="mergingv2")):
        ref = {k: tuple(v.shape) for k, v in swin_unetr.SwinTransformer(**{**SMALL, **overrides}).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in SwinViT3D(**{**SMALL, **overrides}).state_dict().items()}
        assert ours == ref, overrides


def test_channels_last_outputs() -> None:
    outs = SwinViT3D(**SMALL)(torch.randn(SHAPE))
    assert [o.shape[1] for o in outs] == [12, 24, 48, 96, 192]
    assert all(o.permute(0, 2, 3, 4, 1).is_contiguous() for o in outs)
    outs = SwinViT3D(**{**SMALL, **SMALL_2D})(torch.randn(SHAPE_2D))
    sides = [(-(-37 // 2**(i + 1)), -(-50 // 2**(i + 1))) for i in range(5)]
    assert [tuple(o.shape) for o in outs] == [(2, 12 * 2**i, *hw) for i, hw in enumerate(sides)]
    assert all(o.permute(0, 2, 3, 1).is_contiguous() for o in outs)


def test_from_monai_sources_give_the_same_model() -> None:
    ref = monai_swin(downsample="mergingv2")
    unetr = swin_unetr.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, window_size=5, downsample="mergingv2")
    unetr.swinViT.load_state_dict(ref.state_dict())
    prefixed = {f"module.{k}": v for k, v in unetr.state_dict().items()}  # DataParallel(SwinUNETR)
    ssl_style = {"state_dict": {f"module.{k.replace('mlp.linear', 'mlp.fc')}": v for k, v in ref.state_dict().items()}}
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = ref(x)[-1]
        for source in (ref, unetr, prefixed, ssl_style):
            model = SwinViT3D.from_monai(source, **({} if isinstance(source, torch.nn.Module) else
                                                    dict(downsample="mergingv2")))
            assert_close(model(x)[-1], expected, f"from_monai({type(source).__name__})")


@pytest.mark.parametrize("dims", [3, 2])
def test_from_monai_state_dict_infers_the_configuration(dims: int) -> None:
    extra = {} if dims == 3 else dict(SMALL_2D, window_size=(5, 5))
    ref = monai_swin(use_v2=True, patch_norm=True, qkv_bias=False, mlp_ratio=2.0, **extra)
    model = SwinViT3D.from_monai(ref.state_dict())
    for key in ("in_chans", "embed_dim", "window_size", "patch_size", "spatial_dims", "depths", "num_heads",
                "mlp_ratio", "qkv_bias", "patch_norm", "use_v2"):
        assert model.config[key] == SwinViT3D.from_monai(ref).config[key], key
    assert model.config["spatial_dims"] == dims


def test_from_monai_errors_name_the_problem() -> None:
    state = monai_swin().state_dict()
    missing = {k: v for k, v in state.items() if k != "layers2.0.blocks.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"missing 'layers2\.0\.blocks\.1\.attn\.qkv\.weight'"):
        SwinViT3D.from_monai(missing)
    with pytest.raises(ValueError, match=r"unexpected 'head\.weight'"):
        SwinViT3D.from_monai({**state, "head.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"'patch_embed\.proj\.weight' has shape \(12, 1, 2, 2, 2\), expected"):
        SwinViT3D.from_monai(state, patch_size=4)
    with pytest.raises(ValueError, match="downsample"):
        SwinViT3D(**SMALL, downsample="mergingv2").load_monai(monai_swin(downsample="merging"))
    with pytest.raises(ValueError, match="window_size"):
        aniso = swin_unetr.SwinTransformer(**{**SMALL, "window_size": (5, 3, 5)}).state_dict()
        SwinViT3D.from_monai(aniso)
    with pytest.raises(ValueError, match=r"'layers1\.0\.blocks\.0\.attn\.relative_position_index' belongs to another "
                                         r"window than window_size=\(5, 5, 3\)"):
        SwinViT3D.from_monai(aniso, window_size=(5, 5, 3))  # same table size, axes in another order
    assert SwinViT3D.from_monai(aniso, window_size=(5, 3, 5)).window_size == (5, 3, 5)
    with pytest.raises(TypeError, match="source"):
        SwinViT3D.from_monai("weights.pt")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(use_hyena=True), "use_hyena"),
        (dict(hyena_stages=(True, False, False, False)), "hyena_stages"),
        (dict(hyena_kernel_size=5), "hyena_kernel_size"),
    ],
)
def test_unsupported_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        SwinViT3D(**SMALL, **kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(spatial_dims=1), r"^spatial_dims: expected 2 or 3 \(as MONAI's\), got 1$"),
        (dict(spatial_dims=2), r"^window_size: expected a positive int or 2 positive ints, got \(5, 5, 5\)$"),
        (dict(spatial_dims=2, window_size=5), r"^patch_size: expected a positive int or 2 positive ints"),
    ],
)
def test_spatial_dims_and_sizes_are_checked(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SwinViT3D(**{**SMALL, **kwargs})


# shifted and padded windows of 2: two stages on 2 x 8 x 10 x 8 volumes; one stage, one head on 1 x 8 x 8 x 6 for
# the Triton interpreter
TINY = dict(in_chans=1, embed_dim=12, window_size=2, patch_size=2, depths=(2, 2), num_heads=(3, 6))
TINIER = dict(in_chans=1, embed_dim=16, window_size=2, patch_size=2, depths=(2,), num_heads=(1,))


def outputs_and_gradients(model: SwinViT3D, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Every stage map and every parameter gradient of a fixed loss, torch's generator seeded with ``seed`` first."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    outs = model(x)
    loss_of(outs).backward()
    return [o.detach() for o in outs] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_dropout_trains_reproducibly_and_checkpoints_alike(backend: str) -> None:
    """attn_drop_rate (MONAI's argument) drops attention weights in train mode only: the same seed gives the same
    outputs and gradients, another seed others, eval mode none; activation checkpointing, whose recomputation
    restores torch's generators, draws the same masks (the Triton path: the same Philox seeds). Triton under the
    interpreter on CPU."""
    if backend == "triton" and not (K.triton_available() and (K.interpreting() or torch.cuda.is_available())):
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    config, shape = (TINY, (2, 1, 8, 10, 8)) if backend == "torch" else (TINIER, (1, 1, 8, 8, 6))
    model = SwinViT3D(**config, attn_drop_rate=0.3).to(device)
    plain = SwinViT3D(**config).to(device)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(shape, device=device)
    with K.backend(backend):
        first, again, other = (outputs_and_gradients(model, x, seed) for seed in (1, 1, 2))
        model.eval()
        with torch.no_grad():
            evaluated = model(x)
            assert all(torch.equal(a, b) for a, b in zip(evaluated, plain.eval()(x), strict=True))
        model.train()
        for block in model.modules():
            if hasattr(block, "use_checkpoint"):
                block.use_checkpoint = True
        checkpointed = outputs_and_gradients(model, x, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    outputs = len(evaluated)
    assert not torch.allclose(first[-1], other[-1]) and not torch.allclose(first[outputs - 1], evaluated[-1])
    for i, (a, b) in enumerate(zip(checkpointed, first, strict=True)):
        assert_close(a, b, f"checkpointed tensor {i}", rtol=1e-5)


def test_attention_dropout_rate_is_checked() -> None:
    with pytest.raises(ValueError, match=r"attn_drop_rate: expected a probability in \[0, 1\)"):
        SwinViT3D(**SMALL, attn_drop_rate=1.0)


def test_defaults_of_unsupported_arguments_and_unknown_names() -> None:
    SwinViT3D(**SMALL, use_hyena=False, hyena_kernel_size=3, use_flash_attention=True)  # MONAI's defaults: accepted
    SwinViT3D(**SMALL, hyena_stages=(False,) * 4)  # every stage attention, as MONAI reads it
    SwinViT3D(**SMALL, use_hyena=True, hyena_stages=(False,) * 4)  # MONAI: the per-stage flags override use_hyena
    with pytest.raises(ValueError, match=r"hyena_stages: expected None or one bool per stage \(4\)"):
        SwinViT3D(**SMALL, hyena_stages=(False,) * 3)
    with pytest.raises(TypeError, match="not_an_argument"):
        SwinViT3D(**SMALL, not_an_argument=1)
    with pytest.raises(ValueError, match="modality_gate"):
        SwinViT3D(**SMALL, modality_gate=True)
    with pytest.raises(ValueError, match="downsample"):
        SwinViT3D(**SMALL, downsample="pool")


def modality_model(monai_ref: torch.nn.Module, m: int = 3) -> SwinViT3D:
    return SwinViT3D.from_monai(monai_ref, num_modalities=m, modality_gate=True).eval()


def test_modality_extras_keys_and_monai_parity() -> None:
    ref = monai_swin()
    model = modality_model(ref)
    extra = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in ref.state_dict()}
    assert extra == {f"layers{i + 1}.0.blocks.{j}.gate.{p}": (3, 12 * 2**i, h) if p == "weight" else (3, h)
                     for i, h in enumerate(SMALL["num_heads"]) for j in range(2) for p in ("weight", "bias")}
    assert tuple(model.patch_embed.proj.weight.shape) == (3, 12, 1, 2, 2, 2)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        for ids in ([0, 2], [1, 1]):
            assert_close(model(x, modality_ids=torch.tensor(ids))[-1], ref(x)[-1], f"modalities {ids}")


def test_gate_is_exactly_one_at_init_and_wired() -> None:
    ref = monai_swin()
    plain, gated = SwinViT3D.from_monai(ref).eval(), modality_model(ref)
    x, ids = torch.randn(SHAPE), torch.tensor([0, 1])
    gated_out = gated(x, modality_ids=ids)
    with torch.no_grad():
        for a, b in zip(gated_out, plain(x)):
            assert torch.equal(a, b)  # 2 * sigmoid(0) == 1 exactly: bit-identical to the ungated trunk
    loss_of(gated_out).backward()
    gate = gated.layers2[0].blocks[1].gate
    assert gate.weight.grad[:2].abs().sum() > 0 and gate.weight.grad[2].abs().sum() == 0  # modality 2 absent
    with torch.no_grad():
        gate.bias[1].fill_(1.5)  # only modality 1's gate moves
        moved = gated(x, modality_ids=ids)
        before = [o.detach() for o in gated_out]
    assert torch.equal(moved[1][0], before[1][0]) and torch.equal(moved[2][0], before[2][0])  # volume 0: modality 0
    assert not torch.allclose(moved[2][1], before[2][1])  # volume 1: modality 1, gated stage 2 changes it


def test_2d_modality_extras_and_input_check() -> None:
    """2-D: per-modality Conv2d-shaped patch weights [M, C, Cin, ph, pw], gates, MONAI parity at initialisation."""
    ref = monai_swin(**SMALL_2D)
    model = modality_model(ref)
    assert tuple(model.patch_embed.proj.weight.shape) == (3, 12, 2, 2, 2)
    x = torch.randn(SHAPE_2D)
    with torch.no_grad():
        assert_close(model(x, modality_ids=torch.tensor([2, 0]))[-1], ref(x)[-1], "2-D modalities [2, 0]")
    with pytest.raises(ValueError, match=r"x: expected a float tensor \[V, 2, H, W\] with H, W >= \(2, 2\)"):
        model(torch.randn(2, 2, 8, 8, 8), modality_ids=torch.tensor([0, 0]))


def test_encoder_refuses_a_2d_trunk() -> None:
    with pytest.raises(ValueError, match=r"^spatial_dims: expected 3 \(MedMAPEncoder encodes volumes"):
        MedMAPEncoder(spatial_dims=2, window_size=(7, 7), patch_size=(2, 2))


def test_modality_ids_are_checked() -> None:
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="modality_ids"):
        SwinViT3D(**SMALL)(x, modality_ids=torch.tensor([0, 0]))  # a plain trunk takes no ids
    with pytest.raises(ValueError, match="modality_ids"):
        SwinViT3D(**SMALL, num_modalities=3)(x)
    with pytest.raises(ValueError, match="modality_ids"):
        SwinViT3D(**SMALL, num_modalities=3)(x, modality_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"x: expected a float tensor \[V, 1, D, H, W\]"):
        SwinViT3D(**SMALL)(torch.randn(2, 3, 8, 8, 8))


def spy_triton_forwards(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the ops ("patch_embed_3d", "window_attention") whose Triton forward runs, in call order."""
    calls: list[str] = []
    for op in ("patch_embed_3d", "window_attention"):
        name = f"{op}_triton_forward"
        real = getattr(K.ops, name)
        monkeypatch.setattr(K.ops, name, lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    return calls


@pytest.mark.skipif(not K.triton_available(), reason="Triton is not installed")
def test_model_uses_the_triton_backend_when_selected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ops dispatch to their Triton kernels inside ``backend("triton")`` and the trunk output is unchanged."""
    calls = spy_triton_forwards(monkeypatch)
    # shifted and padded windows of 2 on an 8^3 volume keep the interpreter fast
    model = SwinViT3D(in_chans=1, embed_dim=12, window_size=2, patch_size=2, depths=(2, 2), num_heads=(3, 6),
                      num_modalities=2, modality_gate=True).eval()
    x, ids = torch.randn(2, 1, 8, 10, 8), torch.tensor([1, 0])
    with torch.no_grad():
        with K.backend("torch"):
            expected = model(x, modality_ids=ids)
        assert calls == []
        with K.backend("triton"):
            got = model(x, modality_ids=ids)
    assert calls.count("patch_embed_3d") == 1 and calls.count("window_attention") == 4
    for a, b in zip(got, expected):
        assert_close(a, b, "triton vs torch backend", rtol=1e-4)
