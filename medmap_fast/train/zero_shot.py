"""``medmap-fast zero-shot``: classify studies with a stage-1 model and one text prompt per class, no fine-tuning.

Scoring is CLIP's: a study's joint-space embedding (:func:`~medmap_fast.train.pretrain.embed_studies`: every
volume, centre crop) against each prompt's embedding (the frozen text encoder, then the model's text projection),
both L2-normalised; the class probabilities are the softmax over the classes of the cosine similarities times the
model's learned logit scale. The metrics are :func:`~medmap_fast.train.evaluate.classification_metrics`, the ones
``medmap-fast evaluate`` reports for a classifier.

Classes and prompts: by default every class of the cache's labels (in ``data.classes`` order), each prompt being
``text.prompt_template`` with ``{name}`` = the class name and ``{description}`` = that name with spaces for
underscores ("{description} MRI": hepatic_cyst -> "hepatic cyst MRI"). Given classes are prompts used as written,
each matched to a class of the cache by its words (case, "_" and "-" ignored: "hepatic cyst" is hepatic_cyst), or
``CLASS=PROMPT`` pairs. Only the split's studies labelled with a chosen class are scored: a subset of the classes
is a smaller task. Single-label caches only (a multi-label study has no one class to find).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmap_fast.models.medmap import MedMAPPretrainModel
from medmap_fast.models.text import TextEncoder
from medmap_fast.train.config import RunConfig
from medmap_fast.train.data import CacheData
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.pretrain import embed_studies
from medmap_fast.validation import fail


def _words(text: str) -> str:
    return re.sub(r"[\s_-]+", " ", text.strip().lower())


def class_prompts(class_names: Sequence[str], template: str, given: Sequence[str] | None = None) -> dict[str, str]:
    """class name -> prompt, in the order of ``given`` (default: every class, templated; see the module docstring).
    An item matching no class, or naming a class twice, is an error listing the classes."""
    if not given:
        return {c: template.format(name=c, description=c.replace("_", " ")) for c in class_names}
    by_words = {_words(c): c for c in class_names}
    prompts: dict[str, str] = {}
    for item in given:
        name, prompt = item.split("=", 1) if "=" in item else (item, item)
        match = by_words.get(_words(name))
        if match is None:
            fail(
                f"--classes {item!r}",
                f"a class of the cache's labels ({', '.join(class_names)}) or CLASS=PROMPT",
                f"no class {name.strip()!r}",
            )
        if match in prompts:
            fail(f"--classes {item!r}", "each class once", f"{match!r} a second time")
        prompts[match] = prompt.strip()
    return prompts


@torch.no_grad()
def zero_shot(
    model: MedMAPPretrainModel,
    cache: CacheData,
    config: RunConfig,
    text_encoder: TextEncoder,
    ctx: DistributedContext,
    split: str = "test",
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot metrics of ``split``'s labelled studies: ``{split: classification metrics, "prompts": {class:
    prompt}}``; ``classes`` as ``--classes`` takes them (None: every class, templated)."""
    space = cache.label_space("to score")
    if space.task == "multilabel":
        fail(f"{cache.path}", "single-label studies (one class each) for zero-shot scoring", "multi-label studies")
    prompts = class_prompts(space.class_names, config.text.prompt_template, classes)
    names = list(prompts)
    if len(names) < 2:
        fail("--classes", "at least two classes to choose between", f"{names}")
    labelled = cache.split(split, "labels", ctx)
    chosen = [(e, names.index(e.labels)) for e in labelled if isinstance(e.labels, str) and e.labels in prompts]
    entries = [e for e, _ in chosen]
    if not entries:
        fail(f"{cache.path} split {split!r}", f"studies labelled with one of {names}", "none")
    if len(entries) < len(labelled) and ctx.is_main:
        print(
            f"{cache.path}: {len(labelled) - len(entries)} of {len(labelled)} {split} studies have another class "
            f"and are left out",
            file=sys.stderr,
        )
    studies = embed_studies(model, entries, cache, config, config.evaluate.batch_size, ctx)  # [S, E]
    text = text_encoder.encode(list(prompts.values())).to(ctx.device)
    classes_emb = F.normalize(model.embed_reports(text).float(), dim=-1).cpu()  # [K, E]
    logits = model.loss_fn.scale().detach().float().cpu() * studies @ classes_emb.T
    labels = np.array([label for _, label in chosen])
    task = "binary" if len(names) == 2 else "multiclass"
    return {split: classification_metrics(logits.softmax(1).numpy(), labels, names, task=task), "prompts": prompts}
