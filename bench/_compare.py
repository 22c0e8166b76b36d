"""Parity before timing, shared by the bench modules: the flash-attention accuracy rule, and the CPU table of
interleaved timings with each row's ratio to the best one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pytest
import torch

from medmap_fast.kernels._utils import flash_errors


def flash_rule(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]
               ) -> tuple[float, float, bool]:
    """The flash-attention rule (``medmap_fast.kernels._utils.flash_errors``) over tensors matched by position: each
    of ``got``'s errors against ``exact`` (a float64 run) at most twice that of ``ref`` (the same-dtype eager
    reference) plus a floor. Returns (error, reference error) of the tensor with the worst ratio, and whether every
    tensor passes."""
    errors = flash_errors([f"tensor {i}" for i in range(len(got))], got, ref, exact)
    worst = max(errors, key=lambda e: e.err / max(e.ref_err, 1e-30))
    return worst.err, worst.ref_err, all(e.ok for e in errors)


Step = Callable[[], list[torch.Tensor]]  # one run of a row: its outputs (and gradients), as a list


@dataclasses.dataclass
class Checked:
    """The rows that passed the parity check, ready to time; the others with their reason; the passing rows'
    (error vs float64, reference's error)."""

    steps: dict[str, Step]
    skipped: dict[str, str]
    errors: dict[str, tuple[float, float]]

    @property
    def failed(self) -> list[str]:
        """Rows that raised, or ran but computed something else (neither is timed)."""
        return [name for name, reason in self.skipped.items() if reason.startswith((PARITY_FAILURE, ERROR))]


PARITY_FAILURE, ERROR = "PARITY FAILURE", "ERROR"


def keep_passing(steps: dict[str, Step], ref: Sequence[torch.Tensor], exact: Sequence[torch.Tensor],
                 skipped: dict[str, str]) -> Checked:
    """Run every step once (compiling the rows that compile) and keep those within :func:`flash_rule`; a row that
    fails it, or raises, lands in ``skipped`` with a reason starting with ``PARITY_FAILURE`` or ``ERROR``, and is
    never timed (one broken baseline must not hide the other rows)."""
    kept, errors = {}, {}
    for name, run in steps.items():
        try:
            err, ref_err, ok = flash_rule(run(), ref, exact)
        except Exception as error:  # noqa: BLE001 - reported in the row, as gpu_check reports a failing module
            skipped[name] = f"{ERROR}: {type(error).__name__}: {error}"[:400]
            continue
        if ok:
            kept[name], errors[name] = run, (err, ref_err)
        else:
            skipped[name] = (f"{PARITY_FAILURE}: error {err:.3g} against float64 exceeds 2 x the reference's "
                             f"{ref_err:.3g} (flash rule); not timed")
    return Checked(kept, skipped, errors)


def step_or_skip(checked: Checked, name: str) -> Step:
    """``name``'s parity-checked step, for a pytest case: fails the case when the row failed the check, skips it with
    the reason when the row cannot run here."""
    if name in checked.failed:
        pytest.fail(checked.skipped[name])
    if name not in checked.steps:
        pytest.skip(checked.skipped[name])
    return checked.steps[name]


def cpu_table(medians: dict[str, tuple[float, float]], checked: Checked) -> str:
    """Markdown rows: name, median wall / CPU ms, each as a ratio to the fastest row (1.00 = best), and the parity
    check's error against float64 of the tensor with the worst ratio (with the reference's); then the rows that were
    not timed, with the reason."""
    best_wall = min((w for w, _ in medians.values()), default=float("nan"))
    best_cpu = min((c for _, c in medians.values()), default=float("nan"))
    lines = ["| row | wall ms | x best (wall) | CPU ms | x best (CPU) | err vs fp64 (reference's) |",
             "|---|---|---|---|---|---|"]
    for name, (wall, cpu) in sorted(medians.items(), key=lambda item: item[1][0]):
        lines.append(f"| {name} | {1e3 * wall:.1f} | {wall / best_wall:.2f} | {1e3 * cpu:.1f} | {cpu / best_cpu:.2f} "
                     f"| {checked.errors[name][0]:.2g} ({checked.errors[name][1]:.2g}) |")
    lines += [f"| {name} | not timed: {reason} | | | | |" for name, reason in checked.skipped.items()]
    return "\n".join(lines)
