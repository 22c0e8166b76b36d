"""Stage-2 fusion: dual-stream Cross-Modal Semantic Aggregation (CSA) and the Cross-Cognition Transformer (CCT).

Tokens of every modality of a study are packed into one sequence per study ([S, slots * N, dim], a key-padding mask
marking the slots of modalities the study lacks). CSA makes two streams from them: visual tokens plus a learned
modality embedding, and vision-language tokens gated by the projected frozen-text embedding of a per-modality prompt.
CCT lets each stream attend to the other with real token-level cross-attention (modality-pair bias, head-wise gate).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medmap_fast.kernels import gated_attention
from medmap_fast.kernels._indexing import take_rows
from medmap_fast.models.gating import ModalityGate
from medmap_fast.validation import fail


class StudyTokens(NamedTuple):
    """Tokens grouped per study. tokens [S, L, dim]; modality [S, L] long; padding [S, L] bool (True = missing)."""

    tokens: torch.Tensor
    modality: torch.Tensor
    padding: torch.Tensor


def pack_by_study(
    tokens: torch.Tensor, modality_ids: torch.Tensor, study_index: torch.Tensor, num_studies: int
) -> StudyTokens:
    """[V, N, dim] tokens of V volumes -> one sequence per study of ``max volumes per study`` slots of N tokens.

    Volumes keep their batch order inside a study; missing slots are zero tokens flagged in ``padding``.
    """
    v, n, dim = tokens.shape
    counts = torch.bincount(study_index, minlength=num_studies)
    if not torch.compiler.is_compiling() and bool((counts == 0).any()):  # a host sync: eager only
        empty = torch.nonzero(counts == 0).flatten().tolist()
        fail("study_index", f"at least one volume for each of the {num_studies} studies", f"none for studies {empty}")
    slots = int(counts.max())  # data-dependent: compiled, an unbacked size (needs capture_scalar_outputs)
    torch._check(slots >= 1)
    order = torch.argsort(study_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(study_index)
    slot[order] = torch.arange(v, device=tokens.device) - starts[study_index[order]]
    packed = tokens.new_zeros(num_studies, slots, n, dim)
    packed[study_index, slot] = tokens
    modality = modality_ids.new_zeros(num_studies, slots)
    modality[study_index, slot] = modality_ids
    padding = torch.ones(num_studies, slots, dtype=torch.bool, device=tokens.device)
    padding[study_index, slot] = False
    return StudyTokens(
        packed.reshape(num_studies, slots * n, dim),
        modality.repeat_interleave(n, dim=1),
        padding.repeat_interleave(n, dim=1),
    )


def study_max(x: torch.Tensor, study_index: torch.Tensor, num_studies: int) -> torch.Tensor:
    """[V, C] per volume -> [S, C]: each study's maximum over its volumes (every study has one)."""
    out = x.new_full((num_studies, x.shape[1]), float("-inf"))
    return out.scatter_reduce(0, study_index[:, None].expand_as(x), x, "amax", include_self=True)


def masked_mean(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padded tokens: x [S, L, dim], padding [S, L] -> [S, dim]."""
    keep = (~padding).to(x.dtype)[..., None]
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class CrossModalSemanticAggregation(nn.Module):
    """Dual-stream CSA: (visual, vision-language) streams from encoder tokens.

    visual = W_v f + E[m];  vision-language = (W_v f) * relu(W_p p_m), with p_m the frozen text embedding of modality
    m's prompt (a buffer, [M, prompt_dim]).
    """

    def __init__(self, in_dim: int, dim: int, prompt_embeddings: torch.Tensor) -> None:
        super().__init__()
        num_modalities, prompt_dim = prompt_embeddings.shape
        self.visual_proj = nn.Linear(in_dim, dim)
        self.modality_embed = nn.Embedding(num_modalities, dim)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        self.prompt_proj = nn.Linear(prompt_dim, dim)
        self.register_buffer("prompt_embeddings", prompt_embeddings.detach().float().clone())

    def forward(self, tokens: torch.Tensor, modality_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [V, N, in_dim], modality_ids [V] -> (visual, vision_language), each [V, N, dim]."""
        f = self.visual_proj(tokens)
        prompt_gate = F.relu(self.prompt_proj(self.prompt_embeddings))  # [M, dim]
        visual = f + self.modality_embed(modality_ids)[:, None, :]
        return visual, f * take_rows(prompt_gate, modality_ids)[:, None, :]


class GatedCrossAttention(nn.Module):
    """Multi-head cross-attention through ``kernels.gated_attention`` with a learned per-head modality-pair bias and a
    head-wise modality gate (both zero-initialised: plain attention at start)."""

    def __init__(self, dim: int, num_heads: int, num_modalities: int) -> None:
        super().__init__()
        if dim % num_heads:
            fail("dim", f"a multiple of num_heads={num_heads}", str(dim))
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.pair_bias = nn.Parameter(torch.zeros(num_heads, num_modalities, num_modalities))
        self.gate = ModalityGate(num_modalities, dim, num_heads)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, modality: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """x, context [S, L, dim] (queries, keys); modality [S, L]; padding [S, L] -> [S, L, dim]."""
        s, n, dim = x.shape
        q = self.q(x).view(s, n, self.num_heads, -1)
        k, v = self.kv(context).view(s, context.shape[1], 2, self.num_heads, -1).unbind(2)
        out = gated_attention(
            q,
            k,
            v,
            key_padding_mask=padding,
            pair_bias=self.pair_bias,
            q_modality=modality,
            k_modality=modality,
            gate_logits=self.gate(x, modality),
        )
        return self.proj(out.reshape(s, n, dim))


class FeedForward(nn.Sequential):
    """Pre-norm MLP block: LayerNorm -> Linear(dim, ratio*dim) -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, mlp_ratio: float, dropout: float) -> None:
        hidden = int(dim * mlp_ratio)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class CrossCognitionLayer(nn.Module):
    """One bidirectional pre-norm cross-attention layer: stream a queries stream b and b queries a, then FFNs."""

    def __init__(self, dim: int, num_heads: int, num_modalities: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.a_from_b = GatedCrossAttention(dim, num_heads, num_modalities)
        self.b_from_a = GatedCrossAttention(dim, num_heads, num_modalities)
        self.drop = nn.Dropout(dropout)
        self.ffn_a = FeedForward(dim, mlp_ratio, dropout)
        self.ffn_b = FeedForward(dim, mlp_ratio, dropout)

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, modality: torch.Tensor, padding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        na, nb = self.norm_a(a), self.norm_b(b)
        a = a + self.drop(self.a_from_b(na, nb, modality, padding))
        b = b + self.drop(self.b_from_a(nb, na, modality, padding))
        return a + self.ffn_a(a), b + self.ffn_b(b)


POOLINGS = ("mean", "max", "mean_max")


def masked_max(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Max over the non-padded tokens: x [S, L, dim], padding [S, L] -> [S, dim] (every study has a token)."""
    return x.masked_fill(padding[..., None], float("-inf")).amax(1)


class CrossCognitionTransformer(nn.Module):
    """L CrossCognitionLayers followed by a final LayerNorm per stream; returns the two pooled streams.

    ``pool``: how each stream's tokens become one vector: "mean", "max" (a focal finding lives in few tokens, and a
    mean over every token of every modality dilutes it), or "mean_max" (both, concatenated). Output [S, out_dim] with
    ``out_dim`` = 2 * dim, or 4 * dim for "mean_max".
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        num_modalities: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if pool not in POOLINGS:
            fail("pool", f"one of {POOLINGS}", repr(pool))
        self.pool = pool
        self.out_dim = 2 * dim * (2 if pool == "mean_max" else 1)
        self.layers = nn.ModuleList(
            CrossCognitionLayer(dim, num_heads, num_modalities, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def _pool(self, x: torch.Tensor, padding: torch.Tensor) -> list[torch.Tensor]:
        pooled = []
        if self.pool in ("mean", "mean_max"):
            pooled.append(masked_mean(x, padding))
        if self.pool in ("max", "mean_max"):
            pooled.append(masked_max(x, padding))
        return pooled

    def forward(self, visual: StudyTokens, vision_language: torch.Tensor) -> torch.Tensor:
        """visual: packed stream 1; vision_language [S, L, dim] packed stream 2 (same layout) -> [S, out_dim]."""
        a, b = visual.tokens, vision_language
        for layer in self.layers:
            a, b = layer(a, b, visual.modality, visual.padding)
        return torch.cat(
            [*self._pool(self.norm_a(a), visual.padding), *self._pool(self.norm_b(b), visual.padding)], dim=-1
        )
