"""Building blocks of :class:`~medmap_fast.models.swin3d.SwinViT3D`, key-compatible with MONAI 1.6.1's Swin layers.

Every module works on channels-last tokens ``[B, D, H, W, C]``; the attribute names (and hence ``state_dict`` keys)
are MONAI's, so MONAI checkpoints load unchanged. The attention itself is :func:`medmap_fast.kernels.window_attention`
(padding, cyclic shift, windows, relative-position bias and shift mask happen inside the op), the patch embedding is
:func:`medmap_fast.kernels.patch_embed_3d`.

A 2-D Swin (MONAI's ``spatial_dims=2``) runs as a 3-D one of depth 1: tokens ``[B, H, W, 1, C]``, windows (wh, ww, 1),
shifts (sh, sw, 0) (:func:`unit_depth`), so one code path serves both. Only what MONAI stores or calls in 2-D
shapes is 2-D: the patch-embedding weight [C, Cin, ph, pw], the patch merging (its 2-D channel order, called on
[B, H, W, C] as MONAI's is) and the swinunetr-v2 convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medmap_fast.kernels import patch_embed_3d, window_attention
from medmap_fast.kernels.window_attn import relative_position_index, triple
from medmap_fast.validation import fail

from .gating import ModalityGate

Triple = tuple[int, int, int]


def unit_depth(values: Sequence[int], unit: int) -> Triple:
    """A 3-D window, shift or patch as it is; a 2-D one (MONAI's spatial_dims=2) with a unit last axis ``unit`` (1 for
    a window or patch, 0 for a shift): 2-D Swins run as volumes of depth 1. The relative-position index of a
    (wh, ww, 1) window is MONAI's 2-D one (the last axis adds 0)."""
    return triple([*values, unit][:3])


def effective_window(size: Sequence[int], window: Triple, shift: Triple) -> tuple[Triple, Triple]:
    """MONAI's ``get_window_size``: an axis no longer than the window uses the whole axis as window and no shift."""
    win = triple([s if s <= w else w for s, w in zip(size, window, strict=True)])
    sh = triple([0 if s <= w else k for s, w, k in zip(size, window, shift, strict=True)])
    return win, sh


class DropPath(nn.Module):
    """Stochastic depth per sample (timm / MONAI semantics, scaled by the keep probability)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob: expected a probability in [0, 1], got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if keep > 0.0 else mask)


class Mlp(nn.Module):
    """Swin MLP ``linear2(drop(gelu(linear1(x))))`` with MONAI's ``MLPBlock`` names (one dropout, "swin" mode)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = self.drop1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class WindowAttention3D(nn.Module):
    """qkv Linear -> shifted-window attention op -> output projection, on normalised tokens [B, D, H, W, C].

    ``relative_position_index`` is kept as a buffer only so MONAI checkpoints keep their keys; the op rebuilds the
    index from ``window_size`` (the configured window, which is also the table's window). ``attn_drop`` is MONAI's
    attention dropout: its p goes to the op while the module trains (in eval mode the op gets 0).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Triple,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of the stage width {dim}, got {num_heads}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.scale = (dim // num_heads) ** -0.5  # MONAI's attribute: patch_monai carries a MONAI module's value over
        rows = math.prod(2 * w - 1 for w in window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size, window_size).clone())
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)  # MONAI's child (no parameters, so no state_dict keys)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(
        self, x: torch.Tensor, window: Triple, shift: Triple, gate_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, D, H, W, C] (after norm1), effective window/shift, gate_logits [B, D, H, W, heads] -> same as x."""
        qkv = self.qkv(x)
        pad_kv = None if self.qkv.bias is None else self.qkv.bias[self.dim :]  # MONAI pads before the qkv Linear
        out = window_attention(
            qkv,
            self.num_heads,
            window,
            shift,
            self.relative_position_bias_table,
            table_window=self.window_size,
            pad_kv=pad_kv,
            gate_logits=gate_logits,
            scale=self.scale,
            dropout_p=self.attn_drop.p if self.attn_drop.training else 0.0,  # nn.Dropout's own rule, as MONAI's
        )
        return self.proj_drop(self.proj(out))


class SwinBlock3D(nn.Module):
    """One (shifted-)window Swin block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, channels-last.

    With ``num_modalities`` set, a zero-initialised :class:`ModalityGate` scales attention head h of a token of
    modality m by ``2 * sigmoid(norm1(x) . Wg[m, :, h] + bg[m, h])`` (exactly 1 at initialisation).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Triple,
        shift_size: Triple,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        use_checkpoint: bool = False,
        num_modalities: int | None = None,
    ) -> None:
        super().__init__()
        self.window_size, self.shift_size, self.use_checkpoint = window_size, shift_size, use_checkpoint
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention3D(dim, num_heads, window_size, qkv_bias, drop, attn_drop)
        # nn.Module, not the classes built here: MonaiSwinBlock holds MONAI's DropPath and MLPBlock in these slots
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gate = None if num_modalities is None else ModalityGate(num_modalities, dim, num_heads)

    def _attention(self, x: torch.Tensor, modality_ids: torch.Tensor | None) -> torch.Tensor:
        window, shift = effective_window(x.shape[1:4], self.window_size, self.shift_size)
        x = self.norm1(x)
        logits = None
        if self.gate is not None:
            if modality_ids is None:
                fail("modality_ids", "a [B] tensor of modality ids (the block is modality-gated)", "None")
            logits = self.gate(x, modality_ids.view(-1, 1, 1, 1))
        return self.attn(x, window, shift, logits)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, D, H, W, C]; modality_ids [B] long (needed only with a gate) -> [B, D, H, W, C]."""
        if self.use_checkpoint:
            x = x + self.drop_path(checkpoint(self._attention, x, modality_ids, use_reentrant=False))
            return x + self.drop_path(checkpoint(self._mlp, x, use_reentrant=False))
        x = x + self.drop_path(self._attention(x, modality_ids))
        return x + self.drop_path(self._mlp(x))


class PatchMerging3D(nn.Module):
    """MONAI's ``PatchMergingV2`` on channels-last tokens: pad odd sides, concatenate the 8 voxels of every 2x2x2
    block along channels (raster order of the offsets), LayerNorm(8C), Linear(8C -> 2C, no bias). With
    ``spatial_dims=2`` (MONAI's API: called on [B, H, W, C]) the 4 pixels of every 2x2 block, the H offset fastest
    (MONAI's 2-D order, the same for both MONAI mergings), LayerNorm(4C), Linear(4C -> 2C)."""

    offsets: tuple[tuple[int, ...], ...] = tuple((i, j, k) for i in range(2) for j in range(2) for k in range(2))
    offsets_2d: tuple[tuple[int, ...], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            fail("spatial_dims", "2 or 3", repr(spatial_dims))
        self.dim, self.spatial_dims = dim, spatial_dims
        blocks = 2**spatial_dims
        self.reduction = nn.Linear(blocks * dim, 2 * dim, bias=False)
        self.norm = norm_layer(blocks * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W, C] -> [B, ceil(D/2), ceil(H/2), ceil(W/2), 2C]; 2-D: [B, H, W, C] -> [B, ceil(H/2),
        ceil(W/2), 2C]."""
        sides = x.shape[1:-1]
        if any(s % 2 for s in sides):
            x = F.pad(x, [0, 0] + [p for s in reversed(sides) for p in (0, s % 2)])
        offsets = self.offsets if self.spatial_dims == 3 else self.offsets_2d
        x = torch.cat([x[(slice(None), *(slice(o, None, 2) for o in offset))] for offset in offsets], -1)
        return self.reduction(self.norm(x))


class PatchMergingV1(PatchMerging3D):
    """MONAI 1.6.1's ``PatchMerging`` ("merging", the v0.9 layer): the same as v2 with the 8 offsets in another order
    (in 2-D it is v2: MONAI's PatchMerging hands 4-D tokens to PatchMergingV2).

    MONAI 1.6.1 takes each of the 8 offsets once (no duplicated slice); this order is reproduced for weight parity.
    """

    offsets = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


MERGING = {"merging": PatchMergingV1, "mergingv2": PatchMerging3D}


class PatchProjection(nn.Module):
    """The patch-embedding weights: ``weight`` [C, Cin, p, p, p] and ``bias`` [C] (a Conv3d's, MONAI's keys; a 2-D
    ``patch_size`` gives a Conv2d's [C, Cin, p, p]), or with ``num_modalities`` M one set per modality, ``weight``
    [M, C, Cin, p, p, p] and ``bias`` [M, C]."""

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: Sequence[int], num_modalities: int | None = None
    ) -> None:
        super().__init__()
        lead = () if num_modalities is None else (num_modalities,)
        self.weight = nn.Parameter(torch.empty(*lead, embed_dim, in_chans, *patch_size))
        self.bias = nn.Parameter(torch.empty(*lead, embed_dim))
        with torch.no_grad():
            for i in range(num_modalities or 1):  # each slot initialised like its own Conv3d
                conv_init(
                    self.weight.view(-1, *self.weight.shape[-2 - len(patch_size) :])[i],
                    self.bias.view(-1, embed_dim)[i],
                )


def conv_init(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """PyTorch's default Conv/Linear initialisation (Kaiming-uniform, a = sqrt(5)) applied in place."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight[0].numel())
    nn.init.uniform_(bias, -bound, bound)


class PatchEmbed3D(nn.Module):
    """Per-modality 3D patch embedding to channels-last tokens (MONAI ``PatchEmbed`` keys: ``proj``, ``norm``); a 2-D
    ``patch_size`` embeds 2-D images as tokens of depth 1."""

    def __init__(
        self,
        patch_size: Sequence[int],
        in_chans: int,
        embed_dim: int,
        norm_layer: type[nn.Module] | None = None,
        num_modalities: int | None = None,
    ) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.proj = PatchProjection(in_chans, embed_dim, patch_size, num_modalities)
        self.norm = None if norm_layer is None else norm_layer(embed_dim)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Cin, D, H, W], modality_ids [B] -> [B, ceil(D/p), ceil(H/p), ceil(W/p), C]; 2-D: x [B, Cin, H, W]
        -> [B, ceil(H/p), ceil(W/p), 1, C]."""
        out = self._embed(x, modality_ids)
        return out.unsqueeze(3) if x.ndim == 4 else out

    def _embed(self, x: torch.Tensor, modality_ids: torch.Tensor | None) -> torch.Tensor:
        norm = self.norm
        if isinstance(norm, nn.LayerNorm):  # fused into the op
            return patch_embed_3d(
                x,
                self.proj.weight,
                self.proj.bias,
                modality_ids,
                layer_norm=True,
                ln_weight=norm.weight,
                ln_bias=norm.bias,
                eps=norm.eps,
            )
        out = patch_embed_3d(x, self.proj.weight, self.proj.bias, modality_ids)
        return out if norm is None else norm(out)


class ConvResBlock(nn.Module):
    """MONAI's ``UnetrBasicBlock(kernel_size=3, stride=1, norm_name="instance", res_block=True)`` with equal in/out
    channels (the swinunetr-v2 block before each stage), on channels-last tokens, with MONAI's keys
    (``layer.conv1.conv.weight``, ``layer.conv2.conv.weight``); 2-D (``spatial_dims=2``) with MONAI's 2-D convolutions
    and instance norms."""

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.layer = _UnetResLayer(channels, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W, C] -> [B, D, H, W, C] (2-D: [B, H, W, 1, C]); the convolutions see a channels-last
        [B, C, D, H, W] (2-D: [B, C, H, W]) view."""
        if self.spatial_dims == 2:
            return self.layer(x.squeeze(3).movedim(-1, 1)).movedim(1, -1).unsqueeze(3)
        return self.layer(x.movedim(-1, 1)).movedim(1, -1)


class _UnetResLayer(nn.Module):
    """conv3 -> instance norm -> leaky ReLU -> conv3 -> instance norm, + identity, leaky ReLU (MONAI UnetResBlock)."""

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        self.conv1 = _Convolution(channels, spatial_dims)
        self.conv2 = _Convolution(channels, spatial_dims)
        self.norm1 = norm(channels)
        self.norm2 = norm(channels)
        self.lrelu = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(out)) + x)


class _Convolution(nn.Module):
    """A bias-free 3x3x3 Conv3d (3x3 Conv2d in 2-D) stored under ``conv`` (MONAI's ``Convolution`` wrapper)."""

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
