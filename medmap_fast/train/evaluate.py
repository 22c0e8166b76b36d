"""Evaluation metrics: classification (accuracy, one-vs-rest AUC, F1, sensitivity/specificity, confusion matrix) and
report retrieval (recall@k).

Pure functions of numpy arrays or tensors, no scikit-learn dependency (the tests check them against it). Conventions:

* **AUC** is the Mann-Whitney statistic with mid-ranks for ties (equal to the trapezoidal area under the ROC curve).
  A class with no positive or no negative sample has no AUC: it is ``None`` in ``auc_per_class``, left out of
  ``auc_macro`` and listed in ``auc_undefined``.
* **F1 / sensitivity / specificity** are per class from the confusion matrix; a 0/0 ratio counts as 0 (scikit-learn's
  ``zero_division=0``). ``f1_macro`` is their unweighted mean over all classes.
* **chance_accuracy** is the accuracy of always answering the most frequent class of the evaluated labels (the
  stronger of the two usual "chance" baselines; uniform guessing scores 1/K).
* Binary tasks are scored as two classes ("absent", "present") so every metric has the same meaning;
  multi-label tasks get per-label binary metrics and subset (exact-match) accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medmap_fast.validation import fail

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def roc_auc(scores: ArrayLike, positive: ArrayLike) -> float | None:
    """Area under the ROC curve of ``scores`` [N] for the 0/1 ``positive`` [N]; None when one class is missing."""
    s, y = _numpy(scores, np.float64).ravel(), _numpy(positive).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # mid-ranks: every run of equal scores gets the mean of its 1-based positions
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: ArrayLike, positive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of every threshold, from (0, 0) to (1, 1); ties form one step."""
    s, y = _numpy(scores, np.float64).ravel(), _numpy(positive).ravel().astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr


def confusion_matrix(predicted: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true class, columns = predicted class."""
    p, y = _numpy(predicted, np.int64).ravel(), _numpy(labels, np.int64).ravel()
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def _per_class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity (recall), specificity, precision and F1 of every class of a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    sensitivity, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _as_class_probabilities(probs: np.ndarray, task: str) -> np.ndarray:
    """Binary scores ([S], [S, 1] probability of "present", or [S, 2]) -> [S, 2]; others unchanged."""
    if task != "binary":
        return probs
    if probs.ndim == 2 and probs.shape[1] == 2:
        return probs
    p = probs.reshape(-1)
    return np.stack([1.0 - p, p], axis=1)


def classification_metrics(
    probs: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str] | None = None,
    task: str = "multiclass",
    threshold: float = 0.5,
) -> dict[str, Any]:
    """All classification metrics as a JSON-ready dict.

    Args:
        probs: [S, K] class probabilities (multiclass; argmax is the prediction), [S] / [S, 1] / [S, 2] probability
            of "present" (binary), or [S, K] independent label probabilities (multilabel, ``threshold`` applies).
        labels: [S] class indices (multiclass), [S] 0/1 (binary) or [S, K] 0/1 (multilabel).
        class_names: K names (default "0", "1", ...); binary defaults to ("absent", "present").
    Returns:
        accuracy, chance_accuracy, auc_macro, f1_macro, num_samples, and per class (keyed by name): auc, f1,
        sensitivity, specificity, precision, support; the confusion matrix (multiclass/binary: [K, K] rows = truth;
        multilabel: one [[tn, fp], [fn, tp]] per label); auc_undefined (classes left out of auc_macro).
    """
    if task not in ("multiclass", "binary", "multilabel"):
        fail("task", "'multiclass', 'binary' or 'multilabel'", repr(task))
    p = _as_class_probabilities(_numpy(probs, np.float64), task)
    y = _numpy(labels, np.int64)
    s = p.shape[0]
    if (
        p.ndim != 2
        or s == 0
        or (task == "multilabel" and y.shape != p.shape)
        or (task != "multilabel" and y.reshape(-1).shape != (s,))
    ):
        fail(
            "probs/labels",
            "[S, K] probabilities with [S] labels ([S, K] for multilabel), S >= 1",
            f"probs {p.shape}, labels {y.shape}",
        )
    k = p.shape[1]
    if class_names is None:
        class_names = ("absent", "present") if task == "binary" else [str(i) for i in range(k)]
    if len(class_names) != k:
        fail("class_names", f"{k} names (one per column of probs)", f"{len(class_names)}")
    if task == "multilabel":
        return _multilabel_metrics(p, y, list(class_names), threshold)
    y = y.reshape(-1)
    if y.min() < 0 or y.max() >= k:
        fail("labels", f"class indices in [0, {k})", f"values in [{y.min()}, {y.max()}]")
    predicted = p.argmax(1)
    cm = confusion_matrix(predicted, y, k)
    rates = _per_class_rates(cm)
    aucs = [roc_auc(p[:, c], y == c) for c in range(k)]
    support = np.bincount(y, minlength=k)
    return {
        "num_samples": int(s),
        "accuracy": float((predicted == y).mean()),
        "chance_accuracy": float(support.max() / s),
        "auc_macro": _mean_defined(aucs),
        "f1_macro": float(rates["f1"].mean()),
        "auc_undefined": [name for name, a in zip(class_names, aucs, strict=True) if a is None],
        "per_class": {
            name: {"auc": aucs[c], "support": int(support[c]), **{m: float(v[c]) for m, v in rates.items()}}
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def _multilabel_metrics(p: np.ndarray, y: np.ndarray, names: list[str], threshold: float) -> dict[str, Any]:
    predicted = p >= threshold
    truth = y.astype(bool)
    per_label, aucs, f1s, matrices = {}, [], [], []
    for c, name in enumerate(names):
        cm = confusion_matrix(predicted[:, c], truth[:, c], 2)
        rates = {m: float(v[1]) for m, v in _per_class_rates(cm).items()}  # the "present" row
        auc = roc_auc(p[:, c], truth[:, c])
        aucs.append(auc)
        f1s.append(rates["f1"])
        matrices.append(cm.tolist())
        per_label[name] = {"auc": auc, "support": int(truth[:, c].sum()), **rates}
    prevalence = truth.mean(0)
    return {
        "num_samples": int(p.shape[0]),
        "accuracy": float((predicted == truth).all(1).mean()),
        # the best constant answer per label, scored by exact match over all labels
        "chance_accuracy": float((truth == (prevalence >= 0.5)).all(1).mean()),
        "auc_macro": _mean_defined(aucs),
        "f1_macro": float(np.mean(f1s)),
        "auc_undefined": [name for name, a in zip(names, aucs, strict=True) if a is None],
        "per_class": per_label,
        "confusion_matrix": matrices,
        "class_names": names,
    }


def recall_at_k(similarity: ArrayLike, relevant: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries with a relevant candidate among their k most similar ones, for every k in ``ks``.

    similarity [Q, C] (higher = closer); relevant [Q, C] bool (several candidates may be relevant to a query, e.g.
    identical report texts). k larger than C is clamped to C.
    """
    sim = torch.as_tensor(_numpy(similarity, np.float64))
    rel = torch.as_tensor(_numpy(relevant).astype(bool))
    if sim.ndim != 2 or sim.shape != rel.shape or sim.shape[0] == 0 or sim.shape[1] == 0:
        fail("similarity/relevant", "two [Q, C] arrays with Q, C >= 1", f"{tuple(sim.shape)} and {tuple(rel.shape)}")
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    hits = torch.gather(rel, 1, order)
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), torch.full((sim.shape[0],), sim.shape[1]))
    return {k: float((first_hit < min(k, sim.shape[1])).float().mean()) for k in ks}
