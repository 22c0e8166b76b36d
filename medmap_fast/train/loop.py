"""The training loop shared by both stages: AdamW, linear warm-up + cosine decay, AMP, gradient accumulation,
seeding, progress bar with volumes/s and ETA, the run log (:mod:`~medmap_fast.train.runlog`: metrics.csv and
TensorBoard), the non-finite step guard (:mod:`~medmap_fast.train.guard`), DDP, and checkpoints that resume a killed
run exactly where it stopped.

A stage provides a :class:`BatchSource` (the cache loaders of :mod:`medmap_fast.data.loaders`, wrapped by
:class:`medmap_fast.train.data.StageBatches`) and a ``step_loss(model, batch) -> (loss, logs)``; :func:`fit` does
the rest.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.swin_layers import SwinBlock3D
from medmap_fast.train.checkpoint import (
    CHECKPOINT_NAME,
    TrainState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medmap_fast.train.distributed import DistributedContext, unwrap, wrap_model
from medmap_fast.train.guard import NonFiniteGuard
from medmap_fast.train.runlog import RunLog, StepMeter
from medmap_fast.validation import fail

AMP_MODES = ("auto", "bf16", "off")
Batch = dict[str, Any]
StepLoss = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """Optimisation settings of one stage (the ``train:`` section of a stage in the YAML config).

    batch_size is per process and per micro-batch, in items (studies); the effective batch is
    ``batch_size * grad_accum * world_size``. warmup_fraction of all optimiser steps ramp the LR linearly from 0,
    then it follows a cosine to ``lr * min_lr_ratio``. ``lr_scale`` multiplies the LR of parameters whose name
    starts with a prefix (e.g. ``{"encoder.": 0.5}`` for a gentler encoder update when fine-tuning). amp: "auto"
    (bf16 autocast on CUDA, off on CPU), "bf16" or "off". checkpoint_every: also checkpoint every n optimiser steps
    (0 = only at the end of each epoch). max_nonfinite_steps: an update whose loss or gradients hold NaN/Inf is
    skipped; this many skipped in a row stop the run (:mod:`medmap_fast.train.guard`). compile: ``torch.compile``
    the model's encoders in place before training (:func:`apply_train_options`); activation_checkpointing: every Swin
    block recomputes its activations in the backward instead of keeping them (MONAI's ``use_checkpoint``).
    eval_every: evaluate on the validation split after every n-th epoch and after the last one (0 = never; see
    :func:`fit`'s ``on_epoch_end``).
    """

    epochs: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    grad_clip: float | None = 1.0
    amp: str = "auto"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    max_nonfinite_steps: int = 5
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(name, "an int >= 1", repr(value))
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
            fail("eval_every", "an int >= 0 (0: no per-epoch evaluation)", repr(self.eval_every))
        for name in ("compile", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false", repr(getattr(self, name)))
        if self.amp not in AMP_MODES:
            fail("amp", f"one of {AMP_MODES}", repr(self.amp))
        if not 0.0 <= self.warmup_fraction < 1.0:
            fail("warmup_fraction", "a fraction in [0, 1)", repr(self.warmup_fraction))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            fail("lr", "a positive float", repr(self.lr))
        if len(self.betas) != 2:
            fail("betas", "two floats", repr(self.betas))
        self.betas = (float(self.betas[0]), float(self.betas[1]))  # YAML gives a list

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, name: str = "train") -> TrainConfig:
        """Build from a config section; an unknown key is an error naming it (catches typos)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            fail(name, f"keys among {sorted(known)}", f"unknown keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the 0-based ``epoch`` ends with a per-epoch evaluation (``eval_every``)."""
        return self.eval_every > 0 and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class WarmupCosine:
    """LR multiplier of optimiser step t: linear warm-up from 0 over ``warmup`` steps, then a cosine from 1 down to
    ``min_ratio`` at ``total``. A dataclass, not a closure, so LambdaLR can save it in its state."""

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, scalars (``logit_scale``) and other 1-D parameters; per-prefix
    LR multipliers from ``lr_scale`` (the longest matching prefix wins). Frozen parameters are left out."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefixes = [k for k in lr_scale if name.startswith(k)]
        scale = lr_scale[max(prefixes, key=len)] if prefixes else 1.0
        decay = weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr": lr * scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The optimiser of a run: AdamW over :func:`param_groups`, fused on CUDA; elsewhere its multi-tensor path, which
    torch leaves off on the CPU but which gives the per-tensor loop's results bit for bit, in fewer calls."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay, config.lr, config.lr_scale),
        lr=config.lr,
        betas=config.betas,
        fused=cuda,
        foreach=not cuda,
    )


def apply_train_options(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``config``'s model-side options, in place; returns ``model``. ``activation_checkpointing`` turns checkpointing
    on in every Swin block (whatever the encoder's ``use_checkpoint`` said): both halves of a block recompute in the
    backward, as MONAI's ``use_checkpoint`` does. ``compile`` compiles every :class:`MedMAPEncoder` of the model (the
    whole model where it holds none) with ``nn.Module.compile``, which keeps the parameter names, so checkpoints and
    saved models are an eager run's; compiled code skips the encoder's NaN / id-range checks."""
    if config.activation_checkpointing:
        blocks = [m for m in model.modules() if isinstance(m, SwinBlock3D)]
        if not blocks:
            fail(
                "activation_checkpointing",
                "a model with Swin blocks to checkpoint",
                f"a {type(model).__name__} without any",
            )
        for block in blocks:
            block.use_checkpoint = True
    if config.compile:
        on_cpu = any(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and (missing := cpu_compiler_missing()):
            fail("compile", "a C++ compiler for torch.compile on the CPU (Inductor builds C++ kernels there)", missing)
        encoders: list[nn.Module] = [m for m in model.modules() if isinstance(m, MedMAPEncoder)]
        for module in encoders or [model]:
            module.compile()
    return model


def cpu_compiler_missing() -> str | None:
    """Why Inductor cannot compile CPU code here (it searches ``torch._inductor.config.cpp.cxx``), or None."""
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return f"no working C++ compiler among {inductor_config.cpp.cxx}"
    return None


def autocast(device: torch.device, amp: str) -> Any:
    """bf16 autocast on CUDA for amp "auto"/"bf16"; a no-op otherwise (CPU trains in fp32)."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class BatchSource(Protocol):
    """The batches of one process, epoch by epoch: ``len()`` micro-batches per epoch (the same on every rank), and
    ``epoch(e, skip_batches)`` yields those of epoch ``e`` after its first ``skip_batches`` (a resumed run). The
    order and the augmentation of epoch ``e`` must depend only on the source's seed and ``e``."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterable[Batch]: ...


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Run the block, then put every random generator training draws from back as it was (Python, NumPy, torch CPU
    and CUDA: :func:`~medmap_fast.train.checkpoint.rng_state`). Evaluation draws from them (a DataLoader's base seed
    comes from the torch generator); training must not see that."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=2.0,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}, ETA {remaining}{postfix}]",
    )


_POSTFIX = (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("volumes_per_s", "vol/s", ".1f"))


def fit(
    model: nn.Module,
    batches: BatchSource,
    step_loss: StepLoss,
    config: TrainConfig,
    ctx: DistributedContext,
    run_dir: str | Path | None = None,
    desc: str = "train",
    resume: bool = True,
    progress: bool = True,
    find_unused_parameters: bool = False,
    on_epoch_end: Callable[[nn.Module, int], Mapping[str, float | None]] | None = None,
    run_config: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the log (the rows of :mod:`medmap_fast.train.runlog`): one dict per logged
    optimiser step (``step``, ``epoch``, ``lr``, ``loss`` and the stage's logs averaged since the previous row,
    throughput and skipped updates) and one per evaluated epoch (``epoch_end`` = 1, plus what ``on_epoch_end``
    returns).

    ``on_epoch_end(model, epoch)`` is the per-epoch evaluation (the validation metrics, named ``val_*``): called after
    the epochs that ``config.evaluates_after``, on every rank, with the unwrapped model in eval mode, under
    ``torch.no_grad`` and with the random generators restored afterwards (:func:`rng_untouched`), so a run with
    evaluation trains exactly the weights of one without; train mode is restored after it. Its time is left out of
    the step timings.

    With ``run_dir``, rank 0 writes ``checkpoint.pt`` there at the end of every epoch (and every
    ``checkpoint_every`` steps), and the log as ``metrics.csv`` and TensorBoard event files; if a checkpoint exists
    and ``resume`` is true, training continues from it (same configuration required: ``run_config`` plus
    ``config``). An update whose loss or gradients are not finite is skipped (:mod:`medmap_fast.train.guard`).
    The model is moved to ``ctx.device``.
    """
    seed_everything(config.seed)
    apply_train_options(model.to(ctx.device), config)
    ddp = wrap_model(model, ctx, find_unused_parameters)
    optimizer = adamw(model, config, ctx.device)
    micro_per_epoch = len(batches)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    schedule = WarmupCosine(round(config.warmup_fraction * total_steps), total_steps, config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    full_config = {
        "train": config.to_dict(),
        "run": run_config or {},
        "world_size": ctx.world_size,
        "batches_per_epoch": micro_per_epoch,
    }
    ckpt = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    state = TrainState()
    if ckpt is not None and resume and ckpt.is_file():
        state = load_checkpoint(ckpt, model, optimizer, scheduler, full_config)

    def checkpoint() -> None:
        if ckpt is not None and ctx.is_main:
            save_checkpoint(ckpt, model, optimizer, scheduler, state, full_config)

    tried = state.epoch * steps_per_epoch + math.ceil(state.batches_in_epoch / config.grad_accum)
    bar = _progress(total_steps, tried, desc, progress and ctx.is_main)
    guard = NonFiniteGuard(config.max_nonfinite_steps, ctx)
    meter = StepMeter(ctx.device)
    window: list[dict[str, float]] = []  # the logs of the micro-batches of the current optimiser step
    # A resumed run's elapsed time continues from its log.
    started = time.perf_counter() - next((h["elapsed_s"] for h in reversed(state.history) if "elapsed_s" in h), 0.0)
    model.train()
    with RunLog(run_dir, state.history, state.step, enabled=ctx.is_main) as runlog:
        for epoch in range(state.epoch, config.epochs):
            micro = state.batches_in_epoch
            for batch in meter.timed(batches.epoch(epoch, micro)):
                window_start = micro - micro % config.grad_accum
                size = min(config.grad_accum, micro_per_epoch - window_start)
                last_in_window = micro + 1 == window_start + size
                sync: AbstractContextManager[Any] = nullcontext()
                if isinstance(ddp, nn.parallel.DistributedDataParallel) and not last_in_window:
                    sync = ddp.no_sync()  # gradients are all-reduced once per accumulation window
                with sync:
                    with autocast(ctx.device, config.amp):
                        loss, logs = step_loss(ddp, to_device(batch, ctx.device))
                    (loss / size).backward()
                window.append({"loss": float(loss.detach()), **logs})
                micro += 1
                if not last_in_window:
                    continue
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                problem = guard.problem([w["loss"] for w in window], grad_norm, model)
                if problem is None:
                    if config.grad_clip:
                        torch.nn.utils.clip_grads_with_norm_(model.parameters(), config.grad_clip, grad_norm)
                    optimizer.step()
                    scheduler.step()
                    state.step += 1
                    guard.passed()
                else:  # no update: weights, optimiser and schedule stay as they were
                    guard.skip(
                        problem,
                        f"{desc}, the update after optimiser step {state.step} (epoch {epoch + 1}, "
                        f"micro-batch {micro} of {micro_per_epoch})",
                    )
                optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch = micro
                meter.step(window, None if problem else float(grad_norm))
                window = []
                bar.update(1)
                if (
                    (problem is None and state.step % config.log_every == 0)
                    or micro == micro_per_epoch
                    or guard.exhausted
                ):
                    row = {
                        "step": state.step,
                        "epoch": epoch + micro / micro_per_epoch,
                        "lr": scheduler.get_last_lr()[0],
                        **meter.read(ctx),
                        "elapsed_s": time.perf_counter() - started,
                    }
                    runlog.log(row)
                    bar.set_postfix({label: f"{row[k]:{fmt}}" for k, label, fmt in _POSTFIX if k in row})
                guard.check()
                if (
                    problem is None
                    and config.checkpoint_every
                    and state.step % config.checkpoint_every == 0
                    and micro < micro_per_epoch
                ):
                    with meter.paused():
                        checkpoint()
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            with meter.paused():
                if on_epoch_end is not None and config.evaluates_after(epoch):
                    model.eval()
                    with torch.no_grad(), rng_untouched():
                        metrics = on_epoch_end(unwrap(ddp), epoch)
                    model.train()
                    runlog.log({"step": state.step, "epoch": epoch + 1, "epoch_end": 1, **metrics})
                checkpoint()
                runlog.flush()
    bar.close()
    model.eval()
    return state.history
