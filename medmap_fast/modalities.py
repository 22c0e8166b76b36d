"""MRI modality registry: names, ids and the short descriptions used to build text prompts.

The default registry holds the twelve modalities of MedMoM-MRI3D in a fixed order (a modality's id is its position,
so the order is part of every checkpoint). Users extend or replace it with their own list::

    reg = ModalityRegistry(["T1", "T2", "FLAIR", ("SWI", "susceptibility-weighted")])
    reg.index("flair")  # 2 (lookup ignores case)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from medmap_fast.validation import fail


class Modality(NamedTuple):
    """One MRI modality: a short ``name`` (the id key) and a human ``description`` for text prompts."""

    name: str
    description: str


DEFAULT_MODALITIES: tuple[Modality, ...] = (
    Modality("T1", "T1-weighted"),
    Modality("T1c", "contrast-enhanced T1-weighted"),
    Modality("T2", "T2-weighted"),
    Modality("FLAIR", "T2 fluid-attenuated inversion recovery (FLAIR)"),
    Modality("DWI", "diffusion-weighted"),
    Modality("ADC", "apparent diffusion coefficient map"),
    Modality("T2WI", "T2-weighted abdominal"),
    Modality("T1_in_phase", "T1-weighted in-phase"),
    Modality("T1_opposed_phase", "T1-weighted opposed-phase"),
    Modality("arterial", "arterial-phase contrast-enhanced T1-weighted"),
    Modality("portal_venous", "portal-venous-phase contrast-enhanced T1-weighted"),
    Modality("delayed", "delayed-phase contrast-enhanced T1-weighted"),
)
DEFAULT_MODALITY_NAMES: tuple[str, ...] = tuple(m.name for m in DEFAULT_MODALITIES)
_DEFAULT_DESCRIPTIONS = {m.name.lower(): m.description for m in DEFAULT_MODALITIES}

ModalitySpec = str | Modality | tuple[str, str]


class ModalityRegistry:
    """An ordered set of modalities; id = position. Lookups by name ignore case.

    ``modalities``: None (the twelve defaults), a sequence whose items are a name (a default name takes its default
    description, any other name describes itself), a ``(name, description)`` pair or a :class:`Modality`, or a
    mapping name -> description.
    """

    def __init__(self, modalities: Sequence[ModalitySpec] | Mapping[str, str] | None = None) -> None:
        if modalities is None:
            items: Iterable[ModalitySpec] = DEFAULT_MODALITIES
        elif isinstance(modalities, Mapping):
            items = list(modalities.items())
        elif isinstance(modalities, str):
            fail("modalities", "a sequence of modality names (not one string)", repr(modalities))
        else:
            items = modalities
        self._modalities = tuple(_as_modality(m) for m in items)
        if not self._modalities:
            fail("modalities", "at least one modality", "an empty list")
        self._ids: dict[str, int] = {}
        for i, m in enumerate(self._modalities):
            if m.name.lower() in self._ids:
                fail("modalities", "unique names (case-insensitive)", f"{m.name!r} twice")
            self._ids[m.name.lower()] = i

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self._modalities)

    @property
    def descriptions(self) -> tuple[str, ...]:
        return tuple(m.description for m in self._modalities)

    def index(self, name: str, argument: str = "modality") -> int:
        """The id of modality ``name`` (case-insensitive); ValueError naming ``argument`` and the known modalities."""
        key = name.lower() if isinstance(name, str) else None
        if key not in self._ids:
            fail(argument, f"one of {self.names}", repr(name))
        return self._ids[key]

    def ids(self, names: Iterable[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Names -> a long tensor of ids [len(names)]."""
        return torch.tensor([self.index(n) for n in names], dtype=torch.long, device=device)

    def description(self, modality: str | int) -> str:
        """The description of a modality given by name or id."""
        return self[modality].description

    def __getitem__(self, modality: str | int) -> Modality:
        if isinstance(modality, str):
            return self._modalities[self.index(modality)]
        if not 0 <= modality < len(self):
            fail("modality", f"an id in [0, {len(self)})", repr(modality))
        return self._modalities[modality]

    def __len__(self) -> int:
        return len(self._modalities)

    def __iter__(self) -> Iterator[Modality]:
        return iter(self._modalities)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModalityRegistry) and self._modalities == other._modalities

    def __repr__(self) -> str:
        return f"ModalityRegistry({list(self.names)})"

    def to_config(self) -> list[list[str]]:
        """JSON-able form: ``[[name, description], ...]`` (what ``ModalityRegistry(...)`` accepts back)."""
        return [[m.name, m.description] for m in self._modalities]


def _as_modality(spec: ModalitySpec) -> Modality:
    if isinstance(spec, str) and spec:
        return Modality(spec, _DEFAULT_DESCRIPTIONS.get(spec.lower(), spec))
    if not (isinstance(spec, Sequence) and len(spec) == 2 and all(isinstance(s, str) and s for s in spec)):
        fail("modalities", "names, (name, description) pairs or Modality entries", repr(spec))
    return Modality(*spec)
