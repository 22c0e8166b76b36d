"""Static profile of the Triton kernels for Hopper (sm_90), without a GPU (DESIGN §5, issue 10 item 2).

``python bench/sass_profile.py [--kernels window_attention patch_embed_3d gated_attention] [--dtype bf16] [--cases
REGEX] [--json FILE]`` calls each public op (``medmap_fast.kernels.*``) on its Triton path, forward and backward,
with CPU tensors at the paper shapes (``--cases``: only the cases whose name the expression matches); every kernel
launch is compiled for sm_90 with the ptxas / cuobjdump that ship with triton instead of being run (a stand-in
driver tells Triton the device is sm_90, and ``JITFunction.run`` is called with ``warmup=True``), so each kernel
gets the launch configuration, constexprs and argument specialisation of a real launch. Per kernel it prints
registers, spills, shared memory, CTAs per SM and the SASS instruction mix of the inner loop (the body of the
innermost backward branch holding tensor-core instructions: one iteration = one key block of the window-attention
forward; where a kernel runs such a loop once per pass, the passes' bodies together), and per op and pass an
analytic roofline (FLOPs, HBM bytes, exponentials and the H100 floor from each) beside the issue floor of the pass's
kernels (per program the inner loop times its trips plus every other instruction once: set-up, epilogue, outer
loops, the narrower key tiles after a loop; issued at 4 per SM per clock, nothing else), their MUFU floor (the same
count of MUFU instructions, 32 results each, at the special-function units' 16 per SM per clock: a kernel whose
MUFU floor meets its issue floor gains nothing from fewer other instructions) and the bytes those
instructions move in global memory (their loads, stores, asynchronous copies and atomics at the width each
instruction names, every lane active: what L1 and L2 must serve, re-reads included, which the HBM column, each tensor
once, leaves out).

A kernel that fails to compile is reported with its error; the rest of the profile still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator

import torch

# ---------------------------------------------------------------------------------------------- H100 SXM5 constants
# NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5: 132 SMs, dense BF16 989.4 TFLOP/s at the 1.83 GHz
# boost clock the tensor peaks are quoted at, HBM3 3.35 TB/s), as tabulated at
# https://glennklockwood.com/garden/processors/h100
SMS = 132
CLOCK_HZ = 1.83e9
TENSOR_FLOPS = 989.4e12
HBM_BYTES_PER_S = 3.35e12
# MUFU.EX2: 16 results per clock per SM (CUDA C++ Programming Guide, arithmetic instruction throughput, cc 9.0);
# FlashAttention-3 (arXiv:2407.08608, §3) quotes the H100 SXM5's "3.9 TFLOPS of special functions":
# 16 x 132 x 1.83 GHz
EXP_PER_S = 16 * SMS * CLOCK_HZ
ISSUE_PER_S = 4 * SMS * CLOCK_HZ  # 4 warp schedulers per SM, each issuing one warp-instruction per clock
# Occupancy limits per SM, compute capability 9.0 (CUDA C++ Programming Guide, technical specifications): registers
# are allocated per warp in units of 256; sm_90 cubins carry the 1 KB of shared memory CUDA reserves per CTA
REGS_PER_SM, REG_UNIT, SMEM_PER_SM, THREADS_PER_SM, CTAS_PER_SM = 65536, 256, 228 * 1024, 2048, 32

CATEGORIES = ("HGMMA", "HMMA", "MUFU", "float", "integer", "memory", "atomic", "sync", "other")
_INTEGER = {"LEA", "SHF", "SHL", "SHR", "LOP", "LOP3", "SEL", "PRMT", "POPC", "FLO", "BREV", "BMSK", "SGXT", "PLOP3",
            "P2R", "R2P", "VIADD", "VIADDMNMX", "VIMNMX", "REDUX"}
_MEMORY = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDGDEPBAR", "LD", "ST", "LDL", "STL", "LDC",
           "UTMALDG", "UTMASTG", "UBLKCP", "CCTL"}
_ATOMIC = {"RED", "REDG", "ATOM", "ATOMG", "ATOMS"}
# instructions that read or write global memory (through L1 / L2), and the bytes per lane their width modifier says
_GLOBAL = {"LDG", "STG", "LDGSTS", "RED", "REDG", "ATOM", "ATOMG"}
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_SYNC = {"WARPSYNC", "BAR", "BSSY", "BSYNC", "WARPGROUP", "DEPBAR", "SYNCS", "MEMBAR", "FENCE", "ERRBAR"}
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\S*)\s*([^;]*);")


def category(opcode: str) -> str:
    """The instruction-mix category of a SASS opcode without modifiers (``IMAD`` of ``IMAD.MOV.U32``)."""
    if opcode.endswith("GMMA"):
        return "HGMMA"
    if opcode.endswith("MMA"):
        return "HMMA"
    if opcode == "MUFU":
        return "MUFU"
    if opcode in _ATOMIC:
        return "atomic"
    if opcode in _MEMORY:
        return "memory"
    if opcode in _SYNC:
        return "sync"
    if opcode in _INTEGER or (opcode[0] == "I" and opcode not in ("I2F", "I2FP")):
        return "integer"
    if opcode[0] == "F" or opcode in ("I2F", "I2FP") or re.fullmatch(r"H[A-Z]+2", opcode):
        return "float"
    return "other"


# ----------------------------------------------------------------------------------------------------- SASS reading


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # without modifiers
    full: str  # with modifiers (MUFU.EX2)
    operands: str


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of a ``cuobjdump -sass`` listing (one kernel)."""
    return [Instruction(int(m[1], 16), m[2], m[2] + m[3], m[4]) for m in map(_SASS_LINE.match, sass.splitlines()) if m]


def global_bytes(code: list[Instruction]) -> int:
    """Bytes one warp's pass over ``code`` reads or writes in global memory, every lane active: 32 x the width of each
    global load, store, asynchronous copy or atomic (4 bytes unless a modifier says 1, 2, 8 or 16)."""
    widths = (next((_WIDTH[m] for m in i.full.split(".")[1:] if m in _WIDTH), 4) for i in code if i.opcode in _GLOBAL)
    return 32 * sum(widths)


def branch_target(ins: Instruction) -> int | None:
    """The address a BRA jumps to (None for other instructions or an indirect branch)."""
    target = re.match(r"\s*(?:`\()?(0x[0-9a-f]+)", ins.operands) if ins.opcode == "BRA" else None
    return int(target[1], 16) if target else None


def inner_loop(code: list[Instruction]) -> tuple[list[Instruction], int]:
    """The inner loops' bodies and the number of loops: each backward branch (a BRA to a lower address, not to
    itself) closes a loop [target, branch]; the inner loops are those holding HGMMA/HMMA instructions with no such
    loop inside them (one per kernel, or one per pass where a kernel runs the same key loop over several passes:
    their bodies, in order, make one iteration). Without tensor-core loops: the longest loop; without loops: the
    whole kernel."""
    loops = []
    for ins in code:
        target = branch_target(ins)
        if target is not None and target < ins.address:
            loops.append((target, ins.address))
    if not loops:
        return code, 0
    bodies = {span: [i for i in code if span[0] <= i.address <= span[1]] for span in loops}
    tensor = [span for span in loops if any(category(i.opcode) in ("HGMMA", "HMMA") for i in bodies[span])]
    inner = [s for s in tensor if not any(t != s and s[0] <= t[0] and t[1] <= s[1] for t in tensor)]
    if inner:
        return [i for span in sorted(inner) for i in bodies[span]], len(loops)
    return max(bodies.values(), key=len), len(loops)


def once_code(code: list[Instruction], body: list[Instruction]) -> list[Instruction]:
    """What a program runs outside its inner loops (``body``), counted once: set-up, epilogue, the code of outer loops
    and the key tiles a kernel takes after its loop (a narrower tail); not NOPs or the closing branch to itself."""
    inside = {i.address for i in body}
    return [i for i in code if i.address not in inside and i.opcode != "NOP" and branch_target(i) != i.address]


# ----------------------------------------------------------------------------------------------- sm_90 compilation


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def nvidia_tools_missing() -> str | None:
    """Why sm_90 cannot be compiled here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    missing = [t for t in ("ptxas", "cuobjdump") if not os.path.exists(_tool(t))]
    return f"this Triton build carries no NVIDIA backend tools ({', '.join(missing)})" if missing else None


class _Sm90Driver:
    """Stands in for Triton's CUDA driver: the current device is an sm_90 GPU (nothing is ever launched)."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: its compiled sm_90 kernel (or the compile error), grid, bound arguments and the
    pass ("fwd" or "bwd") that launched it."""

    kernel: str
    grid: tuple[int, ...]
    args: dict
    compiled: object | None
    error: str | None
    phase: str


@contextlib.contextmanager
def compiling_for_sm90() -> Iterator[tuple[list[Launch], list[str]]]:
    """Inside, the public ops take their Triton path for CPU tensors, and every ``triton.jit`` launch compiles for
    sm_90 (``warmup=True``: nothing runs, outputs stay uninitialised) and is appended to the yielded list, tagged
    with the yielded phase's last entry."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from medmap_fast.kernels import _backend

    launches: list[Launch] = []
    phase = ["fwd"]
    original_run = JITFunction.run

    def run(kernel, *args, grid, warmup, **kwargs):
        bound = dict(zip(kernel.arg_names, args)) | kwargs
        grid = tuple(grid(bound) if callable(grid) else grid)
        try:
            compiled, error = original_run(kernel, *args, grid=grid, warmup=True, **kwargs), None
        except Exception as e:  # a compile failure is a result of the profile, not a crash
            compiled, error = None, _error(e)
        launches.append(Launch(kernel.fn.__name__, grid, bound, compiled, error, phase[-1]))
        return compiled

    # the ops ask use_triton(x) (CUDA tensors, or the interpreter's CPU ones): yes, wherever it was imported
    binders = [m for m in list(sys.modules.values())
               if m.__name__.startswith("medmap_fast") and getattr(m, "use_triton", None) is _backend.use_triton]
    previous_driver, use_triton = driver._active, _backend.use_triton
    driver.set_active(_Sm90Driver())
    JITFunction.run = run
    for m in binders:
        m.use_triton = lambda x, op: True
    try:
        yield launches, phase
    finally:
        for m in binders:
            m.use_triton = use_triton
        JITFunction.run = original_run
        driver._active = previous_driver


def _error(e: Exception) -> str:
    """One line: the exception's type, first line and (a compile error's message) last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(e).__name__}: {text[:300]}"


def _cubin_tool(tool: str, flags: list[str], data: bytes | str, suffix: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=suffix, mode="wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        run = subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True, check=True)
    return run.stdout + run.stderr


def occupancy(regs: int, smem_bytes: int, warps: int) -> tuple[int, str]:
    """CTAs per SM of a kernel on an H100 and the limit that binds ("regs", "smem", "threads", or "max")."""
    limits = {"regs": REGS_PER_SM // (math.ceil(regs * 32 / REG_UNIT) * REG_UNIT) // warps,
              "smem": SMEM_PER_SM // max(smem_bytes, 1), "threads": THREADS_PER_SM // (32 * warps), "max": CTAS_PER_SM}
    ctas = min(limits.values())
    return ctas, min(limits, key=limits.get) if ctas < CTAS_PER_SM else "max"


def kernel_profile(launch: Launch, trips: int | None) -> dict:
    """Registers, spills, shared memory, occupancy and the inner loop's instruction mix of one compiled launch;
    ``trips``: iterations of the inner loop per program (None where unknown) for the issue floor."""
    c = launch.compiled
    # ptxas -v again on Triton's PTX with Triton's flags (the build log is not kept): registers and spill bytes
    log = _cubin_tool("ptxas", ["-lineinfo", "-v", "--gpu-name=sm_90a", "-o", os.devnull], c.asm["ptx"], ".ptx")
    regs = int(re.search(r"Used (\d+) registers", log)[1])
    spill_st, spill_ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    usage = _cubin_tool("cuobjdump", ["--dump-resource-usage"], c.asm["cubin"], ".cubin")
    smem = c.metadata.shared + int(re.search(r"SHARED:(\d+)", usage)[1])
    warps = c.metadata.num_warps
    ctas, limit = occupancy(regs, smem, warps)
    code = parse_sass(_cubin_tool("cuobjdump", ["-sass"], c.asm["cubin"], ".cubin"))
    body, loops = inner_loop(code)
    once = once_code(code, body)
    mix = Counter(category(i.opcode) for i in body)
    exp = sum(i.full.startswith("MUFU.EX2") for i in body)
    programs = math.prod(launch.grid)
    moved = global_bytes(body) * warps  # per iteration of one program
    issued = None if trips is None else len(body) * trips + len(once)  # warp-instructions per warp of a program
    mufu = None if trips is None else mix["MUFU"] * trips + sum(category(i.opcode) == "MUFU" for i in once)
    return {
        "warps": warps, "regs": regs, "spill_store_bytes": spill_st, "spill_load_bytes": spill_ld, "smem_bytes": smem,
        "ctas_per_sm": ctas, "cta_limit": limit,
        "loops": loops, "loop_instructions": len(body), "once_instructions": len(once),
        "mix": {k: mix.get(k, 0) for k in CATEGORIES},
        "mufu_ex2": exp, "opcodes": dict(Counter(i.opcode for i in body).most_common(12)),
        "tensor_exp_fraction": (mix["HGMMA"] + mix["HMMA"] + exp) / max(1, len(body)),
        "programs": programs, "trips": trips,
        "issue_floor_us": None if issued is None else issued * programs * warps / ISSUE_PER_S * 1e6,
        "mufu_floor_us": None if mufu is None else mufu * 32 * programs * warps / EXP_PER_S * 1e6,
        "loop_global_bytes": moved,
        "loop_global_gb": None if trips is None else (moved * trips + global_bytes(once) * warps) * programs / 1e9,
    }


# ------------------------------------------------------------------------------------------------- ops and rooflines


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Work of one pass of an op: FLOPs (tensor-core products), HBM bytes (each tensor read or written once) and
    exponentials; the floor of each on an H100 SXM5 in µs."""

    flops: float
    bytes: float
    exps: float

    def floors_us(self) -> dict[str, float]:
        return {"tensor": self.flops / TENSOR_FLOPS * 1e6, "hbm": self.bytes / HBM_BYTES_PER_S * 1e6,
                "exp": self.exps / EXP_PER_S * 1e6}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape of an op: ``forward(dtype)`` calls the public op (Triton path) and returns its output and the
    leaves to differentiate; ``roofline(itemsize)`` gives the fwd and bwd work; ``trips`` maps kernel name ->
    f(arguments, grid) = iterations of its inner loop per program (kernels not named get no issue floor)."""

    op: str
    name: str
    forward: Callable[[torch.dtype], tuple[torch.Tensor, list[torch.Tensor]]]
    roofline: Callable[[int], dict[str, Roofline]]
    trips: dict[str, Callable[[dict, tuple], int]]


def _leaves(dtype: torch.dtype, **shapes) -> dict[str, torch.Tensor]:
    """Seeded normal leaves (requires_grad) of the given shapes: name=(shape, std)."""
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randn(*shape, generator=gen) * std).to(dtype).requires_grad_() for k, (shape, std) in
            shapes.items()}


# name, tokens per side, C, heads, spatial dims (2: MONAI's spatial_dims=2 Swin, 7 x 7 windows)
WINDOW_CASES = (("stage1", 64, 48, 3, 3), ("stage2-d32", 32, 192, 6, 3), ("stage1-2d", 56, 48, 3, 2))
WINDOW_DROPOUT = 0.1  # attention dropout of the shifted cases' dropout variant (its own kernels: HAS_DROPOUT)
PATCH_SIDES, PATCH_CHANNELS = (96, 128), 48
GATED_CASES = ((32, 128, 8, 32), (32, 256, 8, 32))  # B, L, H, Dh: bench_gated_attention.PAPER_CASES
MODALITIES = 4  # CCT token groups (as in bench_gated_attention)


def _backward_trips(a: dict, grid: tuple) -> float:
    """Key-loop iterations per program of the window-attention backward: one (key tile, query tile) pair each where
    the query side streams (WINDOWS 0); one key tile each, met by the query tiles held on chip (the key loops of all
    passes over them make one iteration), where it does (WINDOWS 1: a launch per pattern of live query tiles, whose
    programs take its windows), for each of the WPC windows a program takes where it sums dS (BIAS_SUMS)."""
    key_tiles = a["NP"] // a["BN"]
    if a["WINDOWS"] == 0:
        return key_tiles * (a["NP"] // a["BM"])
    return key_tiles * (a["WPC"] if a["BIAS_SUMS"] else 1)


def window_attention_cases() -> list[Case]:
    """Swin stage 1 of the paper config (128^3 input, patch 2: B 2, 64^3 tokens, C 48, 3 heads of 16, 2,000 windows
    of 7^3) unshifted, shifted by 3, and shifted with attention dropout (WINDOW_DROPOUT), a head dim 32 stage
    (32^3 tokens, 6 heads of 32: stage 2 of feature 96) and a 2-D stage (56^2 tokens, 7 x 7 windows, 3 heads of 16);
    MONAI's bias table for the window, the qkv bias as pad_kv, gate logits."""
    import medmap_fast as mf
    from medmap_fast.kernels.window_attn import full_key_tiles as key_tiles

    cases = []
    for stage, tokens, channels, heads, dims in WINDOW_CASES:
        for shift, dropout in ((0, 0.0), (3, 0.0), (3, WINDOW_DROPOUT)):
            def forward(dtype, tokens=tokens, channels=channels, heads=heads, dims=dims, shift=shift, dropout=dropout):
                grid, window = (2, *(tokens,) * dims), (7,) * dims
                x = _leaves(dtype, qkv=((*grid, 3 * channels), 1.0), bias_table=((13**dims, heads), 0.02),
                            pad_kv=((2 * channels,), 0.1), gate_logits=((*grid, heads), 0.5))
                return mf.kernels.window_attention(x["qkv"], heads, window, (shift,) * dims, x["bias_table"],
                                                   table_window=window, pad_kv=x["pad_kv"],
                                                   gate_logits=x["gate_logits"], dropout_p=dropout), list(x.values())

            def roofline(e, tokens=tokens, channels=channels, heads=heads, dims=dims):
                n, d, voxels = 7**dims, channels // heads, 2 * tokens**dims
                windows = 2 * math.ceil(tokens / 7) ** dims
                pairs = windows * heads * n * n  # score entries, padded windows included
                lse = windows * heads * n * 4
                io = voxels * (3 * channels + heads) * e  # qkv and gate logits
                return {"fwd": Roofline(4 * d * pairs, io + voxels * channels * e + lse, pairs),
                        # S recomputed, dV, dP, dK, dQ; reads qkv, gate, out, dout, lse; writes dqkv, dgate
                        "bwd": Roofline(10 * d * pairs, 2 * io + 2 * voxels * channels * e + lse, pairs)}

            drop = f" drop{dropout}" if dropout else ""
            name = f"{stage} B2x{tokens}^{dims} C{channels} h{heads} shift{shift}{drop}"
            cases.append(Case("window_attention", name, forward, roofline,
                              {"_window_attention_fwd": lambda a, g: key_tiles(a["N"], a["BN"]),
                               "_window_attention_bwd": _backward_trips,
                               "_window_attention_bwd_bias": lambda a, g: a["WPC"]}))
    return cases


def patch_embed_cases() -> list[Case]:
    """Two volumes of 96^3 and 128^3 (1 channel, patch 2^3, feature 48, two modalities, no LayerNorm)."""
    import medmap_fast as mf

    cases = []
    for side in PATCH_SIDES:
        def forward(dtype, side=side):
            p = _leaves(dtype, x=((2, 1, side, side, side), 1.0), weight=((2, PATCH_CHANNELS, 1, 2, 2, 2), 8**-0.5),
                        bias=((2, PATCH_CHANNELS), 0.1))
            return mf.kernels.patch_embed_3d(p["x"], p["weight"], p["bias"], torch.arange(2)), list(p.values())

        def roofline(e, side=side):
            positions, k, c = 2 * (side // 2) ** 3, 8, PATCH_CHANNELS
            x, y = 2 * side**3 * e, positions * c * e
            return {"fwd": Roofline(2 * positions * k * c, x + y, 0),
                    "bwd": Roofline(4 * positions * k * c, 2 * x + y, 0)}  # dx and dW; reads x and dy, writes dx

        blocks = lambda a: math.ceil(a["DN"] * a["HN"] * a["WN"] / a["BLOCK_P"])  # noqa: E731
        cases.append(Case("patch_embed_3d", f"V2x1x{side}^3 C{PATCH_CHANNELS}", forward, roofline,
                          {"_patch_embed_fwd_kernel": lambda a, g: 1,
                           "_patch_embed_bwd_kernel": lambda a, g: math.ceil(blocks(a) / g[0])}))
    return cases


def gated_attention_cases() -> list[Case]:
    """The CCT shapes (B 32, L 128 / 256, 8 heads of 32) with key padding (every fourth study misses its second
    modality group), a per-head modality-pair bias and the gate."""
    import medmap_fast as mf

    cases = []
    for b, length, h, dh in GATED_CASES:
        def forward(dtype, b=b, length=length, h=h, dh=dh):
            x = _leaves(dtype, q=((b, length, h, dh), 1.0), k=((b, length, h, dh), 1.0), v=((b, length, h, dh), 1.0),
                        gate_logits=((b, length, h), 1.0))
            bias = _leaves(torch.float32, pair_bias=((h, MODALITIES, MODALITIES), 1.0))["pair_bias"]
            modality = (torch.arange(length) * MODALITIES // length).expand(b, length)
            padding = torch.zeros(b, length, dtype=torch.bool)
            padding[::4] = modality[0] == 1
            out = mf.kernels.gated_attention(x["q"], x["k"], x["v"], padding, bias, modality, modality,
                                             x["gate_logits"])
            return out, [*x.values(), bias]

        def roofline(e, b=b, length=length, h=h, dh=dh):
            pairs, rows = b * h * length * length, b * length * h
            io = rows * (3 * dh + 1) * e + rows * 4  # q, k, v, gate logits; lse
            return {"fwd": Roofline(4 * dh * pairs, io + rows * dh * e, pairs),
                    "bwd": Roofline(10 * dh * pairs, 2 * io + 2 * rows * dh * e, pairs)}

        block = lambda a, size: math.ceil(a[size] / a["BLOCK_N" if size == "LK" else "BLOCK_M"])  # noqa: E731
        cases.append(Case("gated_attention", f"B{b} L{length} h{h} d{dh}", forward, roofline,
                          {"_fwd_kernel": lambda a, g: block(a, "LK"), "_bwd_dq_kernel": lambda a, g: block(a, "LK"),
                           "_bwd_dkdv_kernel": lambda a, g: block(a, "LQ")}))
    return cases


OPS = {"window_attention": window_attention_cases, "patch_embed_3d": patch_embed_cases,
       "gated_attention": gated_attention_cases}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def profile_case(case: Case, dtype: torch.dtype, only: str | None = None) -> tuple[list[dict], list[dict]]:
    """Kernel rows and roofline rows (one per pass) of one case; with ``only``, the rows of that kernel alone (the
    others are compiled, not profiled)."""
    base = {"op": case.op, "case": case.name}
    failure = None
    with compiling_for_sm90() as (launches, phase):
        try:
            out, leaves = case.forward(dtype)
            phase.append("bwd")
            torch.autograd.grad(out, leaves, torch.randn_like(out))
        except Exception as e:  # the op's host code failed: report it, keep the launches compiled before
            failure = _error(e)
    rows = []
    for launch in (launch for launch in launches if only in (None, launch.kernel)):
        row = {**base, "kernel": launch.kernel, "pass": launch.phase, "error": launch.error}
        if launch.error is None:
            try:
                trips = case.trips[launch.kernel](launch.args, launch.grid) if launch.kernel in case.trips else None
            except KeyError:  # the kernel's arguments changed: no issue floor
                trips = None
            try:
                row |= kernel_profile(launch, trips)
            except (subprocess.CalledProcessError, TypeError, AttributeError) as e:
                row["error"] = f"profile failed: {_error(e)}"
        rows.append(row)
    if failure:
        rows.append({**base, "kernel": "(op)", "pass": phase[-1], "error": failure})
    lines = []
    for name, work in case.roofline(dtype.itemsize).items():
        floors = work.floors_us()
        ran = [r for r in rows if r["pass"] == name and not r["error"]]
        issue, mufu, loop_gb = (_total([r.get(k) for r in ran]) for k in ("issue_floor_us", "mufu_floor_us",
                                                                             "loop_global_gb"))
        # the global-memory (L1 / L2) bandwidth the loops would draw if they ran at their issue floor
        drawn = None if issue is None or loop_gb is None else loop_gb / issue * 1e3
        lines.append({**base, "pass": name, "gflop": work.flops / 1e9, "hbm_mb": work.bytes / 1e6,
                      "gexp": work.exps / 1e9, **{f"{k}_floor_us": v for k, v in floors.items()},
                      "floor_us": max(floors.values()), "bound": max(floors, key=floors.get),
                      "issue_floor_us": issue, "mufu_floor_us": mufu, "loop_global_gb": loop_gb,
                      "loop_tb_per_s_at_issue_floor": drawn})
    return rows, lines


def _total(values: list[float | None]) -> float | None:
    """The sum, or None where nothing was summed or a value is unknown."""
    return sum(values) if values and None not in values else None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)) for v in row] for row in rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in [headers, ["---"] * len(headers), *cells])


def render(kernels: list[dict], rooflines: list[dict], dtype: str) -> str:
    """Markdown tables: kernels (resources and inner-loop mix per iteration), then the roofline per op and pass."""
    head = ["op", "case", "kernel", "pass", "warps", "regs", "spill st/ld B", "smem KB", "CTAs/SM", "loop instr",
            "once instr", *CATEGORIES[:2], "MUFU (EX2)", *CATEGORIES[3:], "TC+exp %", "issue floor µs",
            "MUFU floor µs"]
    rows = []
    for r in kernels:
        if r["error"]:
            rows.append([r["op"], r["case"], r["kernel"], r["pass"], f"FAILED: {r['error']}"] + [""] * (len(head) - 5))
            continue
        rows.append([r["op"], r["case"], r["kernel"], r["pass"], r["warps"], r["regs"],
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", round(r["smem_bytes"] / 1024, 1),
                     f"{r['ctas_per_sm']} ({r['cta_limit']})", r["loop_instructions"], r["once_instructions"],
                     r["mix"]["HGMMA"], r["mix"]["HMMA"], f"{r['mix']['MUFU']} ({r['mufu_ex2']})",
                     *list(r["mix"].values())[3:], round(100 * r["tensor_exp_fraction"], 1), r["issue_floor_us"],
                     r["mufu_floor_us"]])
    ops = [[r["op"], r["case"], r["kernel"], ", ".join(f"{k} {v}" for k, v in r["opcodes"].items())]
           for r in kernels if not r["error"]]
    roof = [[r["op"], r["case"], r["pass"], r["gflop"], r["hbm_mb"], r["gexp"], r["tensor_floor_us"],
             r["hbm_floor_us"], r["exp_floor_us"], f"{r['floor_us']:.3g} ({r['bound']})", r["issue_floor_us"],
             r["mufu_floor_us"], r["loop_global_gb"], r["loop_tb_per_s_at_issue_floor"]] for r in rooflines]
    return "\n\n".join([
        f"sm_90 static profile, {dtype}: inner-loop instructions per iteration (window attention: fwd per key tile, "
        "bwd per key tile: its pass over the window's query tiles held on chip, or one (key tile, query tile) pair where "
        "the query side streams; bias kernel per window) and the kernel's other instructions (once instr)",
        _table(head, rows),
        "Most frequent opcodes of each inner loop",
        _table(["op", "case", "kernel", "opcodes per iteration"], ops),
        f"Roofline on an H100 SXM5 ({TENSOR_FLOPS / 1e12:.1f} TFLOP/s dense, {HBM_BYTES_PER_S / 1e12:.2f} TB/s, "
        f"{EXP_PER_S / 1e12:.2f} T exp2/s); issue floor: the pass's kernels (inner loops x trips, other instructions "
        "once) at 4 warp-instructions per SM per clock; MUFU floor: their MUFU instructions (every exp they compute, "
        "padding included, and the other special functions) at 16 results per SM per clock; global GB: what those "
        "instructions read and write in global memory (L1 / L2 / HBM), every lane active, and the TB/s that takes at "
        "the issue floor",
        _table(["op", "case", "pass", "GFLOP", "HBM MB", "G exp", "tensor µs", "HBM µs", "exp µs", "floor µs",
                "issue floor µs", "MUFU floor µs", "global GB", "TB/s at issue floor"], roof),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--cases", help="only the cases whose name this regular expression matches (re.search)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if reason := nvidia_tools_missing():
        print(f"cannot compile for sm_90: {reason}", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels import: real JITFunctions, not the interpreter's
    kernels, rooflines = [], []
    for op in args.kernels:
        try:
            op_cases = OPS[op]()
        except Exception as e:
            kernels.append({"op": op, "case": "", "kernel": "(cases)", "pass": "", "error": _error(e)})
            continue
        for case in (c for c in op_cases if args.cases is None or re.search(args.cases, c.name)):
            rows, lines = profile_case(case, DTYPES[args.dtype])
            kernels += rows
            rooflines += lines
    print(render(kernels, rooflines, args.dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "kernels": kernels, "rooflines": rooflines}, f, indent=1)
    return 1 if any(r["error"] for r in kernels) else 0


# ------------------------------------------------------------------------------------------------------------ test


def test_inner_loop_picks_the_tensor_core_loop():
    """Of a short loop without MMA (a CAS retry), the loop holding the HGMMA and the trap branch to itself, the
    tensor-core loop is the inner loop; the categories count it; the set-up and the exit run once."""
    sass = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   IMAD.MOV.U32 R1, RZ, RZ, R0 ;
        /*0020*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   MUFU.EX2 R3, R2 ;
        /*0040*/               @P0 ATOMG.E.CAS.STRONG.GPU PT, R5, [R6], R4, R5 ;
        /*0050*/               @P1 BRA 0x40 ;
        /*0060*/                   ISETP.GE.AND P2, PT, R1, 0x5, PT ;
        /*0070*/              @!P2 BRA 0x20 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
    """
    body, loops = inner_loop(parse_sass(sass))
    assert loops == 2 and [i.address for i in body] == list(range(0x20, 0x80, 0x10))
    assert [i.address for i in once_code(parse_sass(sass), body)] == [0x0, 0x10, 0x80]  # not the trap branch
    assert Counter(category(i.opcode) for i in body) == {"HGMMA": 1, "MUFU": 1, "atomic": 1, "other": 2,
                                                          "integer": 1}


def test_inner_loops_are_the_innermost_tensor_core_loops():
    """A loop nested in an outer one counts alone (the outer's other instructions are not per iteration); two
    loops one after the other (the key loops of two passes over a window's query tiles) count together."""
    sass = """
        /*0000*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0010*/                   MUFU.EX2 R3, R2 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0040*/               @P1 BRA 0x0 ;
        /*0050*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0060*/               @P2 BRA 0x50 ;
        /*0070*/                   EXIT ;
    """
    body, loops = inner_loop(parse_sass(sass))
    assert loops == 3 and [i.address for i in body] == [0x0, 0x10, 0x20, 0x50, 0x60]



def test_global_bytes_reads_each_width():
    """A warp's global traffic: 16-byte loads and asynchronous copies, a 2-byte load, a default 4-byte store and
    atomic; shared-memory and constant loads are not global."""
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR6][R2.64] ;
        /*0020*/               @P0 LDG.E.U16 R8, desc[UR6][R2.64] ;
        /*0030*/                   STG.E desc[UR6][R2.64], R5 ;
        /*0040*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R7 ;
        /*0050*/                   LDS.128 R12, [R9] ;
        /*0060*/                   LDC R1, c[0x0][0x28] ;
    """
    assert global_bytes(parse_sass(sass)) == 32 * (16 + 16 + 2 + 4 + 4)


if __name__ == "__main__":
    sys.exit(main())
