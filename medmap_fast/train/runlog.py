"""The log of a training run: ``metrics.csv`` and TensorBoard event files in its run folder, written by rank 0.

One row per logged optimiser step: ``step`` (optimiser updates applied), ``epoch`` (fractional), ``loss`` and the
stage's other terms (means since the previous row), ``lr``, ``grad_norm`` (mean pre-clipping total norm),
``nonfinite_steps`` (updates skipped since the previous row because the loss or a gradient was NaN/Inf),
``volumes_per_s`` (all ranks), ``data_s`` / ``step_s`` (seconds per optimiser step spent waiting for batches / in
all; evaluation and checkpoint writes excluded), ``gpu_mem_gb`` (peak allocated since the previous row, CUDA only)
and ``elapsed_s``. One row per evaluated epoch (``train.eval_every``): ``epoch_end`` = 1, ``step``, ``epoch`` (whole)
and the validation metrics, named ``val_*`` (stage 1: ``val_loss``, ``val_retrieval_r1``, ``val_retrieval_r5``; stage
2: ``val_loss``, ``val_accuracy``, ``val_auc_macro``, ``val_f1_macro``). A cell is empty where a row has no such value
(an AUC is undefined when a class has no positive or no negative study).

TensorBoard tags: ``train/<column>`` for the step rows' training values, ``perf/<column>`` for their timings and
``val/<name>`` for the ``val_<name>`` columns of epoch rows, all at ``step``.

The CSV holds exactly the rows of the run's log: a resumed run rewrites it from the log its checkpoint saved (rows a
killed run wrote after its last checkpoint are dropped, as the resumed run logs those steps again) and appends from
there, and TensorBoard is told to purge the events after the checkpoint (``purge_step``). Rows are appended as whole
lines; :func:`read_metrics` ignores a last line without its newline (a run killed mid-write).
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from medmap_fast.fileio import atomic_path
from medmap_fast.train.distributed import DistributedContext, mean_over_ranks

METRICS_CSV = "metrics.csv"
# Wall-clock measurements: they differ between two runs that are otherwise bit-identical.
TIMING_KEYS = ("volumes_per_s", "data_s", "step_s", "gpu_mem_gb", "elapsed_s")
_POSITION_KEYS = ("step", "epoch", "epoch_end")
VAL_PREFIX = "val_"  # the columns of the per-epoch validation metrics

Row = dict[str, Any]  # column -> number (None: no value, an empty cell)


def batch_volumes(batch: dict[str, Any]) -> int:
    """Volumes in a batch: the length of ``batch["volumes"]``, else the leading size of its first tensor."""
    if "volumes" in batch:
        return len(batch["volumes"])
    return next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim), 0)


class StepMeter:
    """What a row of :class:`RunLog` says about the optimiser steps since the previous row: the means of the
    applied steps' logs, the skipped ones, volumes, time spent waiting for batches (:meth:`timed` wraps the batch
    iterator), wall time less what ran under :meth:`paused`, and peak CUDA memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.started = time.perf_counter()
        self.data_s = self.paused_s = 0.0
        self.volumes = self.steps = self.skipped = 0
        self.sums: Row = {}

    def timed(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``batches``, counting their volumes and the time each ``next()`` takes."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                return
            self.data_s += time.perf_counter() - start
            self.volumes += batch_volumes(batch)
            yield batch

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's time (evaluation, checkpoint writes) out of the step time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def step(self, window: list[Row], grad_norm: float | None) -> None:
        """One optimiser step: ``window`` holds the logs of its micro-batches (the step's log is their mean);
        ``grad_norm`` is its total gradient norm, None when the step was skipped."""
        self.steps += 1
        if grad_norm is None:
            self.skipped += 1
            return
        for key in window[0]:
            self.sums[key] = self.sums.get(key, 0.0) + sum(w[key] for w in window) / len(window)
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm

    def read(self, ctx: DistributedContext) -> Row:
        """The means of the applied steps' logs (``loss``, the stage's terms, ``grad_norm``), ``nonfinite_steps``,
        ``volumes_per_s``, ``data_s`` and ``step_s`` (per optimiser step) and ``gpu_mem_gb`` (CUDA) since the
        previous read, averaged over ranks (``volumes_per_s`` summed); then starts over. Every rank calls it."""
        applied = self.steps - self.skipped
        wall = max(time.perf_counter() - self.started - self.paused_s, 1e-9)
        out = {
            **{k: v / applied for k, v in self.sums.items()},
            "nonfinite_steps": float(self.skipped),
            "volumes_per_s": self.volumes / wall,
            "data_s": self.data_s / max(self.steps, 1),
            "step_s": wall / max(self.steps, 1),
        }
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self._reset()
        out = mean_over_ranks(out, ctx)
        out["volumes_per_s"] *= ctx.world_size
        return out


def _tag(key: str, row: Row) -> str:
    if row.get("epoch_end"):
        return f"val/{key.removeprefix(VAL_PREFIX)}"
    return f"perf/{key}" if key in TIMING_KEYS else f"train/{key}"


class RunLog:
    """Appends the rows of a run to ``rows`` (the run's in-memory log, e.g. the checkpoint's) and, when ``run_dir``
    is given and ``enabled`` (rank 0), to ``run_dir/metrics.csv`` and TensorBoard event files in ``run_dir``.

    ``rows`` are the rows logged before this process started (a resumed run: up to step ``start_step``); the CSV is
    rewritten to hold exactly them. Use as a context manager (closes the event files).
    """

    def __init__(self, run_dir: str | Path | None, rows: list[Row], start_step: int = 0, enabled: bool = True) -> None:
        self.rows = rows
        self.csv = Path(run_dir) / METRICS_CSV if run_dir is not None and enabled else None
        self.columns: list[str] = []
        self.tensorboard: Any = None
        if self.csv is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._rewrite(self.csv)
            # TensorBoard drops the events at steps >= purge_step that an earlier, killed process wrote.
            self.tensorboard = SummaryWriter(str(self.csv.parent), purge_step=start_step + 1)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, row: Row) -> None:
        """Add one row (``step`` and ``epoch`` first; ``epoch_end`` = 1 for a per-epoch evaluation row)."""
        self.rows.append(row)
        if self.csv is None:
            return
        if set(row) - set(self.columns):
            self._rewrite(self.csv)  # a new column: the header changes, so the whole file is replaced
        else:
            with open(self.csv, "a", encoding="utf-8", newline="") as f:
                f.write(self._lines([row]))  # one write of whole lines
        for key, value in row.items():
            if key not in _POSITION_KEYS and value is not None:  # None: undefined (e.g. an AUC without positives)
                self.tensorboard.add_scalar(_tag(key, row), value, int(row["step"]))

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _lines(self, rows: list[Row]) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows([[_format(row.get(c)) for c in self.columns] for row in rows])
        return buffer.getvalue()

    def _rewrite(self, path: Path) -> None:
        self.columns = list(dict.fromkeys(k for row in self.rows for k in row))
        header = ",".join(self.columns) + "\n" if self.columns else ""
        with atomic_path(path) as tmp:
            tmp.write_text(header + self._lines(self.rows), encoding="utf-8")


def _format(value: float | None) -> str:
    return "" if value is None else str(value)


def read_metrics(run: str | Path) -> list[Row]:
    """The rows of ``metrics.csv`` (``run`` is the file or its run folder), empty cells left out; a last line
    without its newline (a run killed mid-write) is ignored."""
    path = Path(run)
    path = path / METRICS_CSV if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected the metrics.csv of a training run)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    reader = csv.reader(lines)
    header = next(reader, [])
    rows = []
    for number, cells in enumerate(reader, start=2):
        if len(cells) != len(header):
            raise ValueError(f"{path}: line {number} has {len(cells)} fields, expected {len(header)} ({header})")
        try:
            rows.append({k: float(v) for k, v in zip(header, cells, strict=True) if v != ""})
        except ValueError as err:
            raise ValueError(f"{path}: line {number}: {err}") from None
    return rows


def validation_rows(rows: list[Row]) -> list[Row]:
    """The per-epoch validation of a run's rows: per evaluated epoch, its ``epoch``, ``step`` and ``val_*`` values."""
    keep = ("epoch", "step")
    return [{k: v for k, v in r.items() if k in keep or k.startswith(VAL_PREFIX)} for r in rows if r.get("epoch_end")]


def summarize(rows: list[Row]) -> dict[str, Any]:
    """What a report says about a run's training from its rows: optimiser ``steps``, ``final_loss`` (the last
    row's), median ``volumes_per_s``, ``data_fraction`` (time waiting for batches over step time), peak
    ``gpu_mem_gb`` (None without CUDA), the total of ``nonfinite_steps`` and ``validation`` (the per-epoch rows of
    :func:`validation_rows`; empty when the run did not evaluate)."""
    steps = [r for r in rows if not r.get("epoch_end")]
    losses = [r["loss"] for r in steps if "loss" in r]
    step_time = sum(r.get("step_s", 0.0) for r in steps)
    memory = [r["gpu_mem_gb"] for r in steps if "gpu_mem_gb" in r]
    speeds = [r["volumes_per_s"] for r in steps if "volumes_per_s" in r]
    return {
        "steps": int(max((r["step"] for r in rows), default=0)),
        "final_loss": losses[-1] if losses else None,
        "volumes_per_s": statistics.median(speeds) if speeds else None,
        "data_fraction": sum(r.get("data_s", 0.0) for r in steps) / step_time if step_time else None,
        "gpu_mem_gb": max(memory) if memory else None,
        "nonfinite_steps": int(sum(r.get("nonfinite_steps", 0.0) for r in steps)),
        "validation": validation_rows(rows),
    }
