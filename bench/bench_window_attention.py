"""Shifted-window attention: the public op against MONAI's WindowAttention (eager, and flash for the forward), SDPA
with a broadcast mask, FlexAttention (compiled) and xformers, on the same inputs in one run (``_window_rows.py`` says
what each row runs). Every row is checked against a float64 run of MONAI's block with the flash-attention rule
before it is timed, and is not timed if it fails.

    python bench/bench_window_attention.py                  # CPU, stage 1 of a 96^3 input: 2 x 48^3 tokens, C 48
    python bench/bench_window_attention.py --tokens 64      # stage 1 of 128^3 (about 20 GiB for the fp64 check)
    python bench/bench_window_attention.py --dims 2         # 2-D (MONAI spatial_dims=2, 7 x 7 windows): stage 1 of
                                                            # eight 256^2 images, 8 x 128^2 tokens, C 48

``pytest bench/bench_window_attention.py``: every row at a small size (1 x 12^3 tokens, 8 windows; 2-D 1 x 12^2
tokens, 4 windows) on the present device; rows that cannot run here skip with the reason. ``gpu_rows()``
(bench/gpu_check.py): the stage-1 shapes in bf16 on a CUDA GPU (3-D, and 2-D images of 512^2), the Triton op against
every baseline.

2-D: the op takes [B, H, W, 3C] and 2-D windows and runs the 3-D kernels and PyTorch paths with a unit last axis;
the MONAI rows run MONAI's 2-D block (its 2-D window partition, index and mask).

Attention dropout rows (MONAI's ``attn_drop``, p = 0.1): the op with dropout on each backend, whose baseline is the
same op without it (the cost of the mask). Each is checked first against float64 with the mask it applies: the
Triton kernels' own (materialised from the seed they draw), the torch path given one; timed, both draw their own.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
from collections.abc import Sequence

import pytest
import torch
from _compare import Checked, cpu_table, keep_passing, step_or_skip  # bench/ is on sys.path
from _timing import interleaved_cpu, l2_copy_bandwidth_gbs, time_cuda
from _window_rows import (
    MONAI,
    MONAI_FLASH,
    OP_TORCH,
    OP_TRITON,
    ROWS,
    SDPA,
    Problem,
    make_problem,
    op_row,
    rows,
    sdpa_row,
    step,
    unavailable,
)
from medmap_fast.kernels import window_attn
from medmap_fast.kernels.window_attn_cpu import window_attention_cpu

SHIFTS = (0, 3)
PASSES = ("fwd", "fwd+bwd")
SMALL = dict(batch=1, tokens=12, channels=48, heads=3)  # 2^3 windows of 7^3 tokens, padded from 12^3 (2-D: 2^2)
STAGE1 = {"stage1 128^3": dict(batch=2, tokens=64, channels=48, heads=3),
          "stage1 96^3": dict(batch=2, tokens=48, channels=48, heads=3),
          "2-D stage1 512^2": dict(batch=16, tokens=256, channels=48, heads=3, dims=2)}
CPU_DEFAULTS = {3: dict(batch=2, tokens=48), 2: dict(batch=8, tokens=128)}  # stage 1 of 2 x 96^3, of 8 x 256^2


DROPOUT = 0.1
DROPOUT_ROWS = {f"{OP_TORCH}, attn dropout {DROPOUT}": OP_TORCH, f"{OP_TRITON}, attn dropout {DROPOUT}": OP_TRITON}
ALL_ROWS = (*ROWS, *DROPOUT_ROWS)


def _upstream(p: Problem, passes: str) -> torch.Tensor | None:
    """The fixed output gradient of a fwd+bwd step (None for fwd)."""
    if passes == "fwd":
        return None
    return torch.randn(p.x.shape, generator=torch.Generator().manual_seed(2)).to(p.x)


def references(p: Problem, passes: str) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """The flash rule's inputs for ``passes``: the output gradient (None for fwd), the reference run (SDPA in ``p``'s
    dtype) and the exact one (MONAI's block in float64), each as the output followed by the gradients."""
    dout = _upstream(p, passes)
    p64 = p.to(torch.float64)
    exact = step(lambda x: p64.block.forward_part1(x, p64.mask), p64, None if dout is None else dout.double())()
    del p64
    return dout, step(sdpa_row(p), p, dout)(), exact


def check(p: Problem, passes: str, names: Sequence[str] = ALL_ROWS) -> Checked:
    """Build the rows, run each once (compiling those that compile) and keep those within the flash rule against a
    float64 run of MONAI's block, SDPA in ``p``'s dtype being the reference; then the dropout rows
    (:func:`check_dropout`)."""
    dout, ref, exact = references(p, passes)
    fns, skipped = rows(p, [name for name in names if name in ROWS], passes)
    checked = keep_passing({name: step(fn, p, dout) for name, fn in fns.items()}, ref, exact, skipped)
    dropped = check_dropout(p, passes, [name for name in names if name in DROPOUT_ROWS])
    return Checked({**checked.steps, **dropped.steps}, {**checked.skipped, **dropped.skipped},
                   {**checked.errors, **dropped.errors})


def check_dropout(p: Problem, passes: str, names: Sequence[str] = tuple(DROPOUT_ROWS)) -> Checked:
    """The op with attention dropout DROPOUT on each backend that runs here, each kept if, run with a known mask, it
    is within the flash rule against the reference with that mask in float64 (the reference in ``p``'s dtype with
    it as the rule's reference): the Triton op with torch's generator seeded, so its mask is
    ``window_dropout_mask`` of the seed it draws; the torch path (the CPU one on CPU tensors) given a mask. The
    timed steps draw their own masks."""
    dout, device = _upstream(p, passes), p.x.device
    skipped = {name: reason for name in names if (reason := unavailable(DROPOUT_ROWS[name], device.type, passes))}
    p64, dropout_p = p.to(torch.float64), window_attn.rounded_dropout_p(DROPOUT)  # the p the op applies
    size, window, _ = p.unit_depth()  # the keep masks of a 2-D problem are those of its unit-depth grid
    result = Checked({}, skipped, {})
    for name in (name for name in names if name not in skipped):
        backend = "triton" if DROPOUT_ROWS[name] == OP_TRITON else "torch"
        torch.manual_seed(0)
        if backend == "triton":
            keep = window_attn.window_dropout_mask(window_attn.draw_dropout_seed(device), DROPOUT, p.x.shape[0], size,
                                                   window, p.attn.num_heads)
            run = step(op_row(p, backend, DROPOUT), p, dout)
            known = lambda run=run: (torch.manual_seed(0), run())[1]  # noqa: E731 - the seed keep was drawn from
        else:
            windows = p.x.shape[0] * math.prod(-(-s // w) for s, w in zip(size, window, strict=True))
            keep = torch.rand(windows, p.attn.num_heads, math.prod(window), math.prod(window), device=device) >= DROPOUT
            torch_path = window_attention_cpu if device.type == "cpu" else window_attn.window_attention_reference
            known = step(op_row(p, backend, dropout_p, functools.partial(torch_path, dropout_mask=keep)), p, dout)
        reference = functools.partial(window_attn.window_attention_reference, dropout_mask=keep)
        ref = step(op_row(p, "torch", dropout_p, reference), p, dout)()
        exact = step(op_row(p64, "torch", dropout_p, reference), p64, None if dout is None else dout.double())()
        one = keep_passing({name: known}, ref, exact, result.skipped)
        if name in one.steps:
            result.steps[name], result.errors[name] = step(op_row(p, backend, DROPOUT), p, dout), one.errors[name]
    return result


def dropout_costs(medians: dict[str, float]) -> str:
    """One line per timed dropout row: its time as a multiple of the same op's without dropout."""
    return "\n".join(f"attention dropout cost: {name}: {medians[name] / medians[base]:.2f} x {base}"
                      for name, base in DROPOUT_ROWS.items() if name in medians and base in medians)


# ------------------------------------------------------------------------------------------------------------ CLI

def device_line() -> str:
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=3, choices=(3, 2), help="3-D volumes or 2-D images")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (3-D), 8 (2-D)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per side (default 48: stage 1 of 96^3; 2-D 128: stage 1 of 256^2)")
    parser.add_argument("--channels", type=int, default=48)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--shifts", type=int, nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--rows", nargs="+", default=list(ALL_ROWS), choices=ALL_ROWS, metavar="ROW")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, tokens = (args.batch or CPU_DEFAULTS[args.dims]["batch"]), (args.tokens or CPU_DEFAULTS[args.dims]["tokens"])
    size = dict(batch=batch, tokens=tokens, channels=args.channels, heads=args.heads, dims=args.dims)
    print(f"device: {device_line()}; fp32; median of {args.repeats} interleaved repeats after 1 warm-up")
    failed = False
    for shift in args.shifts:
        p = make_problem(**size, shift=shift, device="cpu", dtype=torch.float32)
        for passes in args.passes:
            checked = check(p, passes, args.rows)
            medians = interleaved_cpu(checked.steps, args.repeats)
            print(f"\n{batch} x {tokens}^{args.dims} tokens, C {args.channels}, {args.heads} heads, shift {shift}, "
                  f"{passes}\n")
            print(cpu_table(medians, checked))
            print(dropout_costs({name: wall for name, (wall, _) in medians.items()}), flush=True)
            failed |= bool(checked.failed)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ pytest-benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=8)
def small_check(shift: int, passes: str, dims: int) -> Checked:
    """Every row of the small case, parity-checked once per (shift, pass, dims)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    return check(make_problem(**SMALL, shift=shift, device=DEVICE, dtype=dtype, dims=dims), passes)


@pytest.mark.parametrize("dims", (3, 2), ids=lambda d: f"{d}d")
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s}")
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("name", ALL_ROWS)
def test_window_attention(benchmark, name: str, passes: str, shift: int, dims: int) -> None:
    pytest.importorskip("monai.networks.nets.swin_unetr", reason="the MONAI baselines need MONAI")
    checked = small_check(shift, passes, dims)
    run = step_or_skip(checked, name)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"window_attention {dims}-D {passes} shift{shift}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else device_line(),
                                max_err=checked.errors[name][0], ref_err=checked.errors[name][1], **SMALL)
    benchmark.pedantic(lambda: (run(), sync()), rounds=5, warmup_rounds=1)


# ------------------------------------------------------------------------------------------------------- gpu_rows

# the rows gpu_rows times per case: in 2-D the op against MONAI's 2-D attention (eager and flash) and the SDPA
# reference only, to keep the GPU check's time (FlexAttention would compile for every new shape)
GPU_CASES = {"stage1 128^3": ALL_ROWS, "2-D stage1 512^2": (MONAI, MONAI_FLASH, SDPA, OP_TRITON)}


def gpu_rows(cases: tuple[str, ...] = tuple(GPU_CASES)) -> list[dict]:
    """bf16 on the current CUDA device: the Triton op against every baseline, and with attention dropout against
    itself without, each parity-checked (flash rule against float64) before it is timed; a row that fails the check
    or cannot run carries its reason. 3-D, and 2-D (MONAI's 2-D block against the op on 2-D tokens; GPU_CASES).
    First row: an L2-resident copy's bandwidth, beside which to read the kernels' bytes per second (the static
    profile's loop GB: bench/RESULTS.md)."""
    copy_ms, copy_gbs = l2_copy_bandwidth_gbs()
    table = [dict(op="device copy", case="L2-resident 8 MiB, 64 per graph", dtype="bf16", **{"pass": "copy"},
                  ms=copy_ms, metric="GB/s", value=copy_gbs, ok=True)]
    for label in cases:
        size, names = STAGE1[label], GPU_CASES[label]
        dims = size.get("dims", 3)
        n, head_dim = 7**dims, size["channels"] // size["heads"]
        windows = size["batch"] * math.ceil(size["tokens"] / 7) ** dims
        fwd_flop = 4 * windows * size["heads"] * n * n * head_dim
        for shift in SHIFTS:
            p = make_problem(**size, shift=shift, device="cuda", dtype=torch.bfloat16)
            for passes in PASSES:
                checked = check(p, passes, names)
                timed = {name: time_cuda(run) for name, run in checked.steps.items()}
                torch.cuda.empty_cache()
                flop = fwd_flop * (1 if passes == "fwd" else 3.5)
                case = (f"{label} {size['batch']}x{size['tokens']}^{dims} C{size['channels']} h{size['heads']} "
                        f"shift{shift}")
                # the op against every baseline; the op with dropout against the op without it (its baseline)
                pairs = [(OP_TRITON, name) for name in ROWS if name != OP_TRITON and name in names]
                pairs += [(name, base) for name, base in DROPOUT_ROWS.items() if base == OP_TRITON and name in names]
                for row, name in pairs:
                    ms, peak = timed.get(row, (None, None))
                    err, ref_err = checked.errors.get(row, (None, None))
                    base_ms, base_peak = timed.get(name, (None, None))
                    table.append({
                        "op": "window_attention" if row == OP_TRITON else f"window_attention attn dropout {DROPOUT}",
                        "case": case, "dtype": "bf16", "pass": passes,
                        "ms": ms, "baseline": name, "baseline_ms": base_ms,
                        "speedup": None if ms is None or base_ms is None else base_ms / ms,
                        "peak_mib": peak, "baseline_peak_mib": base_peak, "metric": "TFLOP/s",
                        "value": None if ms is None else flop / ms / 1e9, "max_err": err, "ref_err": ref_err,
                        "ok": row in checked.steps,
                        "note": "; ".join(f"{k}: {checked.skipped[k]}" for k in (row, name) if k in checked.skipped)})
            del p
            torch.cuda.empty_cache()
    return table


if __name__ == "__main__":
    sys.exit(main())
