"""Shifted-window attention: the Triton kernel vs MONAI's eager WindowAttention and vs SDPA with the relative-position
bias and shift mask folded into ``attn_mask`` (MONAI issue #8973's proposal).

Both baselines start from the same channels-last qkv tensor as the kernel and do what MONAI's Swin block does around
the attention (pad with the qkv bias, roll, partition, attention, reverse, roll back, crop, gate); the shift mask and
the bias index are built on the device once, outside the timed region (MONAI rebuilds the mask every forward).

``pytest bench/bench_window_attention.py``: the torch paths at a modest size on the present device (the Triton case
needs a CUDA GPU). ``gpu_rows()`` (used by bench/gpu_check.py): the paper sizes, bf16, batch 2, forward and
forward+backward, with the flash-attention accuracy rule. Needs neither MONAI nor xformers.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import medmap_fast as mf
from _timing import time_cuda  # median ms and peak MiB with CUDA events (bench/ is on sys.path)

wa = importlib.import_module("medmap_fast.kernels.window_attention")  # the module, not the op of the same name

TABLE = (7, 7, 7)
MONAI, SDPA = "MONAI WindowAttention eager", "SDPA(attn_mask=bias+shift mask)"
Core = Callable[..., torch.Tensor]


def monai_eager_core(q, k, v, bias, mask, scale):
    """MONAI 1.6 ``WindowAttention.forward`` after its qkv Linear: explicit scores, bias, mask, softmax, @ v."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw, (bnw, heads, n, _) = mask.shape[0], attn.shape
        attn = (attn.view(bnw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    return torch.softmax(attn, dim=-1).to(v.dtype) @ v


def sdpa_core(q, k, v, bias, mask, scale):
    """SDPA on [B*nW, heads, n, d] with bias + shift mask folded into one attn_mask (one copy per batch element)."""
    attn_mask = bias
    if mask is not None:
        attn_mask = mask[:, None] if bias is None else bias + mask[:, None]  # [nW, heads or 1, n, n]
        attn_mask = attn_mask.repeat(q.shape[0] // mask.shape[0], 1, 1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_mask is None else attn_mask.to(q.dtype),
                                          scale=scale)


def swin_windows(core: Core, qkv, heads, window, shift, bias_table, pad_kv, gate_logits, index, mask):
    """MONAI's Swin attention path around ``core``: pad (k/v = pad_kv), roll, partition, core, reverse, gate."""
    q, k, v = wa.window_qkv(qkv, heads, window, shift, pad_kv)
    bias = None if bias_table is None else bias_table[index].permute(2, 0, 1)
    out = core(q, k, v, bias, mask, q.shape[-1] ** -0.5)
    return wa.apply_gate(wa.window_merge(out, qkv.shape[1:4], window, shift), gate_logits)


def implementations(qkv: torch.Tensor, heads: int, window, shift) -> dict[str, Callable]:
    """name -> f(qkv, bias_table, pad_kv, gate_logits) for the kernel and both baselines (device caches built)."""
    padded = tuple(wa.padded_size(s, k) for s, k in zip(qkv.shape[1:4], window))
    index = wa.relative_position_index(window, TABLE).to(qkv.device)
    mask = wa.shift_mask(padded, window, shift).to(qkv.device, qkv.dtype) if any(shift) else None

    def triton(qkv, bias_table, pad_kv, gate_logits):
        with mf.backend("triton"):
            return mf.kernels.window_attention(qkv, heads, window, shift, bias_table, table_window=TABLE,
                                               pad_kv=pad_kv, gate_logits=gate_logits)

    def baseline(core):
        return functools.partial(swin_windows, core, heads=heads, window=window, shift=shift, index=index, mask=mask)

    monai, sdpa = baseline(monai_eager_core), baseline(sdpa_core)
    return {"triton": triton,
            MONAI: lambda q, b, p, g: monai(q, bias_table=b, pad_kv=p, gate_logits=g),
            SDPA: lambda q, b, p, g: sdpa(q, bias_table=b, pad_kv=p, gate_logits=g)}


def make_inputs(batch, tokens, channels, heads, device, dtype, seed=0):
    """qkv [B, t, t, t, 3C], a trunc_normal(0.02)-like bias table, pad_kv (the qkv bias) and gate logits, as leaves."""
    gen = torch.Generator().manual_seed(seed)
    rows = math.prod(2 * t - 1 for t in TABLE)
    shapes = {"qkv": ((batch, tokens, tokens, tokens, 3 * channels), 1.0), "bias_table": ((rows, heads), 0.02),
              "pad_kv": ((2 * channels,), 0.1), "gate_logits": ((batch, tokens, tokens, tokens, heads), 0.5)}
    return {k: (torch.randn(*s, generator=gen) * std).to(device, dtype).requires_grad_()
            for k, (s, std) in shapes.items()}


def step(fn: Callable, inputs: dict, dout: torch.Tensor | None) -> Callable[[], object]:
    """A callable running the forward (dout None) or forward + backward to every input."""
    leaves = list(inputs.values())
    if dout is None:
        return lambda: fn(*leaves)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, dout)


# ------------------------------------------------------------------------------------------------ pytest-benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(batch=1, tokens=12, channels=48, heads=3)  # 2^3 windows of 7^3, padded from 12^3


@pytest.mark.parametrize("shift", [(0, 0, 0), (3, 3, 3)], ids=["shift0", "shift3"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["triton", MONAI, SDPA])
def test_window_attention(benchmark, impl, passes, shift):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton kernel is timed on a CUDA GPU only (the CPU interpreter is not a performance path)")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inputs = make_inputs(**SMALL, device=DEVICE, dtype=dtype)
    fn = implementations(inputs["qkv"], SMALL["heads"], (7, 7, 7), shift)[impl]
    dout = None if passes == "fwd" else torch.randn_like(fn(*inputs.values()))
    run = step(fn, inputs, dout)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", **SMALL)
    benchmark.pedantic(lambda: (run(), sync()), rounds=5, warmup_rounds=1)


# ------------------------------------------------------------------------------------------------------- gpu_rows

PAPER_CASES = [  # (case, tokens per side, C, heads): Swin stages 1 and 2 of 96^3 / 128^3 inputs, feature 48
    ("stage1 96^3", 48, 48, 3), ("stage1 128^3", 64, 48, 3), ("stage2 96^3", 24, 96, 6), ("stage2 128^3", 32, 96, 6)]


def flash_errors(impls: dict, inputs: dict, dout: torch.Tensor) -> dict[str, tuple[float, float]]:
    """name -> (kernel error, bf16 SDPA-baseline error) vs an fp64 run, for the output and every gradient."""
    fp64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    results = {}
    sdpa = impls[SDPA]
    for label, fn, leaves in (("kernel", impls["triton"], inputs), ("fp64", sdpa, fp64), ("ref", sdpa, inputs)):
        out = fn(*leaves.values())
        grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
        results[label] = {"out": out.detach(), **{f"d{k}": g for k, g in zip(leaves, grads)}}
        del out, grads
    return {name: ((results["kernel"][name].double() - exact).abs().max().item(),
                   (results["ref"][name].double() - exact).abs().max().item())
            for name, exact in results["fp64"].items()}


def gpu_rows(batch: int = 2) -> list[dict]:
    """Paper sizes on the current CUDA device: bf16 accuracy (flash rule) and timings vs both baselines."""
    rows = []
    for case, tokens, channels, heads in PAPER_CASES:
        for shift in ((0, 0, 0), (3, 3, 3)):
            torch.manual_seed(0)
            inputs = make_inputs(batch, tokens, channels, heads, "cuda", torch.bfloat16)
            window = (7, 7, 7)
            impls = implementations(inputs["qkv"], heads, window, shift)
            dout = torch.randn(batch, tokens, tokens, tokens, channels, device="cuda", dtype=torch.bfloat16)
            errors = flash_errors(impls, inputs, dout)
            n = math.prod(window)
            windows = batch * math.prod(wa.padded_size(tokens, 7) // 7 for _ in range(3))
            fwd_flop = 4 * windows * heads * n * n * (channels // heads)
            per_program = wa._heads_per_program(channels // heads, heads)
            for passes, flop, names in (("fwd", fwd_flop, ["out"]), ("fwd+bwd", 3.5 * fwd_flop, list(errors))):
                ms, peak = time_cuda(step(impls["triton"], inputs, None if passes == "fwd" else dout))
                worst = max(names, key=lambda k: errors[k][0] - 2 * errors[k][1])
                ok = all(errors[k][0] <= 2 * errors[k][1] + 1e-6 for k in names)
                for name, fn in impls.items():
                    if name == "triton":
                        continue
                    base_ms, base_peak = time_cuda(step(fn, inputs, None if passes == "fwd" else dout))
                    rows.append({
                        "op": "window_attention", "case": f"{case} {batch}x{tokens}^3 C{channels} h{heads} "
                        f"shift{shift[0]} {per_program} heads/program", "dtype": "bf16", "pass": passes, "ms": ms,
                        "baseline": name,
                        "baseline_ms": base_ms, "speedup": base_ms / ms, "peak_mib": peak,
                        "baseline_peak_mib": base_peak, "metric": "TFLOP/s", "value": flop / ms / 1e9,
                        "max_err": errors[worst][0], "ref_err": errors[worst][1], "ok": ok,
                        "worst": worst,
                    })
            del inputs, impls, dout
            torch.cuda.empty_cache()
    return rows
