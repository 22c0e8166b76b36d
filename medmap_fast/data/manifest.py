"""The manifest: one study per row (JSONL or CSV), the way real studies enter medmap-fast.

JSONL, one object per line::

    {"study_id": "s001", "split": "train", "report": "Ring-enhancing lesion ...", "labels": "tumour",
     "images": {"T1": "s001/t1.nii.gz", "FLAIR": {"path": "s001/flair.nii.gz", "channel": 0}}}

CSV: columns ``study_id, split, report | report_file, labels`` and one column per modality name (an empty cell =
not acquired). Modality names are the registry's (case-insensitive); relative paths resolve against the manifest's
folder; ``.nii``, ``.nii.gz`` and ``.npy`` (with a ``spacing``) are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ManifestError(ValueError):
    """A malformed manifest; the message starts with ``<file>:<line>:``."""


@dataclass(frozen=True)
class ImageSource:
    """One modality of a study: an absolute ``path``; ``channel`` selects a channel of a 4-D file (None for 3-D);
    ``spacing`` (mm along the array axes) is required for ``.npy`` sources, which are taken as RAS-ordered."""

    path: Path
    channel: int | None = None
    spacing: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class ManifestStudy:
    """One manifest row. ``images`` maps registry modality names (canonical spelling) to sources, in manifest order;
    ``labels``: one class name, a tuple for multi-label, or None; ``report`` or ``report_file`` (or neither);
    ``line``: the row's 1-based line in the manifest (for error messages)."""

    study_id: str
    split: str
    images: dict[str, ImageSource]
    report: str | None = None
    report_file: Path | None = None
    labels: str | tuple[str, ...] | None = None
    line: int = 0
