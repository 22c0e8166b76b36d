"""The prepared cache: what ``medmap-fast prepare`` writes and every loader and trainer reads.

Layout of a cache folder::

    CACHE/studies/<key>.npy    one C-order float16 array per study [M_present, X, Y, Z]: canonical RAS voxel order
                               (X -> right, Y -> anterior, Z -> superior; the axial plane is (X, Y)), every modality
                               on one grid, z-scored over the foreground, 0 outside it
    CACHE/studies/<key>.json   its sidecar: modality names, spacing, affine, sources (path, size, sha256), settings
    CACHE/index.jsonl          one line per prepared study (:class:`CacheEntry`)
    CACHE/errors.jsonl         one line per skipped study: {"study_id", "line", "reason"}

:class:`LabelSpace` turns the manifest's label field (one class name, a list for multi-label, or null) into the
targets of the classifier: multi-class (class index), binary (0/1 of ``class_names[1]``) or multi-label (multi-hot).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmap_fast.fileio import atomic_write_bytes
from medmap_fast.validation import fail

INDEX_FILE = "index.jsonl"
ERRORS_FILE = "errors.jsonl"
STUDIES_DIR = "studies"
SPLITS = ("train", "val", "test")
Labels = str | list[str] | None


@dataclass(frozen=True)
class CacheEntry:
    """One prepared study, as listed in ``index.jsonl``.

    shape: [M_present, X, Y, Z] of the array; modalities: M_present registry names in array order; spacing: mm per
    voxel along X, Y, Z; file: the array's path relative to the cache folder; labels: as the manifest gave them.
    """

    study_id: str
    split: str
    report: str | None
    labels: Labels
    modalities: tuple[str, ...]
    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    file: str

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["modalities"], out["shape"], out["spacing"] = list(self.modalities), list(self.shape), list(self.spacing)
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any], where: str) -> CacheEntry:
        """Build from an index row; ``where`` ("CACHE/index.jsonl:12") prefixes every error."""
        try:
            study_id, split, file = str(row["study_id"]), str(row["split"]), str(row["file"])
            modalities = tuple(row["modalities"])
            shape = tuple(int(s) for s in row["shape"])
            spacing = tuple(float(s) for s in row["spacing"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a cache index row ({type(err).__name__}: {err})") from err
        if split not in SPLITS or len(shape) != 4 or shape[0] != len(modalities) or len(spacing) != 3:
            raise ValueError(
                f"{where}: inconsistent cache index row (split {split!r}, shape {shape}, "
                f"modalities {modalities}, spacing {spacing})"
            )
        return cls(study_id, split, row.get("report"), row.get("labels"), modalities, shape, spacing, file)

    def path(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / self.file

    def load(self, cache_dir: str | Path, mmap: bool = True) -> np.ndarray:
        """The study's float16 array [M, X, Y, Z] (memory-mapped by default: a crop reads only its pages)."""
        path = self.path(cache_dir)
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path}: unreadable cache array of study {self.study_id!r} ({err}); re-run `medmap-fast prepare`"
            ) from err
        if tuple(array.shape) != self.shape or array.dtype != np.float16:
            raise ValueError(
                f"{path}: expected float16 {self.shape} as index.jsonl says, got {array.dtype} "
                f"{tuple(array.shape)}; re-run `medmap-fast prepare`"
            )
        return array


def read_index(cache_dir: str | Path) -> list[CacheEntry]:
    """Every entry of ``cache_dir/index.jsonl``; errors name the file and line."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {cache_dir} a folder written by `medmap-fast prepare`?")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        entries.append(CacheEntry.from_json(row, f"{path}:{number}"))
    return entries


_SAFE_KEY = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")  # lower case: keys stay distinct on case-insensitive disks


def study_key(study_id: str) -> str:
    """File-safe key of a study (``CACHE/studies/<key>.npy``): the id itself when it is already a short lower-case
    name of ``[a-z0-9._-]``, else the id sanitised, cut to 64 characters and suffixed with 8 hex digits of its sha1
    (so distinct ids never share a key)."""
    if _SAFE_KEY.fullmatch(study_id):
        return study_id
    safe = re.sub(r"[^a-z0-9._-]+", "_", study_id.lower()).strip("._")[:64] or "study"
    return f"{safe}-{hashlib.sha1(study_id.encode('utf-8')).hexdigest()[:8]}"


def study_files(cache_dir: str | Path, study_id: str) -> tuple[Path, Path]:
    """(array ``.npy``, sidecar ``.json``) paths of a study in a cache folder."""
    stem = Path(cache_dir) / STUDIES_DIR / study_key(study_id)
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically (readers see the old file or the whole new one)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


def write_index(cache_dir: str | Path, entries: Iterable[CacheEntry]) -> None:
    """Write ``cache_dir/index.jsonl`` (one :meth:`CacheEntry.to_json` row per entry, in the given order)."""
    write_jsonl(Path(cache_dir) / INDEX_FILE, (e.to_json() for e in entries))


def write_errors(cache_dir: str | Path, errors: Iterable[dict[str, Any]]) -> None:
    """Write ``cache_dir/errors.jsonl``: one ``{"study_id", "line", "reason"}`` row per skipped study."""
    write_jsonl(Path(cache_dir) / ERRORS_FILE, errors)


class LabelSpace:
    """Class names and task of a set of studies, and each study's target.

    task: "multilabel" when any study lists its labels (a JSON list), else "binary" for exactly two classes (the
    positive one is ``class_names[1]``), else "multiclass". ``class_names`` default to the sorted names found.
    """

    def __init__(self, labels: Sequence[Labels], class_names: Sequence[str] | None = None) -> None:
        given = [x for x in labels if x is not None]
        self.multilabel = any(isinstance(x, list) for x in given)
        found = sorted({n for x in given for n in ([x] if isinstance(x, str) else x)})
        self.class_names = tuple(class_names) if class_names is not None else tuple(found)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            fail("labels", f"class names among {list(self.class_names)}", f"unknown {unknown}")
        if len(self.class_names) < (1 if self.multilabel else 2):
            fail("labels", "at least two classes (one for multi-label)", f"{list(self.class_names)}")
        self.task = "multilabel" if self.multilabel else "binary" if len(self.class_names) == 2 else "multiclass"

    @property
    def num_outputs(self) -> int:
        """The classifier's ``num_classes`` argument."""
        return 1 if self.task == "binary" else len(self.class_names)

    def encode(self, labels: Labels, study_id: str = "?") -> torch.Tensor:
        """Target of one study: long scalar (multiclass, binary) or float multi-hot [K] (multilabel)."""
        if labels is None:
            fail(f"study {study_id!r} labels", "a label for fine-tuning", "none (null in the manifest)")
        names = [labels] if isinstance(labels, str) else list(labels)
        index = [self.class_names.index(n) for n in names]
        if self.task == "multilabel":
            target = torch.zeros(len(self.class_names))
            target[index] = 1.0
            return target
        if len(index) != 1:
            fail(f"study {study_id!r} labels", "one class name", repr(labels))
        return torch.tensor(index[0], dtype=torch.long)
