"""Cache -> batches: the torch ``Dataset`` + ``DataLoader`` loader, the epoch plan both loaders share, and
:func:`make_loader`, which picks the torch or the DALI loader (:mod:`medmap_fast.data.dali`).

The batch contract (what the trainers consume), S studies holding V volumes in all::

    volumes       float32 [V, 1, X, Y, Z]   (X, Y, Z) = the configured size; study order, then each cache array's
                                            modality order
    modality_ids  long [V]                  ids in the loader's modality registry
    study_index   long [V]                  in [0, S)
    num_studies   int S
    study_ids     list[str] (S);  reports  list[str | None] (S)
    labels        LabelSpace.encode stacked: long [S] or float [S, K]   (only when a LabelSpace is given)

Determinism: an epoch's order is :class:`ShardedSampler`'s (seeded by (seed, epoch), padded so every rank gets the
same number of studies, rank-strided), and a study's augmentation is drawn from an RNG seeded by
(seed, epoch, study index), so the stream does not depend on the worker count and a resumed epoch
(``epoch(e, skip_batches=k)``) is the tail of the full one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medmap_fast.data.augment import AugmentConfig, AugmentParams, apply, crop_reads_most, sample_params, study_rng
from medmap_fast.data.cache import CacheEntry, LabelSpace
from medmap_fast.data.manifest import Modalities, as_registry
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.train.distributed import DistributedContext, ShardedSampler
from medmap_fast.validation import fail

Batch = dict[str, Any]
LOADER_KINDS = ("auto", "dali", "torch")


@dataclass
class StudyItem:
    """One study of a batch: ``volume`` float32 [M, X, Y, Z] (None while the DALI pipeline produces it),
    ``modality_ids`` long [M], ``target`` its label (None without a LabelSpace)."""

    volume: torch.Tensor | None
    modality_ids: torch.Tensor
    study_id: str
    report: str | None
    target: torch.Tensor | None


class StudyDataset(Dataset):
    """The cached studies, one item per study; indexed by ``(epoch, index)`` because a study's augmentation is a
    function of both (see :meth:`params`)."""

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        cache_dir: str | Path,
        registry: ModalityRegistry,
        labels: LabelSpace | None,
        augment: AugmentConfig,
        seed: int,
    ) -> None:
        if not entries:
            fail("entries", "at least one cached study", "none")
        self.entries, self.cache_dir = list(entries), Path(cache_dir)
        self.augment, self.seed = augment, seed
        self.modality_ids = [registry.ids(e.modalities) for e in self.entries]
        self.targets = [labels.encode(e.labels, e.study_id) if labels is not None else None for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def check_files(self) -> None:
        """Open every array's header: a missing, truncated or mis-shaped file is an error naming it now, not in the
        middle of an epoch."""
        for entry in self.entries:
            entry.load(self.cache_dir)

    def params(self, epoch: int, index: int) -> AugmentParams:
        entry = self.entries[index]
        return sample_params(study_rng(self.seed, epoch, index), entry.shape[1:], entry.shape[0], self.augment)

    def item(self, index: int, volume: torch.Tensor | None) -> StudyItem:
        e = self.entries[index]
        return StudyItem(volume, self.modality_ids[index], e.study_id, e.report, self.targets[index])

    def __getitem__(self, key: tuple[int, int]) -> StudyItem:
        epoch, index = key
        entry, size = self.entries[index], self.augment.size
        array = entry.load(self.cache_dir, mmap=not crop_reads_most(entry.shape[1:], size))
        return self.item(index, apply(array, self.params(epoch, index), size))


def assemble_batch(volumes: torch.Tensor, items: Sequence[StudyItem]) -> Batch:
    """The batch dict around ``volumes`` [V, 1, X, Y, Z] (the items' volumes, in order)."""
    counts = torch.tensor([len(it.modality_ids) for it in items])
    batch: Batch = {
        "volumes": volumes,
        "modality_ids": torch.cat([it.modality_ids for it in items]),
        "study_index": torch.repeat_interleave(torch.arange(len(items)), counts),
        "num_studies": len(items),
        "study_ids": [it.study_id for it in items],
        "reports": [it.report for it in items],
    }
    targets = [it.target for it in items if it.target is not None]
    if 0 < len(targets) < len(items):
        fail("items", "a target for every study or for none", f"targets for {len(targets)} of {len(items)} studies")
    if targets:
        batch["labels"] = torch.stack(targets)
    return batch


def collate_studies(items: Sequence[StudyItem]) -> Batch:
    """Items with their volumes -> the batch dict."""
    volumes = [it.volume for it in items if it.volume is not None]
    if len(volumes) < len(items):
        fail("items", "studies with their volumes", f"{len(items) - len(volumes)} of {len(items)} without")
    return assemble_batch(torch.cat(volumes).unsqueeze(1), items)


class StudyLoader:
    """Batches of one rank, epoch by epoch. ``len(loader)``: batches per epoch on this rank (the same on every rank);
    ``loader.epoch(e, skip_batches=k)``: the batches of epoch ``e`` after the first ``k``."""

    kind = "base"

    def __init__(
        self,
        dataset: StudyDataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        device: torch.device,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            fail("batch_size", "an int >= 1", repr(batch_size))
        if not 0 <= rank < world_size:
            fail("rank", f"an int in [0, world_size={world_size})", repr(rank))
        self.dataset, self.batch_size, self.drop_last, self.device = dataset, batch_size, drop_last, device
        self.sampler = ShardedSampler(len(dataset), DistributedContext(rank, world_size), shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        per_rank = self.sampler.per_rank
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def plan(self, epoch: int, skip_batches: int = 0) -> list[list[int]]:
        """Study indices of each remaining batch of ``epoch`` on this rank."""
        if not 0 <= skip_batches <= len(self):
            fail("skip_batches", f"an int in [0, {len(self)}]", repr(skip_batches))
        self.sampler.set_epoch(epoch)
        order = self.sampler.epoch_indices()
        bs = self.batch_size
        return [order[i : i + bs] for i in range(skip_batches * bs, len(self) * bs, bs)]

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        raise NotImplementedError


class _PlannedBatches(Sampler[list[tuple[int, int]]]):
    """Batch sampler whose batches are set before each epoch (the DataLoader, and its persistent workers, stay)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchStudyLoader(StudyLoader):
    """``DataLoader`` over :class:`StudyDataset`: ``num_workers`` processes (kept across epochs) read and augment
    studies; batches are in pinned memory when the device is CUDA."""

    kind = "torch"

    def __init__(self, *args: Any, num_workers: int = 0) -> None:
        super().__init__(*args)
        self._batches = _PlannedBatches()
        self._loader = DataLoader(
            self.dataset,
            batch_sampler=self._batches,
            collate_fn=collate_studies,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        self._batches.batches = [[(epoch, i) for i in b] for b in self.plan(epoch, skip_batches)]
        return iter(self._loader)


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_loader(
    entries: Sequence[CacheEntry],
    cache_dir: str | Path,
    *,
    modality_names: Modalities,
    labels: LabelSpace | None,
    augment: AugmentConfig,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str = torch.device("cpu"),
    kind: str = "auto",
    drop_last: bool = False,
) -> StudyLoader:
    """The loader of ``entries`` (rows of ``cache_dir/index.jsonl``) for this rank.

    modality_names: the encoder's modality registry (a ModalityRegistry, its names, or None for the twelve
    defaults); batches carry ids in it. labels: the LabelSpace of the task (None: no "labels" in the batches).
    shuffle/seed: a new order every epoch, the same for a given (seed, epoch); the augmentation is drawn per
    (seed, epoch, study). rank/world_size: this rank's shard (padded, equal batch counts on every rank).

    kind: "torch" (DataLoader, ``num_workers`` processes), "dali" (DALI pipeline with ``num_workers`` threads, on the
    GPU of ``device`` when it is CUDA, else on DALI's CPU backend) or "auto" (DALI when it imports and ``device`` is
    CUDA, else torch). Every cache file is checked first (exists, readable, float16 of the indexed shape).
    """
    if kind not in LOADER_KINDS:
        fail("loader", f"one of {LOADER_KINDS}", repr(kind))
    if not isinstance(num_workers, int) or num_workers < 0:
        fail("num_workers", "an int >= 0", repr(num_workers))
    device = torch.device(device)
    dataset = StudyDataset(entries, cache_dir, as_registry(modality_names), labels, augment, seed)
    dataset.check_files()
    if kind == "auto":
        kind = "dali" if device.type == "cuda" and dali_importable() else "torch"
    args = (dataset, batch_size, shuffle, seed, rank, world_size, drop_last, device)
    if kind == "dali":
        from medmap_fast.data.dali import DaliStudyLoader

        return DaliStudyLoader(*args, num_threads=max(1, num_workers))
    return TorchStudyLoader(*args, num_workers=num_workers)
