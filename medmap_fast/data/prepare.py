"""``medmap-fast prepare``: the studies of a manifest -> the cache the loaders read (layout in :mod:`.cache`).

Per study, each modality is read with nibabel (a 4-D file needs a ``channel``, an index along its last axis;
``.npy`` files take their given spacing as a RAS diagonal affine) and turned to canonical RAS
(``nib.as_closest_canonical``). The first modality defines the grid: its field of view, its axis directions, at
``spacing`` mm (None keeps its own voxel size). Every modality is resampled onto that grid (linear, scipy.ndimage;
copied unchanged when already on it), a foreground mask is found on all modalities together, the grid is cropped to
the mask's bounding box (+ ``margin`` voxels), each modality is z-scored over the mask and set to exactly 0 outside
it, and the study is written as one C-order float16 array ``[M_present, X, Y, Z]`` plus a JSON sidecar, both
atomically.

A study whose files cannot be used is skipped with one reason in ``errors.jsonl``; the others go on. An entry whose
sources (size, then sha256) and settings are unchanged is reused; a good entry is never replaced by a failed one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from medmap_fast.data.cache import ERRORS_FILE, STUDIES_DIR, CacheEntry, study_files, write_errors, write_index
from medmap_fast.data.manifest import ImageSource, ManifestStudy, read_manifest, read_report
from medmap_fast.fileio import atomic_path, atomic_write_bytes
from medmap_fast.validation import fail

FORMAT_VERSION = 1
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    MemoryError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    nib.spatialimages.ImageDataError,
    nib.wrapstruct.WrapStructError,
)
_OVERLAP_SAMPLES = 32  # grid points per axis at which a modality's coverage of the grid is measured
_ON_GRID_ATOL = 1e-4  # mm; affines closer than this are the same grid (a flipped copy round-trips to ~1e-13)


class StudyError(ValueError):
    """Why one study cannot be prepared; the message names the file and modality."""


@dataclass(frozen=True)
class PrepareSettings:
    """What an entry depends on besides its sources (stored in the sidecar; a change redoes the entry).

    spacing: target voxel size in mm along X, Y, Z, or None for the first modality's own; min_overlap: the least
    fraction of the grid each modality's field of view must cover; threshold: foreground level, as a fraction of each
    modality's 0.5-99.5 percentile range, of the smoothed max over modalities; smooth: Gaussian sigma in voxels of
    that smoothing; margin: voxels kept around the foreground's bounding box; clip: z-scores are clipped to
    [-clip, clip] (float16 holds up to 65504; no tissue contrast comes near 100 standard deviations).
    """

    spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)
    min_overlap: float = 0.5
    threshold: float = 0.1
    smooth: float = 1.0
    margin: int = 2
    clip: float = 100.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["spacing"] = None if self.spacing is None else list(self.spacing)
        return {"format": FORMAT_VERSION, **out}


@dataclass(frozen=True)
class PrepareSummary:
    """What a run did: counts of studies prepared, reused and skipped, wall seconds, the errors.jsonl rows, and
    whether the run was ``strict`` (then any skipped study makes :attr:`exit_code` 1)."""

    prepared: int
    reused: int
    skipped: int
    seconds: float
    errors: tuple[dict[str, Any], ...]
    out: Path
    strict: bool = False

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON object (the command prints it)."""
        return {
            "prepared": self.prepared,
            "reused": self.reused,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "cache": str(self.out),
            "errors": list(self.errors),
        }

    @property
    def exit_code(self) -> int:
        """The command's exit status: 1 when strict and a study was skipped, else 0."""
        return int(self.strict and self.skipped > 0)

    def line(self) -> str:
        """E.g. ``prepared 10, reused 2, skipped 1 (see CACHE/errors.jsonl) in 12.3 s``."""
        skipped = f"skipped {self.skipped}" + (f" (see {self.out / ERRORS_FILE})" if self.skipped else "")
        return f"prepared {self.prepared}, reused {self.reused}, {skipped} in {self.seconds:.1f} s"


@dataclass(frozen=True)
class _Outcome:
    """One study's result: status "prepared" | "reused" | "failed"; entry: its index row (for a failed study, the
    earlier good entry that is kept, or None); reason: why it failed."""

    status: str
    entry: CacheEntry | None
    reason: str | None = None


# --- reading --------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_size(name: str, src: ImageSource) -> int:
    try:
        return src.path.stat().st_size
    except FileNotFoundError:
        raise StudyError(f"{name} image {src.path}: file not found") from None


def _pick_channel(name: str, src: ImageSource, shape: tuple[int, ...]) -> tuple[slice | int, ...]:
    """The index that selects the 3-D volume of an array of ``shape``, after checking its dimensions.

    Trailing singleton dimensions beyond the third are ignored; a 4-D array needs ``channel``, an index along its
    last axis (the NIfTI convention, also for ``.npy``)."""
    dims = len(shape)
    while dims > 3 and shape[dims - 1] == 1:
        dims -= 1
    where = f"{name} image {src.path}"
    if dims < 3:
        raise StudyError(f"{where}: {dims}-D data of shape {shape}, expected a 3-D volume")
    if min(shape[:3]) < 2:
        raise StudyError(f"{where}: a single slice (2-D data of shape {shape}), expected a 3-D volume")
    if dims > 4:
        raise StudyError(f"{where}: {dims}-D data of shape {shape}, expected a 3-D volume or 4-D with a channel")
    if dims == 3:
        if src.channel not in (None, 0):
            raise StudyError(f"{where}: channel {src.channel} given but the file holds one 3-D volume {shape}")
        return (slice(None),) * 3 + (0,) * (len(shape) - 3)
    if src.channel is None:
        raise StudyError(f"{where}: 4-D data of shape {shape} ({shape[3]} channels) and no channel given")
    if not 0 <= src.channel < shape[3]:
        raise StudyError(f"{where}: channel {src.channel} out of range, the file has {shape[3]} channels")
    return (slice(None),) * 3 + (src.channel,) + (0,) * (len(shape) - 4)


def _read_array(name: str, src: ImageSource) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One modality as read: (float32 volume [X, Y, Z] in file order, its 4x4 voxel-to-world affine, facts about
    the source for the sidecar). Every failure is a :class:`StudyError` naming the file and modality."""
    where = f"{name} image {src.path}"
    suffix = "".join(src.path.suffixes[-2:]).lower()
    try:
        if src.path.suffix.lower() == ".npy":
            if src.spacing is None:
                raise StudyError(f"{where}: a .npy source needs a spacing (mm along its axes)")
            raw = np.load(src.path, mmap_mode="r", allow_pickle=False)
            data = np.asarray(raw[_pick_channel(name, src, raw.shape)], dtype=np.float32)
            affine = np.diag([*map(float, src.spacing), 1.0])
            info = {"shape": list(raw.shape), "spacing": list(map(float, src.spacing)), "orientation": "RAS"}
        elif suffix.endswith(".nii") or suffix.endswith(".nii.gz"):
            img = nib.load(src.path)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise StudyError(f"{where}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
            data = np.asarray(img.dataobj[_pick_channel(name, src, img.shape)], dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
            info = {
                "shape": list(img.shape),
                "spacing": [float(z) for z in img.header.get_zooms()[:3]],
                "orientation": "".join(nib.aff2axcodes(affine)),
            }
        else:
            raise StudyError(f"{where}: unsupported file type (expected .nii, .nii.gz or .npy)")
    except FileNotFoundError:
        raise StudyError(f"{where}: file not found") from None
    except StudyError:
        raise
    except _READ_ERRORS as err:
        raise StudyError(
            f"{where}: unreadable, truncated or not a NIfTI/.npy file ({type(err).__name__}: {err})"
        ) from err
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise StudyError(f"{where}: {bad} NaN/Inf voxels")
    low, high = float(data.min()), float(data.max())
    if low == high:
        what = "empty (all zero)" if low == 0 else f"constant (every voxel {low:g})"
        raise StudyError(f"{where}: {what} volume")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise StudyError(f"{where}: invalid voxel-to-world affine {affine[:3].tolist()}")
    return data, affine, info


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder to canonical RAS (``nib.as_closest_canonical``); C-contiguous, so a flipped copy of a volume gives
    bitwise the same array and the same reductions."""
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.ascontiguousarray(np.asanyarray(img.dataobj), dtype=np.float32), np.asarray(img.affine, np.float64)


# --- one grid -------------------------------------------------------------------------------------------------------


def target_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] | None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid (shape, affine) covering the field of view of a volume (``shape``, ``affine``) at ``spacing`` mm,
    with the volume's axis directions and outer voxel corners; ``spacing=None`` (or equal) returns the volume's own."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if spacing is None or np.allclose(zooms, spacing, rtol=0, atol=1e-6):
        x, y, z = (int(s) for s in shape)
        return (x, y, z), affine
    step = np.asarray(spacing, dtype=np.float64)
    size = np.maximum(1, np.round(np.asarray(shape) * zooms / step)).astype(int)
    directions = affine[:3, :3] / zooms
    corner = affine[:3, 3] - directions @ (zooms / 2)  # world position of the first voxel's outer corner
    grid = np.eye(4)
    grid[:3, :3] = directions * step
    grid[:3, 3] = corner + directions @ (step / 2)
    x, y, z = (int(s) for s in size)
    return (x, y, z), grid


def grid_coverage(shape: Sequence[int], vox2vox: np.ndarray, source_shape: Sequence[int]) -> float:
    """Fraction of the grid's voxel centres inside a source's field of view (``vox2vox``: grid voxel -> source
    voxel), measured at the centres of up to 32 equal cells per axis."""
    axes = [(np.arange(m) + 0.5) * n / m - 0.5 for n, m in ((n, min(n, _OVERLAP_SAMPLES)) for n in shape)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    mapped = points @ vox2vox[:3, :3].T + vox2vox[:3, 3]
    inside = np.all((mapped >= -0.5) & (mapped <= np.asarray(source_shape) - 0.5), axis=1)
    return float(inside.mean())


def _onto_grid(
    name: str,
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    grid: np.ndarray,
    min_overlap: float,
) -> np.ndarray:
    """``data`` (canonical, float32) on the grid: an exact copy when it is already there, else linear resampling
    (zero beyond its field of view, give or take half a voxel); a field of view covering less than ``min_overlap``
    of the grid is an error."""
    if data.shape == shape and np.allclose(affine, grid, rtol=0, atol=_ON_GRID_ATOL):
        return data
    vox2vox = np.linalg.inv(affine) @ grid
    covered = grid_coverage(shape, vox2vox, data.shape)
    if covered < min_overlap:
        raise StudyError(
            f"{name} image {path}: its field of view covers {covered:.0%} of the study's grid (the "
            f"first modality's), less than min_overlap {min_overlap:.0%}; not the same anatomy?"
        )
    matrix = vox2vox[:3, :3]
    if np.allclose(matrix, np.diag(np.diag(matrix)), rtol=0, atol=1e-9):
        matrix = np.diag(matrix)  # axis-aligned: scipy's separable (faster) path, same result
    # One edge voxel of padding: a grid point in the outer half of a border voxel takes that voxel's value rather
    # than a blend with the zero outside (which would draw a dark frame at the field of view's edge).
    padded = np.pad(data, 1, mode="edge")
    return ndimage.affine_transform(
        padded,
        matrix,
        offset=vox2vox[:3, 3] + 1,
        output_shape=shape,
        order=1,
        mode="constant",
        cval=0.0,
        output=np.float32,
    )


# --- foreground, crop, normalisation ---------------------------------------------------------------------------------


def foreground_mask(volumes: np.ndarray, threshold: float = 0.1, smooth: float = 1.0) -> np.ndarray:
    """Foreground of a study ``volumes`` [M, X, Y, Z] -> bool [X, Y, Z].

    Each modality is scaled to its robust range (0 or its 0.5th percentile, whichever is lower, to its 99.5th);
    the max over modalities, Gaussian-smoothed (sigma ``smooth`` voxels: Rician background noise averages out, tissue
    does not), above ``threshold``; its largest connected component with holes filled.
    """
    score = np.zeros(volumes.shape[1:], dtype=np.float32)
    for volume in volumes:
        low, high = np.percentile(volume[::2, ::2, ::2], [0.5, 99.5])  # a 1/8 sample: same percentiles, 8x faster
        low = min(float(low), 0.0)
        if high > low:
            np.maximum(score, (volume - low) / (high - low), out=score)
    if smooth > 0:
        score = ndimage.gaussian_filter(score, smooth)
    labels, count = ndimage.label(score > threshold)
    if count == 0:
        return np.zeros(score.shape, dtype=bool)
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return ndimage.binary_fill_holes(labels == largest)


def bounding_box(mask: np.ndarray, margin: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, stop) voxel indices of the mask's bounding box widened by ``margin`` voxels, inside the grid."""

    def extent(axis: int) -> tuple[int, int]:
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        return max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])

    (x0, x1), (y0, y1), (z0, z1) = (extent(axis) for axis in range(3))
    return (x0, y0, z0), (x1, y1, z1)


def _normalise(
    name: str, path: Path, volume: np.ndarray, mask: np.ndarray, clip: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """z-score of ``volume`` over ``mask``, 0 outside it, clipped to [-clip, clip]: float16, and its statistics."""
    values = volume[mask].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not std > 1e-6 * max(abs(mean), 1e-6):
        raise StudyError(f"{name} image {path}: constant ({mean:g}) over the study's foreground after resampling")
    z = (volume - np.float32(mean)) / np.float32(std)
    clipped = int(np.count_nonzero(np.abs(z[mask]) > clip))
    np.clip(z, -clip, clip, out=z)
    z[~mask] = 0.0
    return z.astype(np.float16), {"modality": name, "mean": mean, "std": std, "clipped_voxels": clipped}


def prepare_arrays(study: ManifestStudy, settings: PrepareSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """Read, align, crop and normalise one study: (float16 [M, X, Y, Z], the sidecar's description of it except
    the sources' sizes and hashes). Raises :class:`StudyError`."""
    if not study.images:
        raise StudyError("no images")
    volumes, sources = [], []
    frame = None  # (shape, affine) of the grid: the first image's field of view at settings.spacing
    for name, src in study.images.items():
        data, affine, info = _read_array(name, src)
        data, affine = _canonical(data, affine)
        frame = frame or target_grid(data.shape, affine, settings.spacing)
        shape, grid = frame
        volumes.append(_onto_grid(name, src.path, data, affine, shape, grid, settings.min_overlap))
        sources.append(
            {
                "modality": name,
                "path": str(src.path),
                "channel": src.channel,
                "given_spacing": None if src.spacing is None else list(map(float, src.spacing)),
                **info,
            }
        )
    stack = np.stack(volumes)
    del volumes
    mask = foreground_mask(stack, settings.threshold, settings.smooth)
    if not mask.any():
        raise StudyError(f"empty foreground mask (no voxel above {settings.threshold} of its modality's range)")
    start, stop = bounding_box(mask, settings.margin)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    mask = mask[box]
    out, stats = [], []
    for (name, src), volume in zip(study.images.items(), stack, strict=True):
        z, stat = _normalise(name, src.path, volume[box], mask, settings.clip)
        out.append(z)
        stats.append(stat)
    array = np.ascontiguousarray(np.stack(out))
    crop_affine = grid.copy()
    crop_affine[:3, 3] = grid[:3, :3] @ np.asarray(start, dtype=np.float64) + grid[:3, 3]
    meta = {
        "modalities": list(study.images),
        "shape": list(array.shape),
        "spacing": [float(s) for s in np.linalg.norm(grid[:3, :3], axis=0)],
        "affine": crop_affine.tolist(),
        "crop": {"grid_shape": list(shape), "grid_affine": grid.tolist(), "start": list(start), "stop": list(stop)},
        "foreground_voxels": int(mask.sum()),
        "normalisation": stats,
        "sources": sources,
    }
    return array, meta


# --- one study, with the cache --------------------------------------------------------------------------------------


def _report(study: ManifestStudy) -> str | None:
    try:
        return read_report(study)
    except (FileNotFoundError, ValueError) as err:
        raise StudyError(str(err)) from None


def _valid_sidecar(study_id: str, array_path: Path, sidecar_path: Path) -> dict[str, Any] | None:
    """The sidecar of a complete earlier entry of this study (its array present with the shape it states), or None."""
    try:
        meta = json.loads(sidecar_path.read_text(encoding="utf-8"))
        array = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("study_id") != study_id or meta.get("format") != FORMAT_VERSION:
        return None
    if array.dtype != np.float16 or list(array.shape) != meta.get("shape"):
        return None
    return meta


def _identity(source: dict[str, Any]) -> tuple:
    """What makes two sources the same input (their path may move)."""
    return (source["modality"], source["channel"], source.get("given_spacing"), source["size"])


def _unchanged(old: dict[str, Any], study: ManifestStudy, sizes: list[int], settings: PrepareSettings) -> bool:
    """Whether an earlier entry was made from the same sources (sizes first, then sha256) with the same settings."""
    if old.get("settings") != settings.to_json() or len(old.get("sources", ())) != len(study.images):
        return False
    current = [
        {
            "modality": n,
            "channel": s.channel,
            "size": size,
            "given_spacing": None if s.spacing is None else list(map(float, s.spacing)),
        }
        for (n, s), size in zip(study.images.items(), sizes, strict=True)
    ]
    try:
        if [_identity(s) for s in old["sources"]] != [_identity(s) for s in current]:
            return False
        return all(
            s["sha256"] == _sha256(src.path) for s, src in zip(old["sources"], study.images.values(), strict=True)
        )
    except (KeyError, TypeError, OSError):
        return False


def _entry(study: ManifestStudy, report: str | None, meta: dict[str, Any], array_path: Path) -> CacheEntry:
    labels = list(study.labels) if isinstance(study.labels, tuple) else study.labels
    return CacheEntry(
        study.study_id,
        study.split,
        report,
        labels,
        tuple(meta["modalities"]),
        tuple(meta["shape"]),
        tuple(meta["spacing"]),
        f"{array_path.parent.name}/{array_path.name}",
    )


def _write(array: np.ndarray, meta: dict[str, Any], array_path: Path, sidecar_path: Path) -> None:
    """Sidecar removed first, written last: a run killed in between leaves no sidecar, so the entry is redone."""
    sidecar_path.unlink(missing_ok=True)
    with atomic_path(array_path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    atomic_write_bytes(sidecar_path, json.dumps(meta, indent=1).encode("utf-8"))


def prepare_study(study: ManifestStudy, out: Path, settings: PrepareSettings) -> _Outcome:
    """Prepare (or reuse) one study's cache entry in ``out``; never raises for a bad study."""
    array_path, sidecar_path = study_files(out, study.study_id)
    old = _valid_sidecar(study.study_id, array_path, sidecar_path)
    report = None
    try:
        report = _report(study)
        sizes = [_file_size(name, src) for name, src in study.images.items()]
        if old is not None and _unchanged(old, study, sizes, settings):
            paths = [str(src.path) for src in study.images.values()]
            if [s["path"] for s in old["sources"]] != paths:  # same files, moved: keep the sidecar's paths true
                for source, path in zip(old["sources"], paths, strict=True):
                    source["path"] = path
                atomic_write_bytes(sidecar_path, json.dumps(old, indent=1).encode("utf-8"))
            return _Outcome("reused", _entry(study, report, old, array_path))
        array, meta = prepare_arrays(study, settings)
        for source, src, size in zip(meta["sources"], study.images.values(), sizes, strict=True):
            source.update(size=size, sha256=_sha256(src.path))
        meta = {"format": FORMAT_VERSION, "study_id": study.study_id, **meta, "settings": settings.to_json()}
        _write(array, meta, array_path, sidecar_path)
        return _Outcome("prepared", _entry(study, report, meta, array_path))
    except StudyError as err:
        if old is None:
            return _Outcome("failed", None, str(err))
        return _Outcome(
            "failed",
            _entry(study, report, old, array_path),
            f"{err}; the earlier cache entry {array_path.name} is kept",
        )


def _pool_context() -> multiprocessing.context.BaseContext:
    """Worker processes forked from a fresh fork server that has imported this module once (importing medmap_fast,
    torch included, takes ~2 s: once per session, not once per worker); never a fork of the caller, which may hold
    torch's threads. The workers' code (numpy element-wise, scipy.ndimage, zlib) is single-threaded, so the workers
    are the whole parallelism. Where there is no fork server (Windows), spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


# --- the run --------------------------------------------------------------------------------------------------------


def _settings(
    spacing: float | Sequence[float] | None,
    min_overlap: float,
    threshold: float,
    smooth: float,
    margin: int,
    clip: float,
) -> PrepareSettings:
    mm = None
    if spacing is not None:
        given = (spacing,) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)
        if len(given) != 3 or not all(isinstance(s, (int, float)) and s > 0 for s in given):
            fail("spacing", "a positive number of mm, three of them, or None", repr(given))
        sx, sy, sz = given
        mm = float(sx), float(sy), float(sz)
    if not 0 < min_overlap <= 1:
        fail("min_overlap", "a fraction in (0, 1]", repr(min_overlap))
    if not 0 < threshold < 1:
        fail("threshold", "a fraction in (0, 1)", repr(threshold))
    if not smooth >= 0 or not clip > 0 or not (isinstance(margin, int) and margin >= 0):
        fail("smooth, margin, clip", "smooth >= 0, an integer margin >= 0, clip > 0", f"{smooth}, {margin}, {clip}")
    return PrepareSettings(mm, float(min_overlap), float(threshold), float(smooth), margin, float(clip))


def _studies(manifest: str | os.PathLike | Sequence[ManifestStudy]) -> list[ManifestStudy]:
    if isinstance(manifest, (str, os.PathLike)):
        return read_manifest(manifest)
    studies = list(manifest)
    ids = [s.study_id for s in studies]
    if len(set(ids)) != len(ids):
        fail("manifest", "unique study ids", f"{sorted({i for i in ids if ids.count(i) > 1})} repeated")
    return studies


def prepare(
    manifest: str | os.PathLike | Sequence[ManifestStudy],
    out: str | os.PathLike,
    spacing: float | Sequence[float] | None = 1.5,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
    min_overlap: float = 0.5,
    threshold: float = 0.1,
    smooth: float = 1.0,
    margin: int = 2,
    clip: float = 100.0,
) -> PrepareSummary:
    """Prepare every study of ``manifest`` (a manifest file or ManifestStudy rows) into the cache folder ``out``.

    Writes ``out/studies/<key>.npy`` + ``.json`` per study, then ``out/index.jsonl`` (every good study of the
    manifest, in its order; earlier entries of studies no longer in it are left on disk but not listed) and
    ``out/errors.jsonl``. ``workers``: processes (None = CPU count; 0 or 1 = in this process). ``progress``: a tqdm
    bar and the summary line (:meth:`PrepareSummary.line`) on stderr; stdout stays free for the caller. ``strict``:
    the summary's ``exit_code`` is 1 when any study was skipped (the cache is written the same way). See
    :class:`PrepareSettings` for the other options.
    """

    started = time.perf_counter()
    settings = _settings(spacing, min_overlap, threshold, smooth, margin, clip)
    studies = _studies(manifest)
    out = Path(out)
    (out / STUDIES_DIR).mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        fail("workers", "None or an integer >= 0", repr(workers))
    done: dict[int, _Outcome] = {}  # study index -> outcome
    with tqdm(total=len(studies), unit="study", desc="prepare", disable=not progress) as bar:
        if workers <= 1 or len(studies) <= 1:
            for i, study in enumerate(studies):
                done[i] = prepare_study(study, out, settings)
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(studies)), mp_context=_pool_context()) as pool:
                futures = {pool.submit(prepare_study, s, out, settings): i for i, s in enumerate(studies)}
                for future in as_completed(futures):
                    done[futures[future]] = future.result()
                    bar.update()
    outcomes = [done[i] for i in range(len(studies))]
    errors = tuple(
        {"study_id": s.study_id, "line": s.line, "reason": o.reason}
        for s, o in zip(studies, outcomes, strict=True)
        if o.status == "failed"
    )
    write_index(out, (o.entry for o in outcomes if o.entry is not None))
    write_errors(out, errors)
    count = {k: sum(o.status == k for o in outcomes) for k in ("prepared", "reused", "failed")}
    summary = PrepareSummary(
        count["prepared"], count["reused"], count["failed"], time.perf_counter() - started, errors, out, strict
    )
    if progress:
        print(summary.line(), file=sys.stderr, flush=True)
    return summary
