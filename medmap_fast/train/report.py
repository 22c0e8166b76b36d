"""``report.md`` of a demo run: what was trained on what, the held-out results, the ablation, training as its
run logs recorded it (with the per-epoch validation), and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmap_fast.fileio import atomic_path
from medmap_fast.train.runlog import VAL_PREFIX

# A difference in macro AUC smaller than this is reported as "no clear difference" (one seed, a few hundred test
# studies).
AUC_MARGIN = 0.02
ORGAN_CHANCE_AUC = 0.6  # an organ's own macro AUC below this is reported as "not separated"


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _class_table(metrics: dict[str, Any]) -> list[str]:
    lines = ["| class | support | AUC | sensitivity | specificity | F1 |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"| {name} | {m['support']} | {_fmt(m['auc'])} | {_fmt(m['sensitivity'])} | "
            f"{_fmt(m['specificity'])} | {_fmt(m['f1'])} |"
        )
    return lines


def _summary_row(name: str, m: dict[str, Any]) -> str:
    organs = " / ".join(f"{o} {_fmt(v['auc_macro'])}, {_fmt(v['accuracy'])}" for o, v in m.get("per_organ", {}).items())
    return (
        f"| {name} | {_fmt(m['accuracy'])} | {_fmt(m['chance_accuracy'])} | {_fmt(m['auc_macro'])} | "
        f"{_fmt(m['f1_macro'])} | {organs} |"
    )


def _organ_notes(metrics: dict[str, Any]) -> list[str]:
    """Say plainly when an organ's own task is not learned (its macro AUC near chance)."""
    notes = []
    for organ, m in metrics.get("per_organ", {}).items():
        if m["auc_macro"] is not None and m["auc_macro"] < ORGAN_CHANCE_AUC:
            notes.append(
                f"**The {organ} classes are not separated** (their own macro AUC {m['auc_macro']:.2f}, "
                f"accuracy {m['accuracy']:.2f}): at this volume size and training budget the model has "
                f"only learned that these studies are {organ} studies; the overall macro AUC comes from "
                "the organ split and the other organ's classes."
            )
    return notes


def _ablation_text(pre: dict[str, Any], rand: dict[str, Any], test_studies: int) -> list[str]:
    noise = f"one seed and {test_studies} test studies"
    gain = (pre["auc_macro"] or 0.0) - (rand["auc_macro"] or 0.0)
    acc_gain = pre["accuracy"] - rand["accuracy"]
    head = (
        f"Fine-tuning from the stage-1 encoder changed the held-out macro AUC by {gain:+.3f} and the accuracy by "
        f"{acc_gain:+.3f} against the same fine-tuning budget from a random initialisation."
    )
    if gain > AUC_MARGIN:
        verdict = (
            "**Pre-training helped** in this run. The reports name each study's finding, so the contrastive "
            "stage is a form of weak supervision on every volume separately (per-volume positives), and the "
            "fine-tuning stage starts from features that already separate the findings."
        )
    elif gain < -AUC_MARGIN:
        verdict = (
            "**Pre-training hurt** in this run. Likely causes: the short CPU budget stops stage 1 while its "
            "features still mostly encode the organ and the sequence (which the contrastive loss must "
            "separate first), and fine-tuning at a lower encoder learning rate then moves them too little; "
            f"with {noise} the difference may also be noise."
        )
    else:
        verdict = (
            f"**No clear difference** (within {AUC_MARGIN:.2f} AUC). With {noise} this is within noise. "
            "On this synthetic data every training study is labelled, so stage 2 sees the same studies and "
            "the same information as stage 1; pre-training pays off mainly when reports are plentiful "
            "and labels scarce, which this demo does not simulate."
        )
    return [head, "", verdict]


def _training_table(training: dict[str, dict[str, Any]]) -> list[str]:
    """One row per training run, from the summaries of their ``metrics.csv`` (:func:`runlog.summarize`)."""
    lines = [
        "| run | optimiser steps | final loss | volumes/s (median) | waiting for data | peak GPU memory | "
        "skipped (non-finite) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in training.items():
        share = "n/a" if t["data_fraction"] is None else f"{t['data_fraction']:.0%} of step time"
        memory = "n/a" if t["gpu_mem_gb"] is None else f"{t['gpu_mem_gb']:.2f} GiB"
        lines.append(
            f"| {name} | {t['steps']} | {_fmt(t['final_loss'])} | {_fmt(t['volumes_per_s'], 1)} | {share} | "
            f"{memory} | {t['nonfinite_steps']} |"
        )
    return lines


_VAL_LABELS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "auc_macro": "macro AUC",
    "f1_macro": "macro F1",
    "retrieval_r1": "R@1 (study to report)",
    "retrieval_r5": "R@5 (study to report)",
}


def _validation_tables(training: dict[str, dict[str, Any]]) -> list[str]:
    """Per run that evaluated after its epochs, one table of its validation rows (``summarize``'s ``validation``)."""
    lines: list[str] = []
    for name, t in training.items():
        rows = t.get("validation") or []
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith(VAL_PREFIX)))
        labels = [_VAL_LABELS.get(k.removeprefix(VAL_PREFIX), k) for k in keys]
        lines += [
            f"{name}:",
            "",
            f"| epoch | optimiser step | {' | '.join(labels)} |",
            "|---:|---:|" + "---:|" * len(keys),
        ]
        lines += [
            f"| {int(r['epoch'])} | {int(r['step'])} | {' | '.join(_fmt(r.get(k)) for k in keys)} |" for r in rows
        ]
        lines.append("")
    if not lines:
        return [
            "No run evaluated on a validation split after its epochs (the data has no `val` studies, or "
            "`train.eval_every` is 0).",
            "",
        ]
    head = (
        "Validation after each evaluated epoch (`train.eval_every`), from the same logs: the `val` studies, centre "
        "crops, all of each study's volumes, scored with the metrics of the held-out evaluation (stage 1: the "
        "contrastive loss over batches of a training step's size and study-to-report retrieval; stage 2: the "
        "supervised loss, accuracy, macro AUC and F1)."
    )
    return [head, "", *lines]


def write_report(path: str | Path, metrics: dict[str, Any], figures: dict[str, str]) -> None:
    """Write the markdown report of a demo run (``metrics`` as in metrics.json, ``figures`` name -> file name)."""
    test, pre, data, cfg = metrics["test"], metrics["pretrain"], metrics["data"], metrics["config"]
    env = metrics["environment"]
    enc = cfg["encoder"]
    lines = [
        f"# medmap-fast demo{' (quick)' if metrics['quick'] else ''}",
        "",
        f"Synthetic MRI studies ({data['size']}^3 voxels; {data['train_studies']} training studies with "
        f"{data['train_volumes']} volumes, {data['test_studies']} held-out test studies; {len(data['classes'])} "
        f"classes over brain and liver) -> stage 1 (modality-aware vision-language pre-training) -> stage 2 "
        f"(fine-tuning with CSA + CCT) -> evaluation on the held-out studies. Total time {metrics['elapsed_s']:.0f} s "
        f"on {env['device']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads, torch {env['torch']}).",
        "",
        f"Encoder: Swin-3D `{enc['sharing']}`, feature {enc['embed_dim']}, patch {enc['patch_size']}, window "
        f"{enc['window_size']}, depths {enc['depths']}, heads {enc['num_heads']}. Stage 1: "
        f"{cfg['pretrain']['train'].get('epochs')} epochs; stage 2: {cfg['finetune']['train'].get('epochs')} epochs.",
        "",
        "## Held-out classification",
        "",
        "| model | accuracy | chance accuracy | macro AUC (one-vs-rest) | macro F1 | per organ: macro AUC, accuracy |",
        "|---|---:|---:|---:|---:|---|",
        _summary_row("pre-trained, fine-tuned", test),
    ]
    if "ablation" in metrics:
        lines.append(_summary_row("random init, fine-tuned", metrics["ablation"]["random_init"]["test"]))
    lines += [
        "",
        "*Chance accuracy* is that of always answering the most frequent test class. The macro AUC over all classes "
        "also rewards telling brain from liver studies, which is easy; the per-organ numbers score each organ's own "
        "task (its studies only, probabilities renormalised over its classes).",
        "",
        *[line for note in _organ_notes(test) for line in (note, "")],
        *_class_table(test),
        "",
        f"![confusion matrix]({figures.get('confusion_matrix', '')})  ![ROC curves]({figures.get('roc_curves', '')})",
        "",
        "## Stage 1: zero-shot report retrieval (held-out studies)",
        "",
        f"A study (mean of its volumes' embeddings) retrieves its report among the {pre['num_reports']} distinct "
        f"test reports: R@1 {_fmt(pre['retrieval_r1'])}, R@5 {_fmt(pre['retrieval_r5'])} (chance "
        f"{_fmt(pre['chance_r1'])} / {_fmt(pre['chance_r5'])}); report to study: R@1 "
        f"{_fmt(pre['report_to_study_r1'])}, R@5 {_fmt(pre['report_to_study_r5'])}. The {pre['num_studies']} test "
        f"studies have {pre['num_reports']} distinct reports (random phrasing, sizes, locations and listed sequences), "
        "so retrieval at R@1 needs more than the class.",
        "",
    ]
    if "ablation" in metrics:
        lines += [
            "## Ablation: does pre-training help?",
            "",
            *_ablation_text(test, metrics["ablation"]["random_init"]["test"], metrics["data"]["test_studies"]),
            "",
        ]
    if metrics.get("training"):
        lines += [
            "## Training",
            "",
            *_training_table(metrics["training"]),
            "",
            "From each run folder's `metrics.csv`, which holds one row per logged optimiser step (loss and "
            "its terms, learning rate, gradient norm, volumes/s, data and step time, skipped steps) and the "
            "same values as TensorBoard event files (`tensorboard --logdir RUN`).",
            "",
            *_validation_tables(metrics["training"]),
        ]
    lines += ["## Figures", "", f"![loss and learning-rate curves]({figures.get('loss_curves', '')})", ""]
    lines += [f"![{name}]({file})" for name, file in figures.items() if name.startswith("studies_")]
    timings = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in metrics.get("timings_s", {}).items())
    lines += ["", f"Timings: {timings}.", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
