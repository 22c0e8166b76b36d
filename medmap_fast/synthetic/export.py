"""The demo as one more manifest source: synthetic studies written as NIfTI files plus a manifest.

Layout of the output folder ``OUT``::

    OUT/studies/<study_id>/<modality>.nii.gz   one 3-D NIfTI-1 per acquired sequence: int16 with scl_slope/scl_inter
                                               (the data are Rician noise in every bit, so float32 only doubles the
                                               size), array axes (i, j, k) = the study volume's (D, H, W) = (x, y, z)
    OUT/studies/<study_id>/study.json          the study's record (report, label, modalities, attributes, and the key
                                               of the settings that made it), written after its images
    OUT/manifest.jsonl                         one row per study (medmap_fast.data.manifest's JSONL format)
    OUT/settings.json                          the arguments of a complete output, written last

The affine is the *scanner* frame: the study's unposed grid (:func:`scanner_grid`). The random pose of a demo study
simulates where the head or abdomen lies inside the scanner, which a real header does not know either, so the
header keeps the pose in the image. nibabel's world coordinates of voxel (i, j, k) are the grid's
``coords()[i, j, k]``, in RAS+ mm.

Every file is written atomically and the byte stream is deterministic (gzip without a time stamp or file name), so
the same arguments give the same files whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from torch.utils.data import DataLoader, Dataset

from medmap_fast.data.manifest import ImageSource, ManifestStudy, write_manifest
from medmap_fast.fileio import atomic_write_bytes
from medmap_fast.validation import fail

from .demo import CLASSES, DemoConfig, DemoDataset, generate_study, scanner_grid

MANIFEST_FILE = "manifest.jsonl"
SETTINGS_FILE = "settings.json"
STUDIES_DIR = "studies"
RECORD_FILE = "study.json"
IMAGE_SUFFIX = ".nii.gz"
# Bump when the files written for a study change (format, header, layout): earlier studies are then rewritten.
FORMAT_VERSION = 1
_SCANNER = 1  # NIfTI xform code "scanner_anat": coordinates of the scanner, not of a template


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test), ``round(test_fraction * n)`` of them test, spread over the classes in proportion to
    their sizes (largest remainders get the leftover places) and chosen at random within each class."""
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels)
    classes, counts = np.unique(label_array, return_counts=True)
    exact = test_fraction * counts
    take = np.floor(exact).astype(int)
    leftover = int(round(test_fraction * len(labels))) - int(take.sum())
    by_remainder = np.lexsort((rng.random(len(classes)), -(exact - take)))  # random order among equal remainders
    take[by_remainder[:leftover]] += 1
    test = [
        i
        for c, k in zip(classes, take, strict=True)
        for i in rng.permutation(np.flatnonzero(label_array == c))[:k].tolist()
    ]
    if not test or len(test) == len(labels):
        fail("test_fraction", f"a split leaving studies on both sides of {len(labels)} studies", repr(test_fraction))
    test_set = set(test)
    return [i for i in range(len(labels)) if i not in test_set], sorted(test)


def demo_splits(num_studies: int, seed: int, config: DemoConfig, test_fraction: float) -> list[str]:
    """ "train" or "test" for studies 0..num_studies-1, without rendering them: the split of the in-memory demo
    (stratified by the class index within ``config.class_pool``, seeded by ``seed``)."""
    pool = config.class_pool
    labels = [pool.index(CLASSES[c]) for c in DemoDataset(num_studies, seed, config).labels()]
    _, test = stratified_split(labels, test_fraction, seed)
    splits = ["train"] * num_studies
    for i in test:
        splits[i] = "test"
    return splits


def nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file of a float volume [X, Y, Z] stored as int16 with slope and intercept (nibabel spreads
    the volume's range over the 65536 int16 values: the error is at most half a step), sform = qform = ``affine``."""
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), None)
    image.set_sform(affine, code=_SCANNER)
    image.set_qform(affine, code=_SCANNER)
    image.header.set_xyzt_units("mm", "sec")
    image.set_data_dtype(np.int16)
    # Level 1 (nibabel's default): noisy data hardly compress further at higher levels. mtime=0: same bytes every run.
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _study_key(index: int, seed: int, config: DemoConfig) -> dict[str, Any]:
    """What a study's files depend on (JSON-normalised, so it compares equal to a key read back from disk)."""
    key = {"format": FORMAT_VERSION, "seed": seed, "index": index, "config": dataclasses.asdict(config)}
    return json.loads(json.dumps(key))


def _study_dir(out_dir: Path, index: int, seed: int) -> Path:
    """The folder of a study: ``out_dir/studies/<study_id>`` (the id the generator gives it)."""
    return out_dir / STUDIES_DIR / f"demo-s{seed}-{index:06d}"


def _read_record(folder: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a complete study written with ``key``, or None (missing, unreadable, other settings, or an
    image gone): the study is then written again."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if not all((folder / f"{m}{IMAGE_SUFFIX}").is_file() for m in record["modalities"]):
        return None
    return record


def _remove_study_files(folder: Path, keep: Sequence[str] = ()) -> None:
    """Delete the files this module writes in a study folder (its record first), except the images of ``keep``."""
    (folder / RECORD_FILE).unlink(missing_ok=True)
    for path in folder.glob(f"*{IMAGE_SUFFIX}"):
        if path.name[: -len(IMAGE_SUFFIX)] not in keep:
            path.unlink()


def write_study(folder: Path, index: int, seed: int, config: DemoConfig) -> dict[str, Any]:
    """Generate study ``index`` of ``seed`` and write its images and record into ``folder``; returns the record."""
    study = generate_study(index, seed, config)
    if study.study_id != folder.name:
        raise ValueError(f"{folder}: expected the folder of study {study.study_id!r}")
    affine = scanner_grid(study.organ, config.size).affine
    _remove_study_files(folder, keep=study.modalities)  # no record until every image of these settings is there
    for name, volume in zip(study.modalities, study.volume.numpy(), strict=True):
        atomic_write_bytes(folder / f"{name}{IMAGE_SUFFIX}", nifti_bytes(volume, affine))
    record = {
        "key": _study_key(index, seed, config),
        "study_id": study.study_id,
        "label": CLASSES[study.label],
        "report": study.report,
        "modalities": list(study.modalities),
        "attributes": study.attributes,
    }
    atomic_write_bytes(folder / RECORD_FILE, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return record


class _StudyWriter(Dataset):
    """Item k writes study ``indices[k]`` and returns its record (DataLoader workers then write in parallel)."""

    def __init__(self, out_dir: Path, indices: Sequence[int], seed: int, config: DemoConfig) -> None:
        self.out_dir, self.indices, self.seed, self.config = out_dir, list(indices), seed, config

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = self.indices[k]
        return write_study(_study_dir(self.out_dir, index, self.seed), index, self.seed, self.config)


def _manifest_studies(
    folders: Sequence[Path], records: Sequence[dict[str, Any]], splits: Sequence[str]
) -> list[ManifestStudy]:
    """The manifest's studies: one per record, its images in the study's folder."""
    return [
        ManifestStudy(
            study_id=r["study_id"],
            split=split,
            report=r["report"],
            labels=r["label"],
            images={m: ImageSource(folder / f"{m}{IMAGE_SUFFIX}") for m in r["modalities"]},
        )
        for folder, r, split in zip(folders, records, splits, strict=True)
    ]


def _remove_stale_studies(out_dir: Path, keep: set[str]) -> None:
    """Delete the files of earlier demo studies that the current arguments do not list (another seed or count)."""
    for folder in sorted((out_dir / STUDIES_DIR).glob("*")):
        if folder.name not in keep and (folder / RECORD_FILE).is_file():
            _remove_study_files(folder)
            if not any(folder.iterdir()):
                folder.rmdir()


def write_demo_studies(
    out_dir: str | os.PathLike,
    num_studies: int,
    seed: int = 0,
    config: DemoConfig | None = None,
    test_fraction: float = 0.25,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write demo studies 0..num_studies-1 of ``seed`` as NIfTI files plus a manifest into ``out_dir``; returns the
    manifest's path (``out_dir/manifest.jsonl``).

    Splits: "train" / "test", stratified by class, ``round(test_fraction * num_studies)`` test studies (the split the
    in-memory demo used). Labels: the class name. ``workers``: generator processes (None: one per available CPU;
    0 or 1: in this process); the files do not depend on it.

    Reuse: a complete earlier output of the same arguments is returned at once. Other arguments into the same folder
    regenerate what differs: studies whose seed, index and config match are kept (a larger ``num_studies`` or another
    ``test_fraction`` writes only the new studies and the manifest), the rest are rewritten, and studies no longer
    listed are deleted. A killed run resumes where it stopped (every file is written atomically, a study's record
    after its images, the settings file last).
    """
    config = config or DemoConfig()
    if not isinstance(num_studies, int) or num_studies < 2:
        fail("num_studies", "an int >= 2 (a train and a test study)", repr(num_studies))
    if not 0.0 < test_fraction < 1.0:
        fail("test_fraction", "a fraction in (0, 1)", repr(test_fraction))
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        fail("workers", "None or an int >= 0", repr(workers))
    splits = demo_splits(num_studies, seed, config, test_fraction)  # first: a bad test_fraction fails before any work
    out_dir = Path(out_dir).resolve()
    manifest, settings_path = out_dir / MANIFEST_FILE, out_dir / SETTINGS_FILE
    settings = json.loads(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "num_studies": num_studies,
                "seed": seed,
                "test_fraction": test_fraction,
                "config": dataclasses.asdict(config),
            }
        )
    )
    try:
        previous = json.loads(settings_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None

    folders = [_study_dir(out_dir, i, seed) for i in range(num_studies)]
    records = [_read_record(folder, _study_key(i, seed, config)) for i, folder in enumerate(folders)]
    todo = [i for i, r in enumerate(records) if r is None]
    if previous == settings and not todo and manifest.is_file():
        return manifest
    settings_path.unlink(missing_ok=True)  # the folder is incomplete until this run ends

    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    parallel = workers > 1 and len(todo) > 1
    loader = DataLoader(
        _StudyWriter(out_dir, todo, seed, config),
        batch_size=None,
        num_workers=workers if parallel else 0,
        prefetch_factor=4 if parallel else None,
    )
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(
            loader,
            desc="writing demo studies",
            unit="study",
            total=num_studies,
            initial=num_studies - len(todo),
            dynamic_ncols=True,
            mininterval=2.0,
        )
    written = dict(zip(todo, loader, strict=True))
    studies = [written[i] if record is None else record for i, record in enumerate(records)]

    _remove_stale_studies(out_dir, {folder.name for folder in folders})
    write_manifest(_manifest_studies(folders, studies, splits), manifest)  # paths relative: the folder can move
    atomic_write_bytes(settings_path, (json.dumps(settings, indent=1) + "\n").encode("utf-8"))
    return manifest
