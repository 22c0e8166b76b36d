"""``MedMAPEncoder``: the modality-aware 3D MRI vision encoder (DESIGN §1, §4).

Two ways of being modality-aware over one flat batch of V volumes of mixed modalities:

* ``sharing="gated"`` (default): one :class:`SwinViT3D` trunk with per-modality patch-embedding weights and a
  head-wise modality gate in every Swin block; all V volumes go through every layer in one pass, each volume's
  weights gathered by its modality id.
* ``sharing="separate"``: one plain trunk per modality (the paper's literal wording); volumes are grouped by
  modality, one trunk pass per modality present, and the outputs are put back in input order.

Checkpoints are a directory with ``config.json`` and ``model.safetensors`` (:meth:`MedMAPEncoder.save_pretrained`).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from medmap_fast.fileio import atomic_path, load_safetensors, read_json_object, save_safetensors
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.validation import check_index, check_json_fields, check_volumes, fail

from .conv_branch import ConvBranch, branch_settings
from .swin3d import SwinViT3D, as_triple

SHARING = ("gated", "separate")
# The paper's trunk (MONAI SwinUNETR's swinViT at feature size 48); any SwinViT3D argument overrides these.
SWIN_DEFAULTS: dict[str, Any] = dict(
    in_chans=1, embed_dim=48, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)
)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# SwinViT3D arguments that change how a trunk trains or runs, not what its weights mean.
RUNTIME_SETTINGS = ("drop_rate", "attn_drop_rate", "drop_path_rate", "use_checkpoint", "use_flash_attention")
# The JSON kind of every SwinViT3D argument config.json may hold.
SWIN_JSON_KINDS = {
    "in_chans": "int",
    "embed_dim": "int",
    "window_size": "int or int list",
    "patch_size": "int or int list",
    "depths": "int list",
    "num_heads": "int list",
    "mlp_ratio": "number",
    "qkv_bias": "bool",
    "drop_rate": "number",
    "attn_drop_rate": "number",
    "drop_path_rate": "number",
    "patch_norm": "bool",
    "use_checkpoint": "bool",
    "spatial_dims": "int",
    "downsample": "str",
    "use_v2": "bool",
    "use_flash_attention": "bool",
}
FORMAT = "medmap-fast/MedMAPEncoder"
# 2: may hold "conv_branch"; a config.json without one is written as version 1, which every release reads.
FORMAT_VERSION = 2
PLAIN_FORMAT_VERSION = 1


class EncoderOutput(NamedTuple):
    """``tokens`` [V, N, C] (normalised last stage, N = D4*H4*W4), ``pooled`` [V, C] (token mean), ``features``
    (the 5 normalised stage maps [V, C_i, D_i, H_i, W_i], channels-last memory), ``detections`` [V, C_b] (the conv
    branch's output; None without one)."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    features: list[torch.Tensor]
    detections: torch.Tensor | None = None


class MedMAPEncoder(nn.Module):
    """Modality-aware Swin-3D encoder: ``enc(volumes [V, Cin, D, H, W], modality_ids [V]) -> EncoderOutput``.

    Args:
        modalities: None (the twelve default modalities) or anything :class:`ModalityRegistry` accepts.
        sharing: "gated" (one trunk, per-modality patch embedding + modality-gated attention) or "separate"
            (one trunk per modality).
        conv_branch: None (default: the trunk alone, MONAI's outputs) or a :class:`ConvBranch`'s settings
            (``{"stages": [[16], [32, 64]], "unshuffle": 2}``): a small CNN beside the trunk, a focal-lesion detector
            for small data, whose output is ``EncoderOutput.detections``; the trunk's outputs are unchanged.
        **swin_kwargs: :class:`SwinViT3D` (= MONAI ``SwinTransformer``) arguments; unset ones take the paper's
            values (``SWIN_DEFAULTS``: in_chans 1, embed_dim 48, window 7, patch 2, depths 2-2-2-2, heads 3-6-12-24).
    """

    def __init__(
        self,
        modalities: Sequence[Any] | Mapping[str, str] | ModalityRegistry | None = None,
        sharing: str = "gated",
        conv_branch: Mapping[str, Any] | None = None,
        **swin_kwargs: Any,
    ) -> None:
        super().__init__()
        if sharing not in SHARING:
            fail("sharing", f"one of {SHARING}", repr(sharing))
        for name in ("num_modalities", "modality_gate"):
            if name in swin_kwargs:
                fail(
                    name, "not to be given (MedMAPEncoder sets it from modalities and sharing)", repr(swin_kwargs[name])
                )
        if swin_kwargs.get("spatial_dims", 3) != 3:
            fail(
                "spatial_dims",
                "3 (MedMAPEncoder encodes volumes; a 2-D trunk is SwinViT3D(spatial_dims=2))",
                repr(swin_kwargs["spatial_dims"]),
            )
        self.modalities = modalities if isinstance(modalities, ModalityRegistry) else ModalityRegistry(modalities)
        self.sharing = sharing
        self.swin_kwargs = {**SWIN_DEFAULTS, **swin_kwargs}
        m = len(self.modalities)
        if sharing == "gated":
            self.trunk = SwinViT3D(**self.swin_kwargs, num_modalities=m, modality_gate=True)
        else:
            self.trunks = nn.ModuleList(SwinViT3D(**self.swin_kwargs) for _ in range(m))
        first = self.slot_trunks()[0]
        # normalised as the trunk stores them (e.g. window 7 -> (7, 7, 7))
        self.swin_kwargs = {k: first.config.get(k, v) for k, v in self.swin_kwargs.items()}
        self.in_chans, self.patch_size, self.num_features = first.in_chans, first.patch_size, first.num_features
        self.min_size = self.patch_size
        self.conv_branch: ConvBranch | None = None
        if conv_branch is not None:
            self.conv_branch = ConvBranch(self.in_chans, **branch_settings(conv_branch))
            self.min_size = tuple(max(p, self.conv_branch.min_size) for p in self.patch_size)

    def forward(self, volumes: torch.Tensor, modality_ids: torch.Tensor | Sequence[int | str]) -> EncoderOutput:
        """volumes [V, Cin, D, H, W] float, modality_ids [V] long (or a list of ids / modality names)."""
        volumes = check_volumes(volumes, "volumes", self.in_chans, min_size=self.min_size)
        ids = self.modality_id_tensor(modality_ids, volumes.shape[0], volumes.device)
        if self.sharing == "gated":
            features = self.trunk.stage_maps(volumes, True, ids)
        else:
            features = self._separate(volumes, ids)
        last = features[-1].permute(0, 2, 3, 4, 1)  # a channels-last view: the reshape below copies nothing
        tokens = last.reshape(last.shape[0], -1, last.shape[-1])
        detections = self.conv_branch(volumes) if self.conv_branch is not None else None
        return EncoderOutput(tokens, tokens.mean(1), features, detections)

    def modality_id_tensor(
        self, modality_ids: torch.Tensor | Sequence[int | str], num_volumes: int, device: torch.device
    ) -> torch.Tensor:
        """``modality_ids`` (a [V] integer tensor, or a list of ids and/or modality names) checked -> [V] long."""
        if isinstance(modality_ids, Sequence) and not isinstance(modality_ids, str):
            ids = []
            for i in modality_ids:
                if isinstance(i, str):
                    ids.append(self.modalities.index(i, "modality_ids"))
                elif isinstance(i, numbers.Integral) and not isinstance(i, bool):
                    ids.append(int(i))
                else:
                    fail("modality_ids", "a list of modality ids (int) or names (str)", f"an item {i!r}")
            modality_ids = torch.tensor(ids, dtype=torch.long, device=device)
        return check_index(modality_ids, "modality_ids", num_volumes, len(self.modalities), what="modality ids")

    def _separate(self, volumes: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """One trunk pass per modality present; stage maps gathered back into input order."""
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=len(self.modalities)).tolist()
        groups, start, trunks = [], 0, self.slot_trunks()
        for m, count in enumerate(counts):
            if count:
                groups.append(trunks[m].stage_maps(volumes[order[start : start + count]]))
                start += count
        if len(groups) == 1:  # one modality: the stable sort left the input order unchanged
            return groups[0]
        inverse = torch.argsort(order)
        return [torch.cat(stage)[inverse] for stage in zip(*groups, strict=True)]

    def from_monai(self, source: nn.Module | Mapping[str, torch.Tensor]) -> MedMAPEncoder:
        """Copy MONAI Swin weights (SwinTransformer, SwinUNETR or state_dict) into every modality slot (gates reset to
        zero), so that every modality's outputs equal MONAI's. Returns ``self``."""
        for trunk in self.slot_trunks():
            trunk.load_monai(source)
        return self

    def slot_trunks(self) -> list[SwinViT3D]:
        """The trunks: the shared one (``gated``), or one per modality in registry order (``separate``)."""
        if self.sharing == "gated":
            return [self.trunk]
        return [cast(SwinViT3D, trunk) for trunk in self.trunks]  # a ModuleList's items are typed nn.Module

    # ----------------------------------------------------------------------------------------------- checkpoints
    def get_config(self) -> dict[str, Any]:
        """The JSON-able configuration stored in ``config.json``."""
        swin = {}
        for key, value in self.swin_kwargs.items():
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, (int, float, str, bool, list, type(None))):
                raise TypeError(
                    f"save_pretrained: swin argument {key}={value!r} cannot be stored in {CONFIG_NAME}; "
                    "only plain values (not classes) are supported"
                )
            swin[key] = value
        config: dict[str, Any] = {
            "format": FORMAT,
            "format_version": PLAIN_FORMAT_VERSION,
            "modalities": self.modalities.to_config(),
            "sharing": self.sharing,
            "swin": swin,
        }
        if self.conv_branch is not None:
            config.update(format_version=FORMAT_VERSION, conv_branch=self.conv_branch.settings())
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.get_config()
        save_safetensors(directory / WEIGHTS_NAME, self.state_dict())
        with atomic_path(directory / CONFIG_NAME, durable=True) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device | str = "cpu", **expected: Any
    ) -> MedMAPEncoder:
        """Load a :meth:`save_pretrained` directory. ``expected`` (e.g. ``modalities=[...]``, ``embed_dim=48``,
        ``sharing="gated"``) must match the stored configuration, defaults included, else ValueError naming
        config.json. A config.json or model.safetensors that is corrupt, or weights of another configuration, are
        errors naming the file."""
        path = Path(directory) / CONFIG_NAME
        config = _read_config(path)
        try:
            model = cls(
                modalities=[tuple(m) for m in config["modalities"]],
                sharing=config["sharing"],
                conv_branch=config.get("conv_branch"),
                **config["swin"],
            )
        except (TypeError, ValueError, NotImplementedError) as err:
            raise ValueError(f"{path}: describes no valid MedMAPEncoder ({err})") from err
        _check_expected(path, model.settings(), expected)
        weights = path.with_name(WEIGHTS_NAME)
        state = load_safetensors(weights, device)
        check_state_dict(
            weights,
            model.state_dict(),
            state,
            f"{CONFIG_NAME} ({len(model.modalities)} "
            f"modalities, sharing={model.sharing!r}, embed_dim={model.swin_kwargs['embed_dim']})",
        )
        model.load_state_dict(state)
        return model.to(device)

    def settings(self) -> dict[str, Any]:
        """Every setting, defaults included: modality names, sharing, the conv branch's settings (None: no branch)
        and the full :class:`SwinViT3D` configuration."""
        first = self.slot_trunks()[0]
        swin = {k: v for k, v in first.config.items() if k not in ("num_modalities", "modality_gate")}
        branch = self.conv_branch.settings() if self.conv_branch is not None else None
        return {"modalities": self.modalities.names, "sharing": self.sharing, "conv_branch": branch, **swin}

    def architecture_differences(self, other: MedMAPEncoder) -> list[str]:
        """The settings that give ``other``'s weights another meaning than this encoder's (training-time settings
        such as dropout or activation checkpointing do not count), as ``"key: ours vs theirs"``."""
        ours, theirs = self.settings(), other.settings()
        return [
            f"{key}: {ours[key]!r} vs {theirs.get(key)!r}"
            for key in ours
            if key not in RUNTIME_SETTINGS and not _same_setting(key, ours[key], theirs.get(key))
        ]


def saved_encoder_dir(directory: str | os.PathLike) -> Path:
    """Where a saved model keeps its encoder: ``directory/encoder`` (a run's ``model/`` folder), else ``directory``
    itself (an encoder's own folder, or a ``medmap-fast export`` folder)."""
    directory = Path(directory)
    return directory / "encoder" if (directory / "encoder").is_dir() else directory


def _read_config(path: Path) -> dict[str, Any]:
    config = read_json_object(path, "MedMAPEncoder.save_pretrained")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a {FORMAT} configuration, got format {config.get('format')!r}")
    check_json_fields(path, config, {"format_version": "int", "sharing": "str"})
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config['format_version']} is newer than this medmap-fast "
            f"supports ({FORMAT_VERSION}); upgrade medmap-fast"
        )
    modalities, swin = config.get("modalities"), config.get("swin")
    if not (
        isinstance(modalities, list)
        and modalities
        and all(isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) and s for s in m) for m in modalities)
    ):
        raise ValueError(f"{path}: expected 'modalities' to be a list of [name, description] pairs, got {modalities!r}")
    if not isinstance(swin, dict):
        raise ValueError(f"{path}: expected 'swin' to be an object of SwinViT3D arguments, got {swin!r}")
    check_json_fields(path, swin, SWIN_JSON_KINDS)
    return config


def _check_expected(path: Path, settings: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        if key not in settings:
            raise ValueError(
                f"{path}: cannot check {key}={want!r}: not a MedMAPEncoder setting (one of {sorted(settings)})"
            )
        if key == "modalities":
            want = ModalityRegistry(want).names
        elif key in ("window_size", "patch_size"):
            want = as_triple(want, key)
        if not _same_setting(key, settings[key], want):
            # shown as config.json holds them
            have, want = (list(v) if isinstance(v, tuple) else v for v in (settings[key], want))
            raise ValueError(f"{path}: stored {key}={have!r} does not match the requested {key}={want!r}")


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Equal settings: sequences compare as tuples, modality names ignore case (as lookups do)."""
    if key == "modalities":
        return [n.lower() for n in a] == [n.lower() for n in b]
    return _plain(a) == _plain(b)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_state_dict(path: Path, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """``state`` (read from ``path``) has exactly the keys and shapes of ``own``; else ValueError naming ``path``,
    ``what`` the weights should have been, and up to four missing, unexpected and mis-shaped tensors each."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [
        f"{k!r} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]  # in model order: patch_embed first
    if missing or unexpected or wrong:
        problems = (
            ([f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}"] if missing else [])
            + ([f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"] if unexpected else [])
            + wrong[:4]
        )
        raise ValueError(f"{path}: weights do not match {what}: " + "; ".join(problems))
