"""``medmap-fast demo``: write synthetic studies as NIfTI files and a manifest, prepare them into a cache, pre-train
(stage 1), fine-tune (stage 2), evaluate on held-out studies, and write a run folder:

    data/ cache/        the generated studies (NIfTI + manifest.jsonl) and their prepared cache: the path a user's
                        own studies take (re-running with the same --out reuses both)
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
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch


from medmap_fast import configs
from medmap_fast.data.cache import CacheEntry
from medmap_fast.fileio import atomic_path
from medmap_fast.models.text import TextEncoder
from medmap_fast.train import plots
from medmap_fast.train.config import load_config
from medmap_fast.train.data import CacheData, TextTable, open_cache
from medmap_fast.train.distributed import DistributedContext, barrier, init_distributed
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.finetune import finetune, predict
from medmap_fast.train.pretrain import pretrain, retrieval_metrics
from medmap_fast.train.report import write_report


def configs_dir() -> Path:
    """The shipped YAML configs: the ``medmap_fast.configs`` package's folder, through ``importlib.resources``."""
    return configs.directory()


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


def evaluate_classifier(model: torch.nn.Module, cache: CacheData, config: dict[str, Any], ctx: DistributedContext,
                        split: str = "test") -> dict[str, Any]:
    """Metrics of a split's labelled studies plus the raw probabilities for the plots; ``per_organ`` too when the
    classes are the demo's."""
    from medmap_fast.synthetic.demo import CLASSES, ORGAN_CLASSES

    probs, labels = predict(model, cache.split(split, "labels", ctx), cache, config, ctx)
    class_names = list(cache.labels.class_names)
    metrics = classification_metrics(probs, labels, class_names, task=model.task)
    if set(class_names) <= set(CLASSES) and model.task == "multiclass":
        metrics["per_organ"] = organ_metrics(probs, labels, ORGAN_CLASSES, class_names)
    return {"metrics": metrics, "probs": probs, "labels": labels}


def example_studies(entries: Sequence[CacheEntry], cache: CacheData, organ: str,
                    count: int = 4) -> list[SimpleNamespace]:
    """Up to ``count`` prepared studies of ``organ`` with distinct classes (those with the most modalities first),
    with what :func:`plots.plot_study_slices` needs: modalities, volume [M, X, Y, Z] and report."""
    from medmap_fast.synthetic.demo import ORGAN_CLASSES

    chosen: dict[str, CacheEntry] = {}
    for e in sorted((e for e in entries if e.labels in ORGAN_CLASSES[organ]), key=lambda e: -len(e.modalities)):
        chosen.setdefault(e.labels, e)
    order = list(ORGAN_CLASSES[organ])
    picked = sorted(chosen.values(), key=lambda e: order.index(e.labels))[:count]
    return [SimpleNamespace(modalities=e.modalities, volume=np.asarray(e.load(cache.path), dtype=np.float32),
                            report=f"[{e.labels}] {e.report}") for e in picked]


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "backend": os.environ.get("MEDMAP_FAST_BACKEND", "auto")}


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def prepare_demo_data(config: dict[str, Any], out: Path, progress: bool, ctx: DistributedContext) -> CacheData:
    """Write the ``demo`` section's synthetic studies as NIfTI + manifest under ``out/data`` and prepare them into
    ``out/cache`` (rank 0; the other ranks wait), exactly as a user's own studies go; both steps reuse what an
    earlier run with the same settings left there. Sets ``data.classes`` to the demo's class order."""
    from medmap_fast.data.prepare import prepare
    from medmap_fast.synthetic.demo import DemoConfig
    from medmap_fast.synthetic.export import write_demo_studies

    demo = config["demo"]
    subset = {k: tuple(demo[k]) for k in ("organs", "classes") if demo.get(k)}
    demo_config = DemoConfig(size=demo["size"], **subset)
    if ctx.is_main:
        seed = config["seed"] if demo["seed"] is None else demo["seed"]
        manifest = write_demo_studies(out / "data", int(demo["num_studies"]), int(seed), demo_config,
                                      float(demo["test_fraction"]), demo["num_workers"], progress)
        prepare(manifest, out / "cache", spacing=demo["spacing"], workers=demo["num_workers"], strict=True,
                progress=progress)
    barrier(ctx)
    config["data"]["classes"] = list(demo_config.class_pool)
    return open_cache(config["data"] | {"path": out / "cache"})


def run_demo(out_dir: str | Path | None = None, quick: bool = False, ablation: bool = False,
             config_path: str | Path | None = None, seed: int | None = None, progress: bool = True,
             ctx: DistributedContext | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the content of ``metrics.json``."""
    started = time.perf_counter()
    ctx = ctx or init_distributed()
    config_path = configs.resolve(config_path) if config_path else configs_dir() / (
        "demo_quick.yaml" if quick else "demo.yaml")
    config = load_config(config_path, {"seed": seed} if seed is not None else None)
    out = Path(out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    cache = prepare_demo_data(config, out, progress=progress and ctx.is_main, ctx=ctx)
    config["data"]["path"] = str(cache.path)
    text_cfg = config["text"]
    text_encoder = TextEncoder(text_cfg["model"], pooling=text_cfg["pooling"], max_length=text_cfg.get("max_length"),
                               cache_dir=text_cfg.get("cache_dir"))
    all_entries = [e for entries in cache.splits.values() for e in entries]
    reports = TextTable([e.report for e in all_entries if e.report is not None], text_encoder,
                        progress=progress and ctx.is_main)
    t = lap("data_s", t)

    stage1, stage1_log = pretrain(cache, config, reports, ctx, out / "stage1", progress=progress)
    t = lap("pretrain_s", t)
    retrieval = retrieval_metrics(stage1, cache.split("test", "report"), cache, config, reports, ctx)
    t = lap("retrieval_s", t)

    runs = {"pretrained": (stage1, out / "stage2")}
    if ablation:
        runs["random_init"] = (None, out / "stage2_random_init")
    results, logs = {}, {"stage 1 (pre-training)": stage1_log}
    for name, (init, run_dir) in runs.items():
        model, log = finetune(cache, config, text_encoder, ctx, init=init, run_dir=run_dir, progress=progress)
        t = lap(f"finetune_{name}_s", t)
        results[name] = evaluate_classifier(model, cache, config, ctx)
        logs[f"stage 2 ({name.replace('_', ' ')})"] = log
        t = lap(f"evaluate_{name}_s", t)

    main = results["pretrained"]
    class_names = list(cache.labels.class_names)
    train, test = cache.split("train"), cache.split("test")
    metrics = {
        "test": main["metrics"],
        "pretrain": {**retrieval, "final_loss": next((h["loss"] for h in reversed(stage1_log) if "loss" in h), None)},
        "data": {"train_studies": len(train), "test_studies": len(test),
                 "train_volumes": sum(len(e.modalities) for e in train),
                 "size": config["data"]["size"], "classes": class_names},
        "config": config, "environment": environment(), "quick": quick,
    }
    if ablation:
        metrics["ablation"] = {"random_init": {"test": results["random_init"]["metrics"]}}
    if ctx.is_main:
        from medmap_fast.synthetic.demo import ORGAN_MODALITIES

        figures = {
            "loss_curves": plots.plot_loss_curves(logs, out / "loss_curves.png"),
            "roc_curves": plots.plot_roc_curves(main["probs"], main["labels"], class_names,
                                                out / "roc_curves.png", "held-out studies, one-vs-rest ROC"),
            "confusion_matrix": plots.plot_confusion_matrix(main["metrics"]["confusion_matrix"], class_names,
                                                            out / "confusion_matrix.png", "held-out studies"),
        }
        for organ in ORGAN_MODALITIES:
            examples = example_studies(test, cache, organ)
            if examples:
                figures[f"studies_{organ}"] = plots.plot_study_slices(
                    examples, out / f"studies_{organ}.png",
                    title=f"generated {organ} studies (held out, as prepared): axial slices of each sequence")
        t = lap("plots_s", t)
        metrics["timings_s"] = timings
        metrics["elapsed_s"] = round(time.perf_counter() - started, 2)
        write_json(out / "metrics.json", metrics)
        write_report(out / "report.md", metrics, {k: p.name for k, p in figures.items()})
    return metrics
