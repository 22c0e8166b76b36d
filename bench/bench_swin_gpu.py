"""The Swin trunk on a GPU: SwinViT3D on the Triton backend against MONAI's SwinTransformer eager, with
``use_flash_attention=True`` and compiled, and against SwinViT3D on the torch backend (``_swin_rows.py`` says what
each row runs); feature 48, batch 2, bf16 autocast, forward (autograd off) and forward + backward (DESIGN §5 target:
fwd+bwd >= 2x MONAI at 128^3).

Parity before timing, per row: the flash rule against a float64 MONAI run, MONAI eager under the same autocast being
the reference, on the first batch element (a float64 MONAI forward + backward at 2 x 128^3 would need most of the
card); a row that fails is not timed. ``gpu_rows()`` feeds bench/gpu_check.py; its pytest case runs on a GPU only.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _compare import step_or_skip
from _swin_rows import OURS, OURS_TORCH, ROWS, check_trunks, make_trunks, trunk_step
from _timing import time_cuda  # bench/ is on sys.path

NAMES = (*ROWS, OURS_TORCH)


def gpu_rows(sizes: tuple[int, ...] = (128,), batch: int = 2, feature: int = 48) -> list[dict]:
    rows = []
    for size in sizes:
        t = make_trunks(feature, batch, size, "cuda")
        models = t.models("triton")
        for passes, backward in (("fwd", False), ("fwd+bwd", True)):
            one = dataclasses.replace(t, x=t.x[:1].detach().requires_grad_())
            checked = check_trunks(one, backward, NAMES, torch.bfloat16, "triton")
            torch.cuda.empty_cache()
            timed = {}
            for name in checked.steps:  # at the full batch (the compiled row recompiles in the warm-up)
                model, backend = models[name]
                timed[name] = time_cuda(trunk_step(model, t.x, backward, backend, torch.bfloat16))
            ms, peak = timed.get(OURS, (None, None))
            err, ref_err = checked.errors.get(OURS, (None, None))
            for name in NAMES:
                if name == OURS:
                    continue
                base_ms, base_peak = timed.get(name, (None, None))
                rows.append({"op": "SwinViT3D", "case": f"{batch}x1x{size}^3 f{feature}", "dtype": "bf16-autocast",
                             "pass": passes, "ms": ms, "baseline": name, "baseline_ms": base_ms,
                             "speedup": None if ms is None or base_ms is None else base_ms / ms, "peak_mib": peak,
                             "baseline_peak_mib": base_peak, "max_err": err, "ref_err": ref_err,
                             "ok": OURS in checked.steps,
                             "note": "; ".join(f"{k}: {checked.skipped[k]}" for k in (OURS, name)
                                               if k in checked.skipped)})
        del t, models
        torch.cuda.empty_cache()
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU rows are in bench_swin_cpu.py)")
@pytest.mark.parametrize("name", NAMES)
def test_swin_gpu_fwd_bwd_small(benchmark, name: str) -> None:
    """Forward + backward of the paper trunk at 2 x 1 x 64^3, bf16 autocast, after the parity check."""
    pytest.importorskip("monai.networks.nets.swin_unetr", reason="the MONAI baselines need MONAI")
    t = make_trunks(48, 2, 64, "cuda")
    checked = check_trunks(t, True, (name,), torch.bfloat16, "triton")
    run = step_or_skip(checked, name)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=3, warmup_rounds=1)
