"""The encoder's conv branch: what it adds to a training step of the demo's encoder, on the CPU and on CUDA.

    python bench/bench_conv_branch.py --threads 2       # the demo's encoder and batch: 8 studies x 3 volumes, 32^3
    python bench/gpu_check.py --only bench_conv_branch  # CUDA rows (bf16 autocast): the demo's batch and 8 x 64^3

Rows (each one AdamW step of the encoder alone, forward + backward of a loss on its tokens and detections, the same
volumes): ``trunk`` (the demo's Swin, no branch: the baseline), ``+ branch`` (the demo's ``conv_branch``: 2^3
space-to-depth, 16 | 32-64 channels), ``+ full-res CNN`` (the same widths as three full-resolution stages,
``unshuffle: 1``, stages [[16], [32], [64]]: the three-layer CNN the branch stands in for), ``quick trunk + branch``
(demo_quick's encoder: 8^3 patches, one Swin block per stage, no v2 conv blocks, the same branch). Steps run in
turn within each repeat; the ratio is each row's median wall time over the trunk's. The branch is cuDNN / oneDNN
convolutions, BatchNorm, ReLU and max-pooling (no kernel of ours), so the rows time it and check nothing against a
reference.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import pytest
import torch
from _timing import cuda_time_ms, interleaved_cpu, peak_mib
from bench_swin_cpu import device_line

from medmap_fast.models.encoder import MedMAPEncoder

DEMO_TRUNK = dict(embed_dim=24, patch_size=4, window_size=4, depths=(2, 2), num_heads=(3, 6), use_v2=True)
QUICK_TRUNK = {**DEMO_TRUNK, "patch_size": 8, "depths": (1, 1), "use_v2": False}  # demo_quick's
BRANCH = {"stages": [[16], [32, 64]], "unshuffle": 2}
ROWS = {  # name: (trunk, conv_branch)
    "trunk": (DEMO_TRUNK, None),
    "+ branch": (DEMO_TRUNK, BRANCH),
    "+ full-res CNN": (DEMO_TRUNK, {"stages": [[16], [32], [64]], "unshuffle": 1}),
    "quick trunk + branch": (QUICK_TRUNK, BRANCH),
}


def step(encoder: MedMAPEncoder, optimiser: torch.optim.Optimizer, volumes: torch.Tensor, ids: torch.Tensor) -> None:
    """One AdamW step of ``encoder`` on a loss of its tokens (and detections, where it has a branch)."""
    out = encoder(volumes, ids)
    loss = out.tokens.amax(1).sum() + (out.detections.sum() if out.detections is not None else 0)
    loss.backward()
    optimiser.step()
    encoder.zero_grad(set_to_none=True)


def rows(volumes: int, size: int, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """Each row's step on the same ``volumes`` x 1 x ``size``^3 batch (bf16 autocast on CUDA)."""
    torch.manual_seed(0)
    x = torch.randn(volumes, 1, size, size, size, device=device)
    ids = torch.randint(0, 12, (volumes,), device=device)
    encoders = {name: MedMAPEncoder(conv_branch=branch, **trunk).to(device) for name, (trunk, branch) in ROWS.items()}
    optimisers = {name: torch.optim.AdamW(e.parameters(), lr=1e-4) for name, e in encoders.items()}
    autocast = torch.autocast(device, torch.bfloat16, enabled=device == "cuda")

    def run(name: str) -> Callable[[], None]:
        def one() -> None:
            with autocast:
                step(encoders[name], optimisers[name], x, ids)

        return one

    return {name: run(name) for name in encoders}


def gpu_rows(cases: tuple[tuple[int, int], ...] = ((24, 32), (8, 64))) -> list[dict]:
    """Rows for bench/gpu_check.py: each branch row against the trunk alone, per (volumes, size) case."""
    out = []
    for volumes, size in cases:
        steps = rows(volumes, size, "cuda")
        timed = {name: (cuda_time_ms(fn, warmup=3, repeats=10), peak_mib(fn)) for name, fn in steps.items()}
        base_ms, base_peak = timed["trunk"]
        for name in ROWS:
            if name == "trunk":
                continue
            ms, peak = timed[name]
            out.append({"op": f"encoder step ({name})", "case": f"{volumes}x1x{size}^3",
                        "dtype": "bf16-autocast", "pass": "fwd+bwd+AdamW", "ms": ms, "baseline": "trunk",
                        "baseline_ms": base_ms, "speedup": base_ms / ms, "peak_mib": peak,
                        "baseline_peak_mib": base_peak, "metric": "volumes/s", "value": volumes / ms * 1e3,
                        "note": "cuDNN convolutions: timed, no kernel of ours to check"})
        del steps
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=24, help="volumes per step (default 24: 8 studies x 3)")
    parser.add_argument("--size", type=int, default=32, help="cubic volume side (default 32, the demo's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    medians = interleaved_cpu(rows(args.volumes, args.size), args.repeats)
    base = medians["trunk"][0]
    print(f"{device_line()}; {args.volumes} volumes of {args.size}^3, median of {args.repeats} interleaved steps")
    print("| row | ms per step | x trunk |\n|---|---:|---:|")
    for name, (wall, _) in medians.items():
        print(f"| {name} | {1e3 * wall:.1f} | {wall / base:.2f} |")
    return 0


@pytest.mark.parametrize("name", list(ROWS))
def test_conv_branch_step_cpu(benchmark, name: str) -> None:
    benchmark(rows(4, 16)[name])


if __name__ == "__main__":
    sys.exit(main())
