"""The training loop's guard against non-finite steps: an optimiser update whose loss or gradients hold NaN/Inf is
skipped (no optimiser, LR-scheduler or weight change; its batches count as consumed), reported as a warning and in
the run log, and after ``max_nonfinite_steps`` skipped updates in a row the run stops with
:class:`NonFiniteStepError` naming where and what was not finite.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from medmap_fast.train.distributed import DistributedContext, mean_over_ranks

_NAMES_SHOWN = 3


class NonFiniteStepError(RuntimeError):
    """Too many optimiser updates in a row had a non-finite loss or gradients."""


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an Inf."""
    return [
        name for name, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return ", ".join(names[:_NAMES_SHOWN]) + more


class NonFiniteGuard:
    """Decides whether an optimiser update is skipped and counts the skipped updates in a row (a resumed run starts
    again at 0)."""

    def __init__(self, max_in_row: int, ctx: DistributedContext) -> None:
        self.max_in_row, self.ctx = max_in_row, ctx
        self.in_row = 0
        self.last = ""

    def problem(self, losses: list[float], grad_norm: torch.Tensor, model: nn.Module) -> str | None:
        """What is not finite in an update: its micro-batch ``losses``, or its total gradient norm (then the
        parameters whose gradients hold NaN/Inf are named); None when all is finite. Under DDP the ranks agree
        (one all-reduce), so every rank skips the same updates."""
        bad_losses = [(i, v) for i, v in enumerate(losses) if not math.isfinite(v)]
        bad_norm = not bool(torch.isfinite(grad_norm))
        bad = bool(bad_losses) or bad_norm
        if self.ctx.is_distributed:
            bad = mean_over_ranks({"bad": float(bad)}, self.ctx)["bad"] > 0
        if not bad:
            return None
        parts = [f"loss {v} in micro-batch {i + 1} of {len(losses)}" for i, v in bad_losses]
        if bad_norm:
            names = nonfinite_gradients(model)
            parts.append(
                f"gradient norm {float(grad_norm)} "
                + (f"(NaN/Inf in the gradient of {_names(names)})" if names else "(it overflowed)")
            )
        return "; ".join(parts) or "a non-finite loss or gradient on another rank"

    def passed(self) -> None:
        """An update was applied: the run of skipped updates ends."""
        self.in_row = 0

    def skip(self, problem: str, where: str) -> None:
        """Count a skipped update (``where`` names it, ``problem`` is :meth:`problem`'s text); warns on rank 0."""
        self.in_row += 1
        self.last = f"{where}: {problem}"
        if self.ctx.is_main and not self.exhausted:
            warnings.warn(f"skipped the optimiser update at {self.last}", RuntimeWarning, stacklevel=2)

    @property
    def exhausted(self) -> bool:
        """``max_in_row`` updates in a row were skipped: the run must stop (:meth:`check`)."""
        return self.in_row >= self.max_in_row

    def check(self) -> None:
        """Raise :class:`NonFiniteStepError` when :attr:`exhausted`."""
        if self.exhausted:
            raise NonFiniteStepError(
                f"training stopped after {self.in_row} optimiser updates in a row were skipped because their loss or "
                f"gradients were not finite (max_nonfinite_steps = {self.max_in_row}); the last, at {self.last}. "
                "Check the data for NaN/Inf, lower the learning rate, or train in fp32 (amp: off)"
            )
