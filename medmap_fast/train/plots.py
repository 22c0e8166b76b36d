"""PNG figures of a run: loss and learning-rate curves (from the runs' ``metrics.csv``), one-vs-rest ROC curves,
the confusion matrix, and slices of studies.

matplotlib (the ``demo`` extra) is imported lazily with the non-interactive Agg backend, so training never needs it.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmap_fast.fileio import atomic_path
from medmap_fast.train.evaluate import roc_auc, roc_curve
from medmap_fast.train.runlog import VAL_PREFIX, read_metrics, validation_rows

VAL_LOSS = f"{VAL_PREFIX}loss"
_METRIC_COLORS = ["tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray"]


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


def plot_loss_curves(runs: Mapping[str, str | Path], path: str | Path) -> Path:
    """One column per run (e.g. "stage 1", "stage 2": its run folder or ``metrics.csv``), drawn from the run's
    log: training loss against optimiser step with the per-epoch validation loss (the other validation metrics, all
    in [0, 1], on a second axis; updates skipped as non-finite marked), and the learning rate under it."""
    logs = {name: read_metrics(run) for name, run in runs.items()}  # a missing log fails before any drawing
    plt = _pyplot()
    fig, axes = plt.subplots(
        2, len(logs), figsize=(5.2 * len(logs), 5.4), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [2, 1]}
    )
    for ax, lr_ax, (name, rows) in zip(axes[0], axes[1], logs.items(), strict=True):
        steps = [r for r in rows if not r.get("epoch_end")]
        losses = [r for r in steps if "loss" in r]
        ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="tab:blue", label="train loss")
        for i, r in enumerate(r for r in steps if r.get("nonfinite_steps")):
            ax.axvline(r["step"], color="tab:red", lw=0.8, ls=":", label="skipped (non-finite)" if i == 0 else None)
        ax.set(title=name, ylabel="loss")
        epochs = validation_rows(rows)
        if any(VAL_LOSS in r for r in epochs):
            ax.plot(
                [r["step"] for r in epochs],
                [r.get(VAL_LOSS, np.nan) for r in epochs],
                color="tab:orange",
                marker="o",
                label="validation loss",
            )
        keys = sorted({k for r in epochs for k in r} - {"step", "epoch", VAL_LOSS})
        if keys:
            twin = ax.twinx()
            for key, color in zip(keys, itertools.cycle(_METRIC_COLORS)):  # colours the loss axis does not use
                values = [np.nan if r.get(key) is None else r[key] for r in epochs]
                twin.plot([r["step"] for r in epochs], values, color=color, marker="o", ls="--", label=key)
            twin.set(ylabel="validation metrics", ylim=(0, 1.02))
            twin.legend(loc="center right", fontsize=7)
        ax.legend(loc="upper right", fontsize=7)
        lr_ax.plot([r["step"] for r in steps if "lr" in r], [r["lr"] for r in steps if "lr" in r], color="tab:green")
        lr_ax.set(xlabel="optimiser step", ylabel="learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return _save(fig, path)


def plot_roc_curves(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "one-vs-rest ROC"
) -> Path:
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


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str = "confusion matrix"
) -> Path:
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
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.6 else "black",
                )
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_study_slices(
    studies: Sequence[Any],
    path: str | Path,
    captions: Sequence[str] | None = None,
    slice_index: Sequence[int | None] | None = None,
    title: str = "generated studies",
) -> Path:
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
