"""Run logs: fit writes metrics.csv and TensorBoard event files, a resumed run continues them without duplicates
(per-epoch validation rows included), the non-finite guard skips a poisoned update and stops a run that keeps
producing them, and the demo's plots read the logs. A linear model on CPU: every test takes well under a second of
training."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from medmap_fast.train import loop
from medmap_fast.train.checkpoint import CHECKPOINT_NAME
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.guard import NonFiniteStepError
from medmap_fast.train.loop import TrainConfig, fit
from medmap_fast.train.runlog import METRICS_CSV, TIMING_KEYS, read_metrics, summarize

CPU = DistributedContext()
BATCH = 4
DELAY_S = 0.005  # each batch "loads" this long


class Batches:
    """A BatchSource: the same ``n`` batches of ``BATCH`` items every epoch, each after a short wait."""

    def __init__(self, n: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, BATCH, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def __len__(self) -> int:
        return len(self.x)

    def epoch(self, epoch: int, skip_batches: int = 0):
        for i in range(skip_batches, len(self.x)):
            time.sleep(DELAY_S)
            yield {"x": self.x[i], "y": self.y[i]}


def mse(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"mse": float(loss.detach())}


def _fit(config: TrainConfig, run_dir=None, step_loss=mse, on_epoch_end=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1))
    return model, fit(model, Batches(), step_loss, config, CPU, run_dir, progress=False, on_epoch_end=on_epoch_end)


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_fit_writes_metrics_csv_and_tensorboard_events(tmp_path):
    config = TrainConfig(epochs=2, batch_size=BATCH, lr=1e-2, log_every=2)
    _, history = _fit(config, tmp_path, on_epoch_end=lambda model, epoch: {"val_score": 0.5 + epoch})

    header = (tmp_path / METRICS_CSV).read_text().splitlines()[0].split(",")
    assert header == ["step", "epoch", "lr", "loss", "mse", "grad_norm", "nonfinite_steps", "volumes_per_s",
                      "data_s", "step_s", "elapsed_s", "epoch_end", "val_score"]  # no gpu_mem_gb on CPU
    rows = read_metrics(tmp_path)
    assert rows == history  # the file holds the run's log exactly
    steps = [r for r in rows if not r.get("epoch_end")]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12] and [r["epoch"] for r in steps][:3] == [1 / 3, 2 / 3, 1]
    assert [(r["step"], r["val_score"]) for r in rows if r.get("epoch_end")] == [(6, 0.5), (12, 1.5)]
    for r in steps:
        assert r["loss"] == pytest.approx(r["mse"]) and r["nonfinite_steps"] == 0 and r["grad_norm"] > 0
        assert r["data_s"] >= DELAY_S and r["step_s"] >= r["data_s"]  # two batches of waiting per row, one per step
        assert 0 < r["volumes_per_s"] <= BATCH / DELAY_S
    assert steps[-1]["loss"] < steps[0]["loss"]

    assert [s for s, _ in _scalars(tmp_path, "train/loss")] == [2, 4, 6, 8, 10, 12]
    assert _scalars(tmp_path, "train/lr")[0][1] == pytest.approx(steps[0]["lr"])
    assert _scalars(tmp_path, "val/score") == [(6, 0.5), (12, 1.5)]
    assert len(_scalars(tmp_path, "perf/volumes_per_s")) == 6

    summary = summarize(rows)
    assert summary["steps"] == 12 and summary["final_loss"] == steps[-1]["loss"] and summary["gpu_mem_gb"] is None
    assert 0 < summary["data_fraction"] <= 1 and summary["nonfinite_steps"] == 0


def test_resumed_run_continues_the_logs_without_duplicates(tmp_path):
    """Killed at step 11 with rows up to step 10 logged and step 8 checkpointed, plus a half-written line: the
    resumed run's CSV and TensorBoard scalars equal an uninterrupted run's."""
    config = TrainConfig(epochs=3, batch_size=BATCH, lr=1e-2, log_every=1, checkpoint_every=4)
    evaluate = lambda model, epoch: {"val_score": float(epoch)}  # noqa: E731
    _, reference = _fit(config, tmp_path / "reference", on_epoch_end=evaluate)

    run = tmp_path / "run"
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return mse(model, batch)

    with pytest.raises(KeyboardInterrupt):
        _fit(config, run, crashing, evaluate)
    assert (run / CHECKPOINT_NAME).is_file()
    with open(run / METRICS_CSV, "a") as f:
        f.write("11,1.83,0.0")  # a kill in the middle of a write
    before = read_metrics(run)
    assert [r["step"] for r in before if not r.get("epoch_end")][-1] == 10  # the half line is ignored

    # a restart comes seconds later: TensorBoard reads a folder's event files in name order, and a name starts with
    # its creation second (within one second, process-wide counters that sort as text decide)
    time.sleep(1.1)
    _, history = _fit(config, run, on_epoch_end=evaluate)
    rows = read_metrics(run)
    assert rows == history and _untimed(rows) == _untimed(reference)
    steps = [r["step"] for r in rows if not r.get("epoch_end")]
    assert steps == list(range(1, 19))
    assert rows[:8] == before[:8]  # rows up to the checkpoint (step 8) are kept as written
    elapsed = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    assert elapsed == sorted(elapsed)  # the resumed run's clock continues
    assert [s for s, _ in _scalars(run, "train/loss")] == list(range(1, 19))  # events after step 8 purged
    assert [s for s, _ in _scalars(run, "val/score")] == [6, 12, 18]


def test_a_run_killed_between_its_epoch_validation_and_checkpoint_logs_the_validation_once(tmp_path, monkeypatch):
    """Epoch 2's validation row is written, then the process dies before the epoch's checkpoint: the resumed run
    (from epoch 1's checkpoint) redoes epoch 2 and its validation, and the logs hold each epoch's row once."""
    config = TrainConfig(epochs=2, batch_size=BATCH, lr=1e-2, log_every=1)  # checkpoints at epoch ends only
    evaluate = lambda model, epoch: {"val_score": float(epoch)}  # noqa: E731
    _, reference = _fit(config, tmp_path / "reference", on_epoch_end=evaluate)

    save = loop.save_checkpoint

    def dying(path, model, optimizer, scheduler, state, full_config):
        if state.epoch == 2:
            raise KeyboardInterrupt
        save(path, model, optimizer, scheduler, state, full_config)

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        _fit(config, run, on_epoch_end=evaluate)
    monkeypatch.undo()
    assert [r["epoch"] for r in read_metrics(run) if r.get("epoch_end")] == [1, 2]  # written before the kill
    time.sleep(1.1)  # a later restart (TensorBoard orders event files by their creation second)
    _, history = _fit(config, run, on_epoch_end=evaluate)
    rows = read_metrics(run)
    assert rows == history and _untimed(rows) == _untimed(reference)
    assert _scalars(run, "val/score") == [(6, 0.0), (12, 1.0)]


def test_nonfinite_update_is_skipped_without_touching_weights_or_schedule(tmp_path):
    seen: list[list[torch.Tensor]] = []

    def poisoned(model, batch):
        seen.append([p.detach().clone() for p in model.parameters()])
        loss, logs = mse(model, batch)
        return (loss * float("nan") if len(seen) == 3 else loss), logs

    config = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-2, log_every=1)
    with pytest.warns(RuntimeWarning, match=r"after optimiser step 2 .*loss nan in micro-batch 1 of 1"):
        _, history = _fit(config, tmp_path, poisoned)
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # the third update was skipped
    assert not any(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # the others were applied
    _, clean = _fit(config)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in history] == [r["lr"] for r in clean[:5]]  # the schedule did not advance on the skip
    assert [r["nonfinite_steps"] for r in history] == [0, 0, 1, 0, 0]
    assert all(r["loss"] == r["loss"] for r in history)  # the NaN is kept out of the means
    assert summarize(read_metrics(tmp_path))["nonfinite_steps"] == 1


def test_run_stops_after_max_nonfinite_steps_in_a_row(tmp_path):
    calls = {"n": 0}

    def exploding(model, batch):  # from the 4th update on: a finite loss with Inf gradients
        out = model(batch["x"])
        calls["n"] += 1
        if calls["n"] > 3:
            out.register_hook(lambda g: torch.full_like(g, float("inf")))
        return ((out - batch["y"]) ** 2).mean(), {}

    config = TrainConfig(epochs=2, batch_size=BATCH, lr=1e-2, log_every=1, max_nonfinite_steps=3)
    with pytest.warns(RuntimeWarning, match="gradient of 0.weight, 0.bias"):
        with pytest.raises(NonFiniteStepError, match=r"3 optimiser updates in a row.*max_nonfinite_steps = 3.*"
                                                     r"after optimiser step 3 \(epoch 1, micro-batch 6 of 6\).*"
                                                     r"gradient norm (inf|nan).*gradient of 0.weight, 0.bias"):
            _fit(config, tmp_path, exploding)
    rows = read_metrics(tmp_path)
    assert rows[-1]["step"] == 3 and rows[-1]["nonfinite_steps"] == 3  # the stop is in the log
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        TrainConfig(max_nonfinite_steps=0)


def test_read_metrics_names_a_broken_file(tmp_path):
    path = tmp_path / METRICS_CSV
    path.write_text("step,loss\n1,0.5\n2,0.25,7\n")
    with pytest.raises(ValueError, match=r"metrics.csv: line 3 has 3 fields, expected 2"):
        read_metrics(path)
    path.write_text("step,loss\n1,fast\n")
    with pytest.raises(ValueError, match=r"metrics.csv: line 2"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="metrics.csv of a training run"):
        read_metrics(tmp_path / "missing")


def test_loss_curves_are_drawn_from_the_run_logs(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the demo extra (matplotlib)")
    from medmap_fast.train.plots import plot_loss_curves

    config = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-2, log_every=1)
    _fit(config, tmp_path / "a", on_epoch_end=lambda model, epoch: {"val_score": 0.5})
    _fit(config, tmp_path / "b")
    out = plot_loss_curves({"stage 1": tmp_path / "a", "stage 2": tmp_path / "b"}, tmp_path / "loss_curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_loss_curves({"missing": tmp_path / "c"}, tmp_path / "x.png")
