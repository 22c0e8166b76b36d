"""Multi-process training with ``torchrun`` + DDP: NCCL on GPU, gloo on CPU. No home-made collective layer.

``torchrun --nproc-per-node=N -m medmap_fast.cli pretrain ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is
world size 1 and never touches ``torch.distributed``. Rank 0 writes every file; the contrastive loss all-gathers its
features with gradient (see :class:`medmap_fast.losses.AsymmetricContrastiveLoss`), so a DDP run trains on the
global batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs: rank / world size (1 without torchrun) and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the ``torchrun`` process group when WORLD_SIZE > 1 (NCCL for CUDA, gloo for CPU); else a 1-process context.

    Each rank uses ``cuda:LOCAL_RANK`` on GPU. Idempotent: an already initialised group is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device(device)
    if world_size <= 1:
        return DistributedContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown(ctx: DistributedContext) -> None:
    """Leave the process group (no-op for a single process).

    The barrier first: a rank that destroys its group while a peer still talks to it makes gloo abort that peer.
    """
    if ctx.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistributedContext, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``ctx.device``) when distributed, else ``model``.

    ``find_unused_parameters`` is needed when a step may leave parameters out of the graph (e.g. the per-modality
    trunks of ``sharing="separate"`` for modalities absent from a batch).
    """
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier(ctx: DistributedContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], ctx: DistributedContext) -> dict[str, float]:
    """Average scalar logs over ranks (one all-reduce); unchanged for a single process."""
    if not ctx.is_distributed or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / ctx.world_size).tolist(), strict=True))


def gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class ShardedSampler(Sampler[int]):
    """``DistributedSampler`` semantics (seeded per-epoch shuffle, padded to equal shards, rank-strided) that can
    also start mid-epoch, so a resumed run sees exactly the batches it had not trained on yet.

    Call :meth:`set_epoch` before each epoch and :meth:`skip` after resuming inside one.
    """

    def __init__(self, length: int, ctx: DistributedContext, shuffle: bool = True, seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"length: expected a dataset of at least 1 item, got {length}")
        self.length, self.ctx, self.shuffle, self.seed = length, ctx, shuffle, seed
        self.per_rank = math.ceil(length / ctx.world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def skip(self, items: int) -> None:
        """Start this epoch after the first ``items`` indices of this rank's shard."""
        self.start = items

    def epoch_indices(self) -> list[int]:
        """This rank's whole shard for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.ctx.world_size
        order = (order * math.ceil(total / self.length))[:total]  # pad by repeating, as DistributedSampler does
        return order[self.ctx.rank : total : self.ctx.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
