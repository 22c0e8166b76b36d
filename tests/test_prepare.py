"""``prepare``: real MRI (nibabel's anatomical.nii, nilearn's MNI152 T1) and synthetic heads through the cache,
every bad-input path, orientation, one grid per study, foreground and z-score, resume and keeping good entries."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmap_fast.data.cache import read_index, study_files, study_key
from medmap_fast.data.manifest import ImageSource, ManifestStudy
from medmap_fast.data.prepare import foreground_mask, grid_coverage, prepare, target_grid

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # 33x41x25, 2 mm, LAS, int16


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def study(study_id: str, split: str = "train", **images: Path | ImageSource) -> ManifestStudy:
    sources = {k: v if isinstance(v, ImageSource) else ImageSource(Path(v)) for k, v in images.items()}
    return ManifestStudy(study_id, split, sources, report=f"report of {study_id}", labels="normal", line=1)


def run(studies, out: Path, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return prepare(studies, out, **kw)


def head(shape, spacing, origin, blob=(6.0, -10.0, 8.0), tissue=100.0, spot=300.0, noise=4.0, seed=0,
         axes=(1, 1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic head in world mm: an ellipsoid (radii 30, 36, 28 around 0) of ``tissue`` with a 6 mm ``spot``
    sphere at world ``blob``, Rician background noise; axis-aligned grid (``axes``: +1 / -1 per axis direction).
    Returns (float32 volume, affine)."""
    affine = np.diag([*(s * a for s, a in zip(spacing, axes)), 1.0])
    affine[:3, 3] = origin
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = ((xyz / [30.0, 36.0, 28.0]) ** 2).sum(-1) <= 1
    volume = np.where(inside, tissue, 0.0)
    volume[np.linalg.norm(xyz - blob, axis=-1) <= 6.0] = spot
    rng = np.random.default_rng(seed)
    volume = np.hypot(volume + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
    return volume.astype(np.float32), affine


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> dict[str, Path]:
    """Real MRI files: nibabel's anatomical.nii, nilearn's MNI152 T1 (2 mm, from the wheel), a second contrast of the
    MNI T1 (its square) at 3 mm on a smaller field of view, and corrupted copies."""
    from nilearn.datasets import load_mni152_template

    d = tmp_path_factory.mktemp("mri")
    mni = load_mni152_template(resolution=2)
    t1 = np.asarray(mni.dataobj, dtype=np.float32)
    files = {"anat": ANATOMICAL, "mni": save(d / "mni.nii.gz", t1, mni.affine)}
    # Another contrast of the same anatomy, resampled to 3 mm and cropped.
    from nibabel.processing import resample_to_output

    t2_3mm = resample_to_output(nib.Nifti1Image(t1**2, mni.affine), voxel_sizes=3.0, order=1)
    shift = np.eye(4)
    shift[:3, 3] = [4, 2, 0]  # the crop below starts 4, 2, 0 voxels in
    files["mni_t2"] = save(d / "mni_t2.nii.gz", np.asarray(t2_3mm.dataobj)[4:-4, 2:, :-3], t2_3mm.affine @ shift)
    anat = nib.load(ANATOMICAL)
    data = np.asarray(anat.dataobj, dtype=np.float32)
    raw = gzip.compress(save(d / "tmp.nii", data, anat.affine).read_bytes())
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nan = data.copy()
    nan[10, 10, 10] = np.nan
    files["nan"] = save(d / "nan.nii.gz", nan, anat.affine)
    broken = bytearray(ANATOMICAL.read_bytes())
    broken[0:4] = b"\0\0\0\0"  # sizeof_hdr
    broken[344:348] = b"xxxx"  # magic
    (d / "broken.nii").write_bytes(bytes(broken))
    files["four_d"] = save(d / "four_d.nii.gz", np.stack([data, data * 2], -1), anat.affine)
    files["two_d"] = save(d / "two_d.nii.gz", data[:, :, 12], anat.affine)
    files["one_slice"] = save(d / "one_slice.nii.gz", data[:, :, 12:13], anat.affine)
    files["five_d"] = save(d / "five_d.nii.gz", np.stack([np.stack([data, data], -1)] * 2, -1), anat.affine)
    files["constant"] = save(d / "constant.nii.gz", np.full((20, 20, 20), 7, np.float32), np.eye(4))
    files["zero"] = save(d / "zero.nii.gz", np.zeros((20, 20, 20), np.float32), np.eye(4))
    (d / "text.nii.gz").write_text("not an image")
    files.update(truncated=d / "truncated.nii.gz", broken=d / "broken.nii", text=d / "text.nii.gz",
                 missing=d / "missing.nii.gz")
    return files


def test_real_mri_and_every_bad_file_in_one_run(mri, tmp_path):
    """The real volumes are prepared in parallel workers; each bad file skips its own study with one reason naming
    the file and modality; --strict turns any skip into exit code 1."""
    four_d = ImageSource(mri["four_d"])
    studies = [study("anat", T1=mri["anat"]), study("mni", "val", T1=mri["mni"], T2=mri["mni_t2"])]
    bad = {"truncated": "EOFError", "nan": "1 NaN/Inf voxels", "broken": "unreadable", "four_d": "no channel given",
           "two_d": "2-D data", "one_slice": "a single slice", "five_d": "5-D data", "missing": "file not found",
           "constant": "constant (every voxel 7)", "zero": "empty (all zero)", "text": "unreadable"}
    studies += [study(f"bad_{k}", FLAIR=mri["anat"], T2=four_d if k == "four_d" else mri[k]) for k in bad]
    studies.append(ManifestStudy("bad_report", "test", {"T1": ImageSource(mri["anat"])},
                                 report_file=mri["missing"].parent / "missing.txt", line=14))
    summary = run(studies, tmp_path, spacing=4.0, workers=2, strict=True)
    assert (summary.prepared, summary.reused, summary.skipped, summary.exit_code) == (2, 0, len(bad) + 1, 1)
    errors = {e["study_id"]: e["reason"] for e in lines(tmp_path / "errors.jsonl")}
    assert len(errors) == len(bad) + 1
    for k, why in bad.items():
        assert why in errors[f"bad_{k}"] and f"T2 image {mri[k]}" in errors[f"bad_{k}"], errors[f"bad_{k}"]
    assert "missing.txt: report file of study 'bad_report' (manifest line 14) not found" in errors["bad_report"]
    entries = read_index(tmp_path)
    assert [e.study_id for e in entries] == ["anat", "mni"]
    assert entries[1].modalities == ("T1", "T2") and entries[1].split == "val"
    assert entries[0].report == "report of anat" and entries[0].labels == "normal"
    mni = entries[1].load(tmp_path)
    assert mni.shape[1:] < (50, 59, 48) and min(mni.shape[1:]) > 30  # cropped to the brain of a 4 mm grid
    t1, t2 = mni.astype(np.float32)
    brain = t1 != 0
    assert np.corrcoef(t1[brain], t2[brain])[0, 1] > 0.9  # the other contrast landed on the same anatomy
    assert summary.line().startswith(f"prepared 2, reused 0, skipped {len(bad) + 1} (see {tmp_path}")
    assert run(studies[:2], tmp_path / "again", spacing=4.0, strict=True).exit_code == 0
    again = read_index(tmp_path / "again")  # in-process run: the same arrays as the workers wrote
    assert all(np.array_equal(a.load(tmp_path), b.load(tmp_path / "again")) for a, b in zip(entries, again))


def test_lps_copy_gives_the_identical_array(mri, tmp_path):
    """anatomical.nii is LAS; its RAS and LPS copies (data flipped, affine adjusted) give the same cached array,
    with and without resampling."""
    canon = nib.as_closest_canonical(nib.load(mri["anat"]))
    ras = np.asarray(canon.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.shape[:2]) - 1  # voxel i of the flipped copy is voxel n-1-i of the original
    save(tmp_path / "ras.nii.gz", ras, canon.affine)
    save(tmp_path / "lps.nii.gz", ras[::-1, ::-1].copy(), canon.affine @ flip)
    assert "".join(nib.aff2axcodes(nib.load(tmp_path / "lps.nii.gz").affine)) == "LPS"
    for spacing in (None, 3.0):
        out = tmp_path / f"cache_{spacing}"
        run([study(k, T1=p) for k, p in [("las", mri["anat"]), ("ras", tmp_path / "ras.nii.gz"),
                                          ("lps", tmp_path / "lps.nii.gz")]], out, spacing=spacing)
        arrays = [e.load(out, mmap=False) for e in read_index(out)]
        assert len(arrays) == 3 and np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[0], arrays[2])
        affines = [json.loads(study_files(out, k)[1].read_text())["affine"] for k in ("las", "ras", "lps")]
        np.testing.assert_allclose(affines[0], affines[2], atol=1e-9)


def test_resampled_edge_has_no_dark_frame(mri, tmp_path):
    """anatomical.nii (2 mm, brain up to its edges) at 1.5 mm: the outer grid points lie in the outer half of the
    border voxels, and take their values (not a blend with zero, a dark frame of strongly negative z-scores)."""
    run([study("anat", T1=mri["anat"])], tmp_path, spacing=1.5)
    (entry,) = read_index(tmp_path)
    volume = entry.load(tmp_path)[0].astype(np.float32)
    assert volume.shape == (44, 55, 33)  # 33x41x25 voxels of 2 mm, nothing cropped
    for axis in range(3):
        border, inner = np.take(volume, [0, -1], axis).mean(), np.take(volume, [1, -2], axis).mean()
        assert abs(border - inner) < 0.3, (axis, border, inner)


def blob_voxel(volume: np.ndarray) -> np.ndarray:
    """Centroid (voxel coordinates) of the bright spot of a z-scored synthetic head."""
    spot = volume > 0.5 * volume.max()
    return np.argwhere(spot).mean(0)


def test_modalities_with_other_spacing_and_fov_land_on_one_grid(tmp_path):
    """T1 2 mm on one field of view, T2 1.25 mm LPS on a shifted one: both on T1's grid; the spot at one world
    position sits at the same voxel in both channels and at that position through the sidecar's affine."""
    t1, a1 = head((40, 46, 36), (2.0, 2.0, 2.0), (-39.0, -45.0, -35.0), seed=1)
    t2, a2 = head((56, 64, 50), (1.25, 1.25, 1.25), (30.0, 38.0, -28.0), tissue=60.0, spot=500.0, seed=2,
                  axes=(-1, -1, 1))
    run([study("s", T1=save(tmp_path / "t1.nii.gz", t1, a1), T2=save(tmp_path / "t2.nii.gz", t2, a2))], tmp_path,
        spacing=None)
    (entry,) = read_index(tmp_path)
    array = entry.load(tmp_path).astype(np.float32)
    assert entry.spacing == (2.0, 2.0, 2.0) and array.shape[0] == 2
    c1, c2 = blob_voxel(array[0]), blob_voxel(array[1])
    np.testing.assert_allclose(c1, c2, atol=0.5)
    affine = np.array(json.loads(study_files(tmp_path, "s")[1].read_text())["affine"])
    np.testing.assert_allclose(affine[:3, :3] @ c1 + affine[:3, 3], [6.0, -10.0, 8.0], atol=1.0)


def test_field_of_view_overlap(tmp_path):
    """A modality whose field of view covers too little of the grid fails its study, saying how much it covers."""
    t1, a1 = head((40, 46, 36), (2.0, 2.0, 2.0), (-39.0, -45.0, -35.0))
    shifted = a1.copy()
    shifted[0, 3] += 0.4 * 80  # 40% of the 80 mm field of view along X: covers 60% of the grid
    far = a1.copy()
    far[:3, 3] += 500.0
    paths = {k: save(tmp_path / f"{k}.nii.gz", t1, a) for k, a in [("t1", a1), ("shifted", shifted), ("far", far)]}
    studies = [study("shifted", T1=paths["t1"], T2=paths["shifted"]), study("far", T1=paths["t1"], T2=paths["far"])]
    run(studies, tmp_path / "c", spacing=None, min_overlap=0.5)
    assert [e.study_id for e in read_index(tmp_path / "c")] == ["shifted"]
    (error,) = lines(tmp_path / "c" / "errors.jsonl")
    assert error["study_id"] == "far" and "covers 0% of the study's grid" in error["reason"]
    run(studies[:1], tmp_path / "strict", spacing=None, min_overlap=0.7)
    reason = lines(tmp_path / "strict" / "errors.jsonl")[0]["reason"]
    assert 0.58 <= int(re.search(r"covers (\d+)%", reason).group(1)) / 100 <= 0.62, reason
    assert grid_coverage((10, 10, 10), np.eye(4), (10, 10, 5)) == pytest.approx(0.5)


def test_output_format_sidecar_and_zscore(tmp_path):
    """float16 C-order [M, X, Y, Z]; the sidecar describes sources (size, sha256, orientation), grid, crop and
    settings; z-scores have mean 0 / std 1 over the foreground and are exactly 0 outside; Rician noise stays out."""
    t1, a1 = head((50, 56, 46), (1.5, 1.5, 1.5), (-37.0, -42.0, -34.0), noise=6.0)
    path = save(tmp_path / "t1.nii.gz", t1, a1)
    summary = run([study("Sub 01/ses", T1=path, FLAIR=path)], tmp_path, spacing=(2.0, 2.0, 2.5), margin=3)
    assert summary.prepared == 1
    array_path, sidecar_path = study_files(tmp_path, "Sub 01/ses")
    assert array_path.name.startswith("sub_01_ses-") and array_path.suffix == ".npy"
    array = np.load(array_path)
    assert array.dtype == np.float16 and array.flags.c_contiguous and array.ndim == 4 and array.shape[0] == 2
    meta = json.loads(sidecar_path.read_text())
    assert meta["format"] == 1 and meta["study_id"] == "Sub 01/ses" and meta["modalities"] == ["T1", "FLAIR"]
    assert meta["shape"] == list(array.shape) and meta["spacing"] == [2.0, 2.0, 2.5]
    source = meta["sources"][0]
    assert source["path"] == str(path) and source["size"] == path.stat().st_size
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["orientation"] == "RAS" and source["shape"] == [50, 56, 46] and source["spacing"] == [1.5] * 3
    assert meta["settings"] == {"format": 1, "spacing": [2.0, 2.0, 2.5], "min_overlap": 0.5, "threshold": 0.1,
                                "smooth": 1.0, "margin": 3, "clip": 100.0}
    # The crop: the ellipsoid (radii 30, 36, 28 mm) plus 3 voxels, not the noisy background.
    extent = np.array(array.shape[1:]) * [2.0, 2.0, 2.5]
    assert np.all(extent >= [60, 72, 56]) and np.all(extent <= np.array([60, 72, 56]) + 2 * 3 * 2.5 + 6)
    grid = np.array(meta["crop"]["grid_affine"])
    np.testing.assert_allclose(np.array(meta["affine"])[:3, 3], grid[:3, :3] @ meta["crop"]["start"] + grid[:3, 3])
    z = array[0].astype(np.float64)
    inside = z != 0
    assert abs(inside.sum() - meta["foreground_voxels"]) <= 2
    assert abs(z[inside].mean()) < 0.01 and abs(z[inside].std() - 1) < 0.01
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in z.shape], indexing="ij"), -1)
    xyz = ijk @ np.array(meta["affine"])[:3, :3].T + np.array(meta["affine"])[:3, 3]
    radius = np.sqrt(((xyz / [30.0, 36.0, 28.0]) ** 2).sum(-1))
    # Smoothing widens the mask by up to ~1.3 sigma (a voxel or two) past a sharp edge; noise beyond stays out.
    assert np.all(z[radius > 1.2] == 0) and np.all(z[radius < 0.85] != 0) and np.any(radius > 1.2)
    assert np.array_equal(array[0], array[1])
    stats = meta["normalisation"][0]
    assert stats["clipped_voxels"] == 0 and 50 < stats["mean"] < 140 and stats["std"] > 10  # tissue + a rim


def test_clip_channel_npy_and_empty_mask(tmp_path):
    """z-scores are clipped (and counted); a 4-D file's channel and a .npy with a spacing are read; a volume whose
    mask is empty (one hot voxel) is an error."""
    t1, a1 = head((30, 34, 28), (2.5, 2.5, 2.5), (-37.0, -42.0, -34.0))
    four_d = save(tmp_path / "4d.nii.gz", np.stack([t1 * 0, t1], -1), a1)  # channel 0 is empty, 1 is the head
    np.save(tmp_path / "t1.npy", t1)
    hot = np.zeros((20, 20, 20), np.float32)
    hot[10, 10, 10] = 1
    studies = [study("four_d", T1=ImageSource(four_d, channel=1)),
               study("npy", T1=ImageSource(tmp_path / "t1.npy", spacing=(2.5, 2.5, 2.5))),
               study("npy_no_spacing", T1=tmp_path / "t1.npy"),
               study("hot", T1=save(tmp_path / "hot.nii.gz", hot, np.eye(4)))]
    summary = run(studies, tmp_path, spacing=None, clip=2.0)
    assert (summary.prepared, summary.skipped) == (2, 2)
    errors = {e["study_id"]: e["reason"] for e in summary.errors}
    assert "needs a spacing" in errors["npy_no_spacing"] and "empty foreground mask" in errors["hot"]
    a, b = (e.load(tmp_path).astype(np.float32) for e in read_index(tmp_path))
    assert a.max() == 2.0 and np.array_equal(a, b)  # the npy is RAS at the same spacing as the NIfTI's grid
    assert json.loads(study_files(tmp_path, "four_d")[1].read_text())["normalisation"][0]["clipped_voxels"] > 0


def test_resume_reuses_and_redoes_what_changed(tmp_path, capsys):
    """A second run reuses every entry (files untouched); a changed setting redoes all, a changed source (same size,
    other bytes) redoes its study only; a study dropped from the manifest leaves the index but keeps its files."""
    paths = []
    for i in range(2):
        data, affine = head((30, 34, 28), (2.5, 2.5, 2.5), (-37.0, -42.0, -34.0), seed=i)
        paths.append(save(tmp_path / f"t{i}.nii", data, affine))
    studies = [study("a", T1=paths[0]), study("b", T1=paths[1])]
    out = tmp_path / "cache"

    def mtimes():
        return [os.stat(p).st_mtime_ns for s in ("a", "b") for p in study_files(out, s)]

    assert run(studies, out, spacing=3.0).prepared == 2
    before = mtimes()
    (out / "index.jsonl").unlink()  # as if the first run had been killed before writing the index
    summary = run(studies, out, spacing=3.0)
    assert (summary.prepared, summary.reused) == (0, 2) and mtimes() == before
    assert [e.study_id for e in read_index(out)] == ["a", "b"]
    assert run(studies, out, spacing=3.0, margin=1).prepared == 2
    changed = nib.load(paths[1])
    data = np.asarray(changed.dataobj).copy()
    data[15, 17, 14] += 50
    save(paths[1], data, changed.affine)
    summary = run(studies, out, spacing=3.0, margin=1)
    assert (summary.prepared, summary.reused) == (1, 1)
    assert run(studies[:1], out, spacing=3.0, margin=1, progress=True).reused == 1
    assert re.search(r"prepared 0, reused 1, skipped 0 in \d+\.\d s\n$", capsys.readouterr().err)
    assert [e.study_id for e in read_index(out)] == ["a"] and study_files(out, "b")[0].is_file()


def test_failed_study_keeps_its_good_entry(tmp_path):
    """A study prepared before whose source is now broken keeps its array, sidecar and index row; errors.jsonl says
    so; a fresh failing study has no index row."""
    data, affine = head((30, 34, 28), (2.5, 2.5, 2.5), (-37.0, -42.0, -34.0))
    path = save(tmp_path / "t1.nii.gz", data, affine)
    studies = [study("good", T1=path), study("new", T1=tmp_path / "absent.nii.gz")]
    out = tmp_path / "cache"
    run(studies, out, spacing=None)
    array_path, sidecar_path = study_files(out, "good")
    before = array_path.read_bytes(), sidecar_path.read_bytes(), os.stat(array_path).st_mtime_ns
    path.write_bytes(path.read_bytes()[:200])  # the source is now truncated
    summary = run(studies, out, spacing=None, strict=True)
    assert (summary.prepared, summary.reused, summary.skipped, summary.exit_code) == (0, 0, 2, 1)
    assert (array_path.read_bytes(), sidecar_path.read_bytes(), os.stat(array_path).st_mtime_ns) == before
    assert [e.study_id for e in read_index(out)] == ["good"]
    reasons = {e["study_id"]: e["reason"] for e in lines(out / "errors.jsonl")}
    assert "truncated" in reasons["good"] and "earlier cache entry good.npy is kept" in reasons["good"]
    assert "kept" not in reasons["new"]


def test_grid_mask_and_keys():
    """target_grid keeps the field of view and axis directions; foreground_mask ignores Rician noise and fills
    holes; study keys are file-safe and distinct."""
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 0.0]
    shape, grid = target_grid((30, 30, 20), affine, (1.5, 1.5, 1.5))
    assert shape == (20, 20, 27)
    np.testing.assert_allclose(grid[:3, :3], np.diag([-1.5, 1.5, 1.5]))
    corner = affine[:3, :3] @ [-0.5, -0.5, -0.5] + affine[:3, 3]
    np.testing.assert_allclose(grid[:3, :3] @ [-0.5, -0.5, -0.5] + grid[:3, 3], corner)
    assert target_grid((30, 30, 20), affine, None)[1] is affine
    volume, _ = head((40, 46, 36), (2.0, 2.0, 2.0), (-39.0, -45.0, -35.0), noise=8.0)
    volume[18:22, 20:24, 16:20] = 0  # a dark hole inside the head
    mask = foreground_mask(volume[None])
    assert mask[20, 22, 18] and not mask[0, 0, 0] and 0.2 < mask.mean() < 0.4
    assert study_key("s001") == "s001"
    keys = {study_key(s) for s in ("S001", "s001", "a/b", "a_b", "../x", "")}
    assert len(keys) == 6 and all("/" not in k and not k.startswith(".") and k for k in keys)


def test_prepare_from_a_jsonl_manifest(mri, tmp_path):
    """A manifest file (relative paths, a report file, a 4-D channel, multi-label) goes through read_manifest."""
    (tmp_path / "r.txt").write_text("Normal study.\n")
    anat = nib.load(mri["anat"])
    save(tmp_path / "two.nii.gz", np.stack([np.asarray(anat.dataobj)] * 2, -1), anat.affine)
    rows = [{"study_id": "s1", "split": "test", "report_file": "r.txt", "labels": ["a", "b"],
             "images": {"t1": str(mri["anat"]), "flair": {"path": "two.nii.gz", "channel": 1}}},
            {"study_id": "s2", "split": "train", "images": {"T2": "absent.nii.gz"}}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = prepare(manifest, tmp_path / "cache", spacing=4.0, workers=1, progress=False)
    assert summary.to_json()["errors"] == [{"study_id": "s2", "line": 2, "reason": summary.errors[0]["reason"]}]
    assert f"T2 image {tmp_path / 'absent.nii.gz'}: file not found" == summary.errors[0]["reason"]
    (entry,) = read_index(tmp_path / "cache")
    assert (entry.report, entry.labels, entry.modalities, entry.split) == ("Normal study.", ["a", "b"],
                                                                          ("T1", "FLAIR"), "test")
    array = entry.load(tmp_path / "cache")
    assert np.array_equal(array[0], array[1])
