"""Whole-encoder GPU benchmark: SwinViT3D on the Triton backend vs MONAI's SwinTransformer (eager) and vs SwinViT3D on
the torch backend, feature 48, batch 2, bf16 autocast, forward+backward (DESIGN §5 target: >= 2x MONAI at 128^3).

``gpu_rows()`` feeds bench/gpu_check.py; the pytest case runs a small size on whatever device is present.
"""

from __future__ import annotations

import pytest
import torch

import medmap_fast as mf
from _timing import time_cuda  # bench/ is on sys.path

PAPER = dict(in_chans=1, embed_dim=48, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
             num_heads=(3, 6, 12, 24), spatial_dims=3)


def monai_swin(**kwargs) -> torch.nn.Module | None:
    """MONAI's SwinTransformer with the same arguments, or None where MONAI is not installed."""
    try:
        from monai.networks.nets.swin_unetr import SwinTransformer
    except ImportError:
        return None
    return SwinTransformer(**kwargs)


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, backend: str) -> None:
    with mf.backend(backend), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        outs = model(x)
    sum(o.float().mean() for o in outs).backward()


def gpu_rows(sizes: tuple[int, ...] = (96, 128), batch: int = 2) -> list[dict]:
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        ours = mf.SwinViT3D(**PAPER).cuda()
        x = torch.randn(batch, 1, size, size, size, device="cuda")
        # correctness of the whole trunk in bf16: Triton backend vs torch backend, both against fp32 torch
        with torch.no_grad(), mf.backend("torch"):
            ref = ours(x)[-1].float()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            with mf.backend("triton"):
                tri = ours(x)[-1].float()
            with mf.backend("torch"):
                eager = ours(x)[-1].float()
        max_err, ref_err = (tri - ref).abs().max().item(), (eager - ref).abs().max().item()
        ms, peak = time_cuda(lambda: fwd_bwd(ours, x, "triton"))
        base = {"torch backend (SDPA + mask)": (lambda: fwd_bwd(ours, x, "torch"))}
        monai = monai_swin(**PAPER)
        if monai is not None:
            monai = monai.cuda()
            base["MONAI SwinTransformer eager"] = lambda: fwd_bwd(monai, x, "torch")
        for name, fn in base.items():
            base_ms, base_peak = time_cuda(fn)
            rows.append({"op": "SwinViT3D", "case": f"{batch}x1x{size}^3 f48", "dtype": "bf16-autocast",
                         "pass": "fwd+bwd", "ms": ms, "baseline": name, "baseline_ms": base_ms,
                         "speedup": base_ms / ms, "peak_mib": peak, "baseline_peak_mib": base_peak,
                         "max_err": max_err, "ref_err": ref_err, "ok": max_err <= 2 * ref_err + 1e-3})
        del ours, monai
        torch.cuda.empty_cache()
    return rows


@pytest.mark.parametrize("backend", ["torch"])
def test_swin_fwd_bwd_small(benchmark, backend: str) -> None:
    """Forward+backward of the paper trunk at 32^3 on the present device (CPU here: the torch path)."""
    model = mf.SwinViT3D(**PAPER)
    x = torch.randn(1, 1, 32, 32, 32)
    benchmark.pedantic(fwd_bwd, args=(model, x, backend), rounds=3, iterations=1)
