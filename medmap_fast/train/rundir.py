"""The run folder of one training stage, as ``medmap-fast pretrain`` / ``finetune --out RUN`` and each stage folder of
``medmap-fast demo`` (``stage1/``, ``stage2/``, ``stage2_random_init/``) write it and ``medmap-fast export RUN``
reads it::

    RUN/config.yaml     the resolved config: written before training (a run resuming its checkpoint keeps the one
                        there until the checkpoint has accepted the config) and again when the run ends
    RUN/checkpoint.pt  model/  metrics.csv  events.out.tfevents.*   written by the training loop
    RUN/metrics.json    written last: the held-out metrics, {"pretrain": report retrieval} (stage 1) or
                        {split: classification metrics} (stage 2); {} when there were no held-out studies
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medmap_fast.fileio import atomic_path
from medmap_fast.train.checkpoint import CHECKPOINT_NAME
from medmap_fast.train.config import RUN_CONFIG, RunConfig
from medmap_fast.train.distributed import DistributedContext

RUN_METRICS = "metrics.json"


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def begin_run(run_dir: str | Path, config: RunConfig, ctx: DistributedContext, resume: bool = True) -> None:
    """Write the resolved config into ``run_dir`` before training (rank 0), unless a checkpoint there will be resumed:
    the config is then written by :func:`end_run`, once the checkpoint has accepted it."""
    run_dir = Path(run_dir)
    if ctx.is_main and not (resume and (run_dir / CHECKPOINT_NAME).is_file()):
        config.save(run_dir / RUN_CONFIG)


def end_run(run_dir: str | Path, config: RunConfig, metrics: dict[str, Any], ctx: DistributedContext) -> None:
    """Write the resolved config and the held-out ``metrics`` into ``run_dir`` (rank 0); metrics.json last, so its
    presence marks a finished run."""
    if ctx.is_main:
        config.save(Path(run_dir) / RUN_CONFIG)
        write_json(Path(run_dir) / RUN_METRICS, metrics)
