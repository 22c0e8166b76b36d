"""The ops are real torch ops: ``torch.compile(model, fullgraph=True)`` traces SwinViT3D, MedMAPEncoder and
MedMAPClassifier without a graph break (CPU, torch backend; outputs and gradients equal eager), and every registered
op (the Triton paths) and its backward pass ``torch.library.opcheck`` under the Triton interpreter.

The compile tests use ``backend="aot_eager"``: Dynamo's full-graph capture and AOTAutograd's joint forward/backward
trace through the ops' fake implementations and registered autograd, which is what fullgraph=True asks of the
models, without Inductor's C++ code generation (about 90 s for the tiny SwinViT3D alone on 2 cores).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import medmap_fast as mf
from medmap_fast.kernels import ops
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier
from medmap_fast.models.swin3d import SwinViT3D

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Dynamo traces through the window geometry's lru_caches (pure functions of ints) and says so once per function
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`-wrapped function"),
    # triton 3.6's interpreter converts 1-element arrays to loop indices, which numpy >= 1.25 deprecates
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

# windows of 2 on 8x10x8 volumes (4x5x4 tokens): shifted, padded and shrunk windows in two stages
TINY = dict(in_chans=1, embed_dim=12, window_size=2, patch_size=2, depths=(2, 2), num_heads=(3, 6))
MODALITIES = ["T1", "T2", "FLAIR"]


def _loss(out) -> torch.Tensor:
    tensors = out if isinstance(out, (list, tuple)) else [out]
    return sum((t.float().square().mean() for t in tensors if torch.is_tensor(t)), torch.zeros(()))


def _compiled_equals_eager(model: torch.nn.Module, *args, **kwargs) -> None:
    """Outputs and parameter gradients of ``torch.compile(model, fullgraph=True)`` equal eager's (torch backend),
    both run from the same generator state."""
    torch.manual_seed(0)
    with mf.backend("torch"):
        want = model(*args, **kwargs)
        _loss(want).backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        torch.manual_seed(0)  # random draws (dropout) repeat eager's
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(*args, **kwargs)
        _loss(got).backward()
    got_list, want_list = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_list) == len(want_list)
    for a, b in zip(got_list, want_list):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_swin_compiles_fullgraph() -> None:
    model = SwinViT3D(**TINY, num_modalities=2, modality_gate=True, patch_norm=True)
    _compiled_equals_eager(model, torch.randn(2, 1, 8, 10, 8), modality_ids=torch.tensor([1, 0]))


def test_2d_swin_compiles_fullgraph() -> None:
    """A 2-D trunk (MONAI's spatial_dims=2) runs the 3-D ops with a unit depth axis; that reshaping traces too."""
    model = SwinViT3D(**TINY, spatial_dims=2, use_v2=True)
    _compiled_equals_eager(model, torch.randn(2, 1, 8, 10))


def test_swin_with_attention_dropout_compiles_fullgraph() -> None:
    """Train mode with attention dropout: the compiled graph draws the masks from torch's generator as eager does
    (same seed, same outputs and gradients)."""
    model = SwinViT3D(**TINY, attn_drop_rate=0.3).train()
    _compiled_equals_eager(model, torch.randn(2, 1, 8, 10, 8))


def test_gated_encoder_compiles_fullgraph() -> None:
    model = MedMAPEncoder(modalities=MODALITIES, sharing="gated", **TINY)
    _compiled_equals_eager(model, torch.randn(3, 1, 8, 10, 8), torch.tensor([2, 0, 2]))


@pytest.mark.parametrize("conv_branch", [None, {"stages": [[4], [8]]}], ids=["trunk", "conv-branch"])
def test_classifier_compiles_fullgraph(conv_branch) -> None:
    encoder = MedMAPEncoder(modalities=MODALITIES, sharing="gated", conv_branch=conv_branch, **TINY)
    model = MedMAPClassifier(encoder, 3, torch.randn(len(MODALITIES), 16), dim=16, num_heads=2, dropout=0.0)
    # study 0 has two volumes, study 1 one: key padding in the cross-attention
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        _compiled_equals_eager(model, torch.randn(3, 1, 8, 10, 8), torch.tensor([2, 0, 1]), torch.tensor([0, 1, 0]),
                               num_studies=2)


def test_compiled_model_skips_host_syncing_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The id range and NaN checks sync with the host: eager runs them at the model's entry, compiled code not at
    all (a graph break otherwise), and the ops never (on every call they would sit on the hot path)."""
    model = SwinViT3D(**TINY, num_modalities=2, modality_gate=True)
    x, ids = torch.randn(2, 1, 8, 10, 8), torch.tensor([1, 0])
    syncs = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append(t.shape) or real(t))
    with mf.backend("torch"), torch.no_grad():
        model(x, modality_ids=ids)
        assert syncs == [(2,)]  # the ids' min and max, once per forward
        syncs.clear()
        torch._dynamo.reset()
        torch.compile(model, fullgraph=True, backend="aot_eager")(x, modality_ids=ids)
    assert syncs == []


# ---- opcheck ---------------------------------------------------------------------------------------------------


def _leaf(*shape: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * std).requires_grad_()


def _forward_args(op: str) -> tuple:
    """Small inputs of every feature of ``op``: per-modality weights + fused LayerNorm; shifted, padded windows with
    bias, pad_kv and gate; key padding, pair bias and gate."""
    torch.manual_seed(0)
    if op == "patch_embed_3d":
        return (_leaf(2, 1, 5, 6, 7), _leaf(3, 8, 1, 2, 2, 2, std=0.3), _leaf(3, 8), torch.tensor([2, 0]),
                _leaf(8), _leaf(8), True, 1e-5, torch.float32)
    if op == "window_attention":
        return (_leaf(2, 3, 4, 5, 3 * 2 * 16), _leaf(45, 2, std=0.1), _leaf(64), _leaf(2, 3, 4, 5, 2), None, 2,
                [2, 2, 3], [1, 0, 1], [2, 2, 3], None, 0.0)
    if op == "window_attention dropout":  # a seed and p > 0; one head (one per program with dropout)
        return (_leaf(1, 3, 2, 5, 3 * 16), _leaf(45, 1, std=0.1), _leaf(32), _leaf(1, 3, 2, 5, 1),
                torch.tensor([12345]), 1, [2, 2, 3], [1, 0, 1], [2, 2, 3], None, 0.3)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    return (_leaf(2, 5, 2, 16), _leaf(2, 7, 2, 16), _leaf(2, 7, 2, 16), padding, _leaf(2, 2, 3),
            torch.randint(0, 2, (2, 5)), torch.randint(0, 3, (2, 7)), _leaf(2, 5, 2), None)


def _backward_args(op: str) -> tuple:
    """The backward op's arguments for :func:`_forward_args`, every gradient wanted."""
    args = _forward_args(op)
    detached = [a.detach() if torch.is_tensor(a) else a for a in args]
    with torch.no_grad():
        out = _op(op)(*detached)
    if op == "patch_embed_3d":
        x, weight, bias, ids, ln_weight, ln_bias, layer_norm, eps, _ = detached
        return (torch.randn_like(out), x, weight, bias, ids, ln_weight, ln_bias, layer_norm, eps, [True] * 5)
    out, lse = out
    if op.startswith("window_attention"):
        return (torch.randn_like(out), *detached[:5], out, lse, *detached[5:], [True] * 4)
    return (torch.randn_like(out), *detached[:8], out, lse, detached[8], [True] * 5)


OPS = ["patch_embed_3d", "window_attention", "window_attention dropout", "gated_attention"]


def _op(case: str):
    """The registered op of an OPS case ("window_attention dropout": the window op with a seed and p > 0)."""
    return getattr(ops, case.split()[0])
needs_triton_on_cpu = pytest.mark.skipif(
    not (mf.kernels.triton_available() and mf.kernels.interpreting()),
    reason="the registered ops run Triton kernels: on CPU tensors that needs triton and TRITON_INTERPRET=1 (conftest "
           "sets it without a GPU)")


@needs_triton_on_cpu
@pytest.mark.parametrize("op", OPS)
def test_opcheck_forward(op: str) -> None:
    """Schema, fake implementation, registered autograd (the backward op included) and AOT dispatch."""
    torch.library.opcheck(_op(op), _forward_args(op))


@needs_triton_on_cpu
@pytest.mark.parametrize("op", OPS)
def test_opcheck_backward(op: str) -> None:
    """The backward ops (no autograd of their own)."""
    torch.library.opcheck(getattr(ops, f"{op.split()[0]}_backward"), _backward_args(op))


def test_top_level_kernels_name_is_the_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a checkout, ``kernels/`` is also importable as a top-level ``kernels`` (transformers probes that name with
    importlib.import_module whenever MONAI pulls it in). A second copy of the package would register the ops again,
    freeing the entries the first copy's op handles point to: later op calls then crashed at random."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    assert importlib.import_module("kernels") is mf.kernels
    assert not [name for name in sys.modules if name.startswith("kernels.")]
