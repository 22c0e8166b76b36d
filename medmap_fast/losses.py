"""MedMAP losses: the asymmetric volume-report contrastive loss, sigmoid focal loss, label-prompt alignment.

All take raw features or logits, validate their inputs (``ValueError`` naming the argument, what was received and
what was expected) and compute in float32 even under autocast (float64 inputs stay float64), since a softmax over
hundreds of logits scaled by up to 100 is not safe in bfloat16.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medmap_fast.validation import check_float_tensor, check_index, describe, fail

REDUCTIONS = ("mean", "sum", "none")


def _upcast(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one compute dtype: float64 if any is float64 (for exact checks), else float32."""
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    return tuple(x.to(dtype) for x in xs)


def _check_features(x: object, name: str, expected: str, dim: int | None = None) -> torch.Tensor:
    """A finite float tensor [n, E] with n >= 1 (and E == dim when given)."""
    x = check_float_tensor(x, name, expected, 2)
    if x.shape[0] == 0 or x.shape[1] == 0 or (dim is not None and x.shape[1] != dim):
        fail(name, f"a float tensor {expected}", describe(x))
    return x


def _value_range(x: torch.Tensor) -> str:
    return f"values in [{x.min().item()}, {x.max().item()}]"


def _register_scalar(module: nn.Module, name: str, value: float, learnable: bool) -> None:
    """A 0-d ``nn.Parameter`` (learnable) or buffer (fixed, still saved in the state dict)."""
    if not math.isfinite(value):
        fail(name, "a finite value", repr(value))
    tensor = torch.tensor(float(value))
    if learnable:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows_with_grad(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` [counts[rank], ...] along dim 0, keeping the gradient to the local rows.

    Ranks may hold different numbers of rows: each pads to the largest count for the collective and the padding is
    sliced off. The backward pass sums each rank's gradient into the rank that owns the rows (all-gather's adjoint).
    """
    padded = F.pad(x, (0, 0) * (x.ndim - 1) + (0, max(counts) - x.shape[0]))
    return torch.cat([part[:n] for part, n in zip(_AllGatherWithGrad.apply(padded), counts, strict=True)])


class _AllGatherWithGrad(torch.autograd.Function):
    """x [n, ...] on every rank -> [W, n, ...]; backward: the sum over ranks of the gradient of this rank's slice.

    Written here because ``torch.distributed.nn.functional.all_gather`` is deprecated in torch 2.13 and its
    replacement lives in a private module; one all-reduce of the (small) embedding gradient works on gloo and NCCL.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def _gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Like :func:`gather_rows_with_grad` without autograd (for indices)."""
    padded = F.pad(x, (0, max(counts) - x.shape[0]))
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


class AsymmetricContrastiveLoss(nn.Module):
    """MedMAP's asymmetric contrastive loss between V volumes and the S reports of their studies.

    With L2-normalised volume embeddings v_i, report embeddings t_s, study s(i) of volume i and
    ``scale = exp(min(logit_scale, logit_scale_max))``::

        L_v2t = mean_i  -log softmax_s(scale * v_i . t_s)[s(i)]                 (one positive per volume)
        L_t2v = mean_{s with >= 1 volume}  -log( sum_{i: s(i)=s} exp(scale * t_s . v_i) / sum_i exp(scale * t_s . v_i) )
        L     = lam * L_v2t + (1 - lam) * L_t2v

    A report may retrieve any of its study's volumes (several positives, one per modality); a report with no
    volume in the batch only serves as a negative for the volume-to-report term.

    Distributed (``torch.distributed`` initialised, world size W > 1): volumes, reports and study indices are
    all-gathered with gradient (study indices offset by the report counts of lower ranks; ranks may hold different
    counts). With ``local_loss=False`` every rank returns the loss of the global batch. With ``local_loss=True``
    (open_clip style) each rank only scores its own volumes and reports against the global batch (a W-fold smaller
    logit matrix) and returns W times its share, so the mean over ranks is the global loss. In both modes, after
    DDP's gradient averaging every parameter's gradient equals that of one process on the global batch (a rank's
    local embedding gradient is W times the global-batch gradient, which DDP's 1/W cancels). Under ``local_loss``
    the ranks' ``logit_scale`` gradients differ, so this module must sit inside the DDP-wrapped model (as open_clip
    keeps ``logit_scale`` in the model); with ``local_loss=False`` they are identical on every rank.

    Args:
        lam: weight of the volume-to-report term, in [0, 1].
        logit_scale_init: initial log of the logit scale (log(1/0.07), CLIP's temperature 0.07).
        logit_scale_max: the scale is clamped at exp(logit_scale_max) (100 by default).
        learnable_scale: make ``logit_scale`` an ``nn.Parameter`` (True) or a fixed buffer.
        local_loss: the distributed mode described above; no effect in a single process.
    """

    logit_scale: torch.Tensor  # 0-d, registered by _register_scalar as a parameter or a buffer

    def __init__(
        self,
        lam: float = 0.5,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100),
        learnable_scale: bool = True,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            fail("lam", "a weight in [0, 1]", repr(lam))
        if not math.isfinite(logit_scale_max):
            fail("logit_scale_max", "a finite value", repr(logit_scale_max))
        self.lam, self.logit_scale_max, self.local_loss = float(lam), float(logit_scale_max), local_loss
        _register_scalar(self, "logit_scale", logit_scale_init, learnable_scale)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, logit_scale_max={self.logit_scale_max:.4g}, local_loss={self.local_loss}"

    def scale(self) -> torch.Tensor:
        """The current logit scale exp(logit_scale), clamped at exp(logit_scale_max) (0-d tensor, with grad)."""
        return self.logit_scale.clamp(max=self.logit_scale_max).exp()

    def forward(
        self,
        volume_emb: torch.Tensor,
        report_emb: torch.Tensor,
        study_index: torch.Tensor,
        return_parts: bool = False,
        gather: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """volume_emb [V, E], report_emb [S, E], study_index [V] long in [0, S) -> scalar loss.

        ``return_parts=True`` also returns a dict of detached tensors for logging: ``loss_v2t``, ``loss_t2v``
        (this rank's W-scaled shares under ``local_loss``) and ``scale``. ``gather=False`` scores this process's
        batch alone even when distributed (evaluation, where every rank scores the same batches).
        """
        volume_emb = _check_features(volume_emb, "volume_emb", "[V, E] with V >= 1")
        e = volume_emb.shape[1]
        report_emb = _check_features(report_emb, "report_emb", f"[S, {e}] (E as in volume_emb) with S >= 1", e)
        study_index = check_index(
            study_index, "study_index", volume_emb.shape[0], report_emb.shape[0], "volume", "study indices"
        ).to(volume_emb.device)
        with torch.autocast(volume_emb.device.type, enabled=False):
            v, t = (F.normalize(x, dim=-1) for x in _upcast(volume_emb, report_emb))
            world = _distributed_world() if gather else 1
            own_v, own_t = slice(None), slice(None)
            if world > 1:
                v, t, study_index, own_v, own_t = self._gather(v, t, study_index)
            v2t, t2v = self._terms(v, t, study_index, self.scale(), own_v, own_t)
            if world > 1 and self.local_loss:
                v2t, t2v = v2t * world, t2v * world
            loss = self.lam * v2t + (1.0 - self.lam) * t2v
        if return_parts:
            return loss, {"loss_v2t": v2t.detach(), "loss_t2v": t2v.detach(), "scale": self.scale().detach()}
        return loss

    def _gather(
        self, v: torch.Tensor, t: torch.Tensor, study_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice, slice]:
        """Global v, t, study_index and, under ``local_loss``, the slices of this rank's rows (else everything)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = torch.tensor([v.shape[0], t.shape[0]], device=v.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        v_counts, t_counts = zip(*(s.tolist() for s in all_sizes), strict=True)
        t_offsets = [sum(t_counts[:r]) for r in range(world)]
        v = gather_rows_with_grad(v, list(v_counts))
        t = gather_rows_with_grad(t, list(t_counts))
        study_index = _gather_rows(study_index + t_offsets[rank], list(v_counts))
        if not self.local_loss:
            return v, t, study_index, slice(None), slice(None)
        v_start = sum(v_counts[:rank])
        own_v = slice(v_start, v_start + v_counts[rank])
        own_t = slice(t_offsets[rank], t_offsets[rank] + t_counts[rank])
        return v, t, study_index, own_v, own_t

    @staticmethod
    def _terms(
        v: torch.Tensor, t: torch.Tensor, study_index: torch.Tensor, scale: torch.Tensor, own_v: slice, own_t: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_v2t, L_t2v) summed over the rows ``own_v`` / ``own_t`` and divided by the global counts."""
        logits_v = scale * v[own_v] @ t.T  # [V_own, S]
        v2t = F.cross_entropy(logits_v, study_index[own_v], reduction="sum") / v.shape[0]
        full = own_v == slice(None) and own_t == slice(None)
        logits_t = logits_v.T if full else scale * t[own_t] @ v.T  # [S_own, V]
        reports = torch.arange(t.shape[0], device=t.device)[own_t]
        positive = study_index[None, :] == reports[:, None]  # [S_own, V]
        has_volume = positive.any(1)
        n_with_volume = torch.bincount(study_index, minlength=t.shape[0]).gt(0).sum()
        logits_t, positive = logits_t[has_volume], positive[has_volume]
        log_p = logits_t.masked_fill(~positive, float("-inf")).logsumexp(1) - logits_t.logsumexp(1)
        return v2t, -log_p.sum() / n_with_volume


def _sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017); targets may be soft, in [0, 1]."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # 1 - p_t from sigmoid(-x) rather than 1 - sigmoid(x): no cancellation, so it stays accurate for confident
    # logits; the floor at the smallest normal number keeps the gradient of (1 - p_t)^gamma finite for gamma < 1
    # once sigmoid underflows (|x| > ~87 in float32)
    one_minus_p_t = torch.sigmoid(logits) * (1 - target) + torch.sigmoid(-logits) * target
    one_minus_p_t = one_minus_p_t.clamp_min(torch.finfo(one_minus_p_t.dtype).tiny)
    loss = ce * one_minus_p_t**gamma
    if alpha is not None:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        fail("reduction", f"one of {REDUCTIONS}", repr(reduction))
    return reduction


class FocalLoss(nn.Module):
    """Sigmoid focal loss on logits: ``-alpha_t (1 - p_t)^gamma log p_t`` per element, p = sigmoid(logit).

    Targets:
      * float, same shape as ``logits``: binary or multi-label (multi-hot), soft labels in [0, 1] allowed;
      * integer, same shape as ``logits``: 0/1 labels;
      * integer, ``logits`` shape without dim 1 (``logits`` [N, C, ...], target [N, ...]): class indices in
        [0, C), one-hot encoded (multi-class handled as C one-vs-rest sigmoids, as in RetinaNet).

    ``alpha`` weighs positives (``1 - alpha`` negatives); None disables it. With hard labels this equals
    ``torchvision.ops.sigmoid_focal_loss`` and ``monai.losses.FocalLoss(use_softmax=False)`` (``reduction="mean"``
    averages over all elements, like both).
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            fail("alpha", "None or a weight in [0, 1]", repr(alpha))
        if not 0.0 <= gamma < math.inf:
            fail("gamma", "a finite focusing exponent >= 0", repr(gamma))
        self.alpha, self.gamma, self.reduction = alpha, float(gamma), _check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [N, ...] float; target as in the class docstring -> loss (scalar, or logits' shape for 'none')."""
        expected = "[N, ...] or [N, C, ...]"
        check_float_tensor(logits, "logits", expected, max(getattr(logits, "ndim", 1), 1))
        target = _focal_target(logits, target)
        with torch.autocast(logits.device.type, enabled=False):
            x, t = _upcast(logits, target)
            loss = _sigmoid_focal(x, t, self.alpha, self.gamma)
            return _reduce(loss, self.reduction)


def _focal_target(logits: torch.Tensor, target: object) -> torch.Tensor:
    """The float target of logits' shape: labels as given, integer class indices one-hot encoded along dim 1."""
    shape = tuple(logits.shape)
    index_shape = shape[:1] + shape[2:]
    expected = f"labels of shape {shape} in [0, 1]"
    if logits.ndim > 1:
        expected += f", or integer class indices of shape {index_shape} in [0, {shape[1]})"
    if not isinstance(target, torch.Tensor) or target.is_complex():
        fail("target", expected, describe(target) if isinstance(target, torch.Tensor) else type(target).__name__)
    if tuple(target.shape) == shape:  # binary / multi-label (float, bool or integer 0/1)
        labels = target.to(logits.dtype)
        if bool(((labels < 0) | (labels > 1) | ~torch.isfinite(labels)).any()):
            fail("target", expected, _value_range(labels))
        return labels
    if logits.ndim < 2 or tuple(target.shape) != index_shape or target.is_floating_point():
        fail("target", expected, describe(target))
    if shape[1] == 1:  # one logit per sample: integer targets are binary labels, not indices of a single class
        return _focal_target(logits, target.unsqueeze(1))
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= shape[1]):
        fail("target", expected, _value_range(target))
    return F.one_hot(target.long(), shape[1]).movedim(-1, 1).to(logits.dtype)


class LabelPromptAlignmentLoss(nn.Module):
    """Align features to the text embeddings of label prompts, CLIP zero-shot style.

    For features f_b [B, E] and prompt embeddings p_k [K, E] (e.g. :class:`~medmap_fast.models.text.TextEncoder`
    embeddings of "MRI of the liver showing a haemangioma", ..., projected to E)::

        logits[b, k] = scale * cos(f_b, p_k) + bias,      scale = exp(min(logit_scale, logit_scale_max))

    and the loss is cross-entropy to the class for integer targets [B] (multi-class; the bias cancels), or binary
    cross-entropy with logits for multi-hot float targets [B, K] (multi-label; a learnable bias, as in SigLIP).
    ``reduction="mean"`` averages over samples (CE) or elements (BCE).

    Why not the reference code's term: it takes KL(softmax(t_y) || softmax(f)) with the softmax over the *feature
    dimensions* of a single feature vector and a single target embedding (medmap-paper-and-code.md §7.1). That
    treats an embedding as a probability distribution over its coordinates, is not invariant to the embedding's
    norm and does not contrast the right label with the wrong ones; cosine logits against all K prompts do.

    Args:
        logit_scale_init: initial log scale (log(1/0.07)); learnable unless ``learnable=False``.
        logit_scale_max: clamp of the scale (log 100).
        bias_init: initial logit bias (matters for the multi-label BCE form only; a negative value makes every
            label start mostly negative, which suits rare positives).
        learnable: ``logit_scale`` and ``logit_bias`` are ``nn.Parameter`` s (True) or fixed buffers.
        reduction: "mean", "sum" or "none".
    """

    logit_scale: torch.Tensor  # 0-d each, registered by _register_scalar as parameters or buffers
    logit_bias: torch.Tensor

    def __init__(
        self,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100),
        bias_init: float = 0.0,
        learnable: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if not math.isfinite(logit_scale_max):
            fail("logit_scale_max", "a finite value", repr(logit_scale_max))
        self.logit_scale_max, self.reduction = float(logit_scale_max), _check_reduction(reduction)
        _register_scalar(self, "logit_scale", logit_scale_init, learnable)
        _register_scalar(self, "logit_bias", bias_init, learnable)

    def logits(self, features: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
        """features [B, E], prompt_emb [K, E] -> logits [B, K] (also the zero-shot classifier at inference)."""
        features = _check_features(features, "features", "[B, E] with B >= 1")
        e = features.shape[1]
        prompt_emb = _check_features(prompt_emb, "prompt_emb", f"[K, {e}] (E as in features) with K >= 1", e)
        with torch.autocast(features.device.type, enabled=False):
            f, p = (F.normalize(x, dim=-1) for x in _upcast(features, prompt_emb))
            return self.logit_scale.clamp(max=self.logit_scale_max).exp() * f @ p.T + self.logit_bias

    def forward(self, features: torch.Tensor, prompt_emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """features [B, E], prompt_emb [K, E], target [B] class indices or [B, K] multi-hot -> loss."""
        logits = self.logits(features, prompt_emb)
        b, k = logits.shape
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            expected = f"multi-hot float labels [{b}, {k}] in [0, 1], or class indices [{b}]"
            check_float_tensor(target, "target", expected, 2)
            if tuple(target.shape) != (b, k):
                fail("target", expected, describe(target))
            if bool(((target < 0) | (target > 1)).any()):
                fail("target", expected, _value_range(target))
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction=self.reduction)
        target = check_index(target, "target", b, k, "sample", "class indices")
        return F.cross_entropy(logits, target.to(logits.device), reduction=self.reduction)
