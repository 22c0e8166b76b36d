"""The in-memory study record and its collation into the batch contract (DESIGN section 2).

A :class:`Study` is one examination: the co-registered volumes of the sequences that were acquired (any subset of the
modality registry), the report and the label. :func:`collate_studies` flattens a list of studies into one batch of
V volumes (``V = sum of modalities per study``) with ``modality_ids`` and ``study_index``, the layout every model of
the package consumes; report embeddings are added by the caller from the (frozen, cached) text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medmap_fast.modalities import DEFAULT_MODALITY_NAMES, ModalityRegistry
from medmap_fast.validation import describe, fail

# The default modality names; a volume's modality id is its index here (see :mod:`medmap_fast.modalities`).
MODALITIES = DEFAULT_MODALITY_NAMES


@dataclass
class Study:
    """One study: ``volume`` float32 [M_present, D, H, W], one channel per name in ``modalities`` (same order).

    ``spacing`` is the voxel size in mm along (D, H, W); ``label`` a class index (the demo's classes are
    :data:`medmap_fast.synthetic.demo.CLASSES`); ``attributes`` free JSON-serialisable metadata (findings, acquisition).
    """

    study_id: str
    organ: str
    modalities: tuple[str, ...]
    volume: torch.Tensor
    spacing: tuple[float, float, float]
    report: str
    label: int
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        name = f"Study {self.study_id!r}"
        v = self.volume
        if not isinstance(v, torch.Tensor) or v.ndim != 4 or not v.is_floating_point():
            got = describe(v) if isinstance(v, torch.Tensor) else type(v).__name__
            fail(f"{name}.volume", "a float tensor [M_present, D, H, W]", got)
        if len(self.modalities) == 0 or v.shape[0] != len(self.modalities):
            fail(f"{name}.volume", f"one channel per modality ({len(self.modalities)}: {self.modalities})", describe(v))
        if len(set(self.modalities)) != len(self.modalities):
            fail(f"{name}.modalities", "distinct modality names", str(self.modalities))
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            fail(f"{name}.spacing", "three positive voxel sizes in mm", str(self.spacing))
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (D, H, W)."""
        return tuple(self.volume.shape[1:])  # type: ignore[return-value]


@dataclass
class StudyBatch:
    """A collated batch of S studies and V volumes.

    volumes [V, 1, D, H, W]; modality_ids [V] long (index into the registry); study_index [V] long in [0, S);
    labels [S] long; reports and study_ids: S strings each.
    """

    volumes: torch.Tensor
    modality_ids: torch.Tensor
    study_index: torch.Tensor
    labels: torch.Tensor
    reports: list[str]
    study_ids: list[str]

    @property
    def num_studies(self) -> int:
        return len(self.study_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StudyBatch:
        """The batch with its tensors on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return StudyBatch(move(self.volumes), move(self.modality_ids), move(self.study_index), move(self.labels),
                          self.reports, self.study_ids)

    def pin_memory(self) -> StudyBatch:
        """Page-locked copies of the tensors (called by ``DataLoader(pin_memory=True)``)."""
        return StudyBatch(self.volumes.pin_memory(), self.modality_ids.pin_memory(), self.study_index.pin_memory(),
                          self.labels.pin_memory(), self.reports, self.study_ids)


def collate_studies(
    studies: Sequence[Study],
    modality_names: Sequence[str] | ModalityRegistry = MODALITIES,
    dtype: torch.dtype = torch.float32,
) -> StudyBatch:
    """Flatten ``studies`` into a :class:`StudyBatch`; usable as a ``DataLoader`` ``collate_fn``.

    Volumes keep study order and, within a study, the study's modality order. ``modality_names`` (names or a
    :class:`~medmap_fast.modalities.ModalityRegistry`; lookup ignores case) is the registry the ids index, by default
    the twelve defaults. Raises ValueError for an empty list, a modality outside the registry or studies whose
    spatial shapes differ (crop or resample them to one size first).
    """
    if len(studies) == 0:
        fail("studies", "at least one Study", "an empty sequence")
    registry = modality_names if isinstance(modality_names, ModalityRegistry) else ModalityRegistry(modality_names)
    shape = None
    for s in studies:
        if not isinstance(s, Study):
            fail("studies", "a sequence of Study records", f"an item of type {type(s).__name__}")
        unknown = [m for m in s.modalities if m not in registry]
        if unknown:
            fail(f"Study {s.study_id!r}.modalities", f"names from the registry {registry.names}", f"unknown {unknown}")
        if shape is None:
            shape, first = s.shape, s.study_id
        elif s.shape != shape:
            fail(f"Study {s.study_id!r}.volume", f"spatial shape {shape} like study {first!r}", f"shape {s.shape}")
    counts = torch.tensor([len(s.modalities) for s in studies])
    return StudyBatch(
        volumes=torch.cat([s.volume for s in studies]).to(dtype).unsqueeze(1),
        modality_ids=registry.ids([m for s in studies for m in s.modalities]),
        study_index=torch.repeat_interleave(torch.arange(len(studies)), counts),
        labels=torch.tensor([s.label for s in studies], dtype=torch.long),
        reports=[s.report for s in studies],
        study_ids=[s.study_id for s in studies],
    )
