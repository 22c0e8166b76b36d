"""The manifest (JSONL / CSV reading, every malformed-row error with its line, writing) and the importers (MSD
Task01 layout, folder per study, hashed splits). Image files are not opened by the manifest, so most trees here
hold empty placeholder files; the MSD test writes real 4-D NIfTI files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmap_fast.data.importers import assign_split, folders_manifest, msd_manifest
from medmap_fast.data.manifest import (
    ImageSource,
    ManifestError,
    ManifestStudy,
    read_manifest,
    read_report,
    write_manifest,
)
from medmap_fast.modalities import ModalityRegistry


def write_lines(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**fields) -> str:
    base = {"study_id": "s1", "split": "train", "images": {"T1": "t1.nii.gz"}}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def without_line(studies: list[ManifestStudy]) -> list[ManifestStudy]:
    return [dataclasses.replace(s, line=0) for s in studies]


# --- JSONL -------------------------------------------------------------------------------------------------------

def test_jsonl_reads_paths_channels_spacing_labels_and_reports(tmp_path):
    manifest = write_lines(
        tmp_path / "data" / "manifest.jsonl",
        row(study_id="a", split="Train", report="Ring-enhancing lesion.", labels="tumour",
            images={"flair": {"path": "a/x.nii.gz", "channel": 0}, "t1C": "a/t1c.NII", "T1": "/abs/t1.nii.gz"}),
        "",
        row(study_id="b", split="val", report_file="reports/b.txt", labels=["cyst", "oedema"], spacing=[1, 1, 2.5],
            images={"DWI": "b/dwi.npy", "ADC": {"path": "../b/adc.npy", "spacing": [0.5, 0.5, 3]}}),
        row(study_id="c", split="test", labels=None, report="  ", images={"T2": {"path": "c.nii", "channel": 3}}),
    )
    a, b, c = read_manifest(manifest)
    folder = (tmp_path / "data").absolute()
    assert (a.study_id, a.split, a.line, a.labels, a.report) == ("a", "train", 1, "tumour", "Ring-enhancing lesion.")
    assert list(a.images) == ["FLAIR", "T1c", "T1"]  # canonical spelling, manifest order
    assert a.images["FLAIR"] == ImageSource(folder / "a/x.nii.gz", channel=0)
    assert a.images["T1c"] == ImageSource(folder / "a/t1c.NII")
    assert a.images["T1"].path == Path("/abs/t1.nii.gz")
    assert (b.line, b.labels, b.report, b.report_file) == (3, ("cyst", "oedema"), None, folder / "reports/b.txt")
    assert b.images["DWI"] == ImageSource(folder / "b/dwi.npy", spacing=(1.0, 1.0, 2.5))  # the row's spacing
    assert b.images["ADC"] == ImageSource(tmp_path.absolute() / "b/adc.npy", spacing=(0.5, 0.5, 3.0))  # its own
    assert (c.labels, c.report, c.images["T2"].channel) == (None, None, 3)  # a blank report is no report
    # .json holding JSON Lines reads the same; a custom registry is accepted as a list of names
    (tmp_path / "data" / "m.json").write_text(manifest.read_text())
    assert read_manifest(tmp_path / "data" / "m.json") == [a, b, c]
    custom = read_manifest(write_lines(tmp_path / "m2.jsonl", row(images={"swi": "s.nii"})), ["T1", "SWI"])
    assert list(custom[0].images) == ["SWI"]
    assert read_manifest(tmp_path / "m2.jsonl", ModalityRegistry(["SWI"]))[0].images["SWI"].path.name == "s.nii"


JSONL_ERRORS = [
    ('{"study_id": "s1",', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (row(split=...), "missing key(s) ['split']"),
    (row(images=...), "missing key(s) ['images']"),
    (row(label="x"), "unknown key(s) ['label']; allowed: study_id, split, report, report_file, labels, images"),
    (row(images={"T3": "a.nii"}), "unknown modality 'T3'; known: T1, T1c, T2, FLAIR, DWI, ADC"),
    (row(images={"T1": "a.nii", "t1": "b.nii"}), "modality T1 given twice ('T1' and 't1')"),
    ('{"study_id": "s1", "split": "train", "images": {"T1": "a.nii", "T1": "b.nii"}}', "['T1'] given twice"),
    (row(split="validation"), "split: expected one of train, val, test, got 'validation'"),
    (row(study_id=7), "study_id: expected a non-empty string, got 7"),
    (row(study_id=" "), "study_id: expected a non-empty string"),
    (row(labels=3), "labels: expected a class name, a list of class names or null, got 3"),
    (row(labels=["a", 1]), "labels: expected a class name"),
    (row(labels=""), "labels: expected a class name"),
    (row(labels=["a", "a"]), "labels: ['a'] listed more than once"),
    (row(report=3), "report: expected a string or null, got 3"),
    (row(report_file=""), "report_file: expected a path"),
    (row(report="x", report_file="r.txt"), "give report or report_file, not both"),
    (row(images={}), "images: expected a non-empty object"),
    (row(images=["a.nii"]), "images: expected a non-empty object"),
    (row(images={"T1": 5}), "images.T1: expected a path"),
    (row(images={"T1": {"channel": 0}}), "images.T1: expected a path"),
    (row(images={"T1": {"path": "a.nii", "chanel": 0}}), "images.T1: unknown key(s) ['chanel']; allowed: path, "),
    (row(images={"T1": "a.mha"}), "images.T1: unsupported image file 'a.mha'; expected .nii.gz, .nii, .npy"),
    (row(images={"T1": "a.nii.gz.bak"}), "unsupported image file"),
    (row(images={"T1": {"path": "a.nii", "channel": -1}}), "images.T1.channel: expected an integer >= 0, got -1"),
    (row(images={"T1": {"path": "a.nii", "channel": True}}), "images.T1.channel: expected an integer >= 0"),
    (row(images={"T1": "a.npy"}), "images.T1: a .npy image needs a spacing"),
    (row(images={"T1": {"path": "a.npy", "spacing": [1, 1]}}), "images.T1.spacing: expected three positive"),
    (row(images={"T1": {"path": "a.npy", "spacing": [1, 0, 1]}}), "images.T1.spacing: expected three positive"),
    (row(images={"T1": {"path": "a.nii", "spacing": [1, 1, 1]}}), "images.T1.spacing: only for .npy images"),
    (row(spacing=[1, 1, "2"]), "spacing: expected three positive numbers"),
    (row(study_id="first"), "duplicate study_id 'first' (first on line 1)"),
]


@pytest.mark.parametrize("bad,message", JSONL_ERRORS, ids=[m[:40] for _, m in JSONL_ERRORS])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    manifest = write_lines(tmp_path / "m.jsonl", row(study_id="first"), "", bad, row(study_id="last"))
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    assert str(err.value).startswith(f"{manifest}:3: ")
    assert message in str(err.value)


def test_whole_file_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"m\.txt: unsupported manifest type '\.txt'"):
        read_manifest(write_lines(tmp_path / "m.txt", row()))
    with pytest.raises(FileNotFoundError, match="nope.jsonl: manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="e.jsonl: no studies"):
        read_manifest(write_lines(tmp_path / "e.jsonl", "", "  "))
    (tmp_path / "latin.csv").write_bytes(b"study_id,split,T1\n\xe9,train,a.nii\n")
    with pytest.raises(ManifestError, match="latin.csv: not UTF-8 text"):
        read_manifest(tmp_path / "latin.csv")


# --- CSV ---------------------------------------------------------------------------------------------------------

def test_csv_reads_columns_labels_spacing_and_multiline_reports(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "\ufeffStudy_ID, split ,t1,FLAIR,labels,report,report_file,Spacing,dwi\n"  # BOM, case, spaces
        's1,train,s1/t1.nii.gz,,tumour|oedema,"Two lines:\nlesion.",,,\n'
        "\n"
        's2,VAL,,s2/f.nii,cyst,,r/s2.txt,"1,1,2",s2/d.npy\n'
        "s3,test,s3.nii,,|,,,1x1x2.5,s3.npy\n"
        "s4,test,s4.nii,,a|,,,1 2 3,\n"
        "s5,test,s5.nii,,,,,,\n",
        encoding="utf-8",
    )
    s1, s2, s3, s4, s5 = read_manifest(manifest)
    assert [s.line for s in (s1, s2, s3, s4, s5)] == [2, 5, 6, 7, 8]  # s1's quoted report spans lines 2-3
    assert (s1.labels, s1.report, list(s1.images)) == (("tumour", "oedema"), "Two lines:\nlesion.", ["T1"])
    assert s1.images["T1"] == ImageSource(tmp_path.absolute() / "s1/t1.nii.gz")
    assert (s2.split, s2.labels, s2.report, s2.report_file) == ("val", "cyst", None, tmp_path.absolute() / "r/s2.txt")
    assert list(s2.images) == ["FLAIR", "DWI"] and s2.images["DWI"].spacing == (1.0, 1.0, 2.0)
    assert (s3.labels, s3.images["DWI"].spacing, s3.images["T1"].spacing) == ((), (1.0, 1.0, 2.5), None)
    assert (s4.labels, s5.labels, s5.report, list(s5.images)) == (("a",), None, None, ["T1"])


CSV_HEADER = "study_id,split,T1,labels,spacing,report,report_file"
CSV_ERRORS = [
    ("study_id,T1\na,b.nii", 1, "missing column(s) ['split']"),
    ("study_id,split,T3\na,train,b.nii", 1, "unknown column 'T3'; allowed: study_id, split, report, report_file, "
                                            "labels, spacing and the modalities T1, T1c"),
    ("study_id,split,T1,t1\na,train,b.nii,", 1, "column 't1' given twice"),
    ("study_id,split,labels\na,train,x", 1, "no modality column"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,train,b.nii,,,", 3, "expected 7 cells as in the header, got 6"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,train,b.npy,,1;1;1,,", 3, "spacing: expected three numbers in mm"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,train,b.npy,,1x1,,", 3, "spacing: expected three positive numbers"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,train,b.npy,,,,", 3, "images.T1: a .npy image needs a spacing"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,train,,x,,,", 3, "images: expected a non-empty object"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\n,train,b.nii,,,,", 3, "study_id: expected a non-empty string"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,tr,b.nii,,,,", 3, "split: expected one of train, val, test, got 'tr'"),
    (f"{CSV_HEADER}\na,train,a.nii,,,,\nb,train,b.nii,,,x,r.txt", 3, "give report or report_file, not both"),
    (f'{CSV_HEADER}\na,train,a.nii,,,"x\n\ny",\nb,train,b.mha,,,,', 5, "unsupported image file 'b.mha'"),
    (f'{CSV_HEADER}\na,train,a.nii,,,"x\ny",\na,train,b.nii,,,,', 4, "duplicate study_id 'a' (first on line 2)"),
]


@pytest.mark.parametrize("text,line,message", CSV_ERRORS, ids=[m[:40] for *_, m in CSV_ERRORS])
def test_csv_errors_name_file_and_line(tmp_path, text, line, message):
    manifest = write_lines(tmp_path / "m.csv", text)
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    assert str(err.value).startswith(f"{manifest}:{line}: ")
    assert message in str(err.value)


# --- reports, writing --------------------------------------------------------------------------------------------

def test_read_report(tmp_path):
    inline = ManifestStudy("a", "train", {}, report="text")
    assert read_report(inline) == "text"
    assert read_report(ManifestStudy("a", "train", {})) is None
    (tmp_path / "r.txt").write_text("  Normal study.\n", encoding="utf-8")
    assert read_report(ManifestStudy("a", "train", {}, report_file=tmp_path / "r.txt")) == "Normal study."
    (tmp_path / "empty.txt").write_text("\n")
    assert read_report(ManifestStudy("a", "train", {}, report_file=tmp_path / "empty.txt")) is None
    missing = ManifestStudy("b", "val", {}, report_file=tmp_path / "gone.txt", line=7)
    with pytest.raises(FileNotFoundError, match=r"gone\.txt: report file of study 'b' \(manifest line 7\) not found"):
        read_report(missing)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match=r"bad\.txt: report file of study 'a' .* not readable UTF-8"):
        read_report(ManifestStudy("a", "train", {}, report_file=tmp_path / "bad.txt"))


def test_write_read_round_trip(tmp_path):
    folder = (tmp_path / "out").absolute()
    studies = [
        ManifestStudy("a", "train", {"FLAIR": ImageSource(folder / "a/x.nii.gz", channel=0),
                                     "T1": ImageSource(tmp_path.absolute() / "elsewhere/t1.nii")},
                      report="Línea uno.\nLine two.", labels="tumour"),
        ManifestStudy("b", "val", {"DWI": ImageSource(folder / "b.npy", spacing=(1.0, 1.0, 2.5))},
                      report_file=folder / "r/b.txt", labels=("cyst", "oedema")),
        ManifestStudy("c", "test", {"T2": ImageSource(folder / "c.nii.gz")}, labels=()),
    ]
    path = folder / "manifest.jsonl"
    write_manifest(studies, path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["images"] == {"FLAIR": {"path": "a/x.nii.gz", "channel": 0},
                                 "T1": str(tmp_path.absolute() / "elsewhere/t1.nii")}  # outside: absolute
    assert rows[1]["report_file"] == "r/b.txt" and rows[1]["images"]["DWI"] == {"path": "b.npy",
                                                                               "spacing": [1.0, 1.0, 2.5]}
    assert without_line(read_manifest(path)) == studies
    assert [s.line for s in read_manifest(path)] == [1, 2, 3]
    # a moved folder still reads (relative paths)
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert read_manifest(moved / "manifest.jsonl")[1].report_file == moved.absolute() / "r/b.txt"


def test_write_rejects_what_would_not_read_back(tmp_path):
    one = ManifestStudy("a", "train", {"T1": ImageSource(tmp_path / "a.nii")})
    with pytest.raises(ValueError, match=r"m\.jsonl: cannot write study 'a': its study_id is given twice"):
        write_manifest([one, one], tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="unknown modality 'SWI'"):
        write_manifest([ManifestStudy("a", "train", {"SWI": ImageSource(tmp_path / "a.nii")})], tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"images\.T1: a \.npy image needs a spacing"):
        write_manifest([ManifestStudy("a", "train", {"T1": ImageSource(tmp_path / "a.npy")})], tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="path: expected a .jsonl or .json manifest path"):
        write_manifest([one], tmp_path / "m.csv")
    assert not (tmp_path / "m.jsonl").exists()  # nothing half-written
    swi = ManifestStudy("a", "train", {"SWI": ImageSource(tmp_path / "a.nii")})
    write_manifest([swi], tmp_path / "m.jsonl", ["T1", "SWI"])
    assert without_line(read_manifest(tmp_path / "m.jsonl", ["T1", "SWI"])) == [swi]


# --- importers ---------------------------------------------------------------------------------------------------

def write_msd_task(root: Path, modality: dict[str, str], train: list[str], test: list[str]) -> Path:
    """A fake Task01 tree: dataset.json and real 4-D NIfTI files [8, 8, 8, C]."""
    rng = np.random.default_rng(0)
    for sub, names in (("imagesTr", train), ("imagesTs", test)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            data = rng.normal(size=(8, 8, 8, len(modality))).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), root / sub / f"{name}.nii.gz")
    info = {"name": "BRATS", "modality": modality,
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in train],
            "test": [f"./imagesTs/{n}.nii.gz" for n in test]}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


BRATS_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def test_msd_task01(tmp_path):
    root = write_msd_task(tmp_path / "Task01_BrainTumour", BRATS_MODALITIES, ["BRATS_001", "BRATS_002"],
                          ["BRATS_900"])
    studies = msd_manifest(root)
    assert [s.study_id for s in studies] == ["BRATS_001", "BRATS_002", "BRATS_900"]
    first = studies[0]
    path = root.absolute() / "imagesTr/BRATS_001.nii.gz"
    assert nib.load(path).shape == (8, 8, 8, 4)
    assert first.images == {"FLAIR": ImageSource(path, 0), "T1": ImageSource(path, 1), "T1c": ImageSource(path, 2),
                            "T2": ImageSource(path, 3)}
    assert (first.report, first.report_file, first.labels) == (None, None, None)
    assert first.split == assign_split("BRATS_001") and studies[2].split == "test"  # the task's own test images
    write_manifest(studies, root / "manifest.jsonl")
    assert without_line(read_manifest(root / "manifest.jsonl")) == studies
    # registry names match directly (Task05 Prostate); one channel gives 3-D images without a channel
    prostate = write_msd_task(tmp_path / "Task05", {"0": "T2", "1": "adc"}, ["p1"], [])
    assert msd_manifest(prostate)[0].images["ADC"].channel == 1
    single = write_msd_task(tmp_path / "single", {"0": "FLAIR"}, ["f1"], [])
    assert msd_manifest(single)[0].images["FLAIR"].channel is None


@pytest.mark.parametrize("modality,training,message", [
    ({"0": "FLAIR", "1": "PD"}, [], "modality 1 'PD' is no registry modality"),
    ({"0": "FLAIR", "1": "flair"}, [], "channels 0 and 1 are both modality FLAIR"),
    ({"1": "FLAIR"}, [], 'expected "modality"'),
    (BRATS_MODALITIES, [{"image": "./imagesTr/a.mha"}], r"training\[0\]: expected a NIfTI image path"),
    (BRATS_MODALITIES, [{"label": "x"}], r"training\[0\]: expected a NIfTI image path"),
    (BRATS_MODALITIES, [{"image": "a/x.nii.gz"}, {"image": "b/x.nii"}], r"training\[1\]: .* study 'x' a second"),
    (BRATS_MODALITIES, [], "no images"),
    (BRATS_MODALITIES, {"image": "a.nii"}, "expected lists 'training'"),
    (BRATS_MODALITIES, None, "not valid JSON"),
])
def test_msd_errors_name_dataset_json(tmp_path, modality, training, message):
    info = json.dumps({"modality": modality, "training": training})
    (tmp_path / "dataset.json").write_text(info if training is not None else info[:-3])
    with pytest.raises(ManifestError, match=message) as err:
        msd_manifest(tmp_path)
    assert str(err.value).startswith(str(tmp_path.absolute() / "dataset.json"))


def test_msd_registry_without_the_modality(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "t1gd"}, "training": []}))
    with pytest.raises(ManifestError, match=r"dataset\.json: modality 0 't1gd' is no registry modality \(T1, T2\)"):
        msd_manifest(tmp_path, modalities=["T1", "T2"])
    with pytest.raises(FileNotFoundError, match="dataset.json: not found"):
        msd_manifest(tmp_path / "none")


def touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_folders(tmp_path):
    root = tmp_path / "studies"
    touch(root / "s1" / "flair.nii")
    touch(root / "s1" / "T1.nii.gz")
    touch(root / "s1" / "report.txt", "Normal.\n")
    touch(root / "s1" / "labels.txt", "\nnormal\n")
    touch(root / "s1" / ".DS_Store")
    touch(root / "s2" / "t2.NII.GZ")
    touch(root / "s2" / "Labels.txt", "cyst\n oedema \n")
    touch(root / "s2" / "split.txt", "VAL\n")
    touch(root / "manifest.jsonl")  # files beside the study folders are ignored
    touch(root / ".trash" / "x.txt")
    s1, s2 = folders_manifest(root)
    folder = root.absolute()
    assert (s1.study_id, list(s1.images), s1.labels, s1.report_file) == ("s1", ["T1", "FLAIR"], "normal",
                                                                          folder / "s1/report.txt")
    assert s1.images["FLAIR"] == ImageSource(folder / "s1/flair.nii") and s1.split == assign_split("s1")
    assert (s2.split, s2.labels, s2.report_file, list(s2.images)) == ("val", ("cyst", "oedema"), None, ["T2"])
    assert read_report(s1) == "Normal."
    write_manifest([s1, s2], root / "manifest.jsonl")
    assert without_line(read_manifest(root / "manifest.jsonl")) == [s1, s2]


def test_folders_errors_list_every_problem(tmp_path):
    root = tmp_path / "studies"
    touch(root / "good" / "T1.nii.gz")
    touch(root / "typo" / "fliar.nii.gz")
    touch(root / "typo" / "T1.nii.gz")
    touch(root / "typo" / "notes.md")
    touch(root / "twice" / "T1.nii")
    touch(root / "twice" / "t1.nii.gz")
    touch(root / "npy" / "T1.npy")
    (root / "empty").mkdir()
    touch(root / "nolabel" / "T1.nii")
    touch(root / "nolabel" / "labels.txt", "\n \n")
    touch(root / "badsplit" / "T1.nii")
    touch(root / "badsplit" / "split.txt", "validation")
    with pytest.raises(ManifestError) as err:
        folders_manifest(root)
    message = str(err.value)
    assert message.startswith(f"{root.absolute()}: 6 study folder(s) not usable")
    assert "typo: unexpected ['fliar.nii.gz', 'notes.md']" in message
    assert "twice: unexpected ['t1.nii.gz']" in message
    assert "npy: unexpected ['T1.npy']" in message
    assert "empty: no <modality>.nii.gz or .nii file" in message
    assert "nolabel/labels.txt: no label" in message
    assert "badsplit/split.txt: split: expected one of train, val, test, got 'validation'" in message
    assert "good" not in message
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folders_manifest(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ManifestError, match="no study folders"):
        folders_manifest(tmp_path / "nothing")


# --- splits ------------------------------------------------------------------------------------------------------

def test_hashed_splits_are_deterministic_and_stable():
    ids = [f"study_{i:03d}" for i in range(200)]
    splits = [assign_split(i, seed=3) for i in ids]
    assert splits == [assign_split(i, seed=3) for i in ids]
    assert splits != [assign_split(i, seed=4) for i in ids]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert 8 <= counts["val"] <= 32 and 8 <= counts["test"] <= 32, counts  # 20 expected, sd 4.2
    wide = [assign_split(i, val_fraction=0.3, test_fraction=0.2) for i in ids]
    assert 45 <= wide.count("val") <= 75 and 25 <= wide.count("test") <= 55
    assert {assign_split(i, val_fraction=0, test_fraction=0) for i in ids} == {"train"}
    assert {assign_split(i, val_fraction=0, test_fraction=1) for i in ids} == {"test"}
    for val, test in ((-0.1, 0.1), (0.6, 0.5), (0.1, 1.1)):
        with pytest.raises(ValueError, match="val_fraction, test_fraction: expected fractions in"):
            assign_split("a", val_fraction=val, test_fraction=test)


def test_adding_a_study_keeps_the_others_splits(tmp_path):
    root = tmp_path / "studies"
    for i in range(30):
        touch(root / f"s{i:02d}" / "T1.nii.gz")
    before = {s.study_id: s.split for s in folders_manifest(root, val_fraction=0.3, test_fraction=0.3, seed=1)}
    touch(root / "new" / "T1.nii.gz")
    after = {s.study_id: s.split for s in folders_manifest(root, val_fraction=0.3, test_fraction=0.3, seed=1)}
    assert {k: after[k] for k in before} == before and len(set(before.values())) == 3
    msd_root = write_msd_task(tmp_path / "msd", BRATS_MODALITIES, ["a", "b", "c"], [])
    first = {s.study_id: s.split for s in msd_manifest(msd_root, seed=1, val_fraction=0.3, test_fraction=0.3)}
    assert first == {k: assign_split(k, 1, 0.3, 0.3) for k in ("a", "b", "c")}  # the same helper as folders
