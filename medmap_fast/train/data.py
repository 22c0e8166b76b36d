"""Studies in, batches out: the data side of both training stages.

* :func:`load_studies` resolves a data source ("demo": the embedded synthetic dataset of :mod:`medmap_fast.synthetic.demo`)
  into normalised train and test studies (a seeded split, stratified by class).
* :class:`TextTable` holds the frozen text embeddings of every report once (the text encoder caches them on disk).
* :class:`StudyCollate` turns a list of studies into the batch dict the stage step functions consume, optionally
  keeping a random subset of at most ``max_volumes`` modalities per study (modality dropout during training, which
  also bounds the compute per study).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medmap_fast.data.study import MODALITIES, Study, collate_studies
from medmap_fast.models.text import TextEncoder
from medmap_fast.validation import fail

DATA_SOURCES = ("demo",)


@dataclass
class StudySplit:
    """Train and held-out test studies and the names of the label indices."""

    train: list[Study]
    test: list[Study]
    class_names: tuple[str, ...]


def normalize_study(study: Study, dtype: torch.dtype = torch.float16, eps: float = 1e-6) -> Study:
    """Per-volume z-score (each modality of the study separately), the usual MRI normalisation (nnU-Net), stored
    as ``dtype`` (float16 halves the memory of an in-memory dataset; batches are collated to float32)."""
    v = study.volume.float()
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    std = v.std(dim=(1, 2, 3), keepdim=True)
    return dataclasses.replace(study, volume=((v - mean) / (std + eps)).to(dtype).contiguous())


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test), ``round(test_fraction * n)`` of them test, spread over the classes in proportion to
    their sizes (largest remainders get the leftover places) and chosen at random within each class."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = test_fraction * counts
    take = np.floor(exact).astype(int)
    leftover = int(round(test_fraction * len(labels))) - int(take.sum())
    by_remainder = np.lexsort((rng.random(len(classes)), -(exact - take)))  # random order among equal remainders
    take[by_remainder[:leftover]] += 1
    test = [i for c, k in zip(classes, take) for i in rng.permutation(np.flatnonzero(labels == c))[:k].tolist()]
    if not test or len(test) == len(labels):
        fail("test_fraction", f"a split leaving studies on both sides of {len(labels)} studies", repr(test_fraction))
    test_set = set(test)
    return [i for i in range(len(labels)) if i not in test_set], sorted(test)


def load_studies(data: dict[str, Any], seed: int, progress: bool = False) -> StudySplit:
    """The studies of the ``data`` config section, normalised and split into train and test.

    ``source: demo`` generates ``num_studies`` studies of size ``size`` from the seed ``data.seed`` (default: the
    run seed), optionally only of ``organs`` or of ``classes``; labels then index that subset (``class_names``). The
    same config always gives the same studies and the same split, whatever ``num_workers`` (generator processes;
    None: one per available CPU, 0: in this process).
    """
    source = data.get("source", "demo")
    if source not in DATA_SOURCES:
        fail("data.source", f"one of {DATA_SOURCES}", repr(source))
    from medmap_fast.synthetic.demo import CLASSES, DemoConfig, DemoDataset

    data_seed = int(data.get("seed", seed))
    subset = {k: tuple(data[k]) for k in ("organs", "classes") if data.get(k)}
    config = DemoConfig(size=data["size"], **subset)
    names = config.class_pool
    workers = data.get("num_workers")
    workers = len(os.sched_getaffinity(0)) if workers is None else int(workers)
    dataset = DemoDataset(int(data["num_studies"]), data_seed, config)
    # batch_size=None: one study per item, in order; workers render studies in parallel (each on one thread)
    parallel = workers > 1
    loader = DataLoader(dataset, batch_size=None, num_workers=workers if parallel else 0,
                        prefetch_factor=8 if parallel else None)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="generating demo studies", unit="study", dynamic_ncols=True, mininterval=2.0)
    studies = []
    for study in loader:
        study = normalize_study(study)
        studies.append(dataclasses.replace(study, label=names.index(CLASSES[study.label])))
    train, test = stratified_split([s.label for s in studies], float(data["test_fraction"]), data_seed)
    return StudySplit([studies[i] for i in train], [studies[i] for i in test], tuple(names))


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
            fail("texts", "texts of this TextTable", f"{len(missing)} unknown texts, e.g. {missing[0][:60]!r}")
        return self.embeddings[torch.tensor([self.row[t] for t in texts], dtype=torch.long)]


class StudyCollate:
    """``DataLoader`` collate_fn: studies -> batch dict with ``volumes`` [V,1,D,H,W], ``modality_ids`` [V],
    ``study_index`` [V], ``labels`` [S], ``num_studies``; with a :class:`TextTable`, also ``report_embeddings`` [R, E]
    of the batch's *distinct* reports, ``study_index`` then pointing at report rows (studies with identical reports
    share one positive instead of being each other's false negatives in the contrastive loss).

    ``max_volumes``: keep at most this many modalities per study; None keeps every volume (evaluation).
    ``augment``: random flips of each study along each axis (the same for all its modalities, which stay
    co-registered) and a random affine intensity change per volume (scale 1 +- 0.1, shift +- 0.1 on z-scored data).
    Both draw from the torch RNG, which the training loop seeds and checkpoints.
    """

    def __init__(self, modality_names: Sequence[str] = MODALITIES, reports: TextTable | None = None,
                 max_volumes: int | None = None, augment: bool = False) -> None:
        if max_volumes is not None and max_volumes < 1:
            fail("max_volumes", "None or an int >= 1", repr(max_volumes))
        self.modality_names, self.reports = tuple(modality_names), reports
        self.max_volumes, self.augment = max_volumes, augment

    def _prepare(self, study: Study) -> Study:
        m = len(study.modalities)
        if self.max_volumes is not None and m > self.max_volumes:
            keep = torch.randperm(m)[: self.max_volumes].sort().values
            study = dataclasses.replace(study, modalities=tuple(study.modalities[i] for i in keep.tolist()),
                                        volume=study.volume[keep])
        if self.augment:
            axes = [d + 1 for d in range(3) if bool(torch.rand(()) < 0.5)]
            volume = study.volume.float().flip(axes) if axes else study.volume.float()
            scale = 1.0 + 0.2 * (torch.rand(len(study.modalities), 1, 1, 1) - 0.5)
            shift = 0.2 * (torch.rand(len(study.modalities), 1, 1, 1) - 0.5)
            study = dataclasses.replace(study, volume=volume * scale + shift)
        return study

    def __call__(self, studies: Sequence[Study]) -> dict[str, Any]:
        batch = collate_studies([self._prepare(s) for s in studies], self.modality_names)
        out = {"volumes": batch.volumes, "modality_ids": batch.modality_ids, "study_index": batch.study_index,
               "labels": batch.labels, "num_studies": batch.num_studies}
        if self.reports is not None:
            distinct = list(dict.fromkeys(batch.reports))
            report_of_study = torch.tensor([distinct.index(r) for r in batch.reports], dtype=torch.long)
            out["study_index"] = report_of_study[batch.study_index]
            out["report_embeddings"] = self.reports.lookup(distinct)
        return out
