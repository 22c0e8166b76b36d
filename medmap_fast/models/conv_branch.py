"""``ConvBranch``: an optional convolutional lesion detector beside the Swin trunk (an encoder option, off by default).

At the demo's 32^3 voxels a focal lesion is 3-7 voxels across, inside one or two of the trunk's 4^3 patches. From a
few thousand studies the Swin trunk does not learn to find it, while a small 3D CNN does (README, "Training and the
demo"). The branch is that CNN: 3^3 convolutions with BatchNorm and ReLU, so that each position answers "is there a
blob here" with a positive, unnormalised response, and the maximum over positions keeps the strongest one: the
encoder returns it as ``EncoderOutput.detections`` [V, C] beside the trunk's tokens, which stay MONAI's. Each model
adds a linear map of it to its output (stage 1: to the volume embedding; stage 2: to the logits, after a maximum over
a study's volumes). Passed through the trunk's LayerNorm'd tokens and the fusion instead, the same branch learned
far less (README, "Training and the demo").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medmap_fast.validation import fail

EXPECTED = (
    "null (no branch) or {stages: [[C, ...], ...] (a non-empty list of non-empty lists of positive ints: the output "
    "channels of each 3^3 conv, one list per resolution, halved between lists), unshuffle: U (a positive int)}"
)


def branch_settings(value: object, name: str = "conv_branch") -> dict[str, Any]:
    """A ``conv_branch`` setting checked and normalised: ``{"stages": [[int, ...], ...], "unshuffle": int}``."""

    def positive_ints(x: object) -> bool:
        return (
            isinstance(x, Sequence)
            and not isinstance(x, str)
            and len(x) > 0
            and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in x)
        )

    if not isinstance(value, Mapping) or set(value) - {"stages", "unshuffle"} or "stages" not in value:
        fail(name, EXPECTED, repr(value))
    stages, unshuffle = value["stages"], value.get("unshuffle", 2)
    if (
        not isinstance(stages, Sequence)
        or isinstance(stages, str)
        or not stages
        or not all(positive_ints(s) for s in stages)
        or not positive_ints([unshuffle])
    ):
        fail(name, EXPECTED, repr(value))
    return {"stages": [list(s) for s in stages], "unshuffle": unshuffle}


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[V, C, D, H, W] -> [V, C * f^3, ceil(D/f), ceil(H/f), ceil(W/f)]: every f^3 block of voxels (zero-padded at the
    far end, the cache's background) becomes one position with its voxels as channels; nothing is lost."""
    if factor == 1:
        return x
    pad = [p for s in reversed(x.shape[2:]) for p in (0, -s % factor)]
    x = F.pad(x, pad)
    v, c, d, h, w = x.shape
    f = factor
    x = x.view(v, c, d // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(v, c * f**3, d // f, h // f, w // f)


class ConvBranch(nn.Module):
    """A space-to-depth by ``unshuffle``, then for each list of ``stages`` (after the first: a 2^3 max-pool) its
    Conv3d(3^3, padding 1, no bias) + BatchNorm3d + ReLU blocks, then the maximum over positions.

    ``branch(volumes [V, Cin, D, H, W]) -> [V, out_channels]`` (``out_channels`` = the last stage's last width). Each
    side of the input must be at least ``min_size`` = unshuffle * 2^(stages - 1) voxels.
    """

    def __init__(self, in_chans: int, stages: Sequence[Sequence[int]], unshuffle: int = 2) -> None:
        super().__init__()
        settings = branch_settings({"stages": stages, "unshuffle": unshuffle})
        self.stages, self.unshuffle = settings["stages"], settings["unshuffle"]
        layers: list[nn.Module] = []
        c_in = in_chans * self.unshuffle**3
        for i, stage in enumerate(self.stages):
            if i:
                layers.append(nn.MaxPool3d(2))
            for c_out in stage:
                layers += [nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(True)]
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.out_channels = c_in
        self.min_size = self.unshuffle * 2 ** (len(self.stages) - 1)

    def settings(self) -> dict[str, Any]:
        """The constructor's ``stages`` and ``unshuffle``, as ``conv_branch`` holds them."""
        return {"stages": [list(s) for s in self.stages], "unshuffle": self.unshuffle}

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes [V, Cin, D, H, W] -> [V, out_channels]: every channel's strongest response."""
        dtype = next(self.blocks.parameters()).dtype
        return self.blocks(space_to_depth(volumes.to(dtype), self.unshuffle)).amax((2, 3, 4))
