"""The Swin trunk on the CPU: SwinViT3D (torch backend) against MONAI's SwinTransformer eager, with
``use_flash_attention=True`` and compiled (``_swin_rows.py`` says what each row runs), identical weights, forward
(autograd off) and forward + backward, timed interleaved after a parity check that refuses to time a mismatch.

    python bench/bench_swin_cpu.py                       # 2 x 1 x 64^3, feature 48 (the acceptance case)
    python bench/bench_swin_cpu.py --size 96 --threads 1 --repeats 3 --passes fwd+bwd

Each repeat runs every row in turn (so a load change on a shared machine hits them all), and the medians are reported
with their ratio to the fastest row, for wall time and for process CPU time. On a machine shared with other jobs, CPU
time is the steadier number; with more than one thread, a busy core also stalls every OpenMP barrier, which
``--threads 1`` avoids. ``pytest bench/bench_swin_cpu.py`` runs every row at a small size (2 x 1 x 32^3, feature 12).
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys

import pytest
import torch
from _compare import Checked, cpu_table, step_or_skip
from _swin_rows import ROWS, check_trunks, make_trunks
from _timing import interleaved_cpu

PASSES = {"fwd": False, "fwd+bwd": True}  # name -> backward


def device_line() -> str:
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, SwinViT3D on the torch backend")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="cubic volume side (default 64)")
    parser.add_argument("--feature", type=int, default=48, help="embed_dim / feature size (default 48)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: {device_line()}")
    trunks = make_trunks(args.feature, args.batch, args.size, "cpu")
    failed = False
    for passes in args.passes:
        checked = check_trunks(trunks, PASSES[passes], args.rows)
        medians = interleaved_cpu(checked.steps, args.repeats, args.warmup)
        print(f"\n{args.batch} x 1 x {args.size}^3, feature {args.feature}, {passes} fp32, median of {args.repeats} "
              f"interleaved repeats after {args.warmup} warm-up\n")
        print(cpu_table(medians, checked), flush=True)
        failed |= bool(checked.failed)
    return 1 if failed else 0


@functools.lru_cache(maxsize=2)
def small_check(passes: str) -> Checked:
    """Every row of the small case (2 x 1 x 32^3, feature 12), parity-checked once per pass."""
    return check_trunks(make_trunks(12, 2, 32, "cpu"), PASSES[passes])


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("name", ROWS)
def test_swin_cpu(benchmark, name: str, passes: str) -> None:
    pytest.importorskip("monai.networks.nets.swin_unetr", reason="the MONAI baselines need MONAI")
    checked = small_check(passes)
    run = step_or_skip(checked, name)
    benchmark.group = f"swin trunk cpu 2x1x32^3 f12 {passes}"
    benchmark.extra_info.update(device=device_line(), max_err=checked.errors[name][0],
                                ref_err=checked.errors[name][1])
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
