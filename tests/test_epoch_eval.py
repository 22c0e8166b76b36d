"""Per-epoch validation of both stages on a tiny cache: the val split is scored after the epochs of
``train.eval_every`` with the metric code of ``evaluate`` (the last row equals evaluating the final model), logged
as ``val_*`` columns and ``val/`` TensorBoard scalars, without changing the trained weights; an empty val split is
skipped with one note; DDP ranks score the same values as one process; report.md and the loss plot show it.
The loop's side (eval mode, no grad, RNG streams, eval_every epochs): tests/test_train.py; resume: tests/test_runlog.py.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medmap_fast.data.cache import CacheEntry, LabelSpace, study_files
from medmap_fast.train.config import RunConfig, load_config
from medmap_fast.train.data import CacheData, TextTable, stage_batches, with_report_embeddings
from medmap_fast.train.distributed import DistributedContext, init_distributed, shutdown
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.finetune import finetune, predict
from medmap_fast.models.medmap import MedMAPPretrainModel
from medmap_fast.train.loop import TrainConfig
from medmap_fast.train.pretrain import build_encoder, pretrain, retrieval_metrics
from medmap_fast.train.pretrain import validation_metrics as stage1_validation
from medmap_fast.train.runlog import METRICS_CSV, TIMING_KEYS, read_metrics, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = DistributedContext()
CLASSES = ("normal", "cyst", "mass")
SPLITS = ["train"] * 8 + ["val"] * 5 + ["test"] * 2
TINY = {
    "data": {"size": 16},
    "encoder": {"modalities": ["T1", "T2"], "embed_dim": 12, "patch_size": 4, "window_size": 2, "depths": [1, 1],
                "num_heads": [3, 6]},
    "pretrain": {"model": {"embed_dim": 16}, "train": {"epochs": 2, "batch_size": 4, "log_every": 1}},
    "finetune": {"model": {"dim": 16, "depth": 1, "num_heads": 2, "dropout": 0.2},
                 "train": {"epochs": 2, "batch_size": 4, "log_every": 1}},
    "evaluate": {"batch_size": 3},  # stage 2's val: two batches, the second one short
}


class HashText:
    """A frozen text encoder stand-in: a fixed random 8-d embedding per text (from its hash), no model files."""

    def encode(self, texts, progress: bool = False) -> torch.Tensor:
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                            for t in texts])


def _config(**train) -> RunConfig:
    """The tiny config; ``train`` sets keys of both stages' ``train`` sections."""
    return load_config(overrides=[*TINY.items(), *((f"{stage}.train.{k}", v) for stage in ("pretrain", "finetune")
                                                   for k, v in train.items())])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> CacheData:
    """15 studies (T1, + T2 for every other one) of 16^3 voxels, three classes, a report each; 5 in val."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(1)
    splits: dict[str, list[CacheEntry]] = {"train": [], "val": [], "test": []}
    for i, split in enumerate(SPLITS):
        modalities = ("T1", "T2") if i % 2 == 0 else ("T1",)
        label = CLASSES[i % 3]
        array = (rng.normal(size=(len(modalities), 16, 16, 16)) + CLASSES.index(label)).astype(np.float16)
        npy, _ = study_files(root, f"s{i:02d}")
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, array)
        report = f"study {i % 4}: {label}"  # some reports are shared by two studies
        splits[split].append(CacheEntry(f"s{i:02d}", split, report, label, modalities, array.shape, (2.0,) * 3,
                                        str(npy.relative_to(root))))
    return CacheData(root, splits, LabelSpace([e.labels for s in splits.values() for e in s], CLASSES))


def _relabelled(cache: CacheData, labels) -> CacheData:
    """The cache with labels(i) for study i (another task kind)."""
    splits = {s: [dataclasses.replace(e, labels=labels(int(e.study_id[1:]))) for e in entries]
              for s, entries in cache.splits.items()}
    return CacheData(cache.path, splits, LabelSpace([e.labels for s in splits.values() for e in s]))


def _reports(cache: CacheData) -> TextTable:
    return TextTable([e.report for s in cache.splits.values() for e in s], HashText())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _steps(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows if not r.get("epoch_end")]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_eval_every_is_checked_and_named():
    assert RunConfig().finetune.train.eval_every == 1
    assert _config(eval_every=0).pretrain.train.eval_every == 0
    for value in (-1, 1.5, True, "often"):
        with pytest.raises(ValueError, match=r"finetune\.train\.eval_every: expected"):
            load_config(overrides={"finetune.train.eval_every": value})
    with pytest.raises(ValueError, match=r"eval_every: expected an int >= 0"):
        TrainConfig(eval_every=-2)


def test_stage1_validates_each_epoch_without_changing_the_weights(cache, tmp_path):
    reports = _reports(cache)
    model, history = pretrain(cache, _config(), reports, CPU, tmp_path / "on", progress=False)
    plain, plain_history = pretrain(cache, _config(eval_every=0), reports, CPU, tmp_path / "off", progress=False)
    assert _same_weights(model, plain) and _steps(history) == _steps(plain_history)
    assert not any(r.get("epoch_end") for r in plain_history)

    rows = read_metrics(tmp_path / "on")
    assert rows == history
    epochs = [r for r in rows if r.get("epoch_end")]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4)]
    assert all(set(r) == {"step", "epoch", "epoch_end", "val_loss", "val_retrieval_r1", "val_retrieval_r5"}
               for r in epochs)
    val = cache.split("val")
    config = _config()
    final = retrieval_metrics(model, val, cache, config, reports, CPU)  # the final weights: the last row
    assert (epochs[-1]["val_retrieval_r1"], epochs[-1]["val_retrieval_r5"]) == (final["retrieval_r1"],
                                                                               final["retrieval_r5"])
    # the loss: the model's own forward on batches of a training step's size (4 studies), averaged over studies
    total = 0.0
    for batch in stage_batches(val, cache, config, None, CPU, ["T1", "T2"], 4, size_of="pretrain").epoch(0):
        batch = with_report_embeddings(batch, reports)
        with torch.no_grad():
            out = model(batch["volumes"], batch["modality_ids"], batch["study_index"], batch["report_embeddings"])
        total += float(out.loss) * batch["num_studies"]
    assert epochs[-1]["val_loss"] == pytest.approx(total / len(val), rel=1e-6)
    assert _scalars(tmp_path / "on", "val/loss") == [(2, pytest.approx(epochs[0]["val_loss"])),
                                                     (4, pytest.approx(epochs[1]["val_loss"]))]
    assert [s for s, _ in _scalars(tmp_path / "on", "val/retrieval_r5")] == [2, 4]


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_stage2_validation_is_evaluate_on_the_val_split(cache, tmp_path, task):
    kinds = {
        "multiclass": lambda i: CLASSES[i % 3],
        "binary": lambda i: ("normal", "lesion")[i % 2],
        "multilabel": lambda i: [["cyst"], ["cyst", "mass"], ["mass"]][i % 3],
    }
    data = _relabelled(cache, kinds[task])
    assert data.label_space().task == task
    config = _config()
    model, history = finetune(data, config, HashText(), CPU, run_dir=tmp_path, progress=False)
    epochs = [r for r in read_metrics(tmp_path) if r.get("epoch_end")]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4)]
    val = data.split("val", "labels")
    probs, labels = predict(model, val, data, config, CPU)
    final = classification_metrics(probs, labels, list(data.label_space().class_names), task=task)
    for key in ("accuracy", "auc_macro", "f1_macro"):
        assert epochs[-1][f"val_{key}"] == pytest.approx(final[key], abs=1e-12), key
    assert epochs[-1]["val_loss"] > 0 and len(_scalars(tmp_path, "val/auc_macro")) == 2
    if task == "multiclass":  # with dropout in the model: training draws from the RNG between evaluations
        plain, plain_history = finetune(data, _config(eval_every=0), HashText(), CPU, progress=False)
        assert _same_weights(model, plain) and _steps(history) == _steps(plain_history)


def test_eval_every_two_evaluates_epochs_two_and_the_last(cache, tmp_path):
    config = _config(epochs=3, eval_every=2)
    _, history = finetune(cache, config, HashText(), CPU, run_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in history if r.get("epoch_end")] == [2, 3]


def test_an_empty_val_split_is_skipped_with_one_note(cache, tmp_path, capsys):
    no_val = CacheData(cache.path, {**cache.splits, "val": []}, cache.labels)
    _, history = pretrain(no_val, _config(epochs=1), _reports(cache), CPU, tmp_path / "s1", progress=False)
    _, history2 = finetune(no_val, _config(epochs=1), HashText(), CPU, run_dir=tmp_path / "s2", progress=False)
    err = capsys.readouterr().err
    assert err.count("no val studies with a report; stage 1 (pre-training) runs without per-epoch validation") == 1
    assert err.count("no val studies with labels; stage 2 (fine-tuning) runs without per-epoch validation") == 1
    assert not any(r.get("epoch_end") for r in history + history2)
    assert "val_loss" not in (tmp_path / "s2" / METRICS_CSV).read_text()
    _, _ = finetune(no_val, _config(epochs=1, eval_every=0), HashText(), CPU, progress=False)
    assert capsys.readouterr().err == ""  # eval_every 0: nothing to say


def test_report_and_plot_show_the_per_epoch_validation(cache, tmp_path):
    from medmap_fast.train.report import write_report

    _, history = finetune(cache, _config(), HashText(), CPU, run_dir=tmp_path / "s2", progress=False)
    test = classification_metrics(np.array([[0.8, 0.2], [0.3, 0.7]]), np.array([0, 1]))
    retrieval = {"num_reports": 2, "num_studies": 2, **{k: 0.5 for k in (
        "retrieval_r1", "retrieval_r5", "chance_r1", "chance_r5", "report_to_study_r1", "report_to_study_r5")}}
    metrics = {
        "test": test, "pretrain": retrieval, "quick": True, "elapsed_s": 1.0, "config": _config().to_dict(),
        "data": {"size": 16, "train_studies": 8, "train_volumes": 12, "test_studies": 2, "classes": ["a", "b"]},
        "environment": {"device": "cpu", "cpu_count": 2, "torch_threads": 1, "torch": torch.__version__},
        "training": {"stage 2": summarize(read_metrics(tmp_path / "s2")), "stage 1": summarize(history[:1])},
    }
    write_report(tmp_path / "report.md", metrics, {})
    report = (tmp_path / "report.md").read_text()
    epochs = [r for r in history if r.get("epoch_end")]
    assert "stage 2:\n\n| epoch | optimiser step | loss | accuracy | macro AUC | macro F1 |" in report
    assert f"| 2 | 4 | {epochs[1]['val_loss']:.3f} | {epochs[1]['val_accuracy']:.3f} |" in report
    assert "stage 1:\n\n|" not in report  # a run without validation rows has no table
    metrics["training"] = {"stage 1": summarize(history[:1])}
    write_report(tmp_path / "report.md", metrics, {})
    assert "No run evaluated on a validation split" in (tmp_path / "report.md").read_text()

    pytest.importorskip("matplotlib", reason="the plots need the demo extra (matplotlib)")
    from medmap_fast.train.plots import plot_loss_curves

    out = plot_loss_curves({"stage 2": tmp_path / "s2"}, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# DDP: every rank scores the whole val split by itself (the contrastive loss is not gathered), as one process with
# the same global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cache: CacheData, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        model = MedMAPPretrainModel.from_pretrained(Path(out) / "model")
        metrics = stage1_validation(model, cache.split("val"), cache, _config(), _reports(cache), ctx)
        torch.save(metrics, Path(out) / f"rank{rank}.pt")
    finally:
        shutdown(ctx)
    os._exit(0)  # results are saved; skip interpreter finalisation, where gloo's threads can still abort (SIGABRT)


def test_ddp_ranks_score_the_val_split_as_one_process(cache, tmp_path):
    torch.manual_seed(0)
    model = MedMAPPretrainModel(build_encoder(_config()), text_dim=8, embed_dim=16)
    model.save_pretrained(tmp_path / "model")
    # the workers' global training batch: 2 ranks x 4 studies; the loss scores batches of that size
    single = stage1_validation(model, cache.split("val"), cache, _config(batch_size=8), _reports(cache), CPU)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cache, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(single, rel=1e-6)
