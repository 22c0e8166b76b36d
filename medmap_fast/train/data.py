"""The data side of both training stages: a prepared cache in, batches of the DESIGN contract out.

* :func:`open_cache` reads ``CACHE/index.jsonl`` into its splits (as the manifest gave them) and the label space
  (class names, task) of the studies that have labels.
* :func:`stage_batches` builds the loader of one stage (DALI or torch, see :mod:`medmap_fast.data.loaders`) and wraps
  it in :class:`StageBatches`, which applies what depends on the model rather than on the data: at most
  ``max_volumes`` modalities per study (modality dropout, which also bounds the compute per study) and the frozen
  report embeddings of :class:`TextTable`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medmap_fast.data.cache import SPLITS, CacheEntry, LabelSpace, read_index
from medmap_fast.data.loaders import make_loader
from medmap_fast.models.text import TextEncoder
from medmap_fast.train.config import DataConfig, RunConfig
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.loop import Batch
from medmap_fast.validation import fail


@dataclass
class CacheData:
    """A prepared cache: its folder, its studies by split, and the label space of the labelled ones (None when no
    study has a label: pre-training data)."""

    path: Path
    splits: dict[str, list[CacheEntry]]
    labels: LabelSpace | None

    def label_space(self, purpose: str = "labels") -> LabelSpace:
        """The labels' class space; an error naming the cache when no study is labelled."""
        if self.labels is None:
            fail(f"{self.path}", f"studies with labels {purpose}", "no labels in index.jsonl")
        return self.labels

    def split(self, name: str, need: str | None = None, ctx: DistributedContext | None = None) -> list[CacheEntry]:
        """The studies of split ``name``; ``need="report"`` or ``"labels"`` leaves out those without one and says so
        on stderr (rank 0). An empty result is an error naming the cache."""
        entries = self.splits.get(name, [])
        if need is not None:
            kept = [e for e in entries if getattr(e, need) is not None]
            if len(kept) < len(entries) and (ctx is None or ctx.is_main):
                print(
                    f"{self.path}: {len(entries) - len(kept)} of {len(entries)} {name} studies have no {need} "
                    f"and are left out",
                    file=sys.stderr,
                )
            entries = kept
        if not entries:
            fail(f"{self.path} split {name!r}", f"studies{f' with a {need}' if need else ''}", "none")
        return entries


def open_cache(data: DataConfig) -> CacheData:
    """The cache of the ``data`` config section (``data.path``; ``data.classes`` fixes the class order)."""
    if not data.path:
        fail("data.path", "the folder written by `medmap-fast prepare` (--data CACHE)", repr(data.path))
    path = Path(data.path)
    entries = read_index(path)
    splits: dict[str, list[CacheEntry]] = {s: [] for s in SPLITS}
    for e in entries:
        splits[e.split].append(e)
    labelled = [e.labels for e in entries if e.labels is not None]
    labels = LabelSpace(labelled, data.classes) if labelled else None
    return CacheData(path, splits, labels)


class TextTable:
    """Frozen embeddings [R, E] of a fixed set of distinct texts, and the lookup text -> row."""

    def __init__(self, texts: Sequence[str], text_encoder: TextEncoder, progress: bool = False) -> None:
        self.texts = list(dict.fromkeys(texts))
        self.row = {t: i for i, t in enumerate(self.texts)}
        self.embeddings = text_encoder.encode(self.texts, progress=progress)
        self.dim = int(self.embeddings.shape[1])

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings [len(texts), E] of texts that are in the table."""
        missing = [t for t in texts if t not in self.row]
        if missing:
            fail("texts", "texts of this TextTable", f"{len(missing)} unknown texts, e.g. {str(missing[0])[:60]!r}")
        return self.embeddings[torch.tensor([self.row[t] for t in texts], dtype=torch.long)]


def keep_volumes(batch: Batch, max_volumes: int) -> Batch:
    """The batch with at most ``max_volumes`` randomly chosen modalities per study (their order kept), drawn from the
    torch RNG, which the training loop seeds and checkpoints."""
    counts = torch.bincount(batch["study_index"].cpu(), minlength=batch["num_studies"]).tolist()
    keep, start = [], 0
    for m in counts:
        chosen = torch.randperm(m)[:max_volumes].sort().values if m > max_volumes else torch.arange(m)
        keep.append(chosen + start)
        start += m
    index = torch.cat(keep).to(batch["volumes"].device)
    return {
        **batch,
        "volumes": batch["volumes"].index_select(0, index),
        "modality_ids": batch["modality_ids"].index_select(0, index),
        "study_index": batch["study_index"].index_select(0, index),
    }


def with_report_embeddings(batch: Batch, reports: TextTable) -> Batch:
    """Add ``report_embeddings`` [R, E] of the batch's *distinct* reports and point ``study_index`` at their rows:
    studies with identical reports share one positive instead of being each other's false negatives."""
    distinct = list(dict.fromkeys(batch["reports"]))
    report_of_study = torch.tensor([distinct.index(r) for r in batch["reports"]], dtype=torch.long)
    study_index = report_of_study.to(batch["study_index"].device)[batch["study_index"]]
    return {**batch, "study_index": study_index, "report_embeddings": reports.lookup(distinct)}


class StageBatches:
    """A loader's batches with the stage's transforms (:func:`keep_volumes`, :func:`with_report_embeddings`);
    a :class:`~medmap_fast.train.loop.BatchSource`."""

    def __init__(self, loader: Any, reports: TextTable | None = None, max_volumes: int | None = None) -> None:
        if max_volumes is not None and max_volumes < 1:
            fail("max_volumes", "None or an int >= 1", repr(max_volumes))
        self.loader, self.reports, self.max_volumes = loader, reports, max_volumes

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        for batch in self.loader.epoch(epoch, skip_batches):
            if self.max_volumes is not None:
                batch = keep_volumes(batch, self.max_volumes)
            if self.reports is not None:
                batch = with_report_embeddings(batch, self.reports)
            yield batch


def stage_batches(
    entries: Sequence[CacheEntry],
    cache: CacheData,
    config: RunConfig,
    stage: str | None,
    ctx: DistributedContext,
    modality_names: Sequence[str],
    batch_size: int,
    num_workers: int = 0,
    reports: TextTable | None = None,
    max_volumes: int | None = None,
    seed: int = 0,
    size_of: str | None = None,
) -> StageBatches:
    """The batches of ``entries`` for training stage ``stage`` (shuffled, augmented, sharded over the ranks) or,
    with ``stage=None``, for evaluation (in order, every study once, on this process, centre crops at the crop size
    of stage ``size_of``: the stage whose model is evaluated; None: ``data.size``)."""
    training = stage is not None
    augment = config.augment(stage if training else size_of, training)
    loader = make_loader(
        entries,
        cache.path,
        modality_names=modality_names,
        labels=cache.labels,
        augment=augment,
        batch_size=batch_size,
        shuffle=training,
        seed=seed,
        rank=ctx.rank if training else 0,
        world_size=ctx.world_size if training else 1,
        num_workers=num_workers,
        device=ctx.device,
        kind=config.data.loader,
    )
    return StageBatches(loader, reports, max_volumes)
