"""``SwinViT3D``: MONAI's Swin transformer trunk (SwinUNETR's ``swinViT``) on medmap-fast's ops, modality-aware.

Same constructor arguments and ``state_dict`` keys as ``monai.networks.nets.swin_unetr.SwinTransformer`` (MONAI
1.6.1), so MONAI checkpoints load as they are, and the same outputs, in 3-D and (``spatial_dims=2``) 2-D. Differences
are internal: tokens stay channels-last ``[B, D, H, W, C]`` from the patch embedding to the last stage (no permute
round trips; a 2-D trunk runs as one of depth 1, ``[B, H, W, 1, C]``), the patch embedding and the shifted-window
attention are :mod:`medmap_fast.kernels` ops (Triton on GPU, SDPA-based PyTorch elsewhere), and two keyword-only
extras make the trunk modality-aware (see :class:`SwinViT3D`). MONAI is not imported at runtime;
:meth:`SwinViT3D.from_monai` only reads a MONAI module's attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medmap_fast.kernels.window_attn import triple
from medmap_fast.validation import check_index, check_volumes, fail

from .monai_compat import load_monai_state, monai_config, monai_state_dict
from .swin_layers import MERGING, ConvResBlock, PatchEmbed3D, SwinBlock3D, Triple, unit_depth

# MONAI arguments that select features medmap-fast does not implement, with the value that keeps them off.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "use_hyena": False,
    "hyena_stages": None,
    "hyena_kernel_size": 3,
    "hyena_kernel_mlp_dim": 32,
    "hyena_kernel_layers": 3,
    "hyena_mask_max_attenuation": 0.95,
    "hyena_fft_padding": "circular",
    "hyena_grid_type": "single",
    "hyena_use_chunked_fft": False,
    "hyena_use_fft_short_conv": False,
    "hyena_omega_0": 10.0,
    "hyena_l_cache": 32,
    "hyena_short_conv_fft_chunks": 0,
}


def as_spatial(value: int | Sequence[int], name: str, spatial_dims: int = 3) -> tuple[int, ...]:
    """An int or a ``spatial_dims``-sequence of positive ints as a ``spatial_dims``-tuple (MONAI's ensure_tuple_rep)."""
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(values) != spatial_dims or not all(isinstance(v, int) and v > 0 for v in values):
        fail(name, f"a positive int or {spatial_dims} positive ints", repr(value))
    return values


def as_triple(value: int | Sequence[int], name: str) -> Triple:
    """An int or a 3-sequence of positive ints as a 3-tuple."""
    return triple(as_spatial(value, name, 3))


class SwinStage(nn.Module):
    """MONAI's ``BasicLayer``: ``depth`` Swin blocks (every second one shifted by half a window), then downsampling.

    ``window_size`` is 3-D; a 2-D stage (``spatial_dims=2``) has the window (wh, ww, 1) and runs on [B, H, W, 1, C]
    tokens, its downsampling module on [B, H, W, C] (MONAI's 2-D API)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Triple,
        drop_path: Sequence[float],
        downsample: type[nn.Module] | None,
        norm_layer: type[nn.Module],
        spatial_dims: int = 3,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.window_size, self.spatial_dims = window_size, spatial_dims
        self.shift_size = triple([w // 2 for w in window_size])
        self.blocks = nn.ModuleList(
            SwinBlock3D(
                dim,
                num_heads,
                window_size,
                self.shift_size if i % 2 else (0, 0, 0),
                drop_path=drop_path[i],
                norm_layer=norm_layer,
                **block_kwargs,
            )
            for i in range(depth)
        )
        self.downsample = (
            None if downsample is None else downsample(dim=dim, norm_layer=norm_layer, spatial_dims=spatial_dims)
        )

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D, H, W, C] -> [B, D', H', W', C'] (halved sides, doubled channels when downsampling; 2-D: D = 1)."""
        for block in self.blocks:
            x = block(x, modality_ids)
        if self.downsample is None:
            return x
        if self.spatial_dims == 2:  # MONAI's 2-D downsampling takes [B, H, W, C]
            return self.downsample(x.squeeze(3)).unsqueeze(3)
        return self.downsample(x)


class SwinViT3D(nn.Module):
    """Swin-ViT trunk, 3-D or 2-D, a drop-in for MONAI's ``SwinTransformer`` (same arguments, keys and outputs).

    Args (MONAI's): in_chans, embed_dim, window_size, patch_size, depths, num_heads, mlp_ratio, qkv_bias,
        drop_rate, attn_drop_rate (attention dropout in training, inside the fused op), drop_path_rate, norm_layer,
        patch_norm, use_checkpoint (activation checkpointing of both halves of every block), spatial_dims (3, or 2:
        images [B, Cin, H, W], 2-D windows and patches, MONAI's 2-D keys and shapes; run as 3-D of depth 1),
        downsample ("merging" = MONAI's v0.9 ``PatchMerging``, "mergingv2", or a module class with MONAI's
        ``PatchMerging`` API), use_v2 (a residual conv block before each stage), use_flash_attention (accepted for
        compatibility; the attention always runs fused). The ``use_hyena``/``hyena_*`` options raise
        NotImplementedError unless left at their defaults.
    Keyword-only extras (the defaults keep MONAI's keys and shapes):
        num_modalities: M per-modality patch-embedding weights ``patch_embed.proj.weight`` [M, C, Cin, p, p, p]
            (2-D: [M, C, Cin, p, p]) and bias [M, C]; ``forward`` then takes ``modality_ids``.
        modality_gate: a zero-initialised head-wise gate in every block (``gate.weight`` [M, C, heads],
            ``gate.bias`` [M, heads]), needs ``num_modalities``.

    ``forward(x [B, Cin, D, H, W], normalize=True, modality_ids=None)`` returns the stage maps as MONAI does (5 for
    4 stages: the patch embedding and every stage's output, after its downsampling), shapes
    [B, C_i, D_i, H_i, W_i] (channels-last memory: ``.permute(0, 2, 3, 4, 1)`` of a map is contiguous); 2-D:
    x [B, Cin, H, W] -> [B, C_i, H_i, W_i] (``.permute(0, 2, 3, 1)`` contiguous).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        window_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
        downsample: str | type[nn.Module] = "merging",
        use_v2: bool = False,
        *,
        use_flash_attention: bool = False,
        num_modalities: int | None = None,
        modality_gate: bool = False,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        for name in unsupported:
            if name not in UNSUPPORTED_DEFAULTS:
                raise TypeError(f"SwinViT3D got an unexpected keyword argument {name!r}")
        use_hyena, hyena_stages = unsupported.pop("use_hyena", False), unsupported.pop("hyena_stages", None)
        if hyena_stages is not None and len(hyena_stages) != len(depths):
            fail("hyena_stages", f"None or one bool per stage ({len(depths)})", repr(hyena_stages))
        if any(hyena_stages) if hyena_stages is not None else use_hyena:  # MONAI: the stages override the flag
            raise NotImplementedError(
                f"use_hyena={use_hyena!r}, hyena_stages={hyena_stages!r}: MONAI's Hyena blocks "
                "are not implemented in medmap-fast"
            )
        for name, value in unsupported.items():
            if value != UNSUPPORTED_DEFAULTS[name]:
                raise NotImplementedError(f"{name}={value!r}: MONAI's Hyena blocks are not implemented in medmap-fast")
        if spatial_dims not in (2, 3):
            fail("spatial_dims", "2 or 3 (as MONAI's)", repr(spatial_dims))
        if not isinstance(attn_drop_rate, (int, float)) or not 0.0 <= attn_drop_rate < 1.0:
            fail(
                "attn_drop_rate", "a probability in [0, 1) (1 would drop every attention weight)", repr(attn_drop_rate)
            )
        if len(depths) != len(num_heads):
            fail("num_heads", f"one entry per stage ({len(depths)} depths)", repr(tuple(num_heads)))
        if num_modalities is not None and (not isinstance(num_modalities, int) or num_modalities < 1):
            fail("num_modalities", "None or a positive int", repr(num_modalities))
        if modality_gate and num_modalities is None:
            fail("modality_gate", "num_modalities to be set (the gate has one set of weights per modality)", "None")
        if isinstance(downsample, str) and downsample not in MERGING:
            fail("downsample", f"one of {tuple(MERGING)} or a module class", repr(downsample))
        self.config: dict[str, Any] = dict(  # the constructor arguments, normalised (SwinViT3D(**config) rebuilds it)
            in_chans=in_chans,
            embed_dim=embed_dim,
            window_size=as_spatial(window_size, "window_size", spatial_dims),
            patch_size=as_spatial(patch_size, "patch_size", spatial_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=downsample,
            use_v2=use_v2,
            use_flash_attention=use_flash_attention,
            num_modalities=num_modalities,
            modality_gate=modality_gate,
        )
        if isinstance(downsample, str):
            downsample = MERGING[downsample]
        self.in_chans, self.embed_dim, self.num_layers = in_chans, embed_dim, len(depths)
        self.spatial_dims = spatial_dims
        # MONAI's (2 entries in 2-D); the stages get the window of depth 1 in 2-D
        self.window_size, self.patch_size = self.config["window_size"], self.config["patch_size"]
        self.patch_norm, self.use_v2, self.num_modalities = patch_norm, use_v2, num_modalities
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.patch_embed = PatchEmbed3D(
            self.patch_size, in_chans, embed_dim, norm_layer if patch_norm else None, num_modalities
        )
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = embed_dim * 2**i
            stage = SwinStage(
                dim,
                depth,
                heads,
                unit_depth(self.window_size, 1),
                dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample,
                norm_layer,
                spatial_dims,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                use_checkpoint=use_checkpoint,
                num_modalities=num_modalities if modality_gate else None,
            )
            setattr(self, f"layers{i + 1}", nn.ModuleList([stage]))  # MONAI's keys: layers1.0.blocks...
        for i in range(self.num_layers if use_v2 else 0):  # registered after the stages, in MONAI's key order
            setattr(self, f"layers{i + 1}c", nn.ModuleList([ConvResBlock(embed_dim * 2**i, spatial_dims)]))

    def stages(self) -> list[SwinStage]:
        """The Swin stages in order (MONAI stores stage i as ``layers{i+1}[0]``)."""
        return [getattr(self, f"layers{i + 1}")[0] for i in range(self.num_layers)]

    def forward(
        self, x: torch.Tensor, normalize: bool = True, modality_ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """x [B, Cin, D, H, W] float -> [x0, ..., x4], stage i of shape [B, embed_dim * 2**i, D_i, H_i, W_i] (2-D:
        x [B, Cin, H, W] -> [B, embed_dim * 2**i, H_i, W_i]).

        ``normalize`` applies an affine-free LayerNorm over channels to every returned map (MONAI's ``proj_out``);
        the maps fed to the next stage are never normalised. ``modality_ids`` [B] long picks each volume's
        patch-embedding weights and gate (required when ``num_modalities`` > 1). Every side must be at least a patch
        (MONAI would pad a thinner volume into one patch of zeros); volumes of another float dtype are cast to the
        weights' (a float16 volume cache feeding a float32 model), autocast then decides the compute dtype.
        """
        x = check_volumes(x, "x", self.in_chans, min_size=self.patch_size)
        if modality_ids is not None:
            if self.num_modalities is None:
                fail(
                    "modality_ids",
                    "None for a SwinViT3D built without num_modalities",
                    f"a {type(modality_ids).__name__}",
                )
            modality_ids = check_index(
                modality_ids, "modality_ids", x.shape[0], self.num_modalities, what="modality ids"
            )
        elif self.num_modalities == 1:
            modality_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.stage_maps(x, normalize, modality_ids)

    def stage_maps(
        self, x: torch.Tensor, normalize: bool = True, modality_ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """:meth:`forward` without its input checks, for callers that have checked ``x`` and ``modality_ids``
        already (:class:`MedMAPEncoder`), so that the volumes are scanned for NaN/Inf (a pass and a host sync) once."""
        x = self.pos_drop(self.patch_embed(_in_weight_dtype(x, self.patch_embed.proj.weight), modality_ids))
        # [B, D, H, W, C] from here on (2-D: [B, H, W, 1, C])
        outs = [self._proj_out(x, normalize)]
        for i, stage in enumerate(self.stages()):
            if self.use_v2:
                x = getattr(self, f"layers{i + 1}c")[0](x)
            x = stage(x, modality_ids)
            outs.append(self._proj_out(x, normalize))
        return outs

    def _proj_out(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        """Channels-last [B, D, H, W, C] -> a [B, C, D, H, W] view (2-D: [B, H, W, 1, C] -> [B, C, H, W]),
        LayerNorm'd over C without affine when asked (MONAI's ``proj_out``)."""
        if normalize:
            x = F.layer_norm(x, x.shape[-1:])
        return (x.squeeze(3) if self.spatial_dims == 2 else x).movedim(-1, 1)

    @classmethod
    def from_monai(cls, source: nn.Module | Mapping[str, torch.Tensor], **overrides: Any) -> SwinViT3D:
        """A SwinViT3D with the weights of a MONAI ``SwinTransformer``, ``SwinUNETR`` (its ``swinViT``) or state_dict.

        The configuration is read from the module, or inferred from the state_dict's shapes (``downsample``, which a
        state_dict cannot tell, defaults to MONAI's "merging"; an anisotropic window must be given). ``overrides``
        replace or complete it, e.g. ``num_modalities=12, modality_gate=True``: the MONAI patch embedding is then
        copied into every modality slot and the gates start at zero, so outputs equal MONAI's.
        """
        state = monai_state_dict(source)
        config = {**monai_config(source, state), **overrides}
        if "window_size" not in config:
            fail(
                "window_size",
                "an explicit window_size= (an anisotropic window cannot be inferred from a state_dict)",
                "none",
            )
        return cls(**config).load_monai(source)

    def load_monai(self, source: nn.Module | Mapping[str, torch.Tensor]) -> SwinViT3D:
        """Copy MONAI Swin weights (module or state_dict) into this trunk, every modality slot, gates reset to 0."""
        state = monai_state_dict(source)
        if isinstance(source, nn.Module):  # the one architectural choice the keys and shapes cannot reveal
            theirs = monai_config(source, state).get("downsample")
            if theirs != self.config["downsample"]:
                fail("source", f"a MONAI Swin with downsample={self.config['downsample']!r}", f"downsample={theirs!r}")
        load_monai_state(self, state)
        return self


def _in_weight_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in ``weight``'s dtype, unless autocast is on for its device and will cast both itself (it leaves
    float64 as it is, so float64 volumes are cast here)."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if x.dtype == weight.dtype or (autocast and x.dtype != torch.float64):
        return x
    return x.to(weight.dtype)
