"""Stage 1: modality-aware vision-language pre-training, its zero-shot report-retrieval evaluation and its
per-epoch validation.

Every volume of a study is pulled towards the frozen embedding of the study's report (asymmetric contrastive loss,
:class:`~medmap_fast.models.medmap.MedMAPPretrainModel`). The result is saved with ``save_pretrained`` under
``<run_dir>/model`` (its ``encoder/`` initialises stage 2).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from medmap_fast.data.cache import CacheEntry
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPPretrainModel
from medmap_fast.train.config import RunConfig, as_dict
from medmap_fast.train.data import CacheData, TextTable, stage_batches, with_report_embeddings
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.evaluate import recall_at_k
from medmap_fast.train.loop import Batch, TrainConfig, fit, seed_everything, to_device
from medmap_fast.validation import fail

MODEL_DIR = "model"
_WITH = {"report": "a report", "labels": "labels"}


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
    the model and its training log. After every ``train.eval_every``-th epoch the val studies with a report are
    scored (:func:`validation_metrics`) into the log.

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
    desc = "stage 1 (pre-training)"
    val = validation_split(cache, "report", train, ctx, desc)

    def on_epoch_end(trained: nn.Module, epoch: int) -> dict[str, float]:
        return validation_metrics(cast(MedMAPPretrainModel, trained), val or [], cache, config, reports, ctx)

    history = fit(
        model,
        batches,
        pretrain_step,
        train,
        ctx,
        run_dir,
        desc=desc,
        resume=resume,
        progress=progress,
        find_unused_parameters=model.encoder.sharing == "separate",
        on_epoch_end=on_epoch_end if val else None,
        run_config=config.sections("encoder", "pretrain", "text", "data"),
    )
    if run_dir is not None and ctx.is_main:
        model.save_pretrained(Path(run_dir) / MODEL_DIR)
    return model, history


def validation_split(
    cache: CacheData, need: str, train: TrainConfig, ctx: DistributedContext, desc: str
) -> list[CacheEntry] | None:
    """The val studies with a ``need`` ("report" or "labels") that a stage scores after its epochs; None when
    ``train.eval_every`` is 0 or there are none (said once on stderr: the stage trains without validation)."""
    if not train.eval_every:
        return None
    if not any(getattr(e, need) is not None for e in cache.splits.get("val", [])):
        if ctx.is_main:
            print(
                f"{cache.path}: no val studies with {_WITH.get(need, need)}; {desc} runs without per-epoch validation",
                file=sys.stderr,
            )
        return None
    return cache.split("val", need, ctx)


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
    pooled = [
        pool_studies(v, batch["study_index"], batch["num_studies"]).cpu()
        for batch, v in _embedded_batches(model, entries, cache, config, batch_size, ctx)
    ]
    return torch.cat(pooled)


def _embedded_batches(
    model: MedMAPPretrainModel,
    entries: Sequence[CacheEntry],
    cache: CacheData,
    config: RunConfig,
    batch_size: int,
    ctx: DistributedContext,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(evaluation batch on ``ctx.device``, its projected volume embeddings [V, E]) of ``entries``, in order."""
    model.eval().to(ctx.device)
    batches = stage_batches(
        entries, cache, config, None, ctx, model.encoder.modalities.names, batch_size, size_of="pretrain"
    )
    for batch in batches.epoch(0):
        batch = to_device(batch, ctx.device)
        yield batch, model.embed_volumes(batch["volumes"], batch["modality_ids"])


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
    _check_reports(entries, "retrieval_metrics entries")
    study_emb = embed_studies(model, entries, cache, config, config.evaluate.batch_size, ctx)
    return _retrieval(model, study_emb, entries, reports, ctx)


@torch.no_grad()
def validation_metrics(
    model: MedMAPPretrainModel,
    entries: Sequence[CacheEntry],
    cache: CacheData,
    config: RunConfig,
    reports: TextTable,
    ctx: DistributedContext,
) -> dict[str, float]:
    """Stage 1's per-epoch validation, in one pass over ``entries`` (studies with a report, all of their volumes,
    centre crops): ``val_loss``, the contrastive loss of batches of as many studies as a training step sees
    (``pretrain.train.batch_size`` times the world size: as many candidate reports, so the level compares with the
    training loss; training keeps ``max_volumes`` of each study) against their distinct reports, averaged over the
    studies, and ``val_retrieval_r1`` / ``val_retrieval_r5`` of :func:`retrieval_metrics`.

    Every rank scores all of ``entries`` by itself, as :func:`retrieval_metrics` does (the loss is not gathered over
    ranks), so the values are the same on every rank and equal to those of a single process with the same global
    batch size.
    """
    _check_reports(entries, "validation_metrics entries")
    total, pooled = 0.0, []
    batch_size = config.pretrain.train.batch_size * ctx.world_size
    for batch, volume_emb in _embedded_batches(model, entries, cache, config, batch_size, ctx):
        pooled.append(pool_studies(volume_emb, batch["study_index"], batch["num_studies"]).cpu())
        scored = with_report_embeddings(batch, reports)
        report_emb = model.embed_reports(scored["report_embeddings"].to(ctx.device))
        loss = model.loss_fn(volume_emb, report_emb, scored["study_index"], gather=False)
        total += float(cast(torch.Tensor, loss)) * batch["num_studies"]
    retrieval = _retrieval(model, torch.cat(pooled), entries, reports, ctx)
    return {
        "val_loss": total / len(entries),
        "val_retrieval_r1": retrieval["retrieval_r1"],
        "val_retrieval_r5": retrieval["retrieval_r5"],
    }


def _check_reports(entries: Sequence[CacheEntry], name: str) -> None:
    missing = sum(1 for e in entries if e.report is None)
    if missing:
        fail(name, "studies that all have a report", f"{missing} without one")
    if not entries:
        fail(name, "one or more studies", "none")


def _retrieval(
    model: MedMAPPretrainModel,
    study_emb: torch.Tensor,
    entries: Sequence[CacheEntry],
    reports: TextTable,
    ctx: DistributedContext,
) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` from the studies' embeddings [S, E] (:func:`embed_studies`)."""
    study_reports = [cast(str, e.report) for e in entries]
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
