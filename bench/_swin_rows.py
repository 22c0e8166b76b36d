"""The whole Swin trunk: ``SwinViT3D`` against MONAI's ``SwinTransformer`` (the paper's swinViT: SwinUNETR's
encoder), all holding the same weights, on the same input, each checked against a float64 MONAI run with the
flash-attention rule (the 5 stage maps, and the input gradient for forward + backward) before it is timed.

Rows:
  SwinViT3D             ours, from ``SwinViT3D.from_monai``, on the torch backend (CPU) or the Triton one (GPU;
                        the torch backend is then a row of its own)
  MONAI eager           ``SwinTransformer`` as SwinUNETR builds it
  MONAI flash           ``use_flash_attention=True`` (MONAI 1.6.1's argument): SDPA with bias + mask, applied only
                        with autograd off, so forward rows only (with autograd on it runs the eager path above)
  MONAI compiled        ``torch.compile`` of the flash model (default mode): eager attention under autograd, SDPA
                        in the forward rows; compile time is spent in the parity run, not timed
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from _compare import Checked, Step, keep_passing
from torch import nn

import medmap_fast as mf
from medmap_fast.models.swin3d import SwinViT3D

OURS, OURS_TORCH, MONAI, MONAI_FLASH, MONAI_COMPILED = (
    "SwinViT3D", "SwinViT3D torch backend", "MONAI SwinTransformer eager", "MONAI use_flash_attention=True",
    "torch.compile(MONAI flash)")
ROWS = (OURS, MONAI, MONAI_FLASH, MONAI_COMPILED)  # OURS_TORCH too where OURS runs another backend


def paper_config(feature: int) -> dict:
    """The paper's trunk (MONAI SwinUNETR's swinViT) at ``feature`` channels."""
    return dict(in_chans=1, embed_dim=feature, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                num_heads=(3, 6, 12, 24))


@dataclasses.dataclass
class Trunks:
    """MONAI's eager and flash SwinTransformer, the flash one compiled, a SwinViT3D, one set of weights, and the input
    x [B, 1, s, s, s] (a leaf: its gradient is compared)."""

    monai: nn.Module
    flash: nn.Module
    compiled: nn.Module
    ours: SwinViT3D
    x: torch.Tensor

    def models(self, ours_backend: str) -> dict[str, tuple[nn.Module, str]]:
        """Row name -> (model, backend of medmap_fast ops)."""
        models = {OURS: (self.ours, ours_backend), MONAI: (self.monai, "torch"), MONAI_FLASH: (self.flash, "torch"),
                  MONAI_COMPILED: (self.compiled, "torch")}
        if ours_backend != "torch":
            models[OURS_TORCH] = (self.ours, "torch")
        return models


def make_trunks(feature: int, batch: int, size: int, device: str, seed: int = 0) -> Trunks:
    from monai.networks.nets.swin_unetr import SwinTransformer

    torch.manual_seed(seed)
    monai = SwinTransformer(**paper_config(feature))
    flash = SwinTransformer(**paper_config(feature), use_flash_attention=True)
    flash.load_state_dict(monai.state_dict())
    ours = SwinViT3D.from_monai(monai).to(device)
    monai, flash = monai.to(device), flash.to(device)
    x = torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(seed + 1))
    # static shapes: a parity check at another batch must not turn the timed graph into a dynamic-shape one
    return Trunks(monai, flash, torch.compile(flash, dynamic=False), ours, x.to(device).requires_grad_())


def trunk_step(model: nn.Module, x: torch.Tensor, backward: bool, backend: str = "torch",
               autocast: torch.dtype | None = None) -> Step:
    """One call: the 5 stage maps with autograd off, or forward + backward of the sum of their means (parameter
    gradients as in training) returning the maps and x's gradient; under bf16/fp16 autocast when given."""
    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        x.grad = None
        amp = contextlib.nullcontext() if autocast is None else torch.autocast(x.device.type, dtype=autocast)
        with mf.kernels.backend(backend), torch.set_grad_enabled(backward), amp:
            maps = model(x)
        if not backward:
            return maps
        sum(m.float().mean() for m in maps).backward()
        return [*maps, x.grad]

    return run


def unavailable(name: str, backward: bool) -> str | None:
    if name == MONAI_FLASH and backward:
        return "MONAI applies use_flash_attention only with autograd off (fwd+bwd runs the eager row's path)"
    return None


def check_trunks(t: Trunks, backward: bool, names=ROWS, autocast: torch.dtype | None = None,
                 ours_backend: str = "torch") -> Checked:
    """The rows that pass the flash rule against float64 MONAI (reference: MONAI eager in the working precision),
    their steps on ``t.x``."""
    exact_model, x64 = copy.deepcopy(t.monai).double(), t.x.detach().double().requires_grad_()
    exact = [e.double() for e in trunk_step(exact_model, x64, backward)()]
    del exact_model, x64
    ref = trunk_step(t.monai, t.x, backward, autocast=autocast)()
    models = t.models(ours_backend)
    skipped = {name: reason for name in names if (reason := unavailable(name, backward))}
    steps = {name: trunk_step(models[name][0], t.x, backward, models[name][1], autocast)
             for name in names if name not in skipped}
    return keep_passing(steps, ref, exact, skipped)
