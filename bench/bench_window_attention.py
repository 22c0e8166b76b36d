"""Shifted-window attention: the public op against MONAI's WindowAttention (eager, and flash for the forward), SDPA
with a broadcast mask, FlexAttention (compiled) and xformers, on the same inputs in one run (``_window_rows.py`` says
what each row runs). Every row is checked against a float64 run of MONAI's block with the flash-attention rule
before it is timed, and is not timed if it fails.

    python bench/bench_window_attention.py                  # CPU, stage 1 of a 96^3 input: 2 x 48^3 tokens, C 48
    python bench/bench_window_attention.py --tokens 64      # stage 1 of 128^3 (about 20 GiB for the fp64 check)

``pytest bench/bench_window_attention.py``: every row at a small size (1 x 12^3 tokens, 8 windows) on the present
device; rows that cannot run here skip with the reason. ``gpu_rows()`` (bench/gpu_check.py): the stage-1 shapes in
bf16 on a CUDA GPU, the Triton op against every baseline.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys

import pytest
import torch
from _compare import Checked, cpu_table, keep_passing, step_or_skip  # bench/ is on sys.path
from _timing import interleaved_cpu, time_cuda
from _window_rows import OP_TRITON, ROWS, Problem, make_problem, rows, sdpa_row, step

SHIFTS = (0, 3)
PASSES = ("fwd", "fwd+bwd")
SMALL = dict(batch=1, tokens=12, channels=48, heads=3)  # 2^3 windows of 7^3 tokens, padded from 12^3
STAGE1 = {"stage1 128^3": dict(batch=2, tokens=64, channels=48, heads=3),
          "stage1 96^3": dict(batch=2, tokens=48, channels=48, heads=3)}


def check(p: Problem, passes: str, names=ROWS) -> Checked:
    """Build the rows, run each once (compiling those that compile) and keep those within the flash rule against a
    float64 run of MONAI's block, SDPA in ``p``'s dtype being the reference."""
    dout = None
    if passes != "fwd":
        dout = torch.randn(p.x.shape, generator=torch.Generator().manual_seed(2)).to(p.x)
    p64 = p.to(torch.float64)
    exact = step(lambda x: p64.block.forward_part1(x, p64.mask), p64, None if dout is None else dout.double())()
    del p64
    ref = step(sdpa_row(p), p, dout)()
    fns, skipped = rows(p, names, passes)
    return keep_passing({name: step(fn, p, dout) for name, fn in fns.items()}, ref, exact, skipped)


# ------------------------------------------------------------------------------------------------------------ CLI

def device_line() -> str:
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per side (default 48: stage 1 of 96^3)")
    parser.add_argument("--channels", type=int, default=48)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--shifts", type=int, nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(batch=args.batch, tokens=args.tokens, channels=args.channels, heads=args.heads)
    print(f"device: {device_line()}; fp32; median of {args.repeats} interleaved repeats after 1 warm-up")
    failed = False
    for shift in args.shifts:
        p = make_problem(**size, shift=shift, device="cpu", dtype=torch.float32)
        for passes in args.passes:
            checked = check(p, passes, args.rows)
            medians = interleaved_cpu(checked.steps, args.repeats)
            print(f"\n{args.batch} x {args.tokens}^3 tokens, C {args.channels}, {args.heads} heads, shift {shift}, "
                  f"{passes}\n")
            print(cpu_table(medians, checked), flush=True)
            failed |= bool(checked.failed)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ pytest-benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def small_check(shift: int, passes: str) -> Checked:
    """Every row of the small case, parity-checked once per (shift, pass)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    return check(make_problem(**SMALL, shift=shift, device=DEVICE, dtype=dtype), passes)


@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s}")
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("name", ROWS)
def test_window_attention(benchmark, name: str, passes: str, shift: int) -> None:
    pytest.importorskip("monai.networks.nets.swin_unetr", reason="the MONAI baselines need MONAI")
    checked = small_check(shift, passes)
    run = step_or_skip(checked, name)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"window_attention {passes} shift{shift}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else device_line(),
                                max_err=checked.errors[name][0], ref_err=checked.errors[name][1], **SMALL)
    benchmark.pedantic(lambda: (run(), sync()), rounds=5, warmup_rounds=1)


# ------------------------------------------------------------------------------------------------------- gpu_rows

def gpu_rows(cases: tuple[str, ...] = ("stage1 128^3",)) -> list[dict]:
    """bf16 on the current CUDA device: the Triton op against every baseline, each parity-checked (flash rule
    against float64) before it is timed; a row that fails the check or cannot run carries its reason."""
    table = []
    for label in cases:
        size = STAGE1[label]
        n, head_dim = math.prod((7, 7, 7)), size["channels"] // size["heads"]
        windows = size["batch"] * math.ceil(size["tokens"] / 7) ** 3
        fwd_flop = 4 * windows * size["heads"] * n * n * head_dim
        for shift in SHIFTS:
            p = make_problem(**size, shift=shift, device="cuda", dtype=torch.bfloat16)
            for passes in PASSES:
                checked = check(p, passes)
                timed = {name: time_cuda(run) for name, run in checked.steps.items()}
                torch.cuda.empty_cache()
                ms, peak = timed.get(OP_TRITON, (None, None))
                err, ref_err = checked.errors.get(OP_TRITON, (None, None))
                flop = fwd_flop * (1 if passes == "fwd" else 3.5)
                for name in ROWS:
                    if name == OP_TRITON:
                        continue
                    base_ms, base_peak = timed.get(name, (None, None))
                    table.append({
                        "op": "window_attention", "case": f"{label} {size['batch']}x{size['tokens']}^3 "
                        f"C{size['channels']} h{size['heads']} shift{shift}", "dtype": "bf16", "pass": passes,
                        "ms": ms, "baseline": name, "baseline_ms": base_ms,
                        "speedup": None if ms is None or base_ms is None else base_ms / ms,
                        "peak_mib": peak, "baseline_peak_mib": base_peak, "metric": "TFLOP/s",
                        "value": None if ms is None else flop / ms / 1e9, "max_err": err, "ref_err": ref_err,
                        "ok": OP_TRITON in checked.steps,
                        "note": "; ".join(f"{k}: {checked.skipped[k]}" for k in (OP_TRITON, name)
                                          if k in checked.skipped)})
            del p
            torch.cuda.empty_cache()
    return table


if __name__ == "__main__":
    sys.exit(main())
