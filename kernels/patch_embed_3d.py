"""3D patch embedding (Conv3d with kernel == stride) with per-modality weights, channels-last output.

Reference semantics (the Triton kernel must match them):
  x        [V, Cin, D, H, W]         volumes; sides that are not multiples of the patch are zero-padded at the end
                                      (as MONAI's ``PatchEmbed``)
  weight   [M, C, Cin, pd, ph, pw]   one Conv3d weight per modality
  bias     [M, C] or None
  modality_ids [V] long in [0, M)    which weight each volume uses
  ln_weight, ln_bias [C] or None     with ``layer_norm=True``: LayerNorm over C (affine when given) fused at the end
  out      [V, D', H', W', C]        channels-last, D' = ceil(D / pd) ...; dtype ``out_dtype`` (default x.dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_size(size: int, patch: int) -> int:
    """Smallest multiple of ``patch`` that is >= ``size`` (MONAI pads at the end)."""
    return -(-size // patch) * patch


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[V, Cin, D, H, W] -> zero-padded patches [V, D', H', W', Cin*pd*ph*pw] (Conv3d weight order)."""
    v, cin, d, h, w = x.shape
    pd, ph, pw = patch
    x = F.pad(x, (0, padded_size(w, pw) - w, 0, padded_size(h, ph) - h, 0, padded_size(d, pd) - d))
    dn, hn, wn = x.shape[2] // pd, x.shape[3] // ph, x.shape[4] // pw
    x = x.reshape(v, cin, dn, pd, hn, ph, wn, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(v, dn, hn, wn, cin * pd * ph * pw)


def patch_embed_3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    modality_ids: torch.Tensor | None = None,
    *,
    layer_norm: bool = False,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-PyTorch patch embedding: patchify + (batched) matmul with the volume's modality weight."""
    m, c = weight.shape[:2]
    patches = patchify(x, tuple(weight.shape[3:]))  # [V, D', H', W', K]
    v, dn, hn, wn, k = patches.shape
    w2d = weight.reshape(m, c, k)
    if m == 1:
        out = F.linear(patches, w2d[0], None if bias is None else bias[0])
    else:
        ids = modality_ids
        out = torch.bmm(patches.reshape(v, dn * hn * wn, k), w2d[ids].transpose(1, 2))
        if bias is not None:
            out = out + bias[ids][:, None, :]
        out = out.reshape(v, dn, hn, wn, c)
    if layer_norm:
        out = F.layer_norm(out, (c,), ln_weight, ln_bias, eps)
    return out.to(out_dtype or x.dtype)
