"""The demo as a manifest source: NIfTI files in the scanner frame, the manifest, reuse and resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from medmap_fast.data.manifest import read_manifest
from medmap_fast.synthetic import export
from medmap_fast.synthetic.abdomen import ABDOMEN_CENTER_MM, ABDOMEN_FOV_MM
from medmap_fast.synthetic.anatomy import BRAIN_FOV_MM, brain_atlas
from medmap_fast.synthetic.demo import CLASSES, DemoConfig, DemoDataset, generate_study
from medmap_fast.synthetic.export import demo_splits, stratified_split, write_demo_studies
from medmap_fast.synthetic.geometry import Grid

SIZE = (12, 10, 8)  # distinct sides: a swapped axis cannot pass
CONFIG = DemoConfig(size=SIZE)
NUM = 6  # studies 0-3 and 5 of seed 0 are livers, 4 a brain


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _count_generated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the indices the exporter generates (workers=0 runs them in this process)."""
    calls: list[int] = []
    original = export.generate_study

    def counting(index, seed, config):
        calls.append(index)
        return original(index, seed, config)

    monkeypatch.setattr(export, "generate_study", counting)
    return calls


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifest of NUM studies written in this process (the reference output of the module)."""
    return write_demo_studies(tmp_path_factory.mktemp("demo"), NUM, seed=0, config=CONFIG, workers=0, progress=False)


def test_images_load_with_nibabel_and_equal_the_generated_volumes(written: Path):
    studies = read_manifest(written)
    assert [s.study_id for s in studies] == [f"demo-s0-{i:06d}" for i in range(NUM)]
    for index, entry in enumerate(studies):
        study = generate_study(index, 0, CONFIG)
        assert tuple(entry.images) == study.modalities
        for name, volume in zip(study.modalities, study.volume.numpy()):
            path = entry.images[name].path
            assert path.name == f"{name}.nii.gz" and path.parent.name == study.study_id
            image = nib.load(path)
            assert image.shape == SIZE and image.get_data_dtype() == np.int16
            data = image.get_fdata(dtype=np.float32)
            span = float(volume.max() - volume.min())
            # int16 with slope and intercept over the volume's range: half a step of range / 65535 at most
            assert np.abs(data - volume).max() <= span / 2**16 * 1.01
            assert np.abs(data - volume).max() > 0  # it really is quantised (the test would notice a dtype change)


def test_affine_is_the_unposed_scanner_grid(written: Path):
    for entry in read_manifest(written):
        organ = "brain" if "T1" in entry.images else "liver"
        fov, center = (BRAIN_FOV_MM, brain_atlas().center) if organ == "brain" else (ABDOMEN_FOV_MM, ABDOMEN_CENTER_MM)
        grid = Grid.centered(SIZE, fov, center)
        image = nib.load(entry.images[next(iter(entry.images))].path)
        raw = nib.Nifti1Header.from_fileobj(nib.openers.Opener(image.get_filename()))  # the header as stored
        assert int(raw["sform_code"]) == int(raw["qform_code"]) == 1  # scanner_anat
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        np.testing.assert_allclose(image.affine, raw.get_qform(), atol=1e-4)  # qform agrees with sform
        ijk = np.array([[0, 0, 0], [11, 0, 0], [0, 9, 0], [0, 0, 7], [5, 3, 6], [11, 9, 7]])
        world = nib.affines.apply_affine(image.affine, ijk)
        coords = grid.coords().numpy()
        np.testing.assert_allclose(world, coords[tuple(ijk.T)], atol=1e-3)
        # the voxel spacing is the field of view over the longest side, the grid centred on the organ
        np.testing.assert_allclose(raw.get_zooms(), [fov / max(SIZE)] * 3, rtol=1e-6)
        np.testing.assert_allclose(nib.affines.apply_affine(image.affine, (np.array(SIZE) - 1) / 2), center, atol=1e-3)


def test_brain_lies_where_the_mni_template_is_in_world_coordinates(tmp_path: Path):
    """End to end through nibabel's world coordinates: with no pose, the written T1 matches the MNI152 template
    resampled into its grid (correlation inside the brain), clearly better than flipped anterior-posterior or
    inferior-superior or shifted by two voxels along any axis (left-right flips are not tested: the template is
    symmetric; the affine test pins that axis)."""
    from nilearn.datasets import load_mni152_template

    still = DemoConfig(size=24, organs=("brain",), p_modality=1.0, max_rotation_deg=0, max_shift_mm=0, max_scale=0)
    manifest = write_demo_studies(tmp_path, 2, config=still, test_fraction=0.5, workers=0, progress=False)
    image = nib.load(read_manifest(manifest)[0].images["T1"].path)
    reference = resample_from_to(load_mni152_template(resolution=2), image, order=1).get_fdata()
    brain = reference > 0.1 * reference.max()
    data = image.get_fdata()

    def corr(a: np.ndarray) -> float:
        return float(np.corrcoef(a[brain], reference[brain])[0, 1])

    wrong = [data[:, ::-1], data[:, :, ::-1]] + [np.roll(data, s, axis) for axis in range(3) for s in (-2, 2)]
    assert corr(data) > 0.6 and corr(data) > max(corr(w) for w in wrong) + 0.25


def test_manifest_rows_have_labels_reports_and_a_stratified_split(written: Path):
    studies = read_manifest(written)
    for index, entry in enumerate(studies):
        study = generate_study(index, 0, CONFIG)
        assert entry.labels == CLASSES[study.label] and entry.report == study.report
    assert [s.split for s in studies] == demo_splits(NUM, 0, CONFIG, 0.25)
    assert sum(s.split == "test" for s in studies) == round(0.25 * NUM)
    assert all(not Path(p).is_absolute() for p in written.read_text().split('"images": ')[1:])


def test_demo_splits_are_stratified_by_class_and_seeded():
    config = DemoConfig(size=16)
    splits = demo_splits(300, 3, config, 0.2)
    assert splits == demo_splits(300, 3, config, 0.2) and splits != demo_splits(300, 4, config, 0.2)
    assert splits.count("test") == 60
    labels = DemoDataset(300, 3, config).labels()
    for c in set(labels):
        members = [s for s, label in zip(splits, labels) if label == c]
        assert math.floor(0.2 * len(members)) <= members.count("test") <= math.ceil(0.2 * len(members))


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 20 + [1] * 10 + [2] * 3
    train, test = stratified_split(labels, 0.3, seed=1)
    assert sorted(train + test) == list(range(33)) and len(test) == round(0.3 * 33)
    per_class = [sum(labels[i] == c for i in test) for c in range(3)]
    assert per_class[0] == 6 and per_class[1] == 3 and per_class[2] in (0, 1)
    assert stratified_split(labels, 0.3, seed=1) == (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split([0, 1], 0.1, seed=0)


def test_same_files_with_two_worker_processes(written: Path, tmp_path: Path):
    parallel = write_demo_studies(tmp_path, NUM, seed=0, config=CONFIG, workers=2, progress=False)
    assert _files(parallel.parent) == _files(written.parent)


def test_second_call_reuses_the_output(written: Path, monkeypatch: pytest.MonkeyPatch):
    before = {p: p.stat().st_mtime_ns for p in written.parent.rglob("*")}
    calls = _count_generated(monkeypatch)
    assert write_demo_studies(written.parent, NUM, seed=0, config=CONFIG, workers=0, progress=False) == written
    assert calls == [] and {p: p.stat().st_mtime_ns for p in written.parent.rglob("*")} == before


def test_resumes_after_a_kill_and_after_deleted_files(written: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    calls = _count_generated(monkeypatch)
    original = export.generate_study

    def killed_after_three(index, seed, config):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(index, seed, config)

    monkeypatch.setattr(export, "generate_study", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_demo_studies(out, NUM, seed=0, config=CONFIG, workers=0, progress=False)
    assert not (out / export.SETTINGS_FILE).exists() and not (out / export.MANIFEST_FILE).exists()
    calls.clear()
    monkeypatch.setattr(export, "generate_study", original)
    calls = _count_generated(monkeypatch)
    write_demo_studies(out, NUM, seed=0, config=CONFIG, workers=0, progress=False)
    assert calls == [3, 4, 5] and _files(out) == _files(written.parent)

    (out / "studies/demo-s0-000001/study.json").unlink()
    next((out / "studies/demo-s0-000004").glob("*.nii.gz")).unlink()
    calls.clear()
    write_demo_studies(out, NUM, seed=0, config=CONFIG, workers=0, progress=False)
    assert calls == [1, 4] and _files(out) == _files(written.parent)


def test_other_arguments_regenerate_only_what_differs(written: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    shutil.copytree(written.parent, out)
    calls = _count_generated(monkeypatch)
    write_demo_studies(out, NUM + 2, seed=0, config=CONFIG, workers=0, progress=False)  # two more studies
    assert calls == [NUM, NUM + 1] and len(read_manifest(out / export.MANIFEST_FILE)) == NUM + 2

    calls.clear()
    write_demo_studies(out, NUM, seed=0, config=CONFIG, test_fraction=0.5, workers=0, progress=False)
    assert calls == [] and sum(s.split == "test" for s in read_manifest(out / export.MANIFEST_FILE)) == NUM // 2
    assert not (out / f"studies/demo-s0-{NUM:06d}").exists()  # no longer listed: removed

    smaller = DemoConfig(size=8)
    write_demo_studies(out, NUM, seed=0, config=smaller, workers=0, progress=False)
    assert calls == list(range(NUM))
    assert all(nib.load(src.path).shape == (8, 8, 8) for s in read_manifest(out / export.MANIFEST_FILE)
               for src in s.images.values())

    write_demo_studies(out, 2, seed=1, config=smaller, test_fraction=0.5, workers=0, progress=False)
    assert sorted(p.name for p in (out / "studies").iterdir()) == ["demo-s1-000000", "demo-s1-000001"]


@pytest.mark.parametrize("kwargs, name", [({"num_studies": 1}, "num_studies"), ({"workers": -1}, "workers"),
                                          ({"test_fraction": 1.0}, "test_fraction"),
                                          ({"test_fraction": 0.01}, "test_fraction")])  # no test study of 4
def test_bad_arguments_are_errors_naming_them(tmp_path: Path, kwargs: dict, name: str):
    with pytest.raises(ValueError, match=name):
        write_demo_studies(tmp_path, **({"num_studies": 4, "config": CONFIG, "workers": 0, "progress": False} | kwargs))
