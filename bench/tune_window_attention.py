"""Launch configurations of the window-attention kernels, swept one kernel at a time (issue 10 item 6: tune).

Each kernel the op launches (``fwd``; ``bwd``: dq, dk, dv; ``bias``: d(bias table)) takes a query tile BM, a key tile
BN, num_warps, num_stages and G heads per program from ``medmap_fast.kernels.window_attn`` (``_GPU_CONFIGS``,
``_CHANNELS``). Every candidate of SPACE replaces the config of one kernel, the others keep theirs; the backward's
shipped config also runs with every other split of the window's query tiles on chip (tiles per pass over the keys,
or the query side streamed) than the launcher's rule gives:

    python bench/tune_window_attention.py [--kinds fwd bwd bias] [--json F]
        no GPU needed: each candidate compiled for sm_90 at the paper shapes (bench/sass_profile.py's cases, shifted,
        head dim 16 and 32): registers, spills, CTAs per SM, mma.sync count, the issue floor of its inner loop and
        the bytes that loop moves in global memory
    python bench/tune_window_attention.py --time [--json F]        (or: bash bench/run_gpu.sh --tune)
        on a CUDA GPU: stage 1 of the paper (bf16, 2 x 64^3 tokens, 3 heads of 16, shifted), each candidate run once
        through the op against float64 (the flash rule, as bench_window_attention checks it) and, if it passes,
        timed: the forward alone for ``fwd`` candidates, forward + backward for the others

A candidate qualifies when it has no spills, no mma.sync and at least 2 CTAs per SM (issue 10's targets); the
shipped config is marked. Nothing here changes the shipped configs: a winner goes into window_attn.py by hand, with
the table that chose it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Iterator
from unittest import mock

import torch

KERNELS = {"fwd": "_window_attention_fwd", "bwd": "_window_attention_bwd", "bias": "_window_attention_bwd_bias"}
# BM, BN, num_warps, num_stages per kernel; G (heads per program) runs over the divisors of the heads up to 64
# channels. The backward products put BN rows (dk, dv) and BM rows (dq) on wgmma: both stay >= 64
SPACE = {
    "fwd": dict(BM=(64, 128), BN=(64, 128), num_warps=(4, 8), num_stages=(1, 2, 3)),
    "bwd": dict(BM=(64, 128), BN=(64, 128), num_warps=(4, 8), num_stages=(1,)),
    "bias": dict(BM=(64, 128), BN=(64, 128), num_warps=(4, 8), num_stages=(1,)),
}
# sass_profile's shifted cases without dropout: name -> (heads, head dim)
STATIC_CASES = {"stage1 B2x64^3 C48 h3 shift3": (3, 16), "stage2-d32 B2x32^3 C192 h6 shift3": (6, 32)}
TIMED, TIMED_SHIFT = "stage1 128^3", 3  # bench_window_attention's stage 1 of the paper (128^3 input, patch 2)


@dataclasses.dataclass(frozen=True)
class Candidate:
    kind: str  # a key of KERNELS
    bm: int
    bn: int
    warps: int
    stages: int
    heads_per_program: int
    query_tiles: int | None = None  # bwd: query tiles on chip per pass, 0 streamed; None: the launcher's rule

    def label(self) -> str:
        label = f"BM {self.bm} BN {self.bn} w{self.warps} s{self.stages} G{self.heads_per_program}"
        if self.query_tiles is None:
            return label
        return f"{label} {'streamed' if self.query_tiles == 0 else f'{self.query_tiles} tiles/pass'}"


def _window_attn():
    from medmap_fast.kernels import window_attn

    return window_attn


def shipped(kind: str, head_dim: int, heads: int) -> Candidate:
    """The config the op launches ``kind`` with for 16-bit inputs (without dropout)."""
    wa = _window_attn()
    return Candidate(kind, *wa._GPU_CONFIGS[kind], wa._heads_per_program(head_dim, heads, wa._CHANNELS[kind]))


def query_splits(head_dim: int, heads: int) -> list[int]:
    """The backward's shipped config on 7^3 windows: every number of query tiles per pass (at least 2: a pass of
    evenly spread tiles) and 0 (streamed) but the one the launcher's rule picks."""
    wa = _window_attn()
    geo = wa._Geometry(1, (7, 7, 7), (7, 7, 7), (0, 0, 0), (7, 7, 7), heads, head_dim, 1.0)
    cfg = wa._launch_config("bwd", geo.n, head_dim, heads, torch.bfloat16)
    tiles = geo.np // cfg["BM"]
    splits = {0} | {-(-tiles // passes) for passes in range(1, tiles)} - {1}
    return sorted(splits - {wa._query_tiles_per_pass(geo, cfg, False, torch.bfloat16)}, reverse=True)


def candidates(kind: str, head_dim: int, heads: int) -> list[Candidate]:
    """SPACE's configs of ``kind`` for every G that divides ``heads`` within 64 channels, the shipped one first
    (for the backward, then the shipped config with the other query splits)."""
    tile = _window_attn()._head_tile(head_dim)
    groups = [g for g in range(1, heads + 1) if heads % g == 0 and g * tile <= 64]
    found = [Candidate(kind, *config, g) for config in itertools.product(*SPACE[kind].values()) for g in groups]
    first = shipped(kind, head_dim, heads)
    splits = [dataclasses.replace(first, query_tiles=n) for n in query_splits(head_dim, heads)] if kind == "bwd" else []
    return [first, *splits, *(c for c in found if c != first)]


@contextlib.contextmanager
def launching(candidate: Candidate, head_dim: int, heads: int) -> Iterator[None]:
    """Inside, the op launches ``candidate.kind`` with the candidate's config and query split (16-bit inputs, no
    dropout, windows of 7^3 tokens; checked on entry, so that a change to how window_attn picks its configs cannot
    go unnoticed)."""
    wa = _window_attn()
    c = candidate
    split = wa._query_tiles_per_pass if c.query_tiles is None else lambda geo, cfg, dropout, dtype: c.query_tiles
    with (
        mock.patch.dict(wa._GPU_CONFIGS, {c.kind: (c.bm, c.bn, c.warps, c.stages)}),
        mock.patch.dict(wa._CHANNELS, {c.kind: c.heads_per_program * wa._head_tile(head_dim)}),
        mock.patch.object(wa, "_query_tiles_per_pass", split),
    ):
        got = wa._launch_config(c.kind, 343, head_dim, heads, torch.bfloat16)
        want = dict(BM=c.bm, BN=c.bn, num_warps=c.warps, num_stages=c.stages, HEADS_PER_PROGRAM=c.heads_per_program)
        if got != want:
            raise RuntimeError(f"window_attn launches {c.kind} with {got}, not the candidate's {want}")
        yield


def qualifies(row: dict) -> bool:
    """No spills, no mma.sync, at least 2 CTAs per SM."""
    return not row.get("error") and row.get("spill_bytes") == row.get("hmma") == 0 and row.get("ctas_per_sm", 0) >= 2


# ------------------------------------------------------------------------------------------------------- static


def static_rows(kinds: list[str], limit: int | None = None) -> list[dict]:
    """Every candidate of ``kinds`` (the first ``limit`` of each) compiled for sm_90 in each of STATIC_CASES
    (bf16)."""
    import sass_profile

    cases = {case.name: case for case in sass_profile.window_attention_cases() if case.name in STATIC_CASES}
    rows = []
    for name, (heads, head_dim) in STATIC_CASES.items():
        case = cases[name]
        for kind in kinds:
            first = shipped(kind, head_dim, heads)
            for cand in candidates(kind, head_dim, heads)[:limit]:
                with launching(cand, head_dim, heads):
                    found, _ = sass_profile.profile_case(case, torch.bfloat16, only=KERNELS[kind])
                error = next((r["error"] for r in found if r["error"]), None)
                row = {"case": name, "kind": kind, "config": cand.label(), "shipped": cand == first, "error": error}
                if not error:  # on chip, the backward is a launch per query-tile pattern: summed, or the worst
                    row |= {"regs": max(r["regs"] for r in found),
                            "spill_bytes": sum(r["spill_store_bytes"] + r["spill_load_bytes"] for r in found),
                            "ctas_per_sm": min(r["ctas_per_sm"] for r in found),
                            "hmma": sum(r["mix"]["HMMA"] for r in found),
                            "loop_instructions": max(r["loop_instructions"] for r in found),
                            "issue_floor_us": sum(r["issue_floor_us"] for r in found),
                            "loop_global_gb": sum(r["loop_global_gb"] for r in found)}
                rows.append(row)
                print(_line(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- timed


@contextlib.contextmanager
def recording_launches() -> Iterator[dict[str, dict[int, object]]]:
    """Inside, every Triton launch records its compiled kernel under the kernel's name, each compiled variant once
    (the backward launches one per query-tile pattern when it holds the query side on chip)."""
    from triton.runtime.jit import JITFunction

    compiled: dict[str, dict[int, object]] = {}
    original = JITFunction.run

    def run(kernel, *args, **kwargs):
        result = original(kernel, *args, **kwargs)
        compiled.setdefault(kernel.fn.__name__, {})[id(result)] = result
        return result

    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = original


def timed_rows(kinds: list[str], limit: int | None = None) -> list[dict]:
    """Every candidate of ``kinds`` (the first ``limit`` of each) on the current CUDA GPU at TIMED (bf16): resources
    of the kernel as loaded, the flash rule against float64, and its median time (only if it passed)."""
    from _compare import keep_passing
    from _timing import time_cuda
    from _window_rows import make_problem, op_row, step
    from bench_window_attention import STAGE1, references
    from sass_profile import occupancy

    size = STAGE1[TIMED]
    p = make_problem(**size, shift=TIMED_SHIFT, device="cuda", dtype=torch.bfloat16)
    heads, head_dim = size["heads"], size["channels"] // size["heads"]
    dout, ref, exact = references(p, "fwd+bwd")
    case = f"{TIMED} {size['batch']}x{size['tokens']}^3 C{size['channels']} h{heads} shift{TIMED_SHIFT} bf16"
    op = op_row(p, "triton")  # reads its launch configs at every call: the candidate's inside launching()
    checked_step = step(op, p, dout)
    rows, base = [], {}
    for kind in kinds:
        first = shipped(kind, head_dim, heads)
        timed_step = step(op, p, None if kind == "fwd" else dout)
        for cand in candidates(kind, head_dim, heads)[:limit]:
            row = {"case": case, "kind": kind, "config": cand.label(), "shipped": cand == first}
            with launching(cand, head_dim, heads), recording_launches() as compiled:
                checked = keep_passing({"op": checked_step}, ref, exact, {})
                kernels = list(compiled.get(KERNELS[kind], {}).values())
                if kernels:  # + the 1 KB CUDA reserves per CTA
                    ctas = [occupancy(k.n_regs, k.metadata.shared + 1024, k.metadata.num_warps)[0] for k in kernels]
                    row |= {"regs": max(k.n_regs for k in kernels), "spill_bytes": sum(k.n_spills for k in kernels),
                            "hmma": sum(k.asm["ptx"].count("mma.sync") for k in kernels), "ctas_per_sm": min(ctas)}
                if "op" not in checked.steps:
                    row["error"] = checked.skipped["op"]
                else:
                    row["max_err"], row["ref_err"] = checked.errors["op"]
                    row["ms"] = time_cuda(timed_step, repeats=10)[0]
                    if row["shipped"]:
                        base[kind] = row["ms"]
            torch.cuda.empty_cache()
            rows.append(row)
            print(_line(row), flush=True)
    for row in rows:
        if "ms" in row and row["kind"] in base:
            row["x_shipped"] = base[row["kind"]] / row["ms"]
    return rows


# ------------------------------------------------------------------------------------------------------ output

COLUMNS = ("case", "kind", "config", "shipped", "regs", "spill_bytes", "ctas_per_sm", "hmma", "loop_instructions",
           "issue_floor_us", "loop_global_gb", "ms", "x_shipped", "max_err", "ref_err", "error")


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def _line(row: dict) -> str:
    return " | ".join(f"{k} {_cell(row[k])}" for k in COLUMNS if k in row)


def table(rows: list[dict]) -> str:
    """Markdown: the columns any row has, each case and kind sorted best first (qualifying rows before the others,
    then by time or issue floor)."""
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    key = "ms" if "ms" in columns else "issue_floor_us"

    def order(r: dict) -> tuple:
        return r["case"], list(KERNELS).index(r["kind"]), not qualifies(r), r.get(key) or float("inf")

    lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in sorted(rows, key=order)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", action="store_true", help="time on the CUDA GPU (default: sm_90 compiles only)")
    parser.add_argument("--kinds", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--limit", type=int, default=None, help="the first N candidates of each kind (shipped first)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.time:
        if not torch.cuda.is_available():
            print("tune_window_attention --time: no CUDA device", file=sys.stderr)
            return 2
        rows = timed_rows(args.kinds, args.limit)
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    else:
        import sass_profile

        if reason := sass_profile.nvidia_tools_missing():
            print(f"cannot compile for sm_90: {reason}", file=sys.stderr)
            return 2
        os.environ.pop("TRITON_INTERPRET", None)  # before the kernels import: compile, do not interpret
        rows = static_rows(args.kinds, args.limit)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r.get("error") and r["shipped"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
