"""``medmap-fast demo``: write synthetic studies as NIfTI files and a manifest, prepare them into a cache, pre-train
(stage 1), fine-tune (stage 2), evaluate on held-out studies, and write a run folder:

    data/ cache/        the generated studies (NIfTI + manifest.jsonl) and their prepared cache: the path a user's
                        own studies take (re-running with the same --out reuses both)
    config.yaml         the resolved configuration (``--config`` it to repeat the run's settings)
    metrics.json        test metrics (accuracy, chance, macro AUC / F1, per class and per organ), stage-1 retrieval,
                        the ablation (with --ablation), a training summary of each run (from its metrics.csv),
                        timings, the configuration and the environment
    report.md           the same in prose and tables, with the figures
    loss_curves.png  roc_curves.png  confusion_matrix.png  studies_brain.png  studies_liver.png
    stage1/ stage2/ [stage2_random_init/]   each a run folder as `medmap-fast pretrain` / `finetune` write it
                        (:mod:`medmap_fast.train.rundir`: config.yaml, checkpoint.pt (re-running with the same --out
                        resumes), model/, metrics.csv and TensorBoard event files, metrics.json with the stage's
                        held-out metrics), so `medmap-fast export OUT/stage1` (or stage2) exports it
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from medmap_fast import configs
from medmap_fast.data.cache import CacheEntry
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.train import plots
from medmap_fast.train.checkpoint import CHECKPOINT_NAME
from medmap_fast.train.config import RUN_CONFIG, RunConfig, load_config
from medmap_fast.train.data import CacheData, TextTable, open_cache
from medmap_fast.train.distributed import DistributedContext, barrier, init_distributed
from medmap_fast.train.evaluate import classification_metrics
from medmap_fast.train.finetune import finetune, predict
from medmap_fast.train.pretrain import pretrain, retrieval_metrics
from medmap_fast.train.report import write_report
from medmap_fast.train.rundir import begin_run, end_run
from medmap_fast.train.runlog import read_metrics, summarize


def configs_dir() -> Path:
    """The shipped YAML configs: the ``medmap_fast.configs`` package's folder, through ``importlib.resources``."""
    return configs.directory()


def organ_metrics(
    probs: np.ndarray, labels: np.ndarray, organ_classes: Mapping[str, Sequence[str]], class_names: Sequence[str]
) -> dict[str, Any]:
    """Metrics of each organ's own task: its studies only, probabilities renormalised over its classes (those of
    ``class_names``: a model may know a subset, in any order).

    The macro one-vs-rest AUC over all classes also rewards telling brain from liver, which is easy; these numbers
    measure the abnormality detection within an organ.
    """
    out = {}
    for organ, all_names in organ_classes.items():
        names = [n for n in all_names if n in class_names]
        idx = [class_names.index(n) for n in names]
        rows = np.isin(labels, idx)
        if not rows.any():
            continue
        p = probs[rows][:, idx]
        p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
        position = np.full(len(class_names), -1)
        position[idx] = np.arange(len(idx))  # class index -> its place among the organ's classes (any class order)
        y = position[labels[rows]]
        out[organ] = classification_metrics(p, y, list(names))
    return out


def evaluate_classifier(
    model: MedMAPClassifier, cache: CacheData, config: RunConfig, ctx: DistributedContext, split: str = "test"
) -> dict[str, Any]:
    """Metrics of a split's labelled studies plus the raw probabilities for the plots; ``per_organ`` too when the
    classes are the demo's."""
    from medmap_fast.synthetic.demo import CLASSES, ORGAN_CLASSES

    probs, labels = predict(model, cache.split(split, "labels", ctx), cache, config, ctx)
    class_names = list(cache.label_space().class_names)
    metrics = classification_metrics(probs, labels, class_names, task=model.task)
    if set(class_names) <= set(CLASSES) and model.task == "multiclass":
        metrics["per_organ"] = organ_metrics(probs, labels, ORGAN_CLASSES, class_names)
    return {"metrics": metrics, "probs": probs, "labels": labels}


def example_studies(
    entries: Sequence[CacheEntry], cache: CacheData, organ: str, count: int = 4
) -> list[SimpleNamespace]:
    """Up to ``count`` prepared studies of ``organ`` with distinct classes (those with the most modalities first),
    with what :func:`plots.plot_study_slices` needs: modalities, volume [M, X, Y, Z] and report."""
    from medmap_fast.synthetic.demo import ORGAN_CLASSES

    chosen: dict[str, CacheEntry] = {}
    for e in sorted(entries, key=lambda e: -len(e.modalities)):
        if isinstance(e.labels, str) and e.labels in ORGAN_CLASSES[organ]:  # the demo's studies have one label each
            chosen.setdefault(e.labels, e)
    order = list(ORGAN_CLASSES[organ])
    picked = [chosen[c] for c in order if c in chosen][:count]
    return [
        SimpleNamespace(
            modalities=e.modalities,
            volume=np.asarray(e.load(cache.path), dtype=np.float32),
            report=f"[{e.labels}] {e.report}",
        )
        for e in picked
    ]


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "backend": os.environ.get("MEDMAP_FAST_BACKEND", "auto"),
    }


def demo_config_path(quick: bool) -> Path:
    """The shipped config of ``medmap-fast demo``: demo_quick.yaml with ``--quick``, else demo.yaml."""
    return configs_dir() / ("demo_quick.yaml" if quick else "demo.yaml")


def prepare_demo_data(config: RunConfig, out: Path, progress: bool, ctx: DistributedContext) -> CacheData:
    """Write the ``demo`` section's synthetic studies as NIfTI + manifest under ``out/data`` and prepare them into
    ``out/cache`` (rank 0; the other ranks wait), exactly as a user's own studies go; both steps reuse what an
    earlier run with the same settings left there. Sets ``data.path`` to that cache and ``data.classes`` to the
    demo's class order."""
    from medmap_fast.data.prepare import prepare
    from medmap_fast.synthetic.export import write_demo_studies

    demo = config.demo
    demo_config = demo.generator()
    if ctx.is_main:
        seed = config.seed if demo.seed is None else demo.seed
        manifest = write_demo_studies(
            out / "data", demo.num_studies, seed, demo_config, demo.test_fraction, demo.num_workers, progress
        )
        prepare(manifest, out / "cache", spacing=demo.spacing, workers=demo.num_workers, strict=True, progress=progress)
    barrier(ctx)
    config.data.classes = list(demo_config.class_pool)
    config.data.path = str(out / "cache")
    return open_cache(config.data)


def run_demo(
    out_dir: str | Path | None = None,
    quick: bool = False,
    ablation: bool = False,
    config: RunConfig | None = None,
    progress: bool = True,
    ctx: DistributedContext | None = None,
) -> dict[str, Any]:
    """Run the whole demo with ``config`` (default: the shipped :func:`demo_config_path`); returns the content of
    ``metrics.json``. The run folder gets the resolved config as ``config.yaml``."""
    started = time.perf_counter()
    ctx = ctx or init_distributed()
    config = config if config is not None else load_config(demo_config_path(quick))
    out = Path(out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    cache = prepare_demo_data(config, out, progress=progress and ctx.is_main, ctx=ctx)
    if ctx.is_main and not (out / "stage1" / CHECKPOINT_NAME).is_file():
        config.save(out / RUN_CONFIG)  # a resumed run's is saved once its checkpoints accepted it (at the end)
    text_encoder = config.text.text_encoder()
    all_entries = [e for entries in cache.splits.values() for e in entries]
    reports = TextTable(
        [e.report for e in all_entries if e.report is not None], text_encoder, progress=progress and ctx.is_main
    )
    t = lap("data_s", t)

    begin_run(out / "stage1", config, ctx)
    stage1, _ = pretrain(cache, config, reports, ctx, out / "stage1", progress=progress)
    t = lap("pretrain_s", t)
    retrieval = retrieval_metrics(stage1, cache.split("test", "report"), cache, config, reports, ctx)
    end_run(out / "stage1", config, {"pretrain": retrieval}, ctx)
    t = lap("retrieval_s", t)

    runs: dict[str, tuple[MedMAPPretrainModel | None, Path]] = {"pretrained": (stage1, out / "stage2")}
    if ablation:
        runs["random_init"] = (None, out / "stage2_random_init")
    results, run_dirs = {}, {"stage 1 (pre-training)": out / "stage1"}
    for name, (init, run_dir) in runs.items():
        begin_run(run_dir, config, ctx)
        model, _ = finetune(cache, config, text_encoder, ctx, init=init, run_dir=run_dir, progress=progress)
        t = lap(f"finetune_{name}_s", t)
        results[name] = evaluate_classifier(model, cache, config, ctx)
        end_run(run_dir, config, {"test": results[name]["metrics"]}, ctx)
        run_dirs[f"stage 2 ({name.replace('_', ' ')})"] = run_dir
        t = lap(f"evaluate_{name}_s", t)

    main = results["pretrained"]
    class_names = list(cache.label_space().class_names)
    train, test = cache.split("train"), cache.split("test")
    metrics = {
        "test": main["metrics"],
        "pretrain": retrieval,
        "data": {
            "train_studies": len(train),
            "test_studies": len(test),
            "train_volumes": sum(len(e.modalities) for e in train),
            "size": config.data.size,
            "classes": class_names,
        },
        "config": config.to_dict(),
        "environment": environment(),
        "quick": quick,
    }
    if ablation:
        metrics["ablation"] = {"random_init": {"test": results["random_init"]["metrics"]}}
    if ctx.is_main:
        from medmap_fast.synthetic.demo import ORGAN_MODALITIES

        # What the report says about training comes from the runs' logs (rank 0 wrote them).
        metrics["training"] = {name: summarize(read_metrics(d)) for name, d in run_dirs.items()}
        metrics["pretrain"]["final_loss"] = metrics["training"]["stage 1 (pre-training)"]["final_loss"]
        figures = {
            "loss_curves": plots.plot_loss_curves(run_dirs, out / "loss_curves.png"),
            "roc_curves": plots.plot_roc_curves(
                main["probs"], main["labels"], class_names, out / "roc_curves.png", "held-out studies, one-vs-rest ROC"
            ),
            "confusion_matrix": plots.plot_confusion_matrix(
                main["metrics"]["confusion_matrix"], class_names, out / "confusion_matrix.png", "held-out studies"
            ),
        }
        for organ in ORGAN_MODALITIES:
            examples = example_studies(test, cache, organ)
            if examples:
                figures[f"studies_{organ}"] = plots.plot_study_slices(
                    examples,
                    out / f"studies_{organ}.png",
                    title=f"generated {organ} studies (held out, as prepared): axial slices of each sequence",
                )
        t = lap("plots_s", t)
        metrics["timings_s"] = timings
        metrics["elapsed_s"] = round(time.perf_counter() - started, 2)
        end_run(out, config, metrics, ctx)  # the demo's folder is a run folder too: config.yaml, then metrics.json
        write_report(out / "report.md", metrics, {k: p.name for k, p in figures.items()})
    return metrics
