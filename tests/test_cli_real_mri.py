"""The whole user path on real MRI, through the command line: manifest -> prepare -> pretrain -> finetune ->
evaluate, on a handful of studies derived from nilearn's MNI152 T1 template and nibabel's anatomical.nii (a real
head scan, stored LAS), with a second contrast per study, a lesion in half of them, reports and labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_to_output

from medmap_fast.cli import main

TINY = """
seed: 0
data: {size: 16, classes: [normal, lesion]}   # binary, "lesion" the positive class
encoder: {embed_dim: 12, patch_size: 4, window_size: 2, depths: [1, 1], num_heads: [3, 6]}
text: {cache_dir: TEXT_CACHE}
pretrain: {max_volumes: 2, model: {embed_dim: 16}, train: {epochs: 2, batch_size: 4}}
finetune: {model: {dim: 16, depth: 1, num_heads: 2}, train: {epochs: 2, batch_size: 4}}
evaluate: {batch_size: 4}
"""
SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2


def _heads() -> list[nib.Nifti1Image]:
    """Two real T1 head images at 4 mm: the MNI152 template (RAS) and nibabel's anatomical.nii (LAS)."""
    from nilearn.datasets import load_mni152_template

    mni = resample_to_output(load_mni152_template(resolution=2), voxel_sizes=4.0, order=1)
    anatomical = nib.load(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii")
    return [mni, anatomical]


def write_study_folders(root: Path) -> None:
    """Ten study folders: T1.nii.gz and T2.nii.gz (the T1 with its contrast inverted inside the head), report.txt,
    labels.txt, split.txt; odd studies carry a bright 8 mm lesion."""
    rng = np.random.default_rng(0)
    heads = _heads()
    for i, split in enumerate(SPLITS):
        head = heads[i % 2]
        t1 = np.asarray(head.dataobj, dtype=np.float32)
        t1 = t1 / np.percentile(t1, 99) * (1 + 0.05 * rng.normal()) + 0.02 * rng.random(t1.shape, dtype=np.float32)
        lesion = i % 2 == 1
        if lesion:
            inside = np.argwhere(t1 > 0.5)
            centre = inside[rng.integers(len(inside))]
            grid = np.indices(t1.shape).transpose(1, 2, 3, 0)
            t1 += 1.5 * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / 2.0)
        t2 = np.where(t1 > 0.2, 1.6 - t1, t1)
        folder = root / f"sub-{i:02d}"
        folder.mkdir(parents=True)
        for name, data in (("T1", t1), ("T2", t2)):
            nib.save(nib.Nifti1Image(data, head.affine), folder / f"{name}.nii.gz")
        (folder / "report.txt").write_text("A hyperintense focal lesion." if lesion else "No focal abnormality.")
        (folder / "labels.txt").write_text("lesion\n" if lesion else "normal\n")
        (folder / "split.txt").write_text(split + "\n")


def test_manifest_prepare_pretrain_finetune_evaluate(tmp_path, capsys):
    root, cache = tmp_path / "studies", tmp_path / "cache"
    write_study_folders(root)
    assert main(["manifest", "folders", str(root)]) == 0
    manifest = root / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train", "val", "test"}

    assert main(["prepare", str(manifest), "--out", str(cache), "--spacing", "6", "--workers", "0",
                 "--no-progress", "--strict"]) == 0
    index = [json.loads(line) for line in (cache / "index.jsonl").read_text().splitlines()]
    assert len(index) == 10 and all(r["modalities"] == ["T1", "T2"] for r in index)
    capsys.readouterr()

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("TEXT_CACHE", str(tmp_path / "text")))
    common = ["--config", str(config), "--data", str(cache), "--no-progress"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "s1")]) == 0
    stage1 = json.loads((tmp_path / "s1" / "metrics.json").read_text())["pretrain"]
    assert stage1["num_studies"] == 2 and 0.0 <= stage1["retrieval_r1"] <= stage1["retrieval_r5"] <= 1.0
    assert (tmp_path / "s1" / "model" / "encoder" / "model.safetensors").is_file()

    assert main(["finetune", *common, "--init", str(tmp_path / "s1" / "model"), "--out", str(tmp_path / "s2")]) == 0
    test = json.loads((tmp_path / "s2" / "metrics.json").read_text())["test"]
    assert test["num_samples"] == 2 and test["class_names"] == ["normal", "lesion"]

    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "s2" / "model"), "--no-progress",
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test"] == test  # the saved classifier reloads exactly
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "s2" / "model"), "--split", "val", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["val"]["num_samples"] == 2
    assert main(["evaluate", "--model", str(tmp_path / "s1" / "model"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["pretrain"] == stage1

    from medmap_fast.train.finetune import load_classifier  # a damaged saved classifier: errors name the file

    saved = tmp_path / "s2" / "model"
    weights, meta = saved / "classifier.safetensors", saved / "classifier.json"
    good_weights, good_meta = weights.read_bytes(), meta.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match=r"model/classifier\.safetensors: not a readable safetensors file"):
        load_classifier(saved)
    weights.write_bytes(good_weights)
    for text, pattern in [("{", "not valid JSON"), ("{}", r"describes no valid MedMAPClassifier \(KeyError")]:
        meta.write_text(text)
        with pytest.raises(ValueError, match=r"model/classifier\.json: " + pattern):
            load_classifier(saved)
    meta.write_text(good_meta)
    assert load_classifier(saved)[1]["class_names"] == test["class_names"]


def test_dali_and_torch_loaders_train_the_same_model(tmp_path):
    """With augmentation on, a pre-training run on the DALI CPU pipeline gives the weights of the torch loader's run:
    both loaders produce the same batches from the same seed."""
    from safetensors.torch import load_file

    root, cache = tmp_path / "studies", tmp_path / "cache"
    write_study_folders(root)
    assert main(["manifest", "folders", str(root)]) == 0
    assert main(["prepare", str(root / "manifest.jsonl"), "--out", str(cache), "--spacing", "8", "--workers", "0",
                 "--no-progress"]) == 0
    weights = {}
    for loader in ("torch", "dali"):
        config = tmp_path / f"{loader}.yaml"
        config.write_text(TINY.replace("TEXT_CACHE", str(tmp_path / "text")).replace(
            "data: {", f"data: {{loader: {loader}, ").replace("pretrain: {", "pretrain: {augment: true, "))
        out = tmp_path / loader
        assert main(["pretrain", "--config", str(config), "--data", str(cache), "--out", str(out), "--no-progress"]) == 0
        weights[loader] = load_file(out / "model" / "encoder" / "model.safetensors")
    assert weights["torch"].keys() == weights["dali"].keys()
    for key, value in weights["torch"].items():
        assert torch.equal(value, weights["dali"][key]), key


def test_a_malformed_manifest_exits_2_naming_the_line(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"study_id": "a", "split": "train", "images": {"T1": "a.nii.gz"}}\n{"study_id": \n')
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "cache"), "--no-progress"]) == 2
    assert f"{manifest}:2:" in capsys.readouterr().err


def test_prepare_strict_exits_1_when_a_study_is_skipped(tmp_path, capsys):
    root = tmp_path / "studies"
    write_study_folders(root)
    (root / "sub-03" / "T2.nii.gz").write_bytes(b"not a nifti file")
    assert main(["manifest", "folders", str(root)]) == 0
    args = ["prepare", str(root / "manifest.jsonl"), "--out", str(tmp_path / "cache"), "--spacing", "8",
            "--workers", "0", "--no-progress"]
    assert main(args) == 0  # skipped and counted, nothing else lost
    assert len((tmp_path / "cache" / "index.jsonl").read_text().splitlines()) == 9
    errors = [json.loads(line) for line in (tmp_path / "cache" / "errors.jsonl").read_text().splitlines()]
    assert [e["study_id"] for e in errors] == ["sub-03"] and "T2.nii.gz" in errors[0]["reason"]
    assert main([*args, "--strict"]) == 1


def test_training_without_a_cache_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.path"):
        main(["pretrain", "--out", str(tmp_path / "s1"), "--no-progress"])
