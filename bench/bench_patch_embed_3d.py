"""Benchmarks of patch_embed_3d (DESIGN §5.1): the Triton kernel against its two baselines, with and without the
fused LayerNorm, writing channels-last [V, D', H', W', C]:

  conv3d+permute   cuDNN Conv3d (kernel = stride) on the zero-padded volume, as MONAI's PatchEmbed, then a permute
                   to channels-last (+ LayerNorm)
  reshape+linear   patchify (F.pad + reshape + permute copy) + F.linear (cuBLAS) (+ LayerNorm): the stronger one

The baselines use one weight (their best case); the kernel gathers the weight of each volume's modality (2 here).
It is bandwidth-bound (8 -> 48 channels per patch at the paper shape), so the metric is achieved GB/s: the fewest
bytes the pass must move (inputs read once, outputs written once) over its time.

CPU (``pytest bench/bench_patch_embed_3d.py``): the PyTorch paths at a modest size; set MEDMAP_BENCH_PAPER_SIZES=1
for the paper sizes. Triton cases need a GPU and skip elsewhere. On a GPU, ``gpu_rows()`` (used by
bench/gpu_check.py) checks bf16 correctness with the flash-attention rule at the paper sizes and times forward and
forward+backward with CUDA events, next to the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import medmap_fast as mf
from _timing import copy_bandwidth_gbs, cuda_time_ms, graph_time_ms, peak_mib  # bench/ is on sys.path
from medmap_fast.kernels._utils import flash_errors, padded_size
from medmap_fast.kernels.patch_embed import patch_embed_3d_reference

CUDA = torch.cuda.is_available()
PAPER_SIZES = CUDA or os.environ.get("MEDMAP_BENCH_PAPER_SIZES") == "1"
CHANNELS, PATCH, MODALITIES = 48, (2, 2, 2), 2


@dataclass
class Problem:
    """One benchmark input: V volumes [V, 1, S, S, S], the per-modality weights and the LayerNorm parameters."""

    x: torch.Tensor
    modality_ids: torch.Tensor
    weight: torch.Tensor  # [M, C, 1, 2, 2, 2]
    bias: torch.Tensor  # [M, C]
    ln_weight: torch.Tensor | None
    ln_bias: torch.Tensor | None

    @property
    def layer_norm(self) -> bool:
        return self.ln_weight is not None

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.weight, self.bias, self.ln_weight, self.ln_bias) if p is not None]

    def bytes_moved(self, backward: bool) -> int:
        """Fewest bytes: read x and the parameters, write y; backward reads dy and x again, writes the grads."""
        positions = 1
        for size, patch in zip(self.x.shape[2:], PATCH):
            positions *= padded_size(size, patch) // patch
        out = self.x.shape[0] * positions * CHANNELS * self.x.element_size()
        params = sum(p.numel() * p.element_size() for p in self.params())
        fwd = self.x.numel() * self.x.element_size() + out + params
        return fwd + (out + self.x.numel() * self.x.element_size() + params if backward else 0)


def make_problem(volumes: int, side: int, layer_norm: bool, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    return Problem(
        x=rand(volumes, 1, side, side, side, grad=False),  # input volumes: no dx
        modality_ids=torch.arange(volumes, device=device) % MODALITIES,
        weight=rand(MODALITIES, CHANNELS, 1, *PATCH, scale=8**-0.5),
        bias=rand(MODALITIES, CHANNELS, scale=0.1),
        ln_weight=rand(CHANNELS) if layer_norm else None,
        ln_bias=rand(CHANNELS, scale=0.1) if layer_norm else None,
    )


def run_triton(p: Problem) -> torch.Tensor:
    """The kernel as users call it: the public op (argument checks, then the Triton path)."""
    with mf.backend("triton"):
        return mf.kernels.patch_embed_3d(p.x, p.weight, p.bias, p.modality_ids, layer_norm=p.layer_norm,
                                         ln_weight=p.ln_weight, ln_bias=p.ln_bias)


def run_conv3d(p: Problem) -> torch.Tensor:
    """cuDNN Conv3d on the zero-padded volume (MONAI's PatchEmbed), permuted to channels-last, then LayerNorm."""
    d, h, w = p.x.shape[2:]
    pads = (0, padded_size(w, PATCH[2]) - w, 0, padded_size(h, PATCH[1]) - h, 0, padded_size(d, PATCH[0]) - d)
    x = F.pad(p.x, pads) if any(pads) else p.x
    out = F.conv3d(x, p.weight[0], p.bias[0], stride=PATCH).permute(0, 2, 3, 4, 1).contiguous()
    return F.layer_norm(out, (CHANNELS,), p.ln_weight, p.ln_bias) if p.layer_norm else out


def run_linear(p: Problem) -> torch.Tensor:
    """patchify + F.linear (+ LayerNorm): the reference with one weight."""
    return patch_embed_3d_reference(p.x, p.weight[:1], p.bias[:1], None, layer_norm=p.layer_norm,
                                    ln_weight=p.ln_weight, ln_bias=p.ln_bias)


IMPLS: dict[str, Callable[[Problem], torch.Tensor]] = {
    "triton": run_triton, "conv3d+permute": run_conv3d, "reshape+linear": run_linear,
}


def step(impl: Callable[[Problem], torch.Tensor], p: Problem, dy: torch.Tensor | None) -> None:
    """One forward, or forward + backward into the parameters when ``dy`` is given."""
    out = impl(p)
    if dy is not None:
        torch.autograd.grad(out, p.params(), dy)


# ---- pytest-benchmark ------------------------------------------------------------------------------------------

SIZES = [(2, 96), (4, 128)] if PAPER_SIZES else [(2, 48)]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"V{s[0]}x{s[1]}^3")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_patch_embed_3d_speed(benchmark, impl, size, layer_norm, backward):
    if impl == "triton" and not CUDA:
        pytest.skip("Triton timings need a CUDA GPU (the CPU interpreter is no timing)")
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    p = make_problem(*size, layer_norm, dtype, device)
    dy = torch.randn_like(run_linear(p)) if backward else None
    fn = (lambda: (step(IMPLS[impl], p, dy), torch.cuda.synchronize())) if CUDA else (lambda: step(IMPLS[impl], p, dy))
    benchmark.group = f"patch_embed_3d V{size[0]}x{size[1]}^3 C{CHANNELS} {'ln' if layer_norm else 'noln'} " + (
        "fwd+bwd" if backward else "fwd")
    benchmark(fn)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(dtype))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gb_per_s"] = p.bytes_moved(backward) / benchmark.stats.stats.median / 1e9


# ---- GPU check (bench/gpu_check.py) ----------------------------------------------------------------------------

def _float64(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp64 leaf copy of a float tensor (same requires_grad); other values unchanged."""
    if t is None or not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def flash_check(p: Problem, backward: bool) -> tuple[float, float, bool]:
    """Kernel vs fp64 and the same-dtype reference vs fp64, for the output (forward) or the parameter gradients
    (backward): (max kernel error, max reference error, both relative to the tensor's largest value; the flash rule
    holds for every tensor)."""
    fields = (p.x, p.modality_ids, p.weight, p.bias, p.ln_weight, p.ln_bias)
    exact = Problem(*(_float64(t) for t in fields))
    # drawn in the problem's dtype so the fp64 run sees the same values
    dy = torch.randn(run_linear(p).shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(p.x.dtype)

    def results(q: Problem, impl) -> list[torch.Tensor]:
        out = impl(q)
        if not backward:
            return [out]
        return list(torch.autograd.grad(out, q.params(), dy.to(out.dtype)))

    def reference(q: Problem) -> torch.Tensor:
        return patch_embed_3d_reference(q.x, q.weight, q.bias, q.modality_ids, layer_norm=q.layer_norm,
                                        ln_weight=q.ln_weight, ln_bias=q.ln_bias)

    kernel, ref, want = results(p, run_triton), results(p, reference), results(exact, reference)
    checks = flash_errors([str(i) for i in range(len(want))], kernel, ref, want)
    return max(c.err / c.scale for c in checks), max(c.ref_err / c.scale for c in checks), all(c.ok for c in checks)


GRAPH_IMPLS = {"triton": run_triton, "conv3d+permute": run_conv3d, "reshape+linear": run_linear}


def gpu_rows() -> list[dict]:
    """Paper sizes (2 or 4 volumes of 96^3 or 128^3, C = 48, bf16), with and without LayerNorm: one row per
    (case, pass, baseline) with the kernel's time, GB/s and bf16 error, and one row of the device's copy bandwidth.

    ``ms``/``baseline_ms`` are CUDA-graph replays (device time); ``eager_ms``/``baseline_eager_ms`` (rows.json only)
    time eager calls with events, the kernel through the public op, so they include the host's overheads."""
    copy_ms, copy_gbs = copy_bandwidth_gbs()
    rows = [dict(op="device copy", case="clone 1 GiB bf16", dtype="bf16", **{"pass": "copy"}, ms=copy_ms,
                 metric="GB/s", value=copy_gbs, ok=True)]
    for volumes, side in ((2, 96), (4, 96), (2, 128), (4, 128)):
        for layer_norm in (False, True):
            p = make_problem(volumes, side, layer_norm, torch.bfloat16, "cuda")
            case = f"V{volumes}x1x{side}^3 C{CHANNELS}{' +LN' if layer_norm else ''}"
            dy = torch.randn_like(run_linear(p))
            for backward in (False, True):
                max_err, ref_err, ok = flash_check(p, backward)
                grad = dy if backward else None
                calls = {name: (lambda impl=impl: step(impl, p, grad)) for name, impl in IMPLS.items()}
                times = {name: graph_time_ms(lambda impl=impl: step(impl, p, grad))
                         for name, impl in GRAPH_IMPLS.items()}
                eager = {name: cuda_time_ms(call) for name, call in calls.items()}
                peaks = {name: peak_mib(call) for name, call in calls.items()}
                gbs = p.bytes_moved(backward) / times["triton"] / 1e6
                for baseline in ("conv3d+permute", "reshape+linear"):
                    rows.append({
                        "op": "patch_embed_3d", "case": case, "dtype": "bf16", "pass": "fwd+bwd" if backward else "fwd",
                        "ms": times["triton"], "baseline": baseline, "baseline_ms": times[baseline],
                        "speedup": times[baseline] / times["triton"], "peak_mib": peaks["triton"],
                        "baseline_peak_mib": peaks[baseline], "metric": "GB/s", "value": gbs,
                        "copy_fraction": gbs / copy_gbs, "eager_ms": eager["triton"],
                        "baseline_eager_ms": eager[baseline], "max_err": max_err, "ref_err": ref_err, "ok": ok,
                    })
    return rows
