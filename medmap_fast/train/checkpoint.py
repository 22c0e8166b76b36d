"""Training checkpoints that let a killed run resume where it stopped.

One file, ``checkpoint.pt``, replaced atomically and durably (fsync of file and folder) so a crash mid-write leaves the
previous checkpoint intact. It holds the model (unwrapped from DDP), optimiser and LR-scheduler states, the position
(optimiser step, epoch, micro-batches done in the epoch), the RNG states (Python, NumPy, torch CPU and CUDA), the
training log so far, and the run's configuration, which must match on resume. It loads with
``torch.load(weights_only=True)``: only tensors and plain Python values are stored.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmap_fast.fileio import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where training stands: optimiser steps done, current epoch, micro-batches done in it, the log so far."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(
            {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}}
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states are restored only when as many devices are visible)."""
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: dict[str, Any],
) -> None:
    """Write the checkpoint atomically and durably (call on rank 0 only)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batches_in_epoch": state.batches_in_epoch,
        "history": json.dumps(state.history),
        "rng": rng_state(),
        "config": json.dumps(config, sort_keys=True),
    }
    with atomic_path(path, durable=True) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
) -> TrainState:
    """Restore model, optimiser, scheduler and RNGs from ``path``; returns the position to continue from.

    Raises ``ValueError`` when the checkpoint was written by a run with a different configuration (resuming it would
    silently change the schedule or the model).
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: expected a medmap-fast checkpoint of format {FORMAT_VERSION}, "
            f"got format {payload.get('format_version')!r}"
        )
    saved = json.loads(payload["config"])
    current = json.loads(json.dumps(config, sort_keys=True))
    if saved != current:
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise ValueError(
            f"{path}: written by a run with another configuration (differs in {changed}); use a new "
            f"output folder or delete the checkpoint to start over"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return TrainState(payload["step"], payload["epoch"], payload["batches_in_epoch"], json.loads(payload["history"]))
