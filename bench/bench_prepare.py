"""``prepare`` seconds per study on synthetic NIfTI studies of realistic size, with 1 and 2 worker processes.

    python bench/bench_prepare.py                       # 4 studies x 4 modalities, 240x240x155 at 1 mm -> 1.5 mm
    python bench/bench_prepare.py --studies 8 --workers 1 2 4 --size 240 240 155

Each study holds ``--modalities`` gzipped int16 NIfTI volumes of a head (an ellipsoid of tissue with Rician
background noise, as a scanner writes them), the later ones in LPS order at another voxel size on a shifted field
of view, so every step of ``prepare`` runs: read, reorient, resample, mask, crop, z-score, write. Every timing is a
fresh cache (nothing reused); a second run over the last cache gives the cost of a resumed run (hash checks only).
``pytest bench/bench_prepare.py`` times a small case with pytest-benchmark.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medmap_fast.data.manifest import ImageSource, ManifestStudy
from medmap_fast.data.prepare import prepare

MODALITIES = ("T1", "T1c", "T2", "FLAIR")


def head_volume(shape: tuple[int, int, int], spacing: float, lps: bool, shift: float, seed: int) -> nib.Nifti1Image:
    """An int16 head (ellipsoid filling ~70% of the field of view, tissue ~1000 with structure, Rician noise ~20)
    centred at world 0, the field of view moved by ``shift`` mm along every axis, RAS or LPS voxel order."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.75) ** 2)
    tissue = np.where(r <= 1, 800 + 400 * np.cos(6 * r) ** 2, 0.0)
    volume = np.hypot(tissue + rng.normal(0, 20, shape), rng.normal(0, 20, shape)).astype(np.int16)
    signs = (-1.0, -1.0, 1.0) if lps else (1.0, 1.0, 1.0)
    affine = np.diag([*(s * spacing for s in signs), 1.0])
    affine[:3, 3] = [shift - s * spacing * (n - 1) / 2 for s, n in zip(signs, shape)]
    return nib.Nifti1Image(volume, affine)


def write_studies(folder: Path, count: int, size: tuple[int, int, int], modalities: int) -> list[ManifestStudy]:
    """``count`` studies of ``modalities`` files each: the first at 1 mm on ``size``, the others LPS at 1.2 mm on a
    field of view shifted by 4 mm (so they are resampled, not copied)."""
    studies = []
    for i in range(count):
        images = {}
        for m, name in enumerate(MODALITIES[:modalities]):
            if m == 0:
                img = head_volume(size, 1.0, lps=False, shift=0.0, seed=10 * i + m)
            else:
                img = head_volume(tuple(round(n / 1.2) for n in size), 1.2, lps=True, shift=4.0, seed=10 * i + m)
            path = folder / f"s{i:03d}_{name}.nii.gz"
            nib.save(img, path)
            images[name] = ImageSource(path)
        studies.append(ManifestStudy(f"s{i:03d}", "train", images, report="synthetic"))
    return studies


def time_prepare(studies: list[ManifestStudy], cache: Path, workers: int, spacing: float) -> tuple[float, float]:
    """(wall, CPU of this process) seconds of one ``prepare`` run into ``cache``; fails when a study was skipped.
    With ``workers`` <= 1 the work runs in this process, so its CPU time is steadier than wall time on a shared host."""
    wall, cpu = time.perf_counter(), time.process_time()
    summary = prepare(studies, cache, spacing=spacing, workers=workers, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if summary.skipped:
        raise SystemExit(f"prepare skipped studies: {summary.errors}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--modalities", type=int, default=4, choices=range(1, len(MODALITIES) + 1))
    parser.add_argument("--size", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.studies} studies x "
          f"{args.modalities} modalities, {tuple(args.size)} at 1 mm (others 1.2 mm LPS) -> {args.spacing} mm")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        studies = write_studies(folder, args.studies, tuple(args.size), args.modalities)
        (folder / "tiny").mkdir()
        size_mb = sum(p.stat().st_size for p in folder.glob("*.nii.gz")) / 2**20
        print(f"wrote {size_mb:.0f} MiB of .nii.gz in {time.perf_counter() - started:.1f} s")
        n = args.studies
        tiny = write_studies(folder / "tiny", 2, (32, 32, 32), 1)
        wall, _ = time_prepare(tiny, folder / "cache_tiny", max(args.workers), args.spacing)
        print(f"worker pool start-up (once per session: the fork server imports medmap_fast): {wall:.2f} s")
        for workers in args.workers:
            cache = folder / f"cache_{workers}"
            load = os.getloadavg()[0]
            wall, cpu = time_prepare(studies, cache, workers, args.spacing)
            in_process = f"; CPU {cpu / n:.2f} s per study" if workers <= 1 else ""
            print(f"workers {workers}: {wall:.2f} s, {wall / n:.2f} s per study ({n / wall:.2f} studies/s)"
                  f"{in_process}; load average before: {load:.1f}")
        wall, _ = time_prepare(studies, cache, args.workers[-1], args.spacing)
        print(f"resumed run (every entry reused, sources re-hashed), workers {args.workers[-1]}: "
              f"{wall / n:.3f} s per study")


def test_prepare_small(benchmark, tmp_path):
    """Two studies x 2 modalities at 96x96x64 -> 1.5 mm, in process; a fresh cache each round."""
    studies = write_studies(tmp_path, 2, (96, 96, 64), 2)
    rounds = iter(range(1000))
    benchmark.pedantic(lambda: time_prepare(studies, tmp_path / f"cache{next(rounds)}", 1, 1.5), rounds=3,
                       iterations=1)


if __name__ == "__main__":
    main()
