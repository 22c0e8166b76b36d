"""The manifest: one study per row (JSONL or CSV), the way real studies enter medmap-fast.

JSONL (``.jsonl``, or ``.json`` holding JSON Lines), one object per line, blank lines allowed::

    {"study_id": "s001", "split": "train", "report": "Ring-enhancing lesion ...", "labels": "tumour",
     "images": {"T1": "s001/t1.nii.gz", "FLAIR": {"path": "s001/flair.nii.gz", "channel": 0}}}

Keys: ``study_id`` (non-empty string, unique), ``split`` (train / val / test), ``report`` (text) or
``report_file`` (a UTF-8 text file), ``labels`` (one class name, a list of names for multi-label, or null /
absent), ``images`` (non-empty: modality -> path, or -> ``{"path", "channel", "spacing"}``: ``channel`` (int >= 0)
picks a channel of a 4-D file, ``spacing`` ([sx, sy, sz] mm, positive) is for ``.npy`` images only), and an
optional row-level ``spacing`` that applies to every ``.npy`` image of the row without its own. Any other key is
an error (a typo would otherwise drop data silently).

CSV (``.csv``, UTF-8, a header row): columns ``study_id``, ``split``, optional ``report``, ``report_file``,
``labels``, ``spacing``, and one column per modality (an empty cell = not acquired); header names are
case-insensitive. ``labels``: one class name, or several separated by ``|`` for multi-label (``a|b``; a trailing
``|`` makes a one-name list, ``a|``; a lone ``|`` an empty list: a multi-label study with none of the classes);
an empty cell = no labels. ``spacing``: three positive numbers in mm separated by commas (quote the cell:
``"1,1,1.5"``), ``x`` or spaces (``1x1x1.5``), for the row's ``.npy`` images. Channels and per-image spacings need
JSONL.

Both: modality names are the registry's (case-insensitive; stored in its spelling, in manifest order); relative
paths resolve against the manifest's folder; ``.nii``, ``.nii.gz`` and ``.npy`` (RAS-ordered, with a spacing) are
accepted; an empty report is no report. Files are not opened here: ``prepare`` reports a missing or unreadable file
for its study only, and :func:`read_report` reads a ``report_file``. Every malformed row is a :class:`ManifestError`
``<file>:<line>: <problem>``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from medmap_fast.data.cache import SPLITS
from medmap_fast.fileio import atomic_write_bytes
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.validation import fail

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npy")
ROW_KEYS = ("study_id", "split", "report", "report_file", "labels", "images", "spacing")
REQUIRED_KEYS = ("study_id", "split", "images")
IMAGE_KEYS = ("path", "channel", "spacing")
_MANIFEST_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_CSV_LABEL_SEPARATOR = "|"
Modalities = ModalityRegistry | Sequence[str] | None


class ManifestError(ValueError):
    """A malformed manifest; the message starts with ``<file>:<line>:`` (``<file>:`` for the whole file)."""


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


def as_registry(modalities: Modalities) -> ModalityRegistry:
    """A registry from a registry, a list of names, or None (the twelve defaults)."""
    return modalities if isinstance(modalities, ModalityRegistry) else ModalityRegistry(modalities)


def image_suffix(name: str) -> str | None:
    """The accepted image suffix that ``name`` ends with (``.nii.gz``, ``.nii``, ``.npy``; any case), else None."""
    lower = name.lower()
    return next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)


def canonical_modality(name: object, registry: ModalityRegistry) -> str:
    """The registry's spelling of modality ``name`` (case-insensitive); ValueError listing the known ones."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(registry.names)}")
    return registry[name].name


def parse_split(value: object) -> str:
    """train / val / test (any case) -> lower case."""
    if not (isinstance(value, str) and value.strip().lower() in SPLITS):
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {value!r}")
    return value.strip().lower()


def parse_labels(value: object) -> str | tuple[str, ...] | None:
    """A class name (str), several for multi-label (list -> tuple, no repeats), or None."""
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"labels: {repeated} listed more than once")
        return tuple(value)
    raise ValueError(f"labels: expected a class name, a list of class names or null, got {value!r}")


def read_manifest(path: str | os.PathLike, modalities: Modalities = None) -> list[ManifestStudy]:
    """Every study of a JSONL or CSV manifest (format in the module docstring), in file order.

    ``modalities``: the registry whose names the images use (a :class:`ModalityRegistry`, a list of names, or None
    for the twelve defaults). Raises FileNotFoundError for a missing manifest and :class:`ManifestError`
    ``<file>:<line>: <problem>`` for a malformed one; image and report files are not checked here.
    """
    path = Path(path)
    kind = _MANIFEST_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(
            f"{path}: unsupported manifest type {path.suffix or '(no extension)'!r}; expected "
            f".jsonl or .json (JSON Lines) or .csv"
        )
    registry = as_registry(modalities)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: CSV files saved by spreadsheets start with a BOM
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: manifest not found") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err})") from None
    folder = path.parent.absolute()
    rows = _jsonl_rows(text) if kind == "jsonl" else _csv_rows(path, text, registry)
    studies: list[ManifestStudy] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        try:
            study = study_from_row(row(), folder, registry, line)
        except ValueError as err:
            raise ManifestError(f"{path}:{line}: {err}") from None
        if study.study_id in first_line:
            raise ManifestError(
                f"{path}:{line}: duplicate study_id {study.study_id!r} (first on line {first_line[study.study_id]})"
            )
        first_line[study.study_id] = line
        studies.append(study)
    if not studies:
        raise ManifestError(f"{path}: no studies")
    return studies


def write_manifest(studies: Iterable[ManifestStudy], path: str | os.PathLike, modalities: Modalities = None) -> None:
    """Write ``studies`` as a JSONL manifest at ``path`` (``.jsonl`` or ``.json``), atomically.

    Paths inside the manifest's folder are written relative to it (the folder can move), others absolute. Every row
    is checked as :func:`read_manifest` will check it (ValueError naming the study), so the file reads back.
    """
    path = Path(path)
    if _MANIFEST_KINDS.get(path.suffix.lower()) != "jsonl":
        fail("path", "a .jsonl or .json manifest path (write_manifest writes JSON Lines)", str(path))
    registry = as_registry(modalities)
    folder = path.parent.absolute()
    lines, seen = [], set()
    for study in studies:
        row = study_to_row(study, folder)
        try:
            study_from_row(row, folder, registry)
        except ValueError as err:
            raise ValueError(f"{path}: cannot write study {study.study_id!r}: {err}") from None
        if study.study_id in seen:
            raise ValueError(f"{path}: cannot write study {study.study_id!r}: its study_id is given twice")
        seen.add(study.study_id)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def read_report(study: ManifestStudy) -> str | None:
    """The study's report text: ``report``, or the content of ``report_file`` (UTF-8, stripped), or None; an empty
    report is None. A missing or unreadable report file is an error naming it, the study and its manifest line."""
    if study.report_file is None:
        return study.report
    where = f"report file of study {study.study_id!r} (manifest line {study.line})"
    try:
        text = study.report_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{study.report_file}: {where} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{study.report_file}: {where} is not readable UTF-8 text ({err})") from None
    return text.strip() or None


def study_from_row(row: dict[str, Any], folder: Path, registry: ModalityRegistry, line: int = 0) -> ManifestStudy:
    """Check one manifest row (a JSONL object, or a CSV row in that form) and build its study; ValueError saying the
    problem (the caller adds the file and line). Relative paths resolve against ``folder``."""
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(ROW_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    study_id = row["study_id"]
    if not (isinstance(study_id, str) and study_id.strip()):
        raise ValueError(f"study_id: expected a non-empty string, got {study_id!r}")
    report, report_file = row.get("report"), row.get("report_file")
    if not (report is None or isinstance(report, str)):
        raise ValueError(f"report: expected a string or null, got {report!r}")
    if not (report_file is None or (isinstance(report_file, str) and report_file.strip())):
        raise ValueError(f"report_file: expected a path (a non-empty string) or null, got {report_file!r}")
    if report is not None and report_file is not None:
        raise ValueError("give report or report_file, not both")
    row_spacing = None if row.get("spacing") is None else _spacing(row["spacing"], "spacing")
    return ManifestStudy(
        study_id=study_id,
        split=parse_split(row["split"]),
        images=_images(row["images"], folder, registry, row_spacing),
        report=report if report and report.strip() else None,
        report_file=None if report_file is None else _resolve(report_file, folder),
        labels=parse_labels(row.get("labels")),
        line=line,
    )


def study_to_row(study: ManifestStudy, folder: Path) -> dict[str, Any]:
    """The JSONL object of ``study`` (the inverse of :func:`study_from_row`), paths relative to ``folder`` where
    they are inside it."""
    row: dict[str, Any] = {"study_id": study.study_id, "split": study.split}
    if study.report is not None:
        row["report"] = study.report
    if study.report_file is not None:
        row["report_file"] = _relative(study.report_file, folder)
    if study.labels is not None:
        row["labels"] = study.labels if isinstance(study.labels, str) else list(study.labels)
    images: dict[str, Any] = {}
    for name, source in study.images.items():
        image: dict[str, Any] = {"path": _relative(source.path, folder)}
        if source.channel is not None:
            image["channel"] = source.channel
        if source.spacing is not None:
            image["spacing"] = list(source.spacing)
        images[name] = image["path"] if len(image) == 1 else image
    row["images"] = images
    return row


def _jsonl_rows(text: str) -> Iterator[tuple[int, Callable[[], dict[str, Any]]]]:
    """(line, parse) per non-blank line; ``parse()`` gives the object (called inside the caller's error context,
    which adds the file and line)."""
    for line, content in enumerate(text.splitlines(), 1):
        if content.strip():
            yield line, partial(_json_object, content)


def _json_object(content: str) -> dict[str, Any]:
    try:
        value = json.loads(content, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"not valid JSON ({err.msg} at column {err.colno}); expected one JSON object per line (JSON Lines)"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys silently; a repeated key here is a mistake in the manifest
    value = dict(pairs)
    if len(value) != len(pairs):
        repeated = sorted({k for k, _ in pairs if [p[0] for p in pairs].count(k) > 1})
        raise ValueError(f"key(s) {repeated} given twice in one object")
    return value


def _csv_rows(path: Path, text: str, registry: ModalityRegistry) -> Iterator[tuple[int, Callable[[], dict[str, Any]]]]:
    """(line, parse) per CSV record after the header; ``line`` is where the record starts (a quoted report may span
    lines) and ``parse()`` gives the record as a JSONL-style row."""
    reader = csv.reader(io.StringIO(text))
    start, header = 1, None
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                try:
                    header = _csv_header(cells, registry)
                except ValueError as err:
                    raise ManifestError(f"{path}:{line}: {err}") from None
                continue
            yield line, partial(_csv_row, cells, header)
    except csv.Error as err:
        raise ManifestError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


def _csv_header(cells: list[str], registry: ModalityRegistry) -> list[tuple[str, bool]]:
    """Per column: (row key or modality name, is_modality)."""
    columns, seen = [], set()
    for cell in cells:
        name = cell.strip()
        if name.lower() in ROW_KEYS and name.lower() != "images":
            column = (name.lower(), False)
        elif name in registry:
            column = (registry[name].name, True)
        else:
            keys = [k for k in ROW_KEYS if k != "images"]
            raise ValueError(
                f"unknown column {name!r}; allowed: {', '.join(keys)} and the modalities {', '.join(registry.names)}"
            )
        if column[0].lower() in seen:
            raise ValueError(f"column {name!r} given twice (column names are case-insensitive)")
        seen.add(column[0].lower())
        columns.append(column)
    missing = [k for k in REQUIRED_KEYS if k != "images" and k not in seen]
    if missing:
        raise ValueError(f"missing column(s) {missing}")
    if not any(is_modality for _, is_modality in columns):
        raise ValueError(f"no modality column; name one column per modality ({', '.join(registry.names)})")
    return columns


def _csv_row(cells: list[str], header: list[tuple[str, bool]]) -> dict[str, Any]:
    if len(cells) != len(header):
        raise ValueError(f"expected {len(header)} cells as in the header, got {len(cells)}")
    row: dict[str, Any] = {"images": {}}
    for (key, is_modality), cell in zip(header, cells, strict=True):
        cell = cell.strip()
        if is_modality:
            if cell:
                row["images"][key] = cell
        elif key == "labels":
            row[key] = _csv_labels(cell)
        elif key == "spacing":
            row[key] = _csv_spacing(cell)
        else:
            row[key] = cell or None
    return row


def _csv_labels(cell: str) -> str | list[str] | None:
    if _CSV_LABEL_SEPARATOR not in cell:
        return cell or None
    return [name.strip() for name in cell.split(_CSV_LABEL_SEPARATOR) if name.strip()]


def _csv_spacing(cell: str) -> list[float] | None:
    if not cell:
        return None
    try:
        return [float(v) for v in re.split(r"[\s,x]+", cell)]
    except ValueError:
        raise ValueError(f"spacing: expected three numbers in mm like 1,1,1.5 or 1x1x1.5, got {cell!r}") from None


def _spacing(value: object, where: str) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3 and all(_positive_number(v) for v in value)):
        raise ValueError(f"{where}: expected three positive numbers [sx, sy, sz] in mm, got {value!r}")
    sx, sy, sz = value
    return float(sx), float(sy), float(sz)


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _images(
    images: object, folder: Path, registry: ModalityRegistry, row_spacing: tuple[float, float, float] | None
) -> dict[str, ImageSource]:
    if not (isinstance(images, dict) and images):
        raise ValueError(f"images: expected a non-empty object {{modality: path}}, got {images!r}")
    sources: dict[str, ImageSource] = {}
    given_as: dict[str, str] = {}
    for key, spec in images.items():
        name = canonical_modality(key, registry)
        if name in sources:
            raise ValueError(f"images: modality {name} given twice ({given_as[name]!r} and {key!r})")
        given_as[name] = key
        sources[name] = _image(spec if isinstance(spec, dict) else {"path": spec}, f"images.{key}", folder, row_spacing)
    return sources


def _image(
    spec: dict[str, Any], where: str, folder: Path, row_spacing: tuple[float, float, float] | None
) -> ImageSource:
    unknown = sorted(set(spec) - set(IMAGE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(IMAGE_KEYS)}")
    path, channel = spec.get("path"), spec.get("channel")
    if not (isinstance(path, str) and path.strip()):
        raise ValueError(f'{where}: expected a path (a non-empty string) or {{"path": ...}}, got {path!r}')
    suffix = image_suffix(path)
    if suffix is None:
        raise ValueError(f"{where}: unsupported image file {path!r}; expected {', '.join(IMAGE_SUFFIXES)}")
    if channel is not None and not (isinstance(channel, int) and not isinstance(channel, bool) and channel >= 0):
        raise ValueError(f"{where}.channel: expected an integer >= 0, got {channel!r}")
    spacing = None if spec.get("spacing") is None else _spacing(spec["spacing"], f"{where}.spacing")
    if suffix != ".npy" and spacing is not None:
        raise ValueError(f"{where}.spacing: only for .npy images (a NIfTI header carries its own spacing)")
    if suffix == ".npy":
        spacing = spacing or row_spacing
        if spacing is None:
            raise ValueError(f"{where}: a .npy image needs a spacing in mm ([sx, sy, sz] on the image or the row)")
    return ImageSource(_resolve(path, folder), channel, spacing)


def _resolve(path: str, folder: Path) -> Path:
    return Path(os.path.normpath(folder / Path(path).expanduser()))


def _relative(path: Path, folder: Path) -> str:
    path = Path(os.path.abspath(path))
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)
