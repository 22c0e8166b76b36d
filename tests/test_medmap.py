"""MedMAPPretrainModel and MedMAPClassifier: training steps lower the loss, study packing, key padding for missing
modalities, stage-1 -> stage-2 weight transfer, checkpoint round trip, validation errors."""

from __future__ import annotations

import pytest
import torch

from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.fusion import masked_max, masked_mean, pack_by_study
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel

TINY = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4)
TEXT_DIM = 16


def tiny_encoder(**kwargs) -> MedMAPEncoder:
    return MedMAPEncoder(**{**TINY, **kwargs})


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three studies with 2, 1 and 3 volumes of mixed modalities (16^3)."""
    g = torch.Generator().manual_seed(0)
    return {
        "volumes": torch.randn(6, 1, 16, 16, 16, generator=g),
        "modality_ids": torch.tensor([0, 3, 6, 0, 2, 5]),
        "study_index": torch.tensor([0, 0, 1, 2, 2, 2]),
        "reports": torch.randn(3, TEXT_DIM, generator=g),
        "labels": torch.tensor([0, 2, 1]),
    }


def train_steps(model: torch.nn.Module, step, steps: int = 20, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = step()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_pretrain_step_lowers_loss(batch) -> None:
    torch.manual_seed(0)
    model = MedMAPPretrainModel(tiny_encoder(), text_dim=TEXT_DIM, embed_dim=32)
    losses = train_steps(model, lambda: model(batch["volumes"], batch["modality_ids"], batch["study_index"],
                                              batch["reports"]).loss)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def classifier(task: str = "multiclass", num_classes: int = 3, **kwargs) -> MedMAPClassifier:
    torch.manual_seed(0)
    prompts = torch.randn(12, TEXT_DIM)
    return MedMAPClassifier(tiny_encoder(), num_classes, prompts, task=task, dim=32, num_heads=4, dropout=0.0,
                            **kwargs)


@pytest.mark.parametrize("task,labels", [
    ("multiclass", torch.tensor([0, 2, 1])),
    ("binary", torch.tensor([0, 1, 1])),
    ("multilabel", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
])
def test_classifier_step_lowers_loss(batch, task: str, labels: torch.Tensor) -> None:
    model = classifier(task, num_classes=1 if task == "binary" else 3)

    def step():
        out = model(batch["volumes"], batch["modality_ids"], batch["study_index"])
        return model.compute_loss(out, labels)
    losses = train_steps(model, step)
    assert losses[-1] < 0.5 * losses[0], losses
    out = model(batch["volumes"], batch["modality_ids"], batch["study_index"])
    assert out.logits.shape == (3, 1 if task == "binary" else 3)


def test_classifier_gradients_are_bit_reproducible_on_cpu() -> None:
    """Seeded CPU training repeats exactly only if every gradient does: per-modality weights, gate biases, the
    relative-position table and the modality-pair bias are gathered by id, and plain advanced indexing sums the
    repeated rows in a thread-dependent order on CPU (the demo's seeded runs differed in the 4th decimal)."""
    torch.manual_seed(0)
    encoder = MedMAPEncoder(embed_dim=24, patch_size=4, depths=(2, 2), num_heads=(3, 6), window_size=4)
    model = MedMAPClassifier(encoder, 6, torch.randn(12, TEXT_DIM), dim=32, num_heads=4, dropout=0.0).eval()
    volumes = torch.randn(24, 1, 32, 32, 32)
    modality_ids, study_index = torch.arange(24) % 12, torch.arange(24) // 3
    labels = torch.arange(8) % 6

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(volumes, modality_ids, study_index)
        model.compute_loss(out, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the order only varies with several threads
    try:
        first = gradients()
        differing = {n for _ in range(3) for n, g in gradients().items() if not torch.equal(g, first[n])}
    finally:
        torch.set_num_threads(threads)
    assert not differing


def test_classifier_with_label_prompt_alignment(batch) -> None:
    model = classifier(label_embeddings=torch.randn(3, TEXT_DIM))
    out = model(batch["volumes"], batch["modality_ids"], batch["study_index"])
    with_align = model.compute_loss(out, batch["labels"])
    model.align_weight = 0.0
    assert not torch.allclose(with_align, model.compute_loss(out, batch["labels"]))


def test_pack_by_study_keeps_order_and_pads() -> None:
    tokens = torch.arange(5 * 2 * 1, dtype=torch.float32).view(5, 2, 1)
    packed = pack_by_study(tokens, torch.tensor([4, 1, 2, 3, 0]), torch.tensor([1, 0, 1, 1, 0]), 2)
    assert packed.tokens.shape == (2, 6, 1)
    assert packed.tokens[0, :4, 0].tolist() == [2, 3, 8, 9]          # volumes 1 and 4, batch order
    assert packed.tokens[1, :, 0].tolist() == [0, 1, 4, 5, 6, 7]      # volumes 0, 2, 3
    assert packed.padding[0].tolist() == [False] * 4 + [True] * 2
    assert not packed.padding[1].any()
    assert packed.modality[0, :4].tolist() == [1, 1, 0, 0]


def test_masked_max_ignores_padding() -> None:
    x = torch.tensor([[[1.0, -5.0], [9.0, 9.0], [2.0, -1.0]]])
    padding = torch.tensor([[False, True, False]])
    assert masked_max(x, padding).tolist() == [[2.0, -1.0]]
    assert masked_mean(x, padding).tolist() == [[1.5, -3.0]]


@pytest.mark.parametrize("pool,width", [("mean", 2), ("max", 2), ("mean_max", 4)])
def test_cct_pooling(batch, pool: str, width: int) -> None:
    model = classifier(pool=pool)
    out = model(batch["volumes"], batch["modality_ids"], batch["study_index"])
    assert out.features.shape == (3, width * model.cct.layers[0].a_from_b.q.in_features)
    assert out.logits.shape == (3, 3)
    with pytest.raises(ValueError, match="pool: expected one of"):
        classifier(pool="sum")


@pytest.mark.parametrize("pool", ["mean", "max", "mean_max"])
def test_missing_modalities_do_not_leak(batch, pool: str) -> None:
    """A study's prediction depends only on its own volumes, however many slots other studies need."""
    model = classifier(pool=pool).eval()
    with torch.no_grad():
        full = model(batch["volumes"], batch["modality_ids"], batch["study_index"]).logits
        alone = model(batch["volumes"][2:3], batch["modality_ids"][2:3], torch.tensor([0])).logits
    torch.testing.assert_close(full[1], alone[0], rtol=1e-5, atol=1e-5)


def test_stage1_weights_reach_stage2(tmp_path, batch) -> None:
    pre = MedMAPPretrainModel(tiny_encoder(), text_dim=TEXT_DIM, embed_dim=32)
    train_steps(pre, lambda: pre(batch["volumes"], batch["modality_ids"], batch["study_index"],
                                 batch["reports"]).loss, steps=2)
    pre.save_pretrained(tmp_path / "stage1")
    reloaded = MedMAPPretrainModel.from_pretrained(tmp_path / "stage1")
    for key, value in pre.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    model = classifier().load_pretrained_encoder(tmp_path / "stage1")
    for key, value in pre.encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key]), key


def test_stage1_of_another_config_is_refused(tmp_path) -> None:
    MedMAPPretrainModel(tiny_encoder(embed_dim=24), text_dim=TEXT_DIM).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"source: expected an encoder of this classifier's architecture, got one "
                                         r"that differs in embed_dim: 12 vs 24 \(this classifier's vs the source's\)$"):
        classifier().load_pretrained_encoder(tmp_path / "other")
    with pytest.raises(ValueError, match=r"differs in modalities: .* vs \('T1', 'T2'\)"):
        classifier().load_pretrained_encoder(tiny_encoder(modalities=["T1", "T2"]))


def test_stage1_with_other_training_settings_or_explicit_defaults_loads() -> None:
    """Only what gives the weights their meaning must agree: dropout, drop path and checkpointing may differ, and a
    default passed explicitly is the same architecture."""
    source = tiny_encoder(mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.2, use_checkpoint=True)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    model = classifier().load_pretrained_encoder(source)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(), source.state_dict().values()))


def test_pretrain_checkpoint_errors_name_the_file(tmp_path) -> None:
    MedMAPPretrainModel(tiny_encoder(), text_dim=TEXT_DIM, embed_dim=32).save_pretrained(tmp_path / "a")
    MedMAPPretrainModel(tiny_encoder(), text_dim=TEXT_DIM, embed_dim=16).save_pretrained(tmp_path / "b")
    heads, config = tmp_path / "a" / "heads.safetensors", tmp_path / "a" / "heads.json"
    good_heads, good_config = heads.read_bytes(), config.read_text()
    heads.write_bytes((tmp_path / "b" / "heads.safetensors").read_bytes())  # a joint space of 16, not 32
    with pytest.raises(ValueError, match=r"a/heads\.safetensors: weights do not match the heads of heads\.json: "
                                         r"'vision_proj\.weight' has shape \(16, 192\), expected \(32, 192\)"):
        MedMAPPretrainModel.from_pretrained(tmp_path / "a")
    heads.write_bytes(good_heads[:100])
    with pytest.raises(ValueError, match=r"a/heads\.safetensors: not a readable safetensors file"):
        MedMAPPretrainModel.from_pretrained(tmp_path / "a")
    heads.write_bytes(good_heads)
    for text, pattern in [("{", "not valid JSON"), ("[]", "expected a JSON object"),
                          (good_config.replace('"text_dim": 16', '"text_dim": "16"'), "expected 'text_dim' to be int"),
                          (good_config.replace('"lam"', '"lamda"'), "describes no valid MedMAPPretrainModel"),
                          ('{"text_dim": 16}', "expected a medmap-fast/MedMAPPretrainModel configuration")]:
        config.write_text(text)
        with pytest.raises(ValueError, match=r"a/heads\.json: " + pattern):
            MedMAPPretrainModel.from_pretrained(tmp_path / "a")
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"a/heads\.json: not found"):
        MedMAPPretrainModel.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("bad,match", [
    (dict(study_index=torch.tensor([0, 0, 1, 1, 1, 1])), "study_index: expected at least one volume"),
    (dict(study_index=torch.tensor([0, 0, 1])), r"study_index: expected a 1-D integer tensor \[6\]"),
])
def test_classifier_validation(batch, bad, match) -> None:
    args = {**batch, **bad}
    with pytest.raises(ValueError, match=match):
        classifier()(args["volumes"], args["modality_ids"], args["study_index"], num_studies=3)


def test_pretrain_validation(batch) -> None:
    model = MedMAPPretrainModel(tiny_encoder(), text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match=r"report_embeddings: expected a float tensor \[S, 16\]"):
        model(batch["volumes"], batch["modality_ids"], batch["study_index"], torch.randn(3, 8))
    with pytest.raises(ValueError, match="study_index"):
        model(batch["volumes"], batch["modality_ids"], torch.tensor([0, 0, 1, 2, 2, 3]), batch["reports"])
    with pytest.raises(ValueError, match="prompt_embeddings"):
        MedMAPClassifier(tiny_encoder(), 3, torch.randn(5, TEXT_DIM))
