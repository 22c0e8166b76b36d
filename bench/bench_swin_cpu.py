"""SwinViT3D vs MONAI's SwinTransformer on the CPU: forward + backward, identical weights, timed interleaved.

    python bench/bench_swin_cpu.py                       # 64^3, feature 48, batch 2 (the acceptance case)
    python bench/bench_swin_cpu.py --size 96 --threads 1 --repeats 3

Both models are built from one MONAI model (``SwinViT3D.from_monai``), so they hold the same weights; their outputs are
compared before timing, and nothing is timed if they differ. Each repeat times MONAI then SwinViT3D (alternating, so a
load change on a shared machine hits both), and the medians are reported with their ratio, for wall time and for
process CPU time. On a machine shared with other jobs, CPU time is the steadier number; with more than one thread, a
busy core also stalls every OpenMP barrier, which ``--threads 1`` avoids. ``pytest bench/bench_swin_cpu.py`` runs a
small case with pytest-benchmark.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch

import medmap_fast.kernels as K
from medmap_fast.models.swin3d import SwinViT3D

PARITY_RTOL = 1e-4  # fp32 outputs, relative to each stage map's largest value


def paper_config(feature: int) -> dict:
    """The paper's trunk (MONAI SwinUNETR's swinViT) at ``feature`` channels."""
    return dict(in_chans=1, embed_dim=feature, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                num_heads=(3, 6, 12, 24))


def build_pair(feature: int, seed: int = 0) -> tuple[torch.nn.Module, SwinViT3D]:
    """MONAI's SwinTransformer and a SwinViT3D with the same weights (needs MONAI)."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    torch.manual_seed(seed)
    monai = SwinTransformer(**paper_config(feature))
    return monai, SwinViT3D.from_monai(monai)


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One training-style step: the 5 stage maps, a scalar of all of them, backward."""
    model.zero_grad(set_to_none=True)
    sum(o.float().mean() for o in model(x)).backward()


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(size: int, feature: int, batch: int, repeats: int, warmup: int, backend: str) -> dict:
    """Interleaved medians for MONAI and SwinViT3D, after checking that their outputs agree.

    Raises SystemExit before any timing when the largest output difference, relative to each stage map's range,
    exceeds ``PARITY_RTOL``: the timing of a model that computes something else would mean nothing.
    """
    monai, ours = build_pair(feature)
    x = torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), K.backend(backend):
        max_err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours(x), monai(x)))
    print(f"max |SwinViT3D - MONAI| / max |MONAI| over the 5 stage maps: {max_err:.2e}")
    if max_err > PARITY_RTOL:
        raise SystemExit(f"SwinViT3D does not reproduce MONAI's outputs (tolerance {PARITY_RTOL:g}); no timing")
    steps = {"MONAI SwinTransformer": lambda: fwd_bwd(monai, x), "SwinViT3D": lambda: fwd_bwd(ours, x)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    with K.backend(backend):
        for i in range(warmup + repeats):
            for name, step in steps.items():
                t = timed(step)
                if i >= warmup:
                    times[name].append(t)
    return {name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
            for name, ts in times.items()}


def device_line(backend: str) -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, SwinViT3D backend {backend}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="cubic volume side (default 64)")
    parser.add_argument("--feature", type=int, default=48, help="embed_dim / feature size (default 48)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--backend", default="torch", choices=K.BACKENDS, help="SwinViT3D's ops (default torch)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: CPU ({device_line(args.backend)})")
    print(f"case: batch {args.batch} x 1 x {args.size}^3, feature {args.feature}, forward+backward fp32, "
          f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up")
    medians = compare(args.size, args.feature, args.batch, args.repeats, args.warmup, args.backend)
    (monai_wall, monai_cpu), (ours_wall, ours_cpu) = medians.values()
    print(f"{'':24s}{'wall s':>10s}{'CPU s':>10s}")
    for name, (wall, cpu) in medians.items():
        print(f"{name:24s}{wall:10.3f}{cpu:10.3f}")
    print(f"{'speed-up (MONAI / ours)':24s}{monai_wall / ours_wall:10.2f}{monai_cpu / ours_cpu:10.2f}")


@pytest.mark.parametrize("model_name", ["MONAI", "SwinViT3D"])
def test_swin_cpu_fwd_bwd(benchmark, model_name: str) -> None:
    """A small case (2 x 1 x 32^3, feature 12) on the CPU, torch backend; compare the two rows' means."""
    pytest.importorskip("monai.networks.nets.swin_unetr", reason="the MONAI baseline needs MONAI")
    monai, ours = build_pair(12)
    model = monai if model_name == "MONAI" else ours
    x = torch.randn(2, 1, 32, 32, 32)
    benchmark.extra_info.update(case="2x1x32^3 f12 fwd+bwd fp32", device=f"CPU ({device_line('torch')})")
    with K.backend("torch"):
        benchmark.pedantic(fwd_bwd, args=(model, x), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
