"""Loaders over the cache: augmentation against a direct numpy construction, the torch and DALI (CPU backend)
loaders giving the same batches, sharding, resume, worker-count independence, labels, and bad cache files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmap_fast.data.augment import AugmentConfig, AugmentParams, apply, sample_params
from medmap_fast.data.cache import CacheEntry, LabelSpace, read_index, study_files, write_index
from medmap_fast.data.loaders import dali_importable, make_loader

NAMES = ("T1", "T2", "FLAIR")
SIZE = (8, 8, 6)


def write_cache(root: Path, shapes: list[tuple[int, int, int, int]], labels: list | None = None,
                seed: int = 0) -> list[CacheEntry]:
    """A cache of float16 studies [M, X, Y, Z] (modalities NAMES[:M]); modality m > 0 = modality 0 * (m + 1) + m on
    the values (small multiples of 1/8, so exact in float16), to see that every modality got the same transform."""
    rng = np.random.default_rng(seed)
    entries = []
    for i, shape in enumerate(shapes):
        base = rng.integers(-16, 16, shape[1:]) / 8
        array = np.stack([base * (m + 1) + m for m in range(shape[0])]).astype(np.float16)
        npy, _ = study_files(root, f"s{i:02d}")
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, array)
        entries.append(CacheEntry(f"s{i:02d}", "train", f"report {i}", labels[i] if labels else None,
                                  NAMES[: shape[0]], tuple(shape), (1.5, 1.5, 1.5), str(npy.relative_to(root))))
    write_index(root, entries)
    return read_index(root)


MIXED = [(1 + i % 3, 7 + i % 5, 10 - i % 4, 5 + i % 3) for i in range(10)]  # variable M; sides above and below SIZE
TRAIN = AugmentConfig(size=(8, 8, 6), random_crop=True, flip=(0.5, 0.5, 0.5), rot90=True, scale=0.2, shift=0.3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CacheEntry]]:
    root = tmp_path_factory.mktemp("cache")
    return root, write_cache(root, MIXED)


def loader(cache: tuple[Path, list[CacheEntry]], **kw):
    root, entries = cache
    args = dict(modality_names=NAMES, labels=None, augment=TRAIN, batch_size=3, shuffle=True, seed=7)
    return make_loader(entries, root, **{**args, **kw})


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                torch.testing.assert_close(x[key], y[key].cpu(), rtol=0, atol=0)
            else:
                assert x[key] == y[key], key


def reference(x: np.ndarray, p: AugmentParams, size: tuple[int, int, int]) -> np.ndarray:
    """Pad generously with zeros, slice, flip, rot90, scale: the transform written the plain numpy way."""
    pad = max(size)
    padded = np.pad(x.astype(np.float32), [(0, 0)] + [(pad, pad)] * 3)
    out = padded[(slice(None), *(slice(s + pad, s + pad + n) for s, n in zip(p.start, size)))]
    for axis, f in enumerate(p.flip):
        if f:
            out = np.flip(out, axis + 1)
    out = np.rot90(out, p.k, axes=(1, 2))
    return out * p.scale[:, None, None, None] + p.shift[:, None, None, None]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("start, flip", [((1, 2, 3), (False, False, False)),   # crop inside
                                         ((-2, 0, -1), (True, False, False)),  # padded on X and Z
                                         ((3, -3, 0), (False, True, True)),
                                         ((-1, -1, -2), (True, True, True))])
def test_apply_matches_numpy(tmp_path: Path, k: int, start: tuple[int, int, int],
                             flip: tuple[bool, bool, bool]) -> None:
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 9, 7, 10)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    size = (6, 6, 7)
    p = AugmentParams(start, flip, k, np.array([1.1, 0.9], np.float32), np.array([0.2, -0.1], np.float32))
    want = reference(x, p, size)
    np.testing.assert_array_equal(apply(np.load(tmp_path / "x.npy", mmap_mode="r"), p, size).numpy(), want)
    np.testing.assert_array_equal(apply(np.load(tmp_path / "x.npy"), p, size).numpy(), want)  # read whole
    np.testing.assert_array_equal(apply(torch.from_numpy(x), p, size).numpy(), want)
    x32 = torch.from_numpy(x.astype(np.float32))
    np.testing.assert_array_equal(apply(x32, p, size).numpy(), want)
    assert torch.equal(x32, torch.from_numpy(x.astype(np.float32)))  # scaled and shifted in a copy, not in place


def test_sample_params_placement() -> None:
    cfg = AugmentConfig(size=(8, 8, 8))
    rng = np.random.default_rng(0)
    starts = np.array([sample_params(rng, (12, 8, 5), 2, cfg).start for _ in range(400)])
    assert set(starts[:, 0]) == set(range(0, 5))  # crop inside, every placement
    assert set(starts[:, 1]) == {0}
    assert set(starts[:, 2]) == set(range(-3, 1))  # study inside the padded volume, every offset
    p = sample_params(rng, (12, 8, 5), 2, AugmentConfig.eval((8, 8, 8)))
    assert p.start == (2, 0, -2) and p.flip == (False,) * 3 and p.k == 0
    assert p.scale.tolist() == [1.0, 1.0] and p.shift.tolist() == [0.0, 0.0]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="augment.rot90"):
        AugmentConfig(size=(8, 6, 8), rot90=True)
    with pytest.raises(ValueError, match="augment.flip"):
        AugmentConfig(flip=(0.5, 2.0, 0.0))
    with pytest.raises(ValueError, match="augment.size"):
        AugmentConfig(size=(8, 8))


NEEDS_DALI = pytest.mark.skipif(not dali_importable(), reason="nvidia-dali is not installed")
KINDS = ["torch", pytest.param("dali", marks=NEEDS_DALI)]


@pytest.mark.parametrize("kind", KINDS)
def test_modalities_share_spatial_transform(cache, kind: str) -> None:
    """Without intensity augmentation, modality m stays modality 0 * (m + 1) + m wherever the study is (not padding)."""
    cfg = AugmentConfig(size=SIZE, rot90=True, flip=(0.5, 0.5, 0.5), scale=0.0, shift=0.0)
    root, entries = cache
    big = [e for e in entries if all(s >= n for s, n in zip(e.shape[1:], SIZE)) and e.shape[0] > 1]
    assert big
    ld = make_loader(big, root, modality_names=NAMES, labels=None, augment=cfg, batch_size=2, shuffle=True,
                     seed=3, kind=kind)
    for epoch in range(4):
        for batch in ld.epoch(epoch):
            v, sidx = batch["volumes"][:, 0], batch["study_index"]
            for s in range(batch["num_studies"]):
                vols = v[sidx == s]
                for m in range(1, len(vols)):
                    torch.testing.assert_close(vols[m], vols[0] * (m + 1) + m, rtol=0, atol=0)


def test_eval_is_deterministic_centre_crop(cache) -> None:
    root, entries = cache
    ld = loader(cache, augment=AugmentConfig.eval(SIZE), shuffle=False)
    first, again = list(ld.epoch(0)), list(ld.epoch(5))
    assert_same_batches(first, again)
    assert first[0]["study_ids"] == [e.study_id for e in entries[:3]]
    x = entries[0].load(root)
    starts = [(side - n) // 2 for side, n in zip(x.shape[1:], SIZE)]
    p = AugmentParams(tuple(starts), (False,) * 3, 0, np.ones(x.shape[0], np.float32), np.zeros(x.shape[0], np.float32))
    torch.testing.assert_close(first[0]["volumes"][: x.shape[0], 0], torch.from_numpy(reference(x, p, SIZE)))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_contract_variable_modalities(cache, kind: str) -> None:
    root, entries = cache
    ld = loader(cache, kind=kind)
    by_id = {e.study_id: e for e in entries}
    seen = []
    for batch in ld.epoch(0):
        ms = [by_id[s].shape[0] for s in batch["study_ids"]]
        assert batch["volumes"].shape == (sum(ms), 1, *SIZE) and batch["volumes"].dtype == torch.float32
        assert batch["study_index"].tolist() == [s for s, m in enumerate(ms) for _ in range(m)]
        assert batch["modality_ids"].tolist() == [i for m in ms for i in range(m)]
        assert batch["num_studies"] == len(ms) and batch["reports"] == [by_id[s].report for s in batch["study_ids"]]
        assert "labels" not in batch
        seen += batch["study_ids"]
    assert sorted(seen) == sorted(by_id) and len(ld) == 4


@NEEDS_DALI
def test_torch_and_dali_give_the_same_batches(cache) -> None:
    torch_loader, dali_loader = loader(cache, kind="torch"), loader(cache, kind="dali", num_workers=2)
    assert dali_loader.kind == "dali" and len(torch_loader) == len(dali_loader)
    for epoch in range(3):
        assert_same_batches(list(torch_loader.epoch(epoch)), list(dali_loader.epoch(epoch)))
    assert_same_batches(list(torch_loader.epoch(1, skip_batches=2)), list(dali_loader.epoch(1, skip_batches=2)))


@pytest.mark.parametrize("n, world", [(9, 3), (10, 3), (10, 4)])
def test_shards_disjoint_and_equal(cache, n: int, world: int) -> None:
    root, entries = cache
    per_rank = []
    for rank in range(world):
        ld = make_loader(entries[:n], root, modality_names=NAMES, labels=None, augment=TRAIN, batch_size=2,
                         shuffle=True, seed=1, rank=rank, world_size=world)
        batches = list(ld.epoch(3))
        assert len(batches) == len(ld)
        per_rank.append([s for b in batches for s in b["study_ids"]])
    assert len({len(ids) for ids in per_rank}) == 1  # same number of studies (and batches) on every rank
    union = [s for ids in per_rank for s in ids]
    assert set(union) == {e.study_id for e in entries[:n]}
    assert len(union) - len(set(union)) == (-n) % world  # only the DistributedSampler padding repeats
    orders = {tuple(s for b in loader(cache).epoch(e) for s in b["study_ids"]) for e in range(3)}
    assert len(orders) == 3  # reshuffled each epoch


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_the_tail_of_the_epoch(cache, kind: str) -> None:
    ld = loader(cache, kind=kind)
    full = list(ld.epoch(2))
    assert_same_batches(list(ld.epoch(2, skip_batches=1)), full[1:])
    assert list(ld.epoch(2, skip_batches=len(ld))) == []
    with pytest.raises(ValueError, match="skip_batches"):
        ld.epoch(2, skip_batches=len(ld) + 1)


def test_same_batches_whatever_num_workers(cache) -> None:
    a = [list(loader(cache, num_workers=0).epoch(e)) for e in range(2)]
    two = loader(cache, num_workers=2)
    b = [list(two.epoch(e)) for e in range(2)]  # the same (persistent) workers serve both epochs
    for x, y in zip(a, b):
        assert_same_batches(x, y)


@pytest.mark.parametrize("labels, want", [
    (["a", "b", "c", "a"], torch.tensor([0, 1, 2, 0])),
    ([["a"], ["b", "c"], [], ["a", "c"]], torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1]])),
])
def test_labels(tmp_path: Path, labels: list, want: torch.Tensor) -> None:
    entries = write_cache(tmp_path, MIXED[:4], labels=labels)
    space = LabelSpace([e.labels for e in entries])
    ld = make_loader(entries, tmp_path, modality_names=NAMES, labels=space, augment=TRAIN, batch_size=4,
                     shuffle=False, seed=0)
    (batch,) = list(ld.epoch(0))
    assert batch["labels"].dtype == want.dtype
    torch.testing.assert_close(batch["labels"], want)


def test_bad_cache_names_the_file(tmp_path: Path) -> None:
    entries = write_cache(tmp_path, MIXED[:3])
    kw = dict(modality_names=NAMES, labels=None, augment=TRAIN, batch_size=2, shuffle=False, seed=0)
    missing = entries[1].path(tmp_path)
    missing.unlink()
    with pytest.raises(ValueError, match=str(missing)):
        make_loader(entries, tmp_path, **kw)
    np.save(missing, np.zeros((1, 2, 2, 2), np.float16))  # not the indexed shape
    with pytest.raises(ValueError, match=f"{missing}: expected float16"):
        make_loader(entries, tmp_path, **kw)
    with pytest.raises(ValueError, match="loader"):
        make_loader(entries, tmp_path, **{**kw, "kind": "fast"})
    with pytest.raises(ValueError, match="modality"):
        make_loader(entries, tmp_path, **{**kw, "modality_names": ["T1"]})


def test_auto_is_torch_on_cpu(cache) -> None:
    assert loader(cache, kind="auto").kind == "torch"


def test_params_vary_by_study_and_epoch(cache) -> None:
    data = loader(cache).dataset
    draws = {(e, i): data.params(e, i) for e in range(3) for i in range(len(data))}
    assert len({float(p.shift[0]) for p in draws.values()}) == len(draws)
    assert all(np.array_equal(p.shift, data.params(e, i).shift) for (e, i), p in draws.items())  # reproducible
