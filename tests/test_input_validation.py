"""Input checks of the public entry points: bool index tensors, list ids, volumes thinner than a patch, volumes of
another float dtype, mixed-precision loss inputs, pre-training and classifier arguments, and the kernel ops.

Every rejected input must raise ValueError naming the argument and showing what was received. Tiny models (feature
12, window 4, two stages) on 2 x 1 x 16^3 volumes, one intra-op thread.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import medmap_fast.kernels as mk
from medmap_fast.losses import AsymmetricContrastiveLoss, LabelPromptAlignmentLoss
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import ClassifierOutput, MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.models.swin3d import SwinViT3D

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(embed_dim=12, window_size=4, depths=(2, 2), num_heads=(3, 6))
SWIN = dict(in_chans=1, patch_size=2, **TINY)
TEXT_DIM = 16
BOOL_IDS = r"got shape \(2,\) dtype torch\.bool"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))


def encoder(sharing: str = "gated") -> MedMAPEncoder:
    torch.manual_seed(0)
    return MedMAPEncoder(sharing=sharing, **TINY).eval()


@pytest.fixture(scope="module")
def gated() -> MedMAPEncoder:
    return encoder("gated")


@pytest.fixture(scope="module")
def pretrain() -> MedMAPPretrainModel:
    torch.manual_seed(0)
    return MedMAPPretrainModel(encoder(), text_dim=TEXT_DIM, embed_dim=8).eval()


_CLASSIFIERS: dict[tuple[str, str, int], MedMAPClassifier] = {}


def classifier(task: str = "multiclass", loss: str = "auto", num_classes: int = 3) -> MedMAPClassifier:
    key = (task, loss, num_classes)
    if key not in _CLASSIFIERS:
        torch.manual_seed(0)
        prompts = torch.randn(12, TEXT_DIM)
        _CLASSIFIERS[key] = MedMAPClassifier(encoder(), num_classes, prompts, task=task, loss=loss, dim=16, depth=1,
                                             num_heads=2).eval()
    return _CLASSIFIERS[key]


def assert_all_close(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------------------
# 1. bool tensors are not index tensors
# ------------------------------------------------------------------------------------------------------------------

def test_encoder_rejects_bool_modality_ids(gated, x) -> None:
    with pytest.raises(ValueError, match=rf"^modality_ids: expected a 1-D integer tensor .*{BOOL_IDS}"):
        gated(x, torch.tensor([True, False]))


def test_swin_rejects_bool_modality_ids(x) -> None:
    swin = SwinViT3D(**SWIN, num_modalities=12, modality_gate=True)
    with pytest.raises(ValueError, match=rf"^modality_ids: expected a 1-D integer tensor .*{BOOL_IDS}"):
        swin(x, modality_ids=torch.tensor([True, False]))


def test_contrastive_loss_rejects_bool_study_index() -> None:
    with pytest.raises(ValueError, match=rf"^study_index: expected a 1-D integer tensor .*{BOOL_IDS}"):
        AsymmetricContrastiveLoss()(torch.randn(2, 8), torch.randn(2, 8), torch.tensor([True, False]))


@pytest.mark.parametrize("num_studies", [None, 2])
def test_classifier_rejects_bool_study_index(x, num_studies) -> None:
    model = classifier()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"^study_index: expected a 1-D integer tensor .*{BOOL_IDS}"):
        model(x, torch.tensor([0, 3]), torch.tensor([True, False]), num_studies=num_studies)


# ------------------------------------------------------------------------------------------------------------------
# 2. modality ids given as a list
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, shown", [
    ([0.5, 1.7], r"0\.5"),
    ([0, None], "None"),
    ([True, 0], "True"),
], ids=["floats", "none", "bool"])
def test_encoder_rejects_bad_list_items(gated, x, ids, shown) -> None:
    with pytest.raises(ValueError, match=rf"^modality_ids: expected a list of modality ids .*got an item {shown}$"):
        gated(x, ids)


@pytest.mark.parametrize("ids", [[np.int64(0), np.int64(2)], ["T1", "t2"], [np.int32(0), "T2"]],
                         ids=["numpy-int64", "names", "mixed"])
def test_encoder_list_ids_equal_tensor_ids(gated, x, ids) -> None:
    with torch.no_grad():
        got, want = gated(x, ids), gated(x, torch.tensor([0, 2]))
    assert_all_close(got.features, want.features)
    torch.testing.assert_close(got.tokens, want.tokens)
    torch.testing.assert_close(got.pooled, want.pooled)


# ------------------------------------------------------------------------------------------------------------------
# 3. a side thinner than the patch
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 1, 16, 16), (2, 1, 16, 16, 1)], ids=["depth", "width"])
@pytest.mark.parametrize("num_modalities", [None, 12])
def test_swin_rejects_side_smaller_than_patch(shape, num_modalities) -> None:
    swin = SwinViT3D(**SWIN, num_modalities=num_modalities)
    ids = None if num_modalities is None else torch.tensor([0, 1])
    pattern = rf"^x: expected a float tensor \[V, 1, D, H, W\] with D, H, W >= \(2, 2, 2\), got shape {re_shape(shape)}"
    with pytest.raises(ValueError, match=pattern):
        swin(torch.randn(shape), modality_ids=ids)


def re_shape(shape: tuple[int, ...]) -> str:
    return re.escape(str(tuple(shape)))


# ------------------------------------------------------------------------------------------------------------------
# 4. volumes of another float dtype are cast to the weights' dtype
# ------------------------------------------------------------------------------------------------------------------

def _same_values_in_float32(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x in ``dtype`` and the float32 tensor of the very same values."""
    cast = x.to(dtype)
    return cast, cast.float()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("num_modalities", [None, 12])
def test_swin_casts_volumes_to_weight_dtype(x, dtype, num_modalities) -> None:
    swin = SwinViT3D(**SWIN, num_modalities=num_modalities, modality_gate=num_modalities is not None).eval()
    ids = None if num_modalities is None else torch.tensor([4, 1])
    other, same = _same_values_in_float32(x, dtype)
    with torch.no_grad():
        got, want = swin(other, modality_ids=ids), swin(same, modality_ids=ids)
    assert all(o.dtype == torch.float32 for o in got)
    assert_all_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("sharing", ["gated", "separate"])
def test_encoder_casts_volumes_to_weight_dtype(x, dtype, sharing) -> None:
    enc = encoder(sharing)
    other, same = _same_values_in_float32(x, dtype)
    ids = torch.tensor([3, 0])  # two modalities: "separate" runs two trunks
    with torch.no_grad():
        got, want = enc(other, ids), enc(same, ids)
    assert got.tokens.dtype == got.pooled.dtype == torch.float32
    assert_all_close(got.features, want.features)
    torch.testing.assert_close(got.tokens, want.tokens)
    torch.testing.assert_close(got.pooled, want.pooled)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_pretrain_model_casts_volumes_to_weight_dtype(pretrain, x, dtype) -> None:
    other, same = _same_values_in_float32(x, dtype)
    ids, study, reports = torch.tensor([0, 2]), torch.tensor([0, 1]), torch.randn(2, TEXT_DIM)
    with torch.no_grad():
        got, want = pretrain(other, ids, study, reports), pretrain(same, ids, study, reports)
    assert got.loss.dtype == got.volume_emb.dtype == torch.float32
    assert_all_close(got[:3], want[:3])


def test_pretrain_model_casts_float64_report_embeddings(pretrain, x) -> None:
    reports = torch.randn(2, TEXT_DIM, dtype=torch.float64)
    with torch.no_grad():
        got, want = pretrain.embed_reports(reports), pretrain.embed_reports(reports.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
        out = pretrain(x, torch.tensor([0, 2]), torch.tensor([0, 1]), reports)
        ref = pretrain(x, torch.tensor([0, 2]), torch.tensor([0, 1]), reports.float())
    assert_all_close(out[:3], ref[:3])


def test_float64_volumes_are_cast_under_autocast_too(x) -> None:
    """Autocast leaves float64 alone (a convolution would fail on float64 volumes and bf16 weights): cast here."""
    enc = encoder()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = enc(x.double(), torch.tensor([3, 0])), enc(x, torch.tensor([3, 0]))
    assert torch.equal(got.tokens, want.tokens)


@pytest.mark.parametrize("sharing", ["gated", "separate"])
def test_encoder_runs_under_cpu_bf16_autocast(x, sharing) -> None:
    enc = encoder(sharing)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x, torch.tensor([3, 0]))
    assert out.tokens.dtype in (torch.bfloat16, torch.float32)
    assert out.tokens.shape == (2, 8, 48)  # 16^3 -> 8^3 -> 4^3 -> 2^3 tokens
    for t in (out.tokens, out.pooled, *out.features):
        assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------------------------------------------
# 5. losses with one float64 and one float32 input compute in float64
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["volume", "report"])
def test_contrastive_loss_mixed_float64_float32(which) -> None:
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    study = torch.tensor([0, 0, 1, 2, 2])
    loss_fn = AsymmetricContrastiveLoss()
    mixed = loss_fn(v.float(), t, study) if which == "volume" else loss_fn(v, t.float(), study)
    exact = loss_fn(v.float().double(), t, study) if which == "volume" else loss_fn(v, t.float().double(), study)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, exact)


@pytest.mark.parametrize("target", ["indices", "multi-hot"])
@pytest.mark.parametrize("which", ["features", "prompts"])
def test_alignment_loss_mixed_float64_float32(which, target) -> None:
    g = torch.Generator().manual_seed(4)
    f, p = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2]) if target == "indices" else (torch.rand(4, 3, generator=g) > 0.5).float()
    loss_fn = LabelPromptAlignmentLoss()
    f_mixed, p_mixed = (f.float(), p) if which == "features" else (f, p.float())
    assert loss_fn.logits(f_mixed, p_mixed).dtype == torch.float64
    mixed, exact = loss_fn(f_mixed, p_mixed, y), loss_fn(f_mixed.double(), p_mixed.double(), y)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, exact)


# ------------------------------------------------------------------------------------------------------------------
# 6. MedMAPPretrainModel.forward names the right argument
# ------------------------------------------------------------------------------------------------------------------

def test_pretrain_3d_volume_names_volumes(pretrain) -> None:
    with pytest.raises(ValueError,
                       match=r"^volumes: expected a float tensor \[V, 1, D, H, W\].*got shape \(16, 16, 16\)"):
        pretrain(torch.randn(16, 16, 16), torch.tensor([0]), torch.tensor([0]), torch.randn(1, TEXT_DIM))


def test_pretrain_no_reports_names_reports(pretrain, x) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match=r"^report_emb(eddings)?: expected .*got shape \(0, \d+\)"):
        pretrain(x, torch.tensor([0, 2]), torch.tensor([0, 0]), torch.randn(0, TEXT_DIM))


@pytest.mark.parametrize("study", [[0, 1, 1], [0]], ids=["long", "short"])
def test_pretrain_study_index_wrong_length(pretrain, x, study) -> None:
    pattern = rf"^study_index: expected a 1-D integer tensor \[2\] .*got shape \({len(study)},\)"
    with torch.no_grad(), pytest.raises(ValueError, match=pattern):
        pretrain(x, torch.tensor([0, 2]), torch.tensor(study), torch.randn(2, TEXT_DIM))


# ------------------------------------------------------------------------------------------------------------------
# 7. MedMAPClassifier: list ids, num_studies, binary / multi-label labels
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[3, 0], ["flair", "T1"], [np.int64(3), "t1"]], ids=["ints", "names", "mixed"])
def test_classifier_accepts_list_ids(x, ids) -> None:
    model = classifier()
    study = torch.tensor([0, 0])
    with torch.no_grad():
        got, want = model(x, ids, study), model(x, torch.tensor([3, 0]), study)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.features, want.features)


@pytest.mark.parametrize("num_studies, shown", [(2.0, r"2\.0"), (0, "0"), (True, "True"), (-1, "-1")])
def test_classifier_rejects_bad_num_studies(x, num_studies, shown) -> None:
    model = classifier()
    with torch.no_grad(), pytest.raises(ValueError,
                                        match=rf"^num_studies: expected None or a positive int.*got {shown}$"):
        model(x, torch.tensor([0, 3]), torch.tensor([0, 1]), num_studies=num_studies)


@pytest.mark.parametrize("num_studies", [2, np.int64(2)], ids=["int", "numpy-int64"])
def test_classifier_accepts_integral_num_studies(x, num_studies) -> None:
    model = classifier()
    ids, study = torch.tensor([0, 3]), torch.tensor([1, 0])
    with torch.no_grad():
        got, want = model(x, ids, study, num_studies=num_studies), model(x, ids, study)
    assert got.logits.shape == (2, 3)
    torch.testing.assert_close(got.logits, want.logits)


S, K = 2, 3


def binary_output(task: str, loss: str) -> tuple[MedMAPClassifier, ClassifierOutput]:
    model = classifier(task, loss, num_classes=1 if task == "binary" else K)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5)),
                    torch.tensor([0, 3]), torch.tensor([0, 1]))
    assert out.logits.shape == (S, 1 if task == "binary" else K)
    return model, out


TASK_LOSS = [(t, l) for t in ("binary", "multilabel") for l in ("bce", "focal")]


def bad_labels(task: str) -> list[tuple[object, str]]:
    """(labels, regex for what the message must show) that compute_loss must reject."""
    shape = (S,) if task == "binary" else (S, K)
    ones = torch.ones(shape)
    two, nan = ones.clone(), ones.clone()
    two.view(-1)[0], nan.view(-1)[-1] = 2.0, float("nan")
    minus = ones.long()
    minus.view(-1)[0] = -1
    wrong = (1, 2) if task == "binary" else (1, 6)  # right element count, wrong shape
    n = ones.numel()
    return [
        (two, rf"got 1 of {n} outside \[0, 1\] or NaN, e\.g\. 2\.0$"),
        (two.long(), rf"got 1 of {n} outside \[0, 1\] or NaN, e\.g\. 2\.0$"),
        (minus, rf"got 1 of {n} outside \[0, 1\] or NaN, e\.g\. -1\.0$"),
        (nan, rf"got 1 of {n} outside \[0, 1\] or NaN, e\.g\. nan$"),
        (ones * float("inf"), rf"got {n} of {n} outside \[0, 1\] or NaN, e\.g\. inf$"),
        (torch.ones(wrong), rf"got shape {re_shape(wrong)} dtype torch\.float32"),
        (torch.ones(wrong, dtype=torch.long), rf"got shape {re_shape(wrong)} dtype torch\.int64"),
        (ones.tolist(), "got list"),
    ]


@pytest.mark.parametrize("task, loss", TASK_LOSS)
def test_classifier_compute_loss_rejects_bad_labels(task, loss) -> None:
    model, out = binary_output(task, loss)
    shapes = r"\(2,\) or \(2, 1\)" if task == "binary" else r"\(2, 3\)"
    for labels, shown in bad_labels(task):
        with pytest.raises(ValueError, match=rf"^labels: expected labels in \[0, 1\] of shape {shapes}, {shown}"):
            model.compute_loss(out, labels)


@pytest.mark.parametrize("task, loss", TASK_LOSS)
def test_classifier_compute_loss_accepts_valid_labels(task, loss) -> None:
    model, out = binary_output(task, loss)
    if task == "binary":
        base = torch.tensor([0, 1])
        variants = [base, base.float(), base[:, None], base[:, None].float(), base.bool()]
    else:
        base = torch.tensor([[1, 0, 1], [0, 0, 1]])
        variants = [base, base.float(), base.bool()]
    losses = [model.compute_loss(out, labels) for labels in variants]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses)
    for v in losses[1:]:
        torch.testing.assert_close(v, losses[0])
    soft = model.compute_loss(out, torch.full(tuple(base.shape), 0.5))  # soft targets in [0, 1] are labels too
    assert torch.isfinite(soft)


# ------------------------------------------------------------------------------------------------------------------
# 8. kernel ops
# ------------------------------------------------------------------------------------------------------------------

PE_WEIGHT = torch.randn(12, 1, 2, 2, 2)
PE_X = torch.randn(2, 1, 8, 8, 8)


def test_patch_embed_valid_call() -> None:
    assert mk.patch_embed_3d(PE_X, PE_WEIGHT).shape == (2, 4, 4, 4, 12)


@pytest.mark.parametrize("bad_x, shown", [
    (PE_X.long(), r"got shape \(2, 1, 8, 8, 8\) dtype torch\.int64"),
    (PE_X > 0, r"got shape \(2, 1, 8, 8, 8\) dtype torch\.bool"),
    (PE_X.numpy(), "got ndarray"),
], ids=["int64", "bool", "numpy"])
def test_patch_embed_rejects_non_float_x(bad_x, shown) -> None:
    with pytest.raises(ValueError, match=rf"^x: expected a float tensor \[V, 1, D, H, W\].*{shown}"):
        mk.patch_embed_3d(bad_x, PE_WEIGHT)


def test_patch_embed_rejects_4d_weight() -> None:
    with pytest.raises(ValueError, match=r"^weight: expected a float tensor .*got shape \(12, 1, 2, 2\) dtype"):
        mk.patch_embed_3d(PE_X, PE_WEIGHT[..., 0])


def test_patch_embed_rejects_bad_bias() -> None:
    with pytest.raises(ValueError, match=r"^bias: expected a float tensor \[M, C\] \(or \[C\] for a 5-D weight\), got "
                                         r"shape \(12,\) dtype torch\.int64"):
        mk.patch_embed_3d(PE_X, PE_WEIGHT, torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^bias: expected the dtype of x, torch\.float32, got shape \(1, 12\) "
                                         r"dtype torch\.float64"):
        mk.patch_embed_3d(PE_X, PE_WEIGHT, torch.zeros(12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^bias: expected a float tensor .*got list"):
        mk.patch_embed_3d(PE_X, PE_WEIGHT, [0.0] * 12)


def test_patch_embed_rejects_dtype_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^weight: expected the dtype of x, torch\.float64, got shape "
                                         r"\(1, 12, 1, 2, 2, 2\) dtype torch\.float32"):
        mk.patch_embed_3d(PE_X.double(), PE_WEIGHT)


QKV = torch.randn(1, 4, 4, 4, 36)  # 3C = 36: C = 12, 3 heads


def test_window_attention_valid_call() -> None:
    assert mk.window_attention(QKV, 3, (4, 4, 4), gate_logits=torch.zeros(1, 4, 4, 4, 3)).shape == (1, 4, 4, 4, 12)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(qkv=QKV.long()), r"^qkv: expected a float tensor .*got shape \(1, 4, 4, 4, 36\) dtype torch\.int64"),
    (dict(num_heads=0), r"^num_heads: expected a positive int, got 0$"),
    (dict(window_size=(4, 4)), r"^window_size: expected 3 non-negative ints, got \(4, 4\)$"),
    (dict(qkv=QKV[:, :0]), r"^qkv: expected a float tensor .*every size >= 1.*got shape \(1, 0, 4, 4, 36\)"),
    (dict(qkv=QKV[:0]), r"^qkv: expected .*got shape \(0, 4, 4, 4, 36\)"),
    (dict(gate_logits=torch.zeros(1, 4, 4, 4, 3, dtype=torch.long)),
     r"^gate_logits: expected a float tensor \(1, 4, 4, 4, 3\), got shape \(1, 4, 4, 4, 3\) dtype torch\.int64"),
    (dict(num_heads=True), r"^num_heads: expected a positive int, got True$"),
    (dict(window_size=(True, True, True)), r"^window_size: expected 3 non-negative ints, got \(True, True, True\)$"),
    (dict(bias_table=torch.zeros(343, 3, dtype=torch.long)),
     r"^bias_table: expected a float tensor \(343, 3\), got shape \(343, 3\) dtype torch\.int64"),
], ids=["int-qkv", "zero-heads", "2d-window", "empty-depth", "empty-batch", "int-gate", "bool-heads", "bool-window",
        "int-bias-table"])
def test_window_attention_rejects(kwargs, pattern) -> None:
    args = dict(qkv=QKV, num_heads=3, window_size=(4, 4, 4)) | kwargs
    with pytest.raises(ValueError, match=pattern):
        mk.window_attention(**args)


def gated_inputs(**overrides) -> dict[str, object]:
    g = torch.Generator().manual_seed(6)
    return dict(q=torch.randn(2, 5, 2, 8, generator=g), k=torch.randn(2, 7, 2, 8, generator=g),
                v=torch.randn(2, 7, 2, 8, generator=g)) | overrides


def test_gated_attention_valid_shared_modality() -> None:
    out = mk.gated_attention(**gated_inputs(pair_bias=torch.randn(2, 2, 3), q_modality=torch.zeros(5, dtype=torch.long),
                                           k_modality=torch.zeros(7, dtype=torch.long)))
    assert out.shape == (2, 5, 2, 8)


@pytest.mark.parametrize("name, value", [
    ("pair_bias", [[[0.0] * 3] * 2] * 2),
    ("gate_logits", [[[0.0] * 2] * 5] * 2),
    ("pair_bias", torch.zeros(2, 2, 3, dtype=torch.long)),
])
def test_gated_attention_rejects_non_float_bias_and_gate(name, value) -> None:
    kwargs = gated_inputs(**{name: value})
    if name == "pair_bias":
        kwargs.update(q_modality=torch.zeros(5, dtype=torch.long), k_modality=torch.zeros(7, dtype=torch.long))
    shown = "list" if isinstance(value, list) else r"shape \(2, 2, 3\) dtype torch\.int64"
    with pytest.raises(ValueError, match=rf"^{name}: expected a float tensor .*got {shown}$"):
        mk.gated_attention(**kwargs)


def test_gated_attention_rejects_list_padding_mask() -> None:
    mask = [[False] * 7, [False] * 6 + [True]]
    with pytest.raises(ValueError, match=r"^key_padding_mask: expected a bool tensor \[2, 7\].*got list$"):
        mk.gated_attention(**gated_inputs(key_padding_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=str)
def test_gated_attention_rejects_non_integer_shared_q_modality(dtype) -> None:
    kwargs = gated_inputs(pair_bias=torch.randn(2, 2, 3), q_modality=torch.zeros(5, dtype=dtype),
                          k_modality=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"^q_modality: expected integer modality ids \[2, 5\] \(or \[5\] shared "
                                         rf"by the batch\).*got shape \(5,\) dtype {re.escape(str(dtype))}"):
        mk.gated_attention(**kwargs)
