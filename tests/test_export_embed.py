"""``medmap-fast export``, ``embed`` and ``zero-shot`` on a tiny cache and tiny one-epoch pretrain / finetune runs:
exports load back with the run's weights, embeddings equal the models' own outputs, zero-shot reports the metrics
of ``evaluate``, and bad folders are errors naming them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmap_fast.cli import main
from medmap_fast.data.cache import CacheEntry, study_files, write_index
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPPretrainModel
from medmap_fast.train.config import load_config
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.finetune import load_classifier
from medmap_fast.train.pretrain import pool_studies

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """
seed: 0
data: {size: 16}
encoder: {modalities: [T1, T2], embed_dim: 12, patch_size: 4, window_size: 2, depths: [1, 1], num_heads: [3, 6]}
text: {cache_dir: TEXT_CACHE}
pretrain: {model: {embed_dim: 16}, train: {epochs: 1, batch_size: 4}}
finetune: {model: {dim: 16, depth: 1, num_heads: 2}, train: {epochs: 1, batch_size: 4}}
evaluate: {batch_size: 3}
"""
CLASSES = ("normal", "hepatic_cyst", "tumour")
REPORTS = {"normal": "No abnormality.", "hepatic_cyst": "A simple cyst in the liver.", "tumour": "A solid mass."}
SPLITS = ["train"] * 9 + ["val"] * 3 + ["test"] * 6


def tiny_labels(i: int, multilabel: bool) -> str | list[str]:
    """Study i's labels: class i % 3; multi-label: a list, with class (i + 1) % 3 too for even i."""
    if not multilabel:
        return CLASSES[i % 3]
    return [CLASSES[i % 3], *([CLASSES[(i + 1) % 3]] if i % 2 == 0 else [])]


def write_tiny_cache(root: Path, multilabel: bool = False) -> list[CacheEntry]:
    """18 studies of T1 (+ T2 for every other one), 16^3 voxels (= data.size: the evaluation crop keeps them whole),
    three classes (:func:`tiny_labels`); the last train study has no labels and no report."""
    rng = np.random.default_rng(0)
    entries = []
    for i, split in enumerate(SPLITS):
        label = CLASSES[i % 3]
        modalities = ("T1", "T2") if i % 2 == 0 else ("T1",)
        array = rng.normal(size=(len(modalities), 16, 16, 16)).astype(np.float16)
        npy, _ = study_files(root, f"s{i:02d}")
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, array)
        unlabelled = i == 8
        entries.append(CacheEntry(f"s{i:02d}", split, None if unlabelled else REPORTS[label],
                                  None if unlabelled else tiny_labels(i, multilabel), modalities, array.shape,
                                  (2.0, 2.0, 2.0), str(npy.relative_to(root))))
    write_index(root, entries)
    return entries


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The cache, a stage-1 run (s1), a stage-2 run from it (s2) and their exports (x1, x2)."""
    root = tmp_path_factory.mktemp("runs")
    cache = root / "cache"
    entries = write_tiny_cache(cache)
    config = root / "tiny.yaml"
    config.write_text(TINY.replace("TEXT_CACHE", str(root / "text")))
    common = ["--config", str(config), "--data", str(cache), "--no-progress"]
    assert main(["pretrain", *common, "--out", str(root / "s1")]) == 0
    assert main(["finetune", *common, "--init", str(root / "s1" / "model"), "--out", str(root / "s2")]) == 0
    for stage in ("1", "2"):
        assert main(["export", str(root / f"s{stage}"), "--out", str(root / f"x{stage}")]) == 0
    return {"root": root, "cache": cache, "entries": entries, **{k: root / k for k in ("s1", "s2", "x1", "x2")}}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _study_volumes(cache: Path, entry: CacheEntry) -> torch.Tensor:
    return torch.from_numpy(np.load(entry.path(cache)).astype(np.float32)).unsqueeze(1)  # [M, 1, 16, 16, 16]


def test_export_loads_the_run_weights_and_writes_a_model_card(runs):
    x1, x2 = runs["x1"], runs["x2"]
    _same_state(MedMAPEncoder.from_pretrained(x1), MedMAPEncoder.from_pretrained(runs["s1"] / "model" / "encoder"))
    _same_state(MedMAPPretrainModel.from_pretrained(x1), MedMAPPretrainModel.from_pretrained(runs["s1"] / "model"))
    classifier, meta = load_classifier(x2)
    _same_state(classifier, load_classifier(runs["s2"] / "model")[0])
    _same_state(MedMAPEncoder.from_pretrained(x2), classifier.encoder)
    assert meta["class_names"] == sorted(CLASSES)
    assert sorted(p.name for p in x2.iterdir()) == ["README.md", "classifier.json", "classifier.safetensors",
                                                   "config.json", "metrics.json", "model.safetensors",
                                                   "run_config.yaml"]
    assert (x1 / "run_config.yaml").read_bytes() == (runs["s1"] / "config.yaml").read_bytes()
    card = (x2 / "README.md").read_text()
    test_metrics = json.loads((runs["s2"] / "metrics.json").read_text())["test"]
    for expected in ("stage 2 (fine-tuned classifier)", str(runs["cache"].resolve()),
                     "- train: 9 studies (8 with a report, 8 with labels)", "- test: 6 studies",
                     "volumes per modality: T1 18, T2 9", f"classes (multiclass): {', '.join(sorted(CLASSES))}",
                     f"| test | auc_macro | {test_metrics['auc_macro']:.4g} |", "embed_dim: 12"):
        assert expected in card, expected
    assert "| pretrain | retrieval_r1 |" in (x1 / "README.md").read_text()
    assert not [p for p in runs["root"].iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_errors_name_the_folder(runs, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert main(["export", str(tmp_path / "absent"), *out]) == 2
    assert f"{tmp_path / 'absent'}: not a folder" in capsys.readouterr().err
    assert main(["export", str(runs["cache"]), *out]) == 2
    assert f"{runs['cache']}: not a run folder" in capsys.readouterr().err
    killed = tmp_path / "killed"  # a run killed during training: config and checkpoint, no model/
    killed.mkdir()
    (killed / "config.yaml").write_text("seed: 0\n")
    (killed / "checkpoint.pt").write_bytes(b"")
    assert main(["export", str(killed), *out]) == 2
    assert f"{killed}: incomplete run: no model/heads.json or model/classifier.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(runs["s1"]), "--out", str(runs["x2"])]) == 2  # an earlier export: only with --force
    assert "--force" in capsys.readouterr().err and (runs["x2"] / "classifier.json").is_file()
    with pytest.raises(ValueError, match="inside the run"):
        main(["export", str(runs["s1"]), "--out", str(runs["s1"] / "model")])


def test_force_replaces_an_earlier_export(runs, tmp_path):
    out = tmp_path / "x"
    assert main(["export", str(runs["s2"]), "--out", str(out)]) == 0
    assert main(["export", str(runs["s1"]), "--out", str(out), "--force"]) == 0
    assert (out / "heads.json").is_file() and not (out / "classifier.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_export_set_changes_only_what_the_weights_do_not_depend_on(runs, tmp_path, capsys):
    out, moved = tmp_path / "x", tmp_path / "moved_cache"
    capsys.readouterr()
    assert main(["export", str(runs["s1"]), "--out", str(out), "--set", "evaluate.batch_size=5",
                 "--set", "pretrain.train.num_workers=2", "--data", str(moved)]) == 0
    changed = {"data.path": str(moved), "evaluate.batch_size": 5, "pretrain.train.num_workers": 2}
    assert json.loads(capsys.readouterr().out)["changed"] == changed
    assert load_config(out / "run_config.yaml") == load_config(runs["s1"] / "config.yaml", changed)
    card = (out / "README.md").read_text()
    assert "`evaluate.batch_size: 5`" in card and f"cache `{moved}`: not readable at export time" in card
    _same_state(MedMAPPretrainModel.from_pretrained(out), MedMAPPretrainModel.from_pretrained(runs["x1"]))

    refused = tmp_path / "refused"
    for args, key, trained in ((["--set", "encoder.embed_dim=48"], "encoder.embed_dim", "12"),
                               (["--seed", "3"], "seed", "0"),
                               (["--set", "text.prompt_template='{name} scan'"], "text.prompt_template", "'{description} MRI'"),
                               (["--set", "pretrain.train.lr=0.1"], "pretrain.train.lr", "0.0001")):
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}: the weights of {re.escape(str(runs['s1']))} were "
                                             rf"trained with {re.escape(trained)}, got .*may change only.*data\.path"):
            main(["export", str(runs["s1"]), "--out", str(refused), *args])
    with pytest.raises(ValueError, match=r"encoder: expected keys among .*got unknown keys \['embed_dims'\]"):
        main(["export", str(runs["s1"]), "--out", str(refused), "--set", "encoder.embed_dims=48"])
    assert not refused.exists()


def test_embed_writes_every_study_and_equals_the_models_outputs(runs, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    capsys.readouterr()
    assert main(["embed", "--model", str(runs["x2"]), "--data", str(runs["cache"]), "--out", str(out),
                 "--batch-size", "4", "--set", "data.loader=torch", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["studies"] == len(SPLITS) and summary["config"] == str(tmp_path / "emb.npz.config.yaml")
    resolved = {"evaluate.batch_size": 4, "data.loader": "torch"}  # over the config the model was trained with
    assert load_config(tmp_path / "emb.npz.config.yaml") == load_config(runs["x2"] / "run_config.yaml", resolved)
    emb = np.load(out)  # no pickles
    entries = runs["entries"]
    assert emb["study_ids"].tolist() == [e.study_id for e in entries]  # train, val, test: the index order here
    assert emb["splits"].tolist() == SPLITS
    assert emb["volume_modalities"].tolist() == [m for e in entries for m in e.modalities]
    assert emb["volume_study"].tolist() == [i for i, e in enumerate(entries) for _ in e.modalities]
    classifier = load_classifier(runs["x2"])[0]
    assert emb["study_embeddings"].shape == (len(SPLITS), classifier.cct.out_dim)
    assert emb["volume_embeddings"].shape == (27, 2 * classifier.encoder.num_features)
    assert "classifier features" in str(emb["study_embedding"])

    entry = entries[10]  # in the third batch of four, with two volumes
    volumes = _study_volumes(runs["cache"], entry)
    with torch.no_grad():
        pooled = classifier.encoder(volumes, list(entry.modalities)).pooled
        features = classifier(volumes, list(entry.modalities), torch.zeros(2, dtype=torch.long), 1).features
    rows = emb["volume_study"] == 10
    torch.testing.assert_close(torch.from_numpy(emb["volume_embeddings"][rows]), pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(emb["study_embeddings"][10]), features[0], rtol=1e-4, atol=1e-5)


def test_embed_of_a_stage1_model_gives_its_joint_space_study_embedding(runs, tmp_path):
    out = tmp_path / "emb.npz"
    assert main(["embed", "--model", str(runs["s1"] / "model"), "--data", str(runs["cache"]), "--out", str(out),
                 "--split", "test", "--no-progress"]) == 0
    emb = np.load(out)
    test = [e for e in runs["entries"] if e.split == "test"]
    assert emb["study_ids"].tolist() == [e.study_id for e in test] and set(emb["splits"].tolist()) == {"test"}
    model = MedMAPPretrainModel.from_pretrained(runs["s1"] / "model").eval()
    volumes = _study_volumes(runs["cache"], test[0])
    with torch.no_grad():
        expected = pool_studies(model.embed_volumes(volumes, list(test[0].modalities)), torch.zeros(2).long(), 1)
    assert emb["study_embeddings"].shape == (len(test), 16)
    torch.testing.assert_close(torch.from_numpy(emb["study_embeddings"][0]), expected[0], rtol=1e-4, atol=1e-5)


def test_embed_parquet_without_pyarrow_is_a_clear_error(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(ImportError, match="needs pyarrow, which is not installed; `pip install pyarrow`"):
        main(["embed", "--model", str(runs["x1"]), "--data", str(runs["cache"]), "--out", str(tmp_path / "e.parquet")])
    with pytest.raises(ValueError, match=r"--out: expected a file ending in .npz or .parquet"):
        main(["embed", "--model", str(runs["x1"]), "--data", str(runs["cache"]), "--out", str(tmp_path / "e.csv")])


def test_embed_parquet_holds_the_npz_arrays(runs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (it is optional: .parquet only)")
    args = ["embed", "--model", str(runs["x1"]), "--data", str(runs["cache"]), "--split", "val", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "e.parquet")]) == 0
    assert main([*args, "--out", str(tmp_path / "e.npz")]) == 0
    table, emb = pq.read_table(tmp_path / "e.parquet"), np.load(tmp_path / "e.npz")
    assert table.column("study_id").to_pylist() == emb["study_ids"].tolist()
    np.testing.assert_array_equal(np.array(table.column("study_embedding").to_pylist()), emb["study_embeddings"])
    volumes = [v for study in table.column("volume_embeddings").to_pylist() for v in study]
    np.testing.assert_array_equal(np.array(volumes), emb["volume_embeddings"])
    assert [m for ms in table.column("modalities").to_pylist() for m in ms] == emb["volume_modalities"].tolist()


def test_embed_of_a_missing_cache_names_it(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}"):
        main(["embed", "--model", str(runs["x1"]), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e.npz")])
    with pytest.raises(FileNotFoundError, match="no saved model here"):
        main(["embed", "--model", str(tmp_path), "--data", str(runs["cache"]), "--out", str(tmp_path / "e.npz")])


def test_zero_shot_reports_the_metrics_of_evaluate(runs, tmp_path, capsys):
    evaluate_keys = set(json.loads((runs["s2"] / "metrics.json").read_text())["test"])  # what evaluate reports
    out = tmp_path / "zs"
    assert main(["zero-shot", "--model", str(runs["x1"]), "--data", str(runs["cache"]), "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert load_config(out / "config.yaml") == load_config(runs["x1"] / "run_config.yaml")  # the trained-with one
    assert set(result["test"]) == evaluate_keys
    assert result["test"]["num_samples"] == 6 and result["test"]["class_names"] == sorted(CLASSES)
    assert result["prompts"]["hepatic_cyst"] == "hepatic cyst MRI"  # text.prompt_template "{description} MRI"

    capsys.readouterr()
    assert main(["zero-shot", "--model", str(runs["s1"] / "model"), "--classes", "Hepatic cyst",
                 "normal=a liver with no finding", "--no-progress"]) == 0  # the run's own cache, from its config
    subset = json.loads(capsys.readouterr().out)
    assert subset["prompts"] == {"hepatic_cyst": "Hepatic cyst", "normal": "a liver with no finding"}
    assert subset["test"]["num_samples"] == 4 and subset["test"]["class_names"] == ["hepatic_cyst", "normal"]


def test_zero_shot_scores_each_label_of_a_multilabel_cache_against_its_negative(runs, tmp_path):
    """Each class on its own: softmax over (prompt, "no " + prompt) = sigmoid of the scaled similarity difference;
    the multi-label metrics of evaluate."""
    cache = tmp_path / "multilabel"
    entries = write_tiny_cache(cache, multilabel=True)
    out = tmp_path / "zs"
    assert main(["zero-shot", "--model", str(runs["x1"]), "--data", str(cache), "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["prompts"]["hepatic_cyst"] == "hepatic cyst MRI"
    assert result["negative_prompts"]["hepatic_cyst"] == "no hepatic cyst MRI"
    assert load_config(out / "config.yaml") == load_config(runs["x1"] / "run_config.yaml", {"data.path": str(cache)})

    model = MedMAPPretrainModel.from_pretrained(runs["x1"]).eval()
    text_encoder = load_config(runs["x1"] / "run_config.yaml").text.text_encoder()
    names = list(result["prompts"])
    test = [e for e in entries if e.split == "test"]
    with torch.no_grad():
        studies = torch.cat([pool_studies(model.embed_volumes(_study_volumes(cache, e), list(e.modalities)),
                                          torch.zeros(len(e.modalities), dtype=torch.long), 1) for e in test])
        def joint(texts):
            return torch.nn.functional.normalize(model.embed_reports(text_encoder.encode(texts)), dim=-1)
        positive = joint([result["prompts"][n] for n in names])
        negative = joint([result["negative_prompts"][n] for n in names])
        probs = torch.sigmoid(model.loss_fn.scale() * (studies @ positive.T - studies @ negative.T))
    labels = np.array([[n in e.labels for n in names] for e in test])
    expected = classification_metrics(probs.numpy(), labels, names, task="multilabel")
    assert result["test"].keys() == expected.keys() and result["test"]["num_samples"] == 6
    for key in ("accuracy", "chance_accuracy", "auc_macro", "f1_macro"):
        assert result["test"][key] == pytest.approx(expected[key], abs=1e-6), key
    for name in names:
        assert result["test"]["per_class"][name] == pytest.approx(expected["per_class"][name]), name
    assert result["test"]["confusion_matrix"] == expected["confusion_matrix"]

    assert main(["zero-shot", "--model", str(runs["x1"]), "--data", str(cache), "--classes", "tumour=a solid mass",
                 "--negative-template", "{description} absent", "--out", str(out), "--no-progress"]) == 0
    subset = json.loads((out / "metrics.json").read_text())
    assert subset["negative_prompts"] == {"tumour": "tumour absent"} and subset["test"]["class_names"] == ["tumour"]
    with pytest.raises(ValueError, match=r"--negative-template: expected a format string .*'no \{finding\}'"):
        main(["zero-shot", "--model", str(runs["x1"]), "--data", str(cache), "--negative-template", "no {finding}",
              "--no-progress"])


def test_zero_shot_errors(runs):
    with pytest.raises(SystemExit, match="expected a stage-1 model"):
        main(["zero-shot", "--model", str(runs["x2"]), "--no-progress"])
    with pytest.raises(ValueError, match=r"--classes 'cirrhosis': expected a class of the cache's labels"):
        main(["zero-shot", "--model", str(runs["x1"]), "--classes", "normal", "cirrhosis", "--no-progress"])


def test_evaluate_an_export_reads_its_run_config(runs, tmp_path):
    """`evaluate --model EXPORT` scores with the config the run was trained with (the export's run_config.yaml, not a
    config.yaml beside the export): the same metrics as evaluating the run's own model folder."""
    from_run, from_export = tmp_path / "run", tmp_path / "export"
    assert main(["evaluate", "--model", str(runs["s2"] / "model"), "--no-progress", "--out", str(from_run)]) == 0
    assert main(["evaluate", "--model", str(runs["x2"]), "--no-progress", "--out", str(from_export)]) == 0
    assert (from_export / "metrics.json").read_text() == (from_run / "metrics.json").read_text()
    assert (from_export / "config.yaml").read_text() == (runs["s2"] / "config.yaml").read_text()
