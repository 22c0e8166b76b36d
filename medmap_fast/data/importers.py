"""Importers: manifests from common dataset layouts (``medmap-fast manifest msd|folders ROOT``).

Each returns the studies as :class:`ManifestStudy` records (absolute paths, ``line`` 0); the CLI writes them with
:func:`~medmap_fast.data.manifest.write_manifest`. Files are listed, not opened (``prepare`` checks them). A layout
that cannot be imported is a :class:`ManifestError` naming the file or folder; a missing root or ``dataset.json``
a FileNotFoundError.

Splits: a study's split is drawn from a hash of ``(seed, study_id)`` (:func:`assign_split`), so it is the same on
every run and every machine, and adding or removing studies never moves another study to another split. The
fractions hold on average (binomially around them), not exactly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from medmap_fast.data.manifest import (
    ImageSource,
    ManifestError,
    ManifestStudy,
    Modalities,
    as_registry,
    canonical_modality,
    image_suffix,
    parse_labels,
    parse_split,
)
from medmap_fast.fileio import read_json_object
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.validation import fail

# Medical Segmentation Decathlon channel names (Task01_BrainTumour) -> registry names; registry names also match.
MSD_MODALITY_NAMES = {"flair": "FLAIR", "t1w": "T1", "t1gd": "T1c", "t2w": "T2"}
FOLDER_FILES = ("report.txt", "labels.txt", "split.txt")
_MAX_LISTED = 20
T = TypeVar("T")


def assign_split(study_id: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """ "train", "val" or "test" for ``study_id``: u = the first 64 bits of sha256(f"{seed}:{study_id}") as a number
    in [0, 1); test when u < test_fraction, val when u < val_fraction, else train."""
    _check_fractions(val_fraction, test_fraction)
    digest = hashlib.sha256(f"{seed}:{study_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def msd_manifest(
    root: str | os.PathLike,
    modalities: Modalities = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> list[ManifestStudy]:
    """Studies of a Medical Segmentation Decathlon task (Task01_BrainTumour layout).

    ``root/dataset.json`` names the channels (``"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}``)
    and lists ``"training": [{"image": "./imagesTr/BRATS_001.nii.gz", ...}]`` and ``"test": ["./imagesTs/..."]``.
    One study per image (study_id = its file name without the extension), one modality per channel
    (``ImageSource(path, channel=i)``; a single-channel task gives 3-D images, channel None). Channel names map
    through :data:`MSD_MODALITY_NAMES` or match a registry name (case-insensitive). Training images get the
    hashed split (:func:`assign_split`); the task's own test images (no public segmentations) are split "test".
    No reports, labels None. Errors name ``dataset.json``.
    """
    _check_fractions(val_fraction, test_fraction)
    root = Path(root).absolute()
    dataset = root / "dataset.json"
    try:
        info = read_json_object(dataset, "the Medical Segmentation Decathlon (a task folder's dataset.json)")
    except ValueError as err:  # not JSON, not an object: a malformed layout (missing: FileNotFoundError)
        raise ManifestError(str(err)) from None
    channels = _msd_channels(info.get("modality"), dataset, as_registry(modalities))
    training, test = info.get("training"), info.get("test", [])
    if not isinstance(training, list) or not isinstance(test, list):
        raise ManifestError(f"{dataset}: expected lists 'training' (of {{\"image\": path, ...}}) and 'test' (of paths)")
    entries: list[tuple[object, str | None]] = [
        (e.get("image") if isinstance(e, dict) else None, None) for e in training
    ]
    entries += [(e, "test") for e in test]
    studies: dict[str, ManifestStudy] = {}
    for number, (image, split) in enumerate(entries):
        where = f"training[{number}]" if number < len(training) else f"test[{number - len(training)}]"
        suffix = image_suffix(image) if isinstance(image, str) else None
        if not isinstance(image, str) or suffix not in (".nii.gz", ".nii"):
            raise ManifestError(f"{dataset}: {where}: expected a NIfTI image path (.nii.gz or .nii), got {image!r}")
        path = Path(os.path.normpath(root / image))
        study_id = path.name[: -len(suffix)]
        if study_id in studies:
            raise ManifestError(f"{dataset}: {where}: image {image!r} gives study {study_id!r} a second time")
        sources = {name: ImageSource(path, channel=i if len(channels) > 1 else None) for i, name in enumerate(channels)}
        studies[study_id] = ManifestStudy(
            study_id, split or assign_split(study_id, seed, val_fraction, test_fraction), sources
        )
    if not studies:
        raise ManifestError(f"{dataset}: no images in 'training' or 'test'")
    return list(studies.values())


def folders_manifest(
    root: str | os.PathLike,
    modalities: Modalities = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> list[ManifestStudy]:
    """Studies of a folder-per-study tree: ``root/<study_id>/<modality>.nii.gz`` (or ``.nii``; the file name's stem
    is a registry name, any case), with optional ``report.txt`` (the report, as ``report_file``), ``labels.txt``
    (one class name per non-empty line: one line = a single label, several = a multi-label list) and ``split.txt``
    (train / val / test, overriding the hashed split of :func:`assign_split`).

    Names starting with "." (``.DS_Store``, ``._*``) and files directly in ``root`` are ignored. Any other entry of a
    study folder (a misspelt modality, a ``.npy`` without a spacing, a sub-folder) is an error rather than a
    silently dropped modality; every problem of every folder is listed in one ValueError. Modalities are in registry
    order (the first one's field of view sets the study's grid in ``prepare``).
    """
    _check_fractions(val_fraction, test_fraction)
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    registry = as_registry(modalities)
    studies, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            studies.append(_folder_study(folder, registry, seed, val_fraction, test_fraction))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ManifestError(
            f"{root}: {len(problems)} study folder(s) not usable:\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more
        )
    if not studies:
        raise ManifestError(f"{root}: no study folders (expected one sub-folder per study holding <modality>.nii.gz)")
    return studies


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction <= 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1):
        fail("val_fraction, test_fraction", "fractions in [0, 1] with a sum <= 1", f"{val_fraction}, {test_fraction}")


def _msd_channels(modality: object, dataset: Path, registry: ModalityRegistry) -> list[str]:
    """Registry names of the channels 0..C-1 that dataset.json's "modality" names."""
    if not (
        isinstance(modality, dict)
        and modality
        and sorted(modality) == [str(i) for i in range(len(modality))]
        and all(isinstance(v, str) for v in modality.values())
    ):
        raise ManifestError(f'{dataset}: expected "modality": {{"0": name, "1": name, ...}}, got {modality!r}')
    names: list[str] = []
    for channel in range(len(modality)):
        given = modality[str(channel)]
        alias = MSD_MODALITY_NAMES.get(given.lower())
        name = given if given in registry else alias if alias in registry else None
        if name is None:
            raise ManifestError(
                f"{dataset}: modality {channel} {given!r} is no registry modality "
                f"({', '.join(registry.names)}) and maps to none (known MSD names: {MSD_MODALITY_NAMES})"
            )
        name = registry[name].name
        if name in names:
            raise ManifestError(f"{dataset}: channels {names.index(name)} and {channel} are both modality {name}")
        names.append(name)
    return names


def _folder_study(
    folder: Path, registry: ModalityRegistry, seed: int, val_fraction: float, test_fraction: float
) -> ManifestStudy:
    images: dict[str, ImageSource] = {}
    extras: dict[str, Path] = {}
    unexpected = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        suffix = image_suffix(entry.name)
        stem = entry.name[: -len(suffix)] if suffix in (".nii.gz", ".nii") and entry.is_file() else None
        if entry.name.lower() in FOLDER_FILES and entry.is_file() and entry.name.lower() not in extras:
            extras[entry.name.lower()] = entry
        elif stem in registry and canonical_modality(stem, registry) not in images:
            images[canonical_modality(stem, registry)] = ImageSource(entry)
        else:
            unexpected.append(entry.name)
    if unexpected:
        raise ValueError(
            f"{folder}: unexpected {unexpected}; a study folder holds <modality>.nii.gz or .nii once "
            f"per modality ({', '.join(registry.names)}), report.txt, labels.txt, split.txt"
        )
    if not images:
        raise ValueError(f"{folder}: no <modality>.nii.gz or .nii file ({', '.join(registry.names)})")
    split_file, labels_file = extras.get("split.txt"), extras.get("labels.txt")
    split = (
        assign_split(folder.name, seed, val_fraction, test_fraction)
        if split_file is None
        else _parse_file(split_file, lambda text: parse_split(text.strip()))
    )
    labels = None if labels_file is None else _parse_file(labels_file, _labels_lines)
    return ManifestStudy(
        folder.name,
        split,
        dict(sorted(images.items(), key=lambda item: registry.index(item[0]))),
        report_file=extras.get("report.txt"),
        labels=labels,
    )


def _labels_lines(text: str) -> str | tuple[str, ...] | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no label (one class name per line); remove the file for an unlabelled study")
    return parse_labels(lines[0] if len(lines) == 1 else lines)


def _parse_file(path: Path, parse: Callable[[str], T]) -> T:
    """``parse(text of path)``; its ValueError and unreadable text name the file."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
