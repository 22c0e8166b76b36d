"""Shifted-window attention as a MONAI Swin block runs it, with the attention done by each contender on the same
inputs: x [B, D, H, W, C] (the normalised tokens) -> out [B, D, H, W, C], through one MONAI ``WindowAttention``'s
weights (qkv Linear with bias, relative-position bias table, output projection), so every row computes the same
function of the same leaves (x and those weights). 2-D problems (MONAI's spatial_dims=2: x [B, H, W, C], 7 x 7
windows, MONAI's 2-D block) run the same rows; the op takes them as 2-D (a unit last axis inside).

Rows (name -> what it runs; the shift mask and window geometry are built once, outside the timed region, for all):
  MONAI eager           ``SwinTransformerBlock.forward_part1`` (norm = identity): pad, roll, ``window_partition``,
                        MONAI's ``WindowAttention`` (explicit scores + bias + mask, softmax, @ v), reverse, roll, crop
  MONAI flash           the same with ``use_flash_attention=True``: SDPA with bias + mask copied per window of every
                        batch element; MONAI applies it only with autograd off, so forward rows only
  SDPA                  the same pipeline; windows grouped by shift-mask class (interior, and the last window along
                        each shifted axis: at most 8 classes), one SDPA call per class with its mask [1, heads, n, n]
                        broadcast over the batch and the class's windows (no per-batch or per-window mask copy)
  FlexAttention         one sequence of all windows per batch element, a block mask for the windows and a
                        ``score_mod`` adding the bias and the shift mask (region ids per token); the whole attention
                        compiled with ``torch.compile``
  xformers              ``memory_efficient_attention`` on [B*nW, n, heads, d] with the bias + mask expanded to
                        [B*nW, heads, n, n] (xformers needs the full shape to return the bias gradient), rows padded
                        to a multiple of 8 elements as it requires; CUDA only
  op (torch) / op (triton)  ``medmap_fast.kernels.window_attention`` on the qkv Linear's output, pad_kv = the qkv
                        bias of k and v (what MONAI's zero padding before the Linear gives), then the projection
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import medmap_fast as mf

MONAI, MONAI_FLASH, SDPA, FLEX, XFORMERS = ("MONAI WindowAttention eager", "MONAI WindowAttention flash",
                                            "SDPA broadcast mask", "FlexAttention compiled",
                                            "xformers mem-efficient")
OP_TORCH, OP_TRITON = "op (torch backend)", "op (triton)"
ROWS = (MONAI, MONAI_FLASH, SDPA, FLEX, XFORMERS, OP_TORCH, OP_TRITON)
REFERENCE = SDPA  # the same-dtype reference of the flash rule (fp32 softmax inside SDPA, as flash kernels keep)
WINDOW = 7  # the window side: 7^3 (3-D) or 7^2 (2-D) tokens
Rows = dict[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclasses.dataclass
class Problem:
    """One case: x [B, t, t, t, C] (2-D: [B, t, t, C]; a leaf), a MONAI Swin block (norm = identity, qkv bias)
    holding the weights, its copy with ``use_flash_attention=True`` and the shift mask [nW, n, n] (None when
    unshifted)."""

    x: torch.Tensor
    block: nn.Module
    flash_block: nn.Module
    shift: tuple[int, ...]
    mask: torch.Tensor | None

    @property
    def window(self) -> tuple[int, ...]:
        """The window, (7, 7, 7) or (7, 7)."""
        return (WINDOW,) * len(self.shift)

    @property
    def dims(self) -> int:
        return len(self.shift)

    def unit_depth(self) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
        """Token grid, window and shift as the op runs them: 3-D, a 2-D problem with a unit last axis."""
        pad = 3 - self.dims
        return ((*self.x.shape[1:-1], *(1,) * pad), (*self.window, *(1,) * pad),  # type: ignore[return-value]
                (*self.shift, *(0,) * pad))

    @property
    def attn(self) -> nn.Module:
        return self.block.attn

    def leaves(self) -> list[torch.Tensor]:
        """What fwd+bwd differentiates: x and the attention's weights (shared by every row but MONAI flash)."""
        return [self.x, *self.attn.parameters()]

    def to(self, dtype: torch.dtype) -> Problem:
        """The same problem in ``dtype`` (float64 for the exact run of the flash rule), fresh leaves."""
        block, flash = copy.deepcopy(self.block).to(dtype), copy.deepcopy(self.flash_block).to(dtype)
        x = self.x.detach().to(dtype).requires_grad_()
        return Problem(x, block, flash, self.shift, None if self.mask is None else self.mask.to(dtype))


def make_problem(batch: int, tokens: int, channels: int, heads: int, shift: int, device: str,
                 dtype: torch.dtype, seed: int = 0, dims: int = 3) -> Problem:
    """A case of ``tokens``^dims tokens (dims 3, or 2 for MONAI's 2-D Swin), ``channels`` channels, ``heads`` heads,
    shift 0 or 3 (tokens >= 7)."""
    from monai.networks.nets.swin_unetr import SwinTransformerBlock, compute_mask

    if tokens < WINDOW:
        raise ValueError(f"tokens {tokens} < window {WINDOW} (MONAI would shrink the window: not benched)")
    torch.manual_seed(seed)
    shifts, window = (shift,) * dims, (WINDOW,) * dims
    block = SwinTransformerBlock(channels, heads, window, shifts, qkv_bias=True, norm_layer=nn.Identity)
    with torch.no_grad():  # MONAI initialises the qkv bias to zero: a non-zero one exercises the padded keys
        block.attn.qkv.bias.normal_(0.0, 0.1)
    flash = copy.deepcopy(block)
    flash.attn.use_flash_attention = True
    block, flash = block.to(device, dtype), flash.to(device, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *(tokens,) * dims, channels, generator=gen).to(device, dtype).requires_grad_()
    padded = [math.ceil(tokens / w) * w for w in window]
    mask = compute_mask(padded, window, shifts, device).to(dtype) if shift else None
    return Problem(x, block, flash, shifts, mask)


def swin_windows(x: torch.Tensor, core: Callable[[torch.Tensor], torch.Tensor], shift) -> torch.Tensor:
    """MONAI's path around the attention: pad with zeros, roll by -shift, partition into windows [B, nd, nh, nw, n,
    C] (2-D: [B, nh, nw, n, C]), ``core`` (same shape out), reverse, roll back, crop."""
    from monai.networks.nets.swin_unetr import window_partition, window_reverse

    b, *size, c = x.shape
    dims, window = len(size), (WINDOW,) * len(size)
    pads = [(-s) % k for s, k in zip(size, window)]
    x = F.pad(x, [0, 0] + [p for pad in reversed(pads) for p in (0, pad)])
    padded = x.shape[1:-1]
    axes = tuple(range(1, dims + 1))
    if any(shift):
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
    counts = [p // k for p, k in zip(padded, window)]
    out = core(window_partition(x, window).view(b, *counts, -1, c))
    out = window_reverse(out.reshape(-1, *window, c), window, [b, *padded])
    if any(shift):
        out = torch.roll(out, shifts=tuple(shift), dims=axes)
    return out[(slice(None), *(slice(s) for s in size))]


def bias_of(attn: nn.Module) -> torch.Tensor:
    """The relative-position bias [heads, n, n] gathered from the table as MONAI's forward does (differentiable)."""
    n = math.prod(attn.window_size)
    index = attn.relative_position_index[:n, :n].reshape(-1)
    return attn.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)


def split_qkv(windows: torch.Tensor, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """windows [..., n, C] -> q, k, v [..., n, heads, d] (views of the qkv Linear's output)."""
    qkv = F.linear(windows, attn.qkv.weight, attn.qkv.bias)
    return qkv.unflatten(-1, (3, attn.num_heads, -1)).unbind(-3)


def mask_classes(mask: torch.Tensor | None, counts) -> list[tuple[tuple[slice, ...], torch.Tensor | None]]:
    """Groups of windows sharing one shift mask: (slices over the [nd, nh, nw] (2-D: [nh, nw]) window grid, mask
    [n, n] or None).

    Along a shifted axis only the last window straddles regions of the rolled grid, and its pattern is the same
    for every such window: interior / last per axis gives at most 8 classes (4 in 2-D; one, maskless, when
    unshifted)."""
    if mask is None:
        return [((slice(None),) * len(counts), None)]
    grid = mask.view(*counts, *mask.shape[-2:])
    per_axis = [[s for s in (slice(0, c - 1), slice(c - 1, c)) if s.start < s.stop] for c in counts]
    classes = []
    for slices in itertools.product(*per_axis):
        m = grid[tuple(s.start for s in slices)]
        classes.append((slices, m if bool(m.any()) else None))
    return classes


def sdpa_row(p: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """SDPA per mask class, the class's mask [1, heads, n, n] broadcast over its windows and the batch."""
    attn = p.attn

    def core(windows: torch.Tensor) -> torch.Tensor:  # [B, nd, nh, nw, n, C]
        bias = bias_of(attn).to(windows.dtype)
        out = torch.empty_like(windows)
        for slices, cmask in mask_classes(p.mask, windows.shape[1 : 1 + p.dims]):
            part = windows[(slice(None), *slices)]
            q, k, v = (t.flatten(0, p.dims).transpose(1, 2) for t in split_qkv(part, attn))  # [m, heads, n, d]
            mask = bias if cmask is None else bias + cmask
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=attn.scale)
            out[(slice(None), *slices)] = o.transpose(1, 2).reshape(part.shape)
        return F.linear(out, attn.proj.weight, attn.proj.bias)

    return lambda x: swin_windows(x, core, p.shift)


def flex_row(p: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """FlexAttention over [B, heads, nW*n, d]: block mask = same window; score_mod adds bias[h, i % n, j % n] and
    -100 across regions of the rolled grid; ``flex_attention`` compiled (compiling the code around it too fails on
    the CPU: Inductor's CPU template wants the score_mod's tensors as graph inputs)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attn, n = p.attn, math.prod(p.window)
    length = n * math.prod(math.ceil(s / k) for s, k in zip(p.x.shape[1:-1], p.window))
    # region of every token as the first token of its window in the same region: within a window (all the block
    # mask lets through), equal ids <=> mask 0
    region = None if p.mask is None else (p.mask == 0).int().argmax(-1).reshape(-1)
    # compiled: built eagerly, the block mask would materialise [nW*n, nW*n] index tensors (TiB at stage 1)
    block_mask = create_block_mask(lambda b, h, i, j: i // n == j // n, None, None, length, length,
                                   device=p.x.device, _compile=True)

    def core(windows: torch.Tensor) -> torch.Tensor:  # [B, nd, nh, nw, n, C]
        bias = bias_of(attn).to(windows.dtype)

        def score_mod(score, b, h, i, j):
            score = score + bias[h, i % n, j % n]
            if region is None:
                return score
            return score + torch.where(region[i] == region[j], 0.0, -100.0).to(score.dtype)

        q, k, v = (t.reshape(windows.shape[0], length, attn.num_heads, -1).transpose(1, 2)
                   for t in split_qkv(windows, attn))
        o = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=attn.scale)
        return F.linear(o.transpose(1, 2).reshape(windows.shape), attn.proj.weight, attn.proj.bias)

    compiled = torch.compile(flex_attention, dynamic=False)  # static per shape: 2-D and 3-D cases share a process
    return lambda x: swin_windows(x, core, p.shift)


def xformers_row(p: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """xformers memory_efficient_attention with the bias + mask expanded to [B*nW, heads, n, n] (8-aligned rows)."""
    from xformers.ops import memory_efficient_attention

    attn = p.attn

    def core(windows: torch.Tensor) -> torch.Tensor:  # [B, nd, nh, nw, n, C]
        b, n = windows.shape[0], windows.shape[-2]
        nw = math.prod(windows.shape[1 : 1 + p.dims])
        bias = bias_of(attn).to(windows.dtype)[None]
        if p.mask is not None:
            bias = bias + p.mask[:, None]  # [nW, heads, n, n]
        full = F.pad(bias.expand(b, nw, *bias.shape[1:]), (0, (-n) % 8))  # materialised, rows 8-aligned
        q, k, v = (t.flatten(0, p.dims) for t in split_qkv(windows, attn))  # [B*nW, n, heads, d]
        o = memory_efficient_attention(q, k, v, attn_bias=full.flatten(0, 1)[..., :n], scale=attn.scale)
        return F.linear(o.reshape(windows.shape), attn.proj.weight, attn.proj.bias)

    return lambda x: swin_windows(x, core, p.shift)


def op_row(p: Problem, backend: str, dropout_p: float = 0.0,
           attention: Callable[..., torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The public op on ``backend`` between the same qkv Linear and projection, with attention dropout
    ``dropout_p``; or ``attention``, a 3-D function with the op's signature (a window_attn path), which gets a 2-D
    problem with the unit last axis the op adds."""
    attn = p.attn
    c = p.x.shape[-1]
    _, window, shift = p.unit_depth() if attention else (None, p.window, p.shift)
    attend = attention or mf.kernels.window_attention

    def run(x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
        if attention and p.dims == 2:
            qkv = qkv.unsqueeze(3)
        with mf.kernels.backend(backend):
            out = attend(qkv, attn.num_heads, window, shift, attn.relative_position_bias_table,
                         table_window=window, pad_kv=attn.qkv.bias[c:], dropout_p=dropout_p)
        return F.linear(out.view(*x.shape[:-1], -1), attn.proj.weight, attn.proj.bias)

    return run


def unavailable(name: str, device: str, passes: str) -> str | None:
    """Why ``name`` cannot run here (None when it can)."""
    if name == XFORMERS and device != "cuda":
        return "xformers' memory_efficient_attention needs a CUDA GPU (its CPU build has no attention kernels)"
    if name == OP_TRITON and device != "cuda":
        return "the Triton kernel is timed on a CUDA GPU only (on the CPU it runs in the interpreter)"
    if name == MONAI_FLASH and passes != "fwd":
        return "MONAI applies use_flash_attention only with autograd off (fwd+bwd runs its eager path)"
    if name == FLEX and passes != "fwd" and device != "cuda":
        return f"FlexAttention has no CPU backward in torch {torch.__version__} (NotImplementedError)"
    return None


def rows(p: Problem, names=ROWS, passes: str = "fwd") -> tuple[Rows, dict[str, str]]:
    """name -> f(x) for the ``names`` that can run here, and name -> reason for those that cannot."""
    builders = {MONAI: lambda: (lambda x: p.block.forward_part1(x, p.mask)),
                MONAI_FLASH: lambda: (lambda x: p.flash_block.forward_part1(x, p.mask)),
                SDPA: lambda: sdpa_row(p), FLEX: lambda: flex_row(p), XFORMERS: lambda: xformers_row(p),
                OP_TORCH: lambda: op_row(p, "torch"), OP_TRITON: lambda: op_row(p, "triton")}
    device = p.x.device.type
    skipped = {name: reason for name in names if (reason := unavailable(name, device, passes))}
    return {name: builders[name]() for name in names if name not in skipped}, skipped


def step(fn: Callable[[torch.Tensor], torch.Tensor], p: Problem, dout: torch.Tensor | None
         ) -> Callable[[], list[torch.Tensor]]:
    """A call of the forward with autograd off (dout None), or of forward + backward to every leaf: the output and
    the gradients, as a list."""
    leaves = p.leaves()

    def run() -> list[torch.Tensor]:
        if dout is None:
            with torch.no_grad():
                return [fn(p.x)]
        out = fn(p.x)
        return [out, *torch.autograd.grad(out, leaves, dout)]

    return run
