"""PNG figures of a run: loss curves, one-vs-rest ROC curves, the confusion matrix, and slices of studies.

matplotlib (the ``demo`` extra) is imported lazily with the non-interactive Agg backend, so training never needs it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmap_fast.fileio import atomic_path
from medmap_fast.train.evaluate import roc_auc, roc_curve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_loss_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """One panel per run (e.g. "stage 1", "stage 2"): training loss against optimiser step (and any per-epoch
    validation metrics of the run's log on a second axis)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(histories), figsize=(5.2 * len(histories), 3.6), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items()):
        steps = [h for h in history if "loss" in h and not h.get("epoch_end")]
        ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], color="tab:blue", label="train loss")
        ax.set(title=name, xlabel="optimiser step", ylabel="loss")
        epochs = [h for h in history if h.get("epoch_end")]
        keys = sorted({k for h in epochs for k in h} - {"step", "epoch", "epoch_end"})
        if keys:
            twin = ax.twinx()
            for key in keys:
                twin.plot([h["step"] for h in epochs], [h.get(key, np.nan) for h in epochs], marker="o", ls="--",
                          label=key)
            twin.set(ylabel="validation", ylim=(0, 1.02))
            twin.legend(loc="center right", fontsize=7)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc_curves(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path,
                    title: str = "one-vs-rest ROC") -> Path:
    """One ROC curve per class present in ``labels`` (multiclass probabilities [S, K]), AUC in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(class_names), 2)))
    for c, name in enumerate(class_names):
        positive = labels == c
        auc = roc_auc(probs[:, c], positive)
        if auc is None:
            continue
        fpr, tpr = roc_curve(probs[:, c], positive)
        ax.plot(fpr, tpr, color=colors[c], lw=1.4, label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=6.5, loc="lower right", title="class (AUC)", title_fontsize=7)
    return _save(fig, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in the cells."""
    plt = _pyplot()
    cm = np.asarray(matrix)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_study_slices(studies: Sequence[Any], path: str | Path, captions: Sequence[str] | None = None,
                      slice_index: Sequence[int | None] | None = None, title: str = "generated studies") -> Path:
    """One row per study: an axial slice of every modality present, and a caption (default: the report) under it.

    ``studies`` need ``modalities`` (names), ``volume`` [M, D, H, W] (D, H, W = x, y, z in RAS) and ``report``.
    ``slice_index[i]`` picks the axial (z) slice of study i (default: the middle one). Slices are shown in
    radiological convention (patient's right on the left, anterior up).
    """
    plt = _pyplot()
    cols = max(len(s.modalities) for s in studies)
    fig, axes = plt.subplots(len(studies), cols, figsize=(1.9 * cols, 2.9 * len(studies)), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.35 / len(studies), bottom=0.07, wspace=0.05, hspace=0.75)
    for row, study in enumerate(studies):
        volume = np.asarray(study.volume, dtype=np.float32)
        z = volume.shape[-1] // 2 if not slice_index or slice_index[row] is None else slice_index[row]
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(study.modalities):
                continue
            image = volume[col, :, :, z].T[:, ::-1]  # rows = y (anterior up with origin="lower"), columns = -x
            lo, hi = np.percentile(image, [1, 99.5])
            ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(study.modalities[col], fontsize=8)
        report = textwrap.fill(captions[row] if captions else study.report, width=28 * cols)
        axes[row][0].text(0.0, -0.06, report, transform=axes[row][0].transAxes, fontsize=6.5, va="top", ha="left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
