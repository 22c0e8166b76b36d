"""Stage 2: fine-tune the (pre-trained) encoder with CSA + CCT + head to classify studies; predict; save and load.

The classifier's modality prompts are one text per encoder modality, ``text.prompt_template`` filled with the
registry description (e.g. "T2-weighted MRI"), embedded once by the frozen text encoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from medmap_fast.data.cache import CacheEntry, LabelSpace
from medmap_fast.fileio import atomic_path, read_json_object
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.models.encoder import MedMAPEncoder, saved_encoder_dir
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel, load_head_weights, save_head_weights
from medmap_fast.models.text import TextEncoder
from medmap_fast.train.config import RunConfig, as_dict
from medmap_fast.train.data import CacheData, stage_batches
from medmap_fast.train.distributed import DistributedContext, unwrap
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.loop import Batch, fit, seed_everything, to_device
from medmap_fast.train.pretrain import build_encoder, validation_split

MODEL_DIR = "model"
WEIGHTS_FILE, CONFIG_FILE = "classifier.safetensors", "classifier.json"


def modality_prompts(modalities: ModalityRegistry, template: str) -> list[str]:
    """One prompt per modality, in registry order: ``template`` with ``{name}`` and ``{description}`` filled in."""
    return [template.format(name=m.name, description=m.description) for m in modalities]


def finetune_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised loss of one batch of studies; logs the batch accuracy."""
    out = model(batch["volumes"], batch["modality_ids"], batch["study_index"], num_studies=batch["num_studies"])
    classifier = cast(MedMAPClassifier, unwrap(model))
    loss = classifier.compute_loss(out, batch["labels"])
    logits, labels = out.logits.detach(), batch["labels"]
    if classifier.task == "multilabel":  # the fraction of right label decisions
        return loss, {"accuracy": float(((logits > 0).float() == labels).float().mean())}
    predicted = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
    return loss, {"accuracy": float((predicted == labels).float().mean())}


def build_classifier(
    config: RunConfig, labels: LabelSpace, text_encoder: TextEncoder, encoder: MedMAPEncoder | None = None
) -> MedMAPClassifier:
    """A classifier for ``labels``' task over ``encoder`` (default: a new one from the config) with the configured
    modality prompts."""
    encoder = encoder if encoder is not None else build_encoder(config)
    prompts = text_encoder.encode(modality_prompts(encoder.modalities, config.text.prompt_template))
    return MedMAPClassifier(encoder, labels.num_outputs, prompts, task=labels.task, **as_dict(config.finetune.model))


def finetune(
    cache: CacheData,
    config: RunConfig,
    text_encoder: TextEncoder,
    ctx: DistributedContext,
    init: str | Path | MedMAPPretrainModel | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> tuple[MedMAPClassifier, list[dict[str, float]]]:
    """Train stage 2 on the cache's labelled train studies; ``init`` is the stage-1 model (or its saved folder),
    None = a random encoder. After every ``train.eval_every``-th epoch the labelled val studies are scored
    (:func:`validation_metrics`) into the log.

    With ``run_dir``, checkpoints go there and rank 0 saves the classifier under ``run_dir/model``
    (:func:`load_classifier` reads it back).
    """
    train = config.finetune.train
    seed_everything(train.seed)
    labels = cache.label_space("for fine-tuning")
    model = build_classifier(config, labels, text_encoder)
    if init is not None:
        model.load_pretrained_encoder(init)
    batches = stage_batches(
        cache.split("train", "labels", ctx),
        cache,
        config,
        "finetune",
        ctx,
        model.encoder.modalities.names,
        train.batch_size,
        train.num_workers,
        max_volumes=config.finetune.max_volumes,
        seed=train.seed,
    )
    run_config = {
        **config.sections("encoder", "finetune", "text", "data"),
        "init": str(init) if isinstance(init, (str, Path)) else type(init).__name__,
    }
    desc = "stage 2 (fine-tuning)"
    val = validation_split(cache, "labels", train, ctx, desc)

    def on_epoch_end(trained: nn.Module, epoch: int) -> dict[str, float | None]:
        return validation_metrics(cast(MedMAPClassifier, trained), val or [], cache, config, ctx)

    history = fit(
        model,
        batches,
        finetune_step,
        train,
        ctx,
        run_dir,
        desc=desc,
        resume=resume,
        progress=progress,
        on_epoch_end=on_epoch_end if val else None,
        run_config=run_config,
        find_unused_parameters=model.encoder.sharing == "separate",
    )
    if run_dir is not None and ctx.is_main:
        save_classifier(model, Path(run_dir) / MODEL_DIR, config, labels.class_names)
    return model, history


@torch.no_grad()
def predict(
    model: MedMAPClassifier, entries: Sequence[CacheEntry], cache: CacheData, config: RunConfig, ctx: DistributedContext
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [S, K] (binary: [S] of "present"; multilabel: independent sigmoids), labels [S] or [S, K])
    of every study of ``entries``, in order, with all its volumes (centre crop)."""
    probs, labels, _ = _scored(model, entries, cache, config, ctx)
    return probs, labels


@torch.no_grad()
def validation_metrics(
    model: MedMAPClassifier, entries: Sequence[CacheEntry], cache: CacheData, config: RunConfig, ctx: DistributedContext
) -> dict[str, float | None]:
    """Stage 2's per-epoch validation of the labelled studies ``entries``, in one pass (as :func:`predict`):
    ``val_loss`` (the training loss, ``compute_loss``, averaged over the studies) and ``val_accuracy``,
    ``val_auc_macro`` (None when no class has both positives and negatives) and ``val_f1_macro`` of
    :func:`~medmap_fast.train.evaluate.classification_metrics` for the model's task, the metrics of ``evaluate``.

    Every rank scores all of ``entries`` by itself, as ``evaluate`` does, so the values are the same on every rank.
    """
    probs, labels, loss = _scored(model, entries, cache, config, ctx)
    metrics = classification_metrics(probs, labels, list(cache.label_space().class_names), task=model.task)
    return {"val_loss": loss, **{f"val_{k}": metrics[k] for k in ("accuracy", "auc_macro", "f1_macro")}}


def _scored(
    model: MedMAPClassifier, entries: Sequence[CacheEntry], cache: CacheData, config: RunConfig, ctx: DistributedContext
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`predict`'s probabilities and labels, and the loss (``compute_loss``) averaged over the studies."""
    model.eval().to(ctx.device)
    batches = stage_batches(
        entries,
        cache,
        config,
        None,
        ctx,
        model.encoder.modalities.names,
        config.evaluate.batch_size,
        size_of="finetune",
    )
    probs, labels, total = [], [], 0.0
    for batch in batches.epoch(0):
        batch = to_device(batch, ctx.device)
        out = model(batch["volumes"], batch["modality_ids"], batch["study_index"], batch["num_studies"])
        total += float(model.compute_loss(out, batch["labels"])) * batch["num_studies"]
        logits = out.logits.float()
        probs.append((logits.softmax(1) if model.task == "multiclass" else logits.sigmoid().squeeze(-1)).cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), total / len(entries)


def save_classifier(
    model: MedMAPClassifier, directory: str | Path, config: RunConfig, class_names: Sequence[str]
) -> None:
    """``encoder/`` (the encoder's format), ``classifier.safetensors`` (everything else, prompt embeddings included)
    and ``classifier.json`` (the run config and class names), each written atomically."""
    directory = Path(directory)
    model.encoder.save_pretrained(directory / "encoder")
    save_head_weights(model, directory / WEIGHTS_FILE)
    meta = {
        "num_classes": model.num_classes,
        "task": model.task,
        "class_names": list(class_names),
        "config": config.to_dict(),
        "prompt_shape": list(cast(torch.Tensor, model.csa.prompt_embeddings).shape),
        "label_shape": (
            list(cast(torch.Tensor, model.label_embeddings).shape) if hasattr(model, "label_embeddings") else None
        ),
    }
    with atomic_path(directory / CONFIG_FILE, durable=True) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def load_classifier(directory: str | Path) -> tuple[MedMAPClassifier, dict[str, Any]]:
    """Inverse of :func:`save_classifier`: (classifier in eval mode, its metadata: class_names, config)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    meta = read_json_object(path, "medmap-fast finetune")
    encoder = MedMAPEncoder.from_pretrained(saved_encoder_dir(directory))  # its own files, its own errors
    try:
        kwargs = dict(meta["config"]["finetune"]["model"])
        if meta["label_shape"] is not None:
            kwargs["label_embeddings"] = torch.zeros(meta["label_shape"])  # the saved buffer replaces it
        model = MedMAPClassifier(
            encoder, meta["num_classes"], torch.zeros(meta["prompt_shape"]), task=meta["task"], **kwargs
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: describes no valid MedMAPClassifier ({type(err).__name__}: {err})") from err
    load_head_weights(model, directory / WEIGHTS_FILE, f"the classifier of {CONFIG_FILE}")
    return model.eval(), meta
