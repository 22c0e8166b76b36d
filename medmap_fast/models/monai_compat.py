"""Reading MONAI Swin weights and configurations for :class:`~medmap_fast.models.swin3d.SwinViT3D` (no MONAI import).

Accepted sources: a MONAI ``SwinTransformer``, a ``SwinUNETR`` (its ``swinViT``), or a state_dict / checkpoint dict
(``{"state_dict": ...}`` or ``{"model": ...}``), with ``module.`` (DataParallel) and ``swinViT.`` prefixes stripped and
the ``mlp.fc1``/``mlp.fc2`` names of MONAI's self-supervised Swin checkpoints mapped to ``mlp.linear1``/``linear2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .swin3d import SwinViT3D

_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
_PER_MODALITY = ("patch_embed.proj.weight", "patch_embed.proj.bias")


def _trunk(source: nn.Module) -> Any:
    """The Swin trunk of a MONAI module, read by attribute (Any: MONAI is not imported here)."""
    return source.swinViT if hasattr(source, "swinViT") else source


def monai_state_dict(source: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The Swin trunk's state_dict with MONAI's key names, from a module, a state_dict or a checkpoint dict."""
    if isinstance(source, nn.Module):
        return dict(_trunk(source).state_dict())
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source: expected a MONAI SwinTransformer/SwinUNETR or a state_dict, got {type(source).__name__}"
        )
    tensors: Mapping[str, Any] = source
    for wrapper in ("state_dict", "model"):
        if isinstance(tensors.get(wrapper), Mapping):
            tensors = tensors[wrapper]
    state = {k.removeprefix("module."): v for k, v in tensors.items()}
    if any(k.startswith("swinViT.") for k in state):  # a SwinUNETR: keep the trunk, drop the decoder
        state = {k.removeprefix("swinViT."): v for k, v in state.items() if k.startswith("swinViT.")}
    for old, new in _RENAMES:
        state = {k.replace(old, new): v for k, v in state.items()}
    return state


def monai_config(source: nn.Module | Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """SwinViT3D constructor arguments of a MONAI trunk: read from the module, else inferred from ``state``."""
    if isinstance(source, nn.Module):
        return _module_config(_trunk(source))
    return _state_config(state)


def _module_config(m: Any) -> dict[str, Any]:
    """SwinViT3D arguments read from a MONAI SwinTransformer's attributes."""
    if any(getattr(m, "_per_stage_hyena", ())):
        return {"use_hyena": True}  # SwinViT3D raises NotImplementedError naming it
    stages = [getattr(m, f"layers{i + 1}")[0] for i in range(m.num_layers)]
    block = stages[0].blocks[0]
    last = stages[-1].blocks[-1].drop_path
    merging = type(stages[0].downsample)
    return dict(
        in_chans=m.patch_embed.proj.in_channels,
        embed_dim=m.embed_dim,
        window_size=tuple(m.window_size),
        patch_size=tuple(m.patch_size),
        spatial_dims=len(m.patch_embed.patch_size),
        depths=tuple(len(s.blocks) for s in stages),
        num_heads=tuple(s.blocks[0].num_heads for s in stages),
        mlp_ratio=block.mlp_ratio,
        qkv_bias=block.attn.qkv.bias is not None,
        drop_rate=m.pos_drop.p,
        attn_drop_rate=block.attn.attn_drop.p,
        drop_path_rate=getattr(last, "drop_prob", 0.0),
        norm_layer=type(block.norm1),
        patch_norm=m.patch_norm,
        use_checkpoint=block.use_checkpoint,
        downsample={"PatchMerging": "merging", "PatchMergingV2": "mergingv2"}.get(merging.__name__, merging),
        use_v2=m.use_v2,
        use_flash_attention=getattr(block.attn, "use_flash_attention", False),
    )


def _state_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"state_dict: expected MONAI Swin keys such as 'patch_embed.proj.weight', got keys {sorted(state)[:5]}..."
        )
    embed_dim, in_chans, *patch = state["patch_embed.proj.weight"].shape
    depths: list[int] = []
    heads: list[int] = []
    while f"layers{len(depths) + 1}.0.blocks.0.norm1.weight" in state:
        prefix = f"layers{len(depths) + 1}.0.blocks."
        depths.append(len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}))
        heads.append(state[prefix + "0.attn.relative_position_bias_table"].shape[1])
    block = "layers1.0.blocks.0."
    n, dims = state[block + "attn.relative_position_index"].shape[0], len(patch)  # a Conv2d weight: 2-D
    side = round(n ** (1 / dims))
    config: dict[str, Any] = dict(
        in_chans=in_chans,
        embed_dim=embed_dim,
        patch_size=tuple(patch),
        spatial_dims=dims,
        depths=tuple(depths),
        num_heads=tuple(heads),
        mlp_ratio=state[block + "mlp.linear1.weight"].shape[0] / embed_dim,
        qkv_bias=block + "attn.qkv.bias" in state,
        patch_norm="patch_embed.norm.weight" in state,
        use_v2="layers1c.0.layer.conv1.conv.weight" in state,
    )
    if side**dims == n and (2 * side - 1) ** dims == state[block + "attn.relative_position_bias_table"].shape[0]:
        config["window_size"] = (side,) * dims  # an anisotropic window cannot be told from the shapes: pass it
    return config


def load_monai_state(model: SwinViT3D, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a MONAI trunk state_dict into ``model``: strict keys and shapes, the MONAI patch embedding broadcast to
    every modality slot, the modality gates (absent from MONAI) set to zero so every gate is exactly 1."""
    own = model.state_dict()
    ours = {k for k in own if ".gate." in k}
    missing, unexpected = sorted(set(own) - ours - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state_dict: keys do not match SwinViT3D{_config_hint(model)}: "
            f"missing {_listed(missing)}, unexpected {_listed(unexpected)}"
        )
    with torch.no_grad():
        for key, src in state.items():
            dst = own[key]
            if key in _PER_MODALITY and dst.ndim == src.ndim + 1:
                src = src.expand_as(dst) if tuple(src.shape) == tuple(dst.shape[1:]) else src
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"state_dict: {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                    f"{_config_hint(model)}"
                )
            if key.endswith("relative_position_index") and not torch.equal(src.to(dst.device, dst.dtype), dst):
                # same shape, other window: e.g. an anisotropic window given in another axis order
                raise ValueError(
                    f"state_dict: {key!r} belongs to another window than window_size="
                    f"{model.window_size}{_config_hint(model)}; pass the checkpoint's window_size"
                )
            dst.copy_(src)
        for key in ours:
            own[key].zero_()


def _config_hint(model: SwinViT3D) -> str:
    return f" (embed_dim={model.embed_dim}, patch_size={model.patch_size}, window_size={model.window_size})"


def _listed(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more
