"""``patch_monai``: run a MONAI 1.6.1 ``SwinUNETR`` / ``SwinTransformer`` on medmap-fast's ops, in place.

MONAI pads, rolls and partitions windows in ``SwinTransformerBlock.forward_part1`` before ``WindowAttention`` sees
them, and ``BasicLayer.forward`` builds a shift mask of [windows, n, n] every call; the fused
:func:`medmap_fast.kernels.window_attention` does all of that itself, reading the un-partitioned channels-last tensor.
So the swap happens at the stage: every ``PatchEmbed``, every ``BasicLayer`` and every ``SwinTransformerBlock``
outside one is replaced by a subclass of the matching :class:`SwinViT3D` layer (its forward code) that holds the
MONAI module's own submodules, so the Parameter objects and ``state_dict`` keys stay as they were. MLPs, norms, drop
paths, patch merging and everything outside the Swin trunk stay MONAI's. A 2-D Swin (``spatial_dims=2``) runs as a
3-D one of depth 1 (windows (wh, ww, 1), the Conv2d weight as a (ph, pw, 1) patch), with MONAI's 2-D shapes in and
out of every patched module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .swin3d import SwinStage
from .swin_layers import PatchEmbed3D, SwinBlock3D, WindowAttention3D, unit_depth

if TYPE_CHECKING:  # MONAI is an optional extra (see _swin_unetr); its classes type the modules patched here
    from monai.networks.nets.swin_unetr import BasicLayer, PatchEmbed, SwinTransformerBlock, WindowAttention


def _swin_unetr() -> ModuleType:
    try:
        from monai.networks.nets import swin_unetr
    except ImportError as err:
        raise ImportError("patch_monai needs MONAI: pip install 'medmap-fast[monai]'") from err
    return swin_unetr


def _check_layout(
    where: str,
    module: nn.Module,
    cls: type[nn.Module],
    children: Mapping[str, type[nn.Module] | None],
    params: Iterable[str] = (),
    buffers: Iterable[str] = (),
) -> None:
    """Raise a TypeError naming ``where`` unless ``module`` is exactly MONAI 1.6.1's ``cls`` (a subclass may change
    forward) with exactly these children (None: any type), own parameters and own buffers."""
    problems = [] if type(module) is cls else [f"its class is {type(module).__qualname__}, not {cls.__qualname__}"]
    got = dict(module.named_children())
    if set(got) != set(children):
        problems.append(f"children {sorted(got)}, expected {sorted(children)}")
    problems += [
        f"{name!r} is a {type(got[name]).__name__}, expected {kind.__name__}"
        for name, kind in children.items()
        if name in got and kind and not isinstance(got[name], kind)
    ]
    for what, names, expected in (
        ("parameters", module.named_parameters(recurse=False), params),
        ("buffers", module.named_buffers(recurse=False), buffers),
    ):
        own = sorted(name for name, _ in names)
        if own != sorted(expected):
            problems.append(f"own {what} {own}, expected {sorted(expected)}")
    if problems:
        raise TypeError(f"patch_monai: {where} is not MONAI 1.6.1's {cls.__name__} layout: {'; '.join(problems)}")


def _spatial_dims(where: str, window_or_patch: Sequence[int]) -> int:
    """2 or 3, the length of a MONAI layer's window or patch (its spatial_dims)."""
    if len(window_or_patch) not in (2, 3):
        raise TypeError(f"patch_monai: {where} has a {len(window_or_patch)}-D window or patch, not MONAI's 2-D or 3-D")
    return len(window_or_patch)


def _channels_first(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Channels-last tokens [B, D, H, W, C] (2-D: [B, H, W, 1, C]) as MONAI's [B, C, D, H, W] ([B, C, H, W]), a view."""
    return (x.squeeze(3) if spatial_dims == 2 else x).movedim(-1, 1)


class MonaiPatchEmbed(PatchEmbed3D):
    """MONAI's ``PatchEmbed`` on :func:`~medmap_fast.kernels.patch_embed_3d`, holding its ``proj`` and ``norm`` (a
    Conv3d, or a Conv2d in 2-D)."""

    def __init__(self, embed: PatchEmbed, where: str) -> None:
        dims = _spatial_dims(where, embed.patch_size)
        conv_type = nn.Conv3d if dims == 3 else nn.Conv2d
        _check_layout(
            where,
            embed,
            _swin_unetr().PatchEmbed,
            {"proj": conv_type, **({} if embed.norm is None else {"norm": None})},
        )
        conv = embed.proj
        if not (
            conv.kernel_size == conv.stride == tuple(embed.patch_size)
            and conv.padding == (0,) * dims
            and conv.dilation == (1,) * dims
            and conv.groups == 1
        ):
            raise TypeError(
                f"patch_monai: {where}.proj is not a kernel == stride == patch_size {conv_type.__name__}: {conv}"
            )
        nn.Module.__init__(self)  # adopt MONAI's modules (PatchEmbed3D.__init__ would build new ones)
        self.patch_size, self.embed_dim, self.spatial_dims = tuple(embed.patch_size), embed.embed_dim, dims
        self.proj, self.norm = conv, embed.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # MONAI's signature
        """x [B, Cin, D, H, W] -> [B, C, ceil(D/p), ceil(H/p), ceil(W/p)] as MONAI's (a view of channels-last data);
        2-D: x [B, Cin, H, W] -> [B, C, ceil(H/p), ceil(W/p)]."""
        return _channels_first(super().forward(x), self.spatial_dims)


class MonaiWindowAttention(WindowAttention3D):
    """MONAI's ``WindowAttention`` weights (qkv, proj, relative-position table, scale) behind the fused op; its
    ``attn_drop`` (p and train/eval mode) drives the op's attention dropout."""

    def __init__(self, attn: WindowAttention, where: str) -> None:
        _check_layout(
            where,
            attn,
            _swin_unetr().WindowAttention,
            {
                "qkv": nn.Linear,
                "attn_drop": nn.Dropout,
                "proj": nn.Linear,
                "proj_drop": nn.Dropout,
                "softmax": nn.Softmax,
            },
            params=("relative_position_bias_table",),
            buffers=("relative_position_index",),
        )
        nn.Module.__init__(self)  # adopt MONAI's parameters, in MONAI's registration (= state_dict key) order
        self.dim, self.num_heads, self.scale = attn.dim, attn.num_heads, attn.scale
        self.window_size = unit_depth(attn.window_size, 1)
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.get_buffer("relative_position_index"))
        self.qkv, self.attn_drop, self.proj, self.proj_drop = attn.qkv, attn.attn_drop, attn.proj, attn.proj_drop


class MonaiSwinBlock(SwinBlock3D):
    """MONAI's ``SwinTransformerBlock`` as a :class:`SwinBlock3D` holding its modules: norm1 -> qkv -> fused
    shifted-window attention -> proj on the un-partitioned tokens, then the MLP; MONAI's residuals, drop path and
    checkpointing. ``dim``, ``num_heads``, ``mlp_ratio`` and ``attn.attn_drop`` stay for code reading them (e.g.
    :meth:`SwinViT3D.from_monai`). A 2-D block runs with the window (wh, ww, 1) and shift (sh, sw, 0)."""

    def __init__(self, block: SwinTransformerBlock, where: str) -> None:
        _spatial_dims(where, block.window_size)
        _check_layout(
            where,
            block,
            _swin_unetr().SwinTransformerBlock,
            {"norm1": None, "attn": None, "drop_path": None, "norm2": None, "mlp": None},
        )
        nn.Module.__init__(self)  # adopt MONAI's modules, in MONAI's registration (= state_dict key) order
        self.dim, self.num_heads, self.mlp_ratio = block.dim, block.num_heads, block.mlp_ratio
        self.window_size, self.shift_size = unit_depth(block.window_size, 1), unit_depth(block.shift_size, 0)
        self.use_checkpoint = block.use_checkpoint
        self.norm1 = block.norm1
        self.attn = MonaiWindowAttention(block.attn, f"{where}.attn")
        self.drop_path, self.norm2, self.mlp, self.gate = block.drop_path, block.norm2, block.mlp, None

    def forward(self, x: torch.Tensor, mask_matrix: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, D, H, W, C] -> [B, D, H, W, C] (a bare 2-D block, as MONAI's: [B, H, W, C]; inside a stage
        [B, H, W, 1, C]); MONAI's ``mask_matrix`` is not needed: the op masks shifts itself."""
        if x.ndim == 4:
            return super().forward(x.unsqueeze(3)).squeeze(3)
        return super().forward(x)


class MonaiSwinStage(SwinStage):
    """MONAI's ``BasicLayer`` (Swin blocks, then its own downsampling module) without the per-call shift mask."""

    def __init__(self, layer: BasicLayer, where: str) -> None:
        dims = _spatial_dims(where, layer.window_size)
        _check_layout(
            where,
            layer,
            _swin_unetr().BasicLayer,
            {"blocks": nn.ModuleList, **({} if layer.downsample is None else {"downsample": None})},
        )
        nn.Module.__init__(self)  # adopt MONAI's modules
        self.window_size, self.shift_size = unit_depth(layer.window_size, 1), unit_depth(layer.shift_size, 0)
        self.spatial_dims = dims
        # MonaiSwinBlock checks that each block is exactly MONAI's SwinTransformerBlock
        self.blocks = nn.ModuleList(
            MonaiSwinBlock(cast("SwinTransformerBlock", b), f"{where}.blocks.{i}") for i, b in enumerate(layer.blocks)
        )
        self.downsample = layer.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # MONAI's signature
        """x [B, C, D, H, W] -> [B, C', D', H', W'] as MONAI's (a view of channels-last memory); 2-D:
        [B, C, H, W] -> [B, C', H', W']."""
        tokens = x.movedim(1, -1)
        if self.spatial_dims == 2:
            tokens = tokens.unsqueeze(3)
        return _channels_first(super().forward(tokens.contiguous()), self.spatial_dims)


_PATCHED = (MonaiPatchEmbed, MonaiSwinStage, MonaiSwinBlock)


def _replacement(module: nn.Module, where: str, swin_unetr: ModuleType) -> nn.Module | None:
    """The medmap-fast layer for a MONAI Swin module, None for a module to descend into."""
    if isinstance(module, swin_unetr.PatchEmbed):
        return MonaiPatchEmbed(module, where)
    if isinstance(module, swin_unetr.BasicLayer) and not module.use_hyena:  # a Hyena stage has no window attention
        return MonaiSwinStage(module, where)
    if isinstance(module, swin_unetr.SwinTransformerBlock):
        return MonaiSwinBlock(module, where)
    if isinstance(module, swin_unetr.WindowAttention):
        raise TypeError(
            f"patch_monai: {where} is a WindowAttention outside a SwinTransformerBlock; the fused op "
            "replaces the block's window partitioning too, so only whole blocks can be patched"
        )
    return None


def patch_monai(model: nn.Module) -> nn.Module:
    """Swap, in place, the patch embedding and the window attention of a MONAI 1.6.1 Swin for medmap-fast's ops.

    ``model``: a ``monai.networks.nets.SwinUNETR``, a ``monai.networks.nets.swin_unetr.SwinTransformer``, or any
    module containing them, 3-D or 2-D (``spatial_dims=2``, run as 3-D of depth 1). Every ``PatchEmbed`` then runs
    :func:`medmap_fast.kernels.patch_embed_3d` and every ``SwinTransformerBlock`` runs norm1 -> qkv ->
    :func:`medmap_fast.kernels.window_attention` (shift, padding, window partition, relative-position bias and shift
    mask inside the op) -> proj on the un-partitioned channels-last tokens; the backend follows
    :func:`medmap_fast.backend` / ``MEDMAP_FAST_BACKEND`` (``auto``: Triton on CUDA, the PyTorch path elsewhere).
    Inputs and outputs keep MONAI's shapes.

    The modules keep MONAI's own Parameter objects (an optimizer built before patching still trains them) and
    ``state_dict`` keys, so checkpoints load either way; outputs and gradients equal MONAI's within float rounding.
    Train-mode dropout (``drop_rate`` > 0, and ``attn_drop_rate`` > 0 inside the fused op) draws its masks in
    another element order (on the Triton path from a Philox stream that torch's generator seeds); drop path (per
    sample) draws the same ones. Patching a patched model changes nothing. Run MONAI's ``load_from`` (its
    self-supervised checkpoint loader) before patching; ``load_state_dict`` works either side.

    Raises ImportError without MONAI; TypeError naming the module for anything that is not MONAI 1.6.1's layout (a
    subclass, other children, a bare ``WindowAttention``) or a model without a MONAI Swin. Nothing is changed when it
    raises.

    Returns ``model``; only when ``model`` itself is a ``PatchEmbed``, ``BasicLayer`` or ``SwinTransformerBlock``,
    which cannot be swapped in place, its replacement.

    >>> import torch
    >>> import medmap_fast as mf
    >>> from monai.networks.nets import SwinUNETR
    >>> model = mf.patch_monai(SwinUNETR(in_channels=1, out_channels=2, feature_size=48))
    >>> logits = model(torch.randn(1, 1, 64, 64, 64))   # [1, 2, 64, 64, 64]
    """
    swin_unetr = _swin_unetr()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"patch_monai: expected a torch.nn.Module (a MONAI SwinUNETR/SwinTransformer), got {type(model).__name__}"
        )
    swaps: list[tuple[str, nn.Module]] = []
    already, inside = False, None  # inside: name prefix of the subtree just replaced (or found patched)
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        patched = isinstance(module, _PATCHED)
        new = None if patched else _replacement(module, name or type(model).__name__, swin_unetr)
        if patched or new is not None:
            inside, already = (f"{name}." if name else ""), already or patched
        if new is not None:
            swaps.append((name, new))
    if not swaps and not already:
        raise TypeError(
            f"patch_monai: {type(model).__name__} contains no MONAI PatchEmbed, BasicLayer or "
            "SwinTransformerBlock to patch"
        )
    for name, new in swaps:  # every replacement is built (and checked) before the model is touched
        if not name:
            return new
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model
