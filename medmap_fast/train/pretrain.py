"""Stage 1: modality-aware vision-language pre-training, and its zero-shot report-retrieval evaluation.

Every volume of a study is pulled towards the frozen embedding of the study's report (asymmetric contrastive loss,
:class:`~medmap_fast.models.medmap.MedMAPPretrainModel`). The result is saved with ``save_pretrained`` under
``<run_dir>/model`` (its ``encoder/`` initialises stage 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medmap_fast.data.cache import CacheEntry
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPPretrainModel
from medmap_fast.train.config import RunConfig, as_dict
from medmap_fast.train.data import CacheData, TextTable, stage_batches
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.evaluate import recall_at_k
from medmap_fast.train.loop import Batch, fit, seed_everything, to_device
from medmap_fast.validation import fail

MODEL_DIR = "model"


def build_encoder(config: RunConfig) -> MedMAPEncoder:
    """The encoder of the ``encoder`` config section."""
    return MedMAPEncoder(**as_dict(config.encoder))


def pretrain_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive loss of one batch; logs its two terms and the logit scale."""
    out = model(batch["volumes"], batch["modality_ids"], batch["study_index"], batch["report_embeddings"])
    return out.loss, {k: float(v) for k, v in out.parts.items()}


def pretrain(
    cache: CacheData,
    config: RunConfig,
    reports: TextTable,
    ctx: DistributedContext,
    run_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> tuple[MedMAPPretrainModel, list[dict[str, float]]]:
    """Train stage 1 on the cache's train studies that have a report (all of them must be in ``reports``); returns
    the model and its training log.

    With ``run_dir``, checkpoints go there (a killed run resumes) and rank 0 saves the model under
    ``run_dir/model``.
    """
    train = config.pretrain.train
    seed_everything(train.seed)
    model = MedMAPPretrainModel(build_encoder(config), text_dim=reports.dim, **as_dict(config.pretrain.model))
    batches = stage_batches(
        cache.split("train", "report", ctx),
        cache,
        config,
        "pretrain",
        ctx,
        model.encoder.modalities.names,
        train.batch_size,
        train.num_workers,
        reports,
        config.pretrain.max_volumes,
        train.seed,
    )
    history = fit(
        model,
        batches,
        pretrain_step,
        train,
        ctx,
        run_dir,
        desc="stage 1 (pre-training)",
        resume=resume,
        progress=progress,
        find_unused_parameters=model.encoder.sharing == "separate",
        run_config=config.sections("encoder", "pretrain", "text", "data"),
    )
    if run_dir is not None and ctx.is_main:
        model.save_pretrained(Path(run_dir) / MODEL_DIR)
    return model, history


def pool_studies(volume_emb: torch.Tensor, study_index: torch.Tensor, num_studies: int) -> torch.Tensor:
    """Volume embeddings [V, E] -> one L2-normalised embedding per study [S, E]: the renormalised mean of its
    volumes' normalised embeddings (stage 1's study embedding)."""
    v = F.normalize(volume_emb.float(), dim=-1)
    sums = torch.zeros(num_studies, v.shape[1], device=v.device).index_add_(0, study_index, v)
    return F.normalize(sums, dim=-1)


@torch.no_grad()
def embed_studies(
    model: MedMAPPretrainModel,
    entries: Sequence[CacheEntry],
    cache: CacheData,
    config: RunConfig,
    batch_size: int,
    ctx: DistributedContext,
) -> torch.Tensor:
    """One L2-normalised embedding per study [S, E], in ``entries`` order (:func:`pool_studies` of every volume,
    centre crop)."""
    device = ctx.device
    model.eval().to(device)
    batches = stage_batches(
        entries, cache, config, None, ctx, model.encoder.modalities.names, batch_size, size_of="pretrain"
    )
    out = []
    for batch in batches.epoch(0):
        batch = to_device(batch, device)
        v = model.embed_volumes(batch["volumes"], batch["modality_ids"])
        out.append(pool_studies(v, batch["study_index"], batch["num_studies"]).cpu())
    return torch.cat(out)


@torch.no_grad()
def retrieval_metrics(
    model: MedMAPPretrainModel,
    entries: Sequence[CacheEntry],
    cache: CacheData,
    config: RunConfig,
    reports: TextTable,
    ctx: DistributedContext,
) -> dict[str, float]:
    """Zero-shot report retrieval on held-out studies, in both directions.

    Candidates are the distinct report texts of ``studies`` (identical reports are one candidate, correct for every
    study that has it). ``retrieval_r1/_r5``: a study (its pooled volume embedding) finds its report among them;
    ``report_to_study_r1/_r5``: a report finds one of its studies. ``chance_r1/_r5``: the expected study-to-report
    recall of a random ranking.
    """
    study_reports = [e.report for e in entries if e.report is not None]
    if len(study_reports) != len(entries):
        fail(
            "retrieval_metrics entries",
            "studies that all have a report",
            f"{len(entries) - len(study_reports)} without one",
        )
    study_emb = embed_studies(model, entries, cache, config, config.evaluate.batch_size, ctx)
    texts = list(dict.fromkeys(study_reports))
    report_emb = F.normalize(model.embed_reports(reports.lookup(texts).to(ctx.device)).float(), dim=-1).cpu()
    owner = torch.tensor([texts.index(r) for r in study_reports])
    relevant = owner[:, None] == torch.arange(len(texts))[None, :]  # [S, R]
    similarity = study_emb @ report_emb.T
    s2r = recall_at_k(similarity, relevant)
    r2s = recall_at_k(similarity.T, relevant.T)
    n = len(texts)
    return {
        "retrieval_r1": s2r[1],
        "retrieval_r5": s2r[5],
        "report_to_study_r1": r2s[1],
        "report_to_study_r5": r2s[5],
        "chance_r1": 1.0 / n,
        "chance_r5": min(5, n) / n,
        "num_studies": len(entries),
        "num_reports": n,
    }
