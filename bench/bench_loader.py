"""Loader throughput: the cache + torch loader and the DALI CPU pipeline against MONAI reading the NIfTI files.

    python bench/bench_loader.py                       # 16 studies x 4 modalities, 160x192x160 at 1.2 mm, 96^3 crops
    python bench/bench_loader.py --studies 8 --shape 96 112 96 --size 64

The studies are generated as int16 ``.nii.gz`` files in a temporary folder (a head-like phantom, LAS-oriented as
many DICOM conversions are, so every reader must reorient), prepared once with ``medmap_fast.data.prepare`` at
1.5 mm (seconds per study reported), and then read, in one run, by
  (a) the cache + torch loader (``make_loader(kind="torch")``, 2 worker processes, training augmentation),
  (b) the DALI CPU pipeline (``make_loader(kind="dali")``, 2 threads, the same augmentation),
  (c) MONAI ``LoadImaged + EnsureChannelFirstd + Orientationd(RAS) + Spacingd(1.5) + NormalizeIntensityd(nonzero)
      + RandSpatialCropd`` in a ``DataLoader`` with 2 workers, from the NIfTI files.
Throughput is modality volumes per second at the crop size, after one warm-up pass each (files in the page cache
for every reader). ``pytest bench/bench_loader.py`` times a small case with pytest-benchmark.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmap_fast.data.augment import AugmentConfig
from medmap_fast.data.cache import read_index
from medmap_fast.data.loaders import dali_importable, make_loader
from medmap_fast.data.manifest import ImageSource, ManifestStudy
from medmap_fast.data.prepare import prepare

MODALITIES = ("T1", "T1c", "T2", "FLAIR")


def phantom(shape: tuple[int, int, int], modality: int, rng: np.random.Generator) -> np.ndarray:
    """An int16 head-like volume: an ellipsoid with skull, tissue shells and a lesion, contrast by modality, noise."""
    axes = [np.linspace(-1.15, 1.15, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = np.sqrt(x**2 + (y / 1.1) ** 2 + (z / 0.95) ** 2)
    lesion = (x - 0.3) ** 2 + (y + 0.2) ** 2 + z**2 < 0.04
    levels = np.array([[900, 400, 600], [950, 700, 500], [300, 800, 1200], [500, 700, 600]])[modality]
    vol = np.where(r < 0.85, levels[1] + 200 * np.cos(9 * r), 0) + np.where((r >= 0.85) & (r < 1.0), levels[0], 0)
    vol = vol + lesion * levels[2] + rng.normal(0, 20, shape).astype(np.float32) * (r < 1.0)
    return np.clip(vol, 0, 32767).astype(np.int16)


def write_studies(folder: Path, studies: int, shape: tuple[int, int, int], voxel: float) -> list[ManifestStudy]:
    """``studies`` NIfTI studies of the four MODALITIES (LAS affine, ``voxel`` mm) and their manifest rows."""
    affine = np.diag([-voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [voxel * shape[0] / 2, -voxel * shape[1] / 2, -voxel * shape[2] / 2]
    rows = []
    for s in range(studies):
        rng = np.random.default_rng(s)
        images = {}
        for m, name in enumerate(MODALITIES):
            path = folder / f"study{s:03d}" / f"{name}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(phantom(shape, m, rng), affine), path)
            images[name] = ImageSource(path)
        rows.append(ManifestStudy(f"study{s:03d}", "train", images, report="synthetic"))
    return rows


def monai_loader(rows: list[ManifestStudy], size: int, spacing: float, workers: int) -> Iterable:
    """MONAI's NIfTI-to-crop pipeline over the same files (one dict per study, one key per modality)."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd,
                                  RandSpatialCropd, Spacingd)

    keys = list(MODALITIES)
    transform = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys),
                         Orientationd(keys, axcodes="RAS"), Spacingd(keys, pixdim=(spacing,) * 3, mode="bilinear"),
                         NormalizeIntensityd(keys, nonzero=True), RandSpatialCropd(keys, roi_size=(size,) * 3,
                                                                                   random_size=False)])
    data = [{k: str(r.images[k].path) for k in keys} for r in rows]
    return DataLoader(Dataset(data, transform), batch_size=2, num_workers=workers, shuffle=True)


def volumes_per_s(run: Callable[[], int], passes: int) -> float:
    """Volumes per second over ``passes`` timed passes, after one warm-up pass; ``run`` returns volumes it read."""
    run()
    started, count = time.perf_counter(), 0
    for _ in range(passes):
        count += run()
    return count / (time.perf_counter() - started)


def cache_runner(cache: Path, kind: str, size: int, workers: int) -> Callable[[], int]:
    """One epoch of our loader over the cache (training augmentation, batch 2); returns its volume count."""
    entries = read_index(cache)
    loader = make_loader(entries, cache, modality_names=MODALITIES, labels=None,
                         augment=AugmentConfig(size=(size,) * 3, rot90=True), batch_size=2, shuffle=True, seed=0,
                         num_workers=workers, kind=kind)
    epochs = iter(range(10**9))
    return lambda: sum(len(b["modality_ids"]) for b in loader.epoch(next(epochs)))


def device_line() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    parser.add_argument("--voxel", type=float, default=1.2, help="mm of the NIfTI files")
    parser.add_argument("--spacing", type=float, default=1.5, help="mm of the cache and of MONAI's Spacingd")
    parser.add_argument("--size", type=int, default=96, help="crop side")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="timed passes of the cache loaders (MONAI: 1)")
    parser.add_argument("--skip-monai", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loaders' workers are the parallelism
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        rows = write_studies(folder / "nifti", args.studies, tuple(args.shape), args.voxel)
        print(f"generated {args.studies} studies x {len(MODALITIES)} of {tuple(args.shape)} at {args.voxel} mm "
              f"in {time.perf_counter() - t0:.1f} s")
        summary = prepare(rows, folder / "cache", spacing=args.spacing, workers=args.workers, progress=False)
        shape = read_index(folder / "cache")[0].shape
        print(f"prepare ({args.workers} workers): {summary.seconds / args.studies:.2f} s per study "
              f"({summary.seconds:.1f} s), cache arrays {shape}")
        results = {"cache + torch": volumes_per_s(cache_runner(folder / "cache", "torch", args.size, args.workers),
                                                  args.passes)}
        if dali_importable():
            results["DALI CPU"] = volumes_per_s(cache_runner(folder / "cache", "dali", args.size, args.workers),
                                                args.passes)
        if not args.skip_monai:
            loader = monai_loader(rows, args.size, args.spacing, args.workers)
            results["MONAI from NIfTI"] = volumes_per_s(
                lambda: sum(len(MODALITIES) * len(b[MODALITIES[0]]) for b in loader), 1)
    base = results.get("MONAI from NIfTI")
    print(f"\nloader throughput, {args.size}^3 crops, {args.workers} workers, device: {device_line()}")
    for name, rate in results.items():
        ratio = f"  {rate / base:6.1f}x MONAI" if base else ""
        print(f"  {name:18s} {rate:8.1f} volumes/s{ratio}")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loader")
    prepare(write_studies(folder / "nifti", 4, (64, 72, 64), 1.2), folder / "cache", spacing=1.5, workers=0,
            progress=False)
    return folder / "cache"


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_importable(), reason="nvidia-dali is not installed"))])
def test_loader_epoch(benchmark, small_cache: Path, kind: str) -> None:
    """One epoch of 4 studies x 4 modalities, 32^3 crops, in-process (no workers), one torch thread (as in a
    DataLoader worker: on a loaded 2-core machine, OpenMP barriers make these small tensor ops 100x slower)."""
    run = cache_runner(small_cache, kind, 32, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert benchmark(run) == 16
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
