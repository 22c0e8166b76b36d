"""``medmap-fast zero-shot``: classify studies with a stage-1 model and text prompts of the classes, no fine-tuning.

Scoring is CLIP's: a study's joint-space embedding (:func:`~medmap_fast.train.pretrain.embed_studies`: every
volume, centre crop) against each prompt's embedding (the frozen text encoder, then the model's text projection),
both L2-normalised, their cosine similarity times the model's learned logit scale being the logit.

* single-label caches (binary, multiclass): one prompt per class; a study's class probabilities are the softmax of
  its logits over the classes.
* multi-label caches: every class is scored on its own, CLIP-style, with its prompt and a negative prompt
  (``negative_template``, default "no {prompt}": "hepatic cyst MRI" -> "no hepatic cyst MRI"); the class's
  probability is the softmax over that pair, ``sigmoid(logit(prompt) - logit(negative))``.

The metrics are :func:`~medmap_fast.train.evaluate.classification_metrics` of the task, the ones ``medmap-fast
evaluate`` reports for a classifier of that task (multi-label: per-label AUC, F1, ... at threshold 0.5, exact-match
accuracy).

Classes and prompts: by default every class of the cache's labels (in ``data.classes`` order), each prompt being
``text.prompt_template`` with ``{name}`` = the class name and ``{description}`` = that name with spaces for
underscores ("{description} MRI": hepatic_cyst -> "hepatic cyst MRI"). Given classes are prompts used as written,
each matched to a class of the cache by its words (case, "_" and "-" ignored: "hepatic cyst" is hepatic_cyst), or
``CLASS=PROMPT`` pairs. Single-label: only the split's studies labelled with a chosen class are scored (a subset of
the classes is a smaller task). Multi-label: every labelled study of the split is scored on the chosen classes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from medmap_fast.data.cache import CacheEntry
from medmap_fast.models.medmap import MedMAPPretrainModel
from medmap_fast.models.text import TextEncoder
from medmap_fast.train.config import RunConfig
from medmap_fast.train.data import CacheData
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.pretrain import embed_studies
from medmap_fast.validation import fail

NEGATIVE_TEMPLATE = "no {prompt}"  # multi-label: the negative prompt of each class


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


def negative_prompts(prompts: dict[str, str], template: str) -> dict[str, str]:
    """class name -> negative prompt: ``template`` with ``{prompt}`` (the class's prompt), ``{name}`` and
    ``{description}`` filled in; a template with other fields is an error naming it."""
    try:
        return {c: template.format(prompt=p, name=c, description=c.replace("_", " ")) for c, p in prompts.items()}
    except (KeyError, IndexError, ValueError) as err:
        fail(
            "--negative-template",
            "a format string with no fields other than {prompt}, {name} and {description}",
            f"{template!r} ({type(err).__name__}: {err})",
        )


def _chosen_studies(
    cache: CacheData, split: str, prompts: dict[str, str], multilabel: bool, ctx: DistributedContext
) -> tuple[list[CacheEntry], np.ndarray]:
    """(the studies of ``split`` to score, their labels over the classes of ``prompts``: [S] class indices, or
    [S, K] 0/1 for ``multilabel``); single-label studies of other classes are left out (said on stderr)."""
    names = list(prompts)
    labelled = cache.split(split, "labels", ctx)
    if multilabel:
        sets = [{e.labels} if isinstance(e.labels, str) else set(e.labels or ()) for e in labelled]
        return labelled, np.array([[n in s for n in names] for s in sets], dtype=np.int64)
    entries = [e for e in labelled if isinstance(e.labels, str) and e.labels in prompts]
    if not entries:
        fail(f"{cache.path} split {split!r}", f"studies labelled with one of {names}", "none")
    if len(entries) < len(labelled) and ctx.is_main:
        print(
            f"{cache.path}: {len(labelled) - len(entries)} of {len(labelled)} {split} studies have another class "
            f"and are left out",
            file=sys.stderr,
        )
    return entries, np.array([names.index(cast(str, e.labels)) for e in entries])


@torch.no_grad()
def zero_shot(
    model: MedMAPPretrainModel,
    cache: CacheData,
    config: RunConfig,
    text_encoder: TextEncoder,
    ctx: DistributedContext,
    split: str = "test",
    classes: Sequence[str] | None = None,
    negative_template: str = NEGATIVE_TEMPLATE,
) -> dict[str, Any]:
    """Zero-shot metrics of ``split``'s labelled studies: ``{split: classification metrics, "prompts": {class:
    prompt}}`` (+ ``"negative_prompts"`` for a multi-label cache); ``classes`` as ``--classes`` takes them (None:
    every class, templated)."""
    space = cache.label_space("to score")
    multilabel = space.task == "multilabel"
    prompts = class_prompts(space.class_names, config.text.prompt_template, classes)
    names = list(prompts)
    if len(names) < 2 and not multilabel:
        fail("--classes", "at least two classes to choose between", f"{names}")
    negatives = negative_prompts(prompts, negative_template) if multilabel else {}
    entries, labels = _chosen_studies(cache, split, prompts, multilabel, ctx)
    studies = embed_studies(model, entries, cache, config, config.evaluate.batch_size, ctx)  # [S, E]
    text = text_encoder.encode([*prompts.values(), *negatives.values()]).to(ctx.device)
    texts = F.normalize(model.embed_reports(text).float(), dim=-1).cpu()  # [K (+ K negatives), E]
    logits = model.loss_fn.scale().detach().float().cpu() * studies @ texts.T
    if multilabel:  # per class, the softmax over (prompt, negative prompt)
        k = len(names)
        probs = torch.stack([logits[:, :k], logits[:, k:]], dim=-1).softmax(-1)[..., 0]
        metrics = classification_metrics(probs.numpy(), labels, names, task="multilabel")
        return {split: metrics, "prompts": prompts, "negative_prompts": negatives}
    task = "binary" if len(names) == 2 else "multiclass"
    return {split: classification_metrics(logits.softmax(1).numpy(), labels, names, task=task), "prompts": prompts}
