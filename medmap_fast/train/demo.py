"""``medmap-fast demo``: generate synthetic studies, pre-train (stage 1), fine-tune (stage 2), evaluate on held-out
studies, and write a run folder:

    metrics.json        test metrics (accuracy, chance, macro AUC / F1, per class and per organ), stage-1 retrieval,
                        the ablation (with --ablation), timings, the configuration and the environment
    report.md           the same in prose and tables, with the figures
    loss_curves.png  roc_curves.png  confusion_matrix.png  studies_brain.png  studies_liver.png
    stage1/ stage2/ [stage2_random_init/]   each with checkpoint.pt (re-running with the same --out resumes) and model/
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmap_fast.data.study import Study
from medmap_fast.fileio import atomic_path
from medmap_fast.models.text import TextEncoder
from medmap_fast.train import plots
from medmap_fast.train.config import load_config
from medmap_fast.train.data import StudySplit, TextTable, load_studies
from medmap_fast.train.distributed import DistributedContext, init_distributed
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.finetune import finetune, predict
from medmap_fast.train.pretrain import pretrain, retrieval_metrics
from medmap_fast.train.report import write_report


def configs_dir() -> Path:
    """The shipped YAML configs: the installed ``medmap_fast.configs`` package, else ``configs/`` of a checkout."""
    try:
        from importlib.resources import files

        return Path(str(files("medmap_fast.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


def organ_metrics(probs: np.ndarray, labels: np.ndarray, organ_classes: dict[str, Sequence[str]],
                  class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of each organ's own task: its studies only, probabilities renormalised over its classes.

    The macro one-vs-rest AUC over all classes also rewards telling brain from liver, which is easy; these numbers
    measure the abnormality detection within an organ.
    """
    out = {}
    for organ, names in organ_classes.items():
        idx = [class_names.index(n) for n in names]
        rows = np.isin(labels, idx)
        if not rows.any():
            continue
        p = probs[rows][:, idx]
        p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
        y = np.searchsorted(np.array(idx), labels[rows])  # idx is sorted: the organ's classes are contiguous
        out[organ] = classification_metrics(p, y, list(names))
    return out


def evaluate_classifier(model: torch.nn.Module, split: StudySplit, batch_size: int) -> dict[str, Any]:
    """Test-set metrics (overall and per organ) plus the raw probabilities for the plots."""
    from medmap_fast.synthetic.demo import ORGAN_CLASSES

    probs, labels = predict(model, split.test, batch_size)
    metrics = classification_metrics(probs, labels, split.class_names)
    metrics["per_organ"] = organ_metrics(probs, labels, ORGAN_CLASSES, list(split.class_names))
    return {"metrics": metrics, "probs": probs, "labels": labels}


def lesion_slice(study: Study) -> int | None:
    """Approximate axial index through the study's (first) lesion, from its world-mm centre (pose ignored)."""
    from medmap_fast.synthetic.abdomen import ABDOMEN_CENTER_MM
    from medmap_fast.synthetic.anatomy import brain_atlas

    a = study.attributes
    center = a.get("center_mm") or (a.get("centers_mm") or [None])[0]
    if center is None:
        return None
    fov_center = brain_atlas().center if study.organ == "brain" else ABDOMEN_CENTER_MM
    depth = study.volume.shape[-1]
    z = round((center[2] - fov_center[2]) / study.spacing[2] + (depth - 1) / 2)
    return int(np.clip(z, 0, depth - 1))


def example_studies(studies: Sequence[Study], organ: str, count: int = 4) -> list[Study]:
    """Up to ``count`` studies of ``organ`` with distinct classes, those with the most modalities first."""
    chosen: dict[int, Study] = {}
    for s in sorted((s for s in studies if s.organ == organ), key=lambda s: -len(s.modalities)):
        chosen.setdefault(s.label, s)
    return sorted(chosen.values(), key=lambda s: s.label)[:count]


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "backend": os.environ.get("MEDMAP_FAST_BACKEND", "auto")}


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def run_demo(out_dir: str | Path | None = None, quick: bool = False, ablation: bool = False,
             config_path: str | Path | None = None, seed: int | None = None, progress: bool = True,
             ctx: DistributedContext | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the content of ``metrics.json``."""
    started = time.perf_counter()
    ctx = ctx or init_distributed()
    config_path = config_path or configs_dir() / ("demo_quick.yaml" if quick else "demo.yaml")
    config = load_config(config_path, {"seed": seed} if seed is not None else None)
    out = Path(out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    split = load_studies(config["data"], config["seed"], progress=progress and ctx.is_main)
    text_cfg = config["text"]
    text_encoder = TextEncoder(text_cfg["model"], pooling=text_cfg["pooling"], max_length=text_cfg.get("max_length"),
                               cache_dir=text_cfg.get("cache_dir"))
    reports = TextTable([s.report for s in split.train + split.test], text_encoder, progress=progress and ctx.is_main)
    t = lap("data_s", t)

    stage1, stage1_log = pretrain(split.train, config, reports, ctx, out / "stage1", progress=progress)
    t = lap("pretrain_s", t)
    batch_size = config["evaluate"]["batch_size"]
    retrieval = retrieval_metrics(stage1, split.test, reports, batch_size, ctx.device)
    t = lap("retrieval_s", t)

    num_classes = len(split.class_names)
    runs = {"pretrained": (stage1, out / "stage2")}
    if ablation:
        runs["random_init"] = (None, out / "stage2_random_init")
    results, logs = {}, {"stage 1 (pre-training)": stage1_log}
    for name, (init, run_dir) in runs.items():
        model, log = finetune(split.train, config, num_classes, text_encoder, ctx, init=init, run_dir=run_dir,
                              class_names=split.class_names, progress=progress)
        t = lap(f"finetune_{name}_s", t)
        results[name] = evaluate_classifier(model, split, batch_size)
        logs[f"stage 2 ({name.replace('_', ' ')})"] = log
        t = lap(f"evaluate_{name}_s", t)

    main = results["pretrained"]
    metrics = {
        "test": main["metrics"],
        "pretrain": {**retrieval, "final_loss": next((h["loss"] for h in reversed(stage1_log) if "loss" in h), None)},
        "data": {"train_studies": len(split.train), "test_studies": len(split.test),
                 "train_volumes": sum(len(s.modalities) for s in split.train),
                 "size": config["data"]["size"], "classes": list(split.class_names)},
        "config": config, "environment": environment(), "quick": quick,
    }
    if ablation:
        metrics["ablation"] = {"random_init": {"test": results["random_init"]["metrics"]}}
    if ctx.is_main:
        from medmap_fast.synthetic.demo import ORGAN_MODALITIES

        figures = {
            "loss_curves": plots.plot_loss_curves(logs, out / "loss_curves.png"),
            "roc_curves": plots.plot_roc_curves(main["probs"], main["labels"], split.class_names,
                                                out / "roc_curves.png", "held-out studies, one-vs-rest ROC"),
            "confusion_matrix": plots.plot_confusion_matrix(main["metrics"]["confusion_matrix"], split.class_names,
                                                            out / "confusion_matrix.png", "held-out studies"),
        }
        for organ in ORGAN_MODALITIES:
            examples = example_studies(split.test, organ)
            if examples:
                figures[f"studies_{organ}"] = plots.plot_study_slices(
                    examples, out / f"studies_{organ}.png", [f"[{split.class_names[s.label]}] {s.report}" for s in examples],
                    [lesion_slice(s) for s in examples],
                    f"generated {organ} studies (held out): axial slices of each acquired sequence")
        t = lap("plots_s", t)
        metrics["timings_s"] = timings
        metrics["elapsed_s"] = round(time.perf_counter() - started, 2)
        write_json(out / "metrics.json", metrics)
        write_report(out / "report.md", metrics, {k: p.name for k, p in figures.items()})
    return metrics
