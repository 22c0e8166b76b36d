"""The ``medmap-fast`` command line: demo, manifest, prepare, pretrain, finetune, evaluate, export, embed, zero-shot.

    medmap-fast demo [--out DIR] [--quick] [--ablation]
    medmap-fast manifest folders ROOT [--out ROOT/manifest.jsonl]     # or: manifest msd Task01_BrainTumour
    medmap-fast prepare manifest.jsonl --out CACHE [--spacing 1.5] [--workers N] [--strict]
    medmap-fast pretrain --config demo --data CACHE --out runs/stage1     # a shipped config (demo, demo_quick, paper)
    medmap-fast finetune --config my.yaml --data CACHE --init runs/stage1/model --out runs/stage2   # or a YAML file
    medmap-fast evaluate --model runs/stage2/model [--data CACHE] [--split test]
    medmap-fast export runs/stage2 --out models/stage2                  # one self-contained model folder + model card
    medmap-fast embed --model models/stage2 --data CACHE --out emb.npz  # or .parquet; --split, --batch-size
    medmap-fast zero-shot --model runs/stage1/model --data CACHE [--classes "normal liver" "hepatic cyst" ...]
    medmap-fast --version
    torchrun --nproc-per-node=4 -m medmap_fast.cli pretrain ...        # DDP (NCCL on GPU, gloo on CPU)

Every command that trains, scores or exports a model takes ``--config`` (a YAML file or a shipped name),
``--set KEY=VALUE`` (repeatable: a dotted config key and a YAML value, e.g. ``--set pretrain.train.lr=1e-4 --set
data.size=[64,64,32]``) and ``--seed`` (see :mod:`medmap_fast.train.config`), and saves the resolved config:
demo / pretrain / finetune / evaluate / zero-shot as ``config.yaml`` beside ``metrics.json`` (held-out metrics) in
their ``--out`` folder, embed as ``FILE.config.yaml`` beside its ``--out FILE``, export as the model folder's
``run_config.yaml`` (where ``--set`` may change only the keys the weights do not depend on:
:data:`medmap_fast.train.export.USAGE_KEYS`). Training resumes from ``checkpoint.pt`` when re-run with the same
``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from medmap_fast import __version__
from medmap_fast.train.config import RUN_CONFIG, RunConfig, add_config_args, resolve_config
from medmap_fast.train.export import USAGE_KEYS
from medmap_fast.train.zero_shot import NEGATIVE_TEMPLATE

TRAINED_WITH = "the config the model was trained with (its run folder's config.yaml), else built-in defaults"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    p.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default=None,
        help="kernel backend (default: $MEDMAP_FAST_BACKEND or auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmap-fast", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"medmap-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate synthetic studies, pre-train, fine-tune, evaluate, write a report")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="the small configuration (a few minutes on 2 CPU cores)")
    p.add_argument("--ablation", action="store_true", help="also fine-tune from a random initialisation")
    add_config_args(p, default="demo, or demo_quick with --quick", data=False)
    _common(p)

    p = sub.add_parser("manifest", help="write a manifest (JSONL) for a folder of studies")
    p.add_argument(
        "layout",
        choices=("folders", "msd"),
        help="folders: one folder per study (<modality>.nii.gz, report.txt, labels.txt); "
        "msd: a Medical Segmentation Decathlon task (dataset.json, 4-D imagesTr/)",
    )
    p.add_argument("root", type=Path, help="the dataset folder")
    p.add_argument("--out", type=Path, default=None, help="manifest file (default: ROOT/manifest.jsonl)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="studies assigned to val (by a hash of the id)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="studies assigned to test (by a hash of the id)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash")

    p = sub.add_parser("prepare", help="read, reorient, resample, crop and normalise studies into a cache")
    p.add_argument("manifest", type=Path, help="manifest (.jsonl or .csv)")
    p.add_argument("--out", type=Path, required=True, help="cache folder (index.jsonl, errors.jsonl, studies/)")
    p.add_argument(
        "--spacing",
        type=_spacing,
        default=1.5,
        help="voxel size in mm: one number, three (x,y,z), or 'native' (the first modality's own)",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any study is skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("pretrain", help="stage 1: vision-language pre-training")
    add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, model/, metrics.json)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint.pt")
    _common(p)

    p = sub.add_parser("finetune", help="stage 2: fine-tune a classifier")
    add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, model/, metrics.json)")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--init", type=Path, help="stage-1 model folder (from `pretrain`: <out>/model)")
    init.add_argument("--random-init", action="store_true", help="start from a randomly initialised encoder")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint.pt")
    _common(p)

    p = sub.add_parser("evaluate", help="held-out metrics of a saved stage-1 or stage-2 model")
    add_config_args(p, default=TRAINED_WITH)
    p.add_argument("--model", type=Path, required=True, help="a model/ folder written by pretrain or finetune")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="the split to score")
    p.add_argument(
        "--out", type=Path, default=None, help=f"folder for metrics.json and {RUN_CONFIG} (default: print only)"
    )
    _common(p)

    p = sub.add_parser(
        "export",
        help="a finished pretrain/finetune run folder -> one model folder with a model card",
        description="Export a finished run folder. --set / --config / --data may change only the keys the weights "
        f"do not depend on ({', '.join(USAGE_KEYS)}); any other change is refused, naming the key.",
    )
    p.add_argument("run", type=Path, help="the run folder (the --out of `pretrain` or `finetune`, a demo's stage1/)")
    p.add_argument("--out", type=Path, required=True, help="model folder: MedMAPEncoder.from_pretrained(DIR) loads it")
    p.add_argument("--force", action="store_true", help="replace --out when it already holds files")
    add_config_args(p, default=f"the run's {RUN_CONFIG}")

    p = sub.add_parser("embed", help="per-volume and per-study embeddings of a cache's studies (.npz or .parquet)")
    add_config_args(p, default=TRAINED_WITH)
    p.add_argument("--model", type=Path, required=True, help="an export, a run's model/ folder or an encoder folder")
    p.add_argument("--out", type=Path, required=True, help="embeddings file: .npz, or .parquet (needs pyarrow)")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all", help="the studies to embed")
    p.add_argument(
        "--batch-size", type=int, default=None, help="studies per forward pass (= --set evaluate.batch_size=N)"
    )
    _common(p)

    p = sub.add_parser("zero-shot", help="score a stage-1 model's studies against text prompts of the classes")
    add_config_args(p, default=TRAINED_WITH)
    p.add_argument("--model", type=Path, required=True, help="a stage-1 model: a pretrain run's model/ or its export")
    p.add_argument(
        "--classes",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="prompts, each matched to a class of the cache's labels by its words, or CLASS=PROMPT "
        "(default: every class, through text.prompt_template)",
    )
    p.add_argument(
        "--negative-template",
        default=NEGATIVE_TEMPLATE,
        help="multi-label caches: each class's negative prompt, scored against its prompt ({prompt}: that prompt; "
        "{name}, {description}: the class; default: %(default)r)",
    )
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="the split to score")
    p.add_argument(
        "--out", type=Path, default=None, help=f"folder for metrics.json and {RUN_CONFIG} (default: print only)"
    )
    _common(p)
    return parser


def _spacing(text: str) -> float | tuple[float, ...] | None:
    """--spacing: "native", one number or three comma-separated numbers (mm)."""
    if text == "native":
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'native', a number or three numbers x,y,z, got {text!r}") from None
    if len(values) not in (1, 3) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected one or three positive numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def _load_config(args: argparse.Namespace, fallback: Path | None = None) -> RunConfig:
    """The config of a command (:func:`resolve_config`) over ``fallback`` (a saved run config, when it exists) or
    the built-in defaults when --config is not given."""
    return resolve_config(args, fallback if fallback is not None and fallback.is_file() else None)


def _held_out(cache: Any, need: str, ctx: Any) -> list[Any] | None:
    """The studies to report metrics on: the test split, else val; None (and a note) when neither has any."""
    for split in ("test", "val"):
        if any(getattr(e, need) is not None for e in cache.splits[split]):
            return cache.split(split, need, ctx)
    if ctx.is_main:
        print(f"{cache.path}: no test or val studies with a {need}; no held-out metrics", file=sys.stderr)
    return None


def _run_stage(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.train.data import TextTable, open_cache
    from medmap_fast.train.rundir import begin_run, end_run

    config = _load_config(args)
    progress = not args.no_progress and ctx.is_main
    cache = open_cache(config.data)
    text_encoder = config.text.text_encoder()
    begin_run(args.out, config, ctx, resume=not args.no_resume)
    if args.command == "pretrain":
        from medmap_fast.train.pretrain import pretrain, retrieval_metrics

        texts = [e.report for entries in cache.splits.values() for e in entries if e.report is not None]
        reports = TextTable(texts, text_encoder, progress=progress)
        stage1, _ = pretrain(cache, config, reports, ctx, args.out, progress=progress, resume=not args.no_resume)
        held_out = _held_out(cache, "report", ctx)
        metrics = {"pretrain": retrieval_metrics(stage1, held_out, cache, config, reports, ctx)} if held_out else {}
    else:
        from medmap_fast.train.demo import evaluate_classifier
        from medmap_fast.train.finetune import finetune

        init = None if args.random_init else args.init
        classifier, _ = finetune(
            cache, config, text_encoder, ctx, init=init, run_dir=args.out, progress=progress, resume=not args.no_resume
        )
        held_out = _held_out(cache, "labels", ctx)
        metrics = (
            {held_out[0].split: evaluate_classifier(classifier, cache, config, ctx, held_out[0].split)["metrics"]}
            if held_out
            else {}
        )
    end_run(args.out, config, metrics, ctx)
    return metrics


def _evaluate(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.train.data import open_cache

    config = _saved_model_config(args)
    metrics = _evaluate_model(args.model, args.split, open_cache(config.data), config, ctx)
    _save_outputs(args.out, config, metrics, ctx)
    return metrics


def _evaluate_model(model_dir: Path, split: str, cache: Any, config: RunConfig, ctx: Any) -> dict[str, Any]:
    """Held-out metrics of the saved model in ``model_dir``: classification (stage 2) or report retrieval (stage 1)."""
    from medmap_fast.data.cache import LabelSpace
    from medmap_fast.train.data import TextTable
    from medmap_fast.train.demo import evaluate_classifier
    from medmap_fast.train.finetune import CONFIG_FILE, load_classifier

    if (model_dir / CONFIG_FILE).is_file():
        model, meta = load_classifier(model_dir)
        labelled = [e.labels for entries in cache.splits.values() for e in entries if e.labels is not None]
        cache.labels = LabelSpace(labelled, meta["class_names"])  # the classifier's classes, in its order
        model.to(ctx.device)
        return {split: evaluate_classifier(model, cache, config, ctx, split)["metrics"]}
    from medmap_fast.models.medmap import HEADS_CONFIG, MedMAPPretrainModel
    from medmap_fast.train.pretrain import retrieval_metrics

    if not (model_dir / HEADS_CONFIG).is_file():
        raise SystemExit(
            f"--model {model_dir}: expected a folder written by `medmap-fast pretrain` ({HEADS_CONFIG}) "
            f"or `medmap-fast finetune` ({CONFIG_FILE})"
        )
    stage1 = MedMAPPretrainModel.from_pretrained(model_dir).to(ctx.device)
    entries = cache.split(split, "report", ctx)
    reports = TextTable([e.report for e in entries if e.report is not None], config.text.text_encoder())
    return {"pretrain": retrieval_metrics(stage1, entries, cache, config, reports, ctx)}


def _save_outputs(out: Path | None, config: RunConfig, metrics: dict[str, Any], ctx: Any) -> None:
    """evaluate / zero-shot ``--out``: the resolved config and the metrics, as a run folder holds them."""
    from medmap_fast.train.rundir import end_run

    if out is not None:
        end_run(out, config, metrics, ctx)


def _saved_model_config(args: argparse.Namespace) -> RunConfig:
    """The config of embed / zero-shot: --config, else the one --model was trained with (when found)."""
    from medmap_fast.train.export import run_config_file

    return _load_config(args, run_config_file(args.model))


def _embed(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.train import embed
    from medmap_fast.train.data import open_cache
    from medmap_fast.train.export import load_saved_model

    embed.check_output(args.out)
    if args.batch_size is not None:
        args.overrides.append(("evaluate.batch_size", args.batch_size))
    config = _saved_model_config(args)
    cache = open_cache(config.data)
    result = embed.embed_cache(
        load_saved_model(args.model),
        embed.cache_entries(cache, args.split),
        cache,
        config,
        config.evaluate.batch_size,
        ctx,
        progress=not args.no_progress and ctx.is_main,
    )
    if ctx.is_main:
        embed.write_embeddings(result, args.out)
        config.save(embed.config_file(args.out))
    return embed.summary(result, args.out)


def _zero_shot(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.models.medmap import MedMAPPretrainModel
    from medmap_fast.train.data import open_cache
    from medmap_fast.train.export import saved_stage
    from medmap_fast.train.zero_shot import zero_shot

    if saved_stage(args.model) != "pretrain":
        raise SystemExit(
            f"--model {args.model}: expected a stage-1 model (heads.json): a `medmap-fast pretrain` "
            "run's model/ folder or its export"
        )
    config = _saved_model_config(args)
    model = MedMAPPretrainModel.from_pretrained(args.model)
    metrics = zero_shot(
        model,
        open_cache(config.data),
        config,
        config.text.text_encoder(),
        ctx,
        args.split,
        args.classes,
        args.negative_template,
    )
    _save_outputs(args.out, config, metrics, ctx)
    return metrics


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from medmap_fast.train.export import check_run, export_run

    check_run(args.run)  # before its config.yaml is read
    return export_run(args.run, args.out, force=args.force, config=resolve_config(args, args.run / RUN_CONFIG))


def _manifest(args: argparse.Namespace) -> dict[str, Any]:
    from medmap_fast.data.importers import folders_manifest, msd_manifest
    from medmap_fast.data.manifest import write_manifest

    importer = folders_manifest if args.layout == "folders" else msd_manifest
    studies = importer(args.root, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    out = args.out or args.root / "manifest.jsonl"
    write_manifest(studies, out)
    splits = {s: sum(1 for x in studies if x.split == s) for s in ("train", "val", "test")}
    return {"manifest": str(out), "studies": len(studies), "splits": splits}


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from medmap_fast.data.prepare import prepare

    summary = prepare(
        args.manifest,
        args.out,
        spacing=args.spacing,
        workers=args.workers,
        strict=args.strict,
        progress=not args.no_progress,
    )
    return summary.to_json(), 1 if args.strict and summary.skipped else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("manifest", "prepare", "export"):  # file commands: no process group
        from medmap_fast.data.manifest import ManifestError

        try:
            if args.command == "export":
                summary, code = _export(args), 0
            else:
                summary, code = (_manifest(args), 0) if args.command == "manifest" else _prepare(args)
        except (ManifestError, FileNotFoundError, FileExistsError) as err:
            print(f"medmap-fast {args.command}: {err}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return code
    from medmap_fast.kernels import backend
    from medmap_fast.train.distributed import init_distributed, shutdown

    ctx = init_distributed(args.device)
    try:
        with backend(args.backend) if args.backend else nullcontext():
            if args.command == "demo":
                from medmap_fast.train.demo import demo_config_path, run_demo

                config = resolve_config(args, demo_config_path(args.quick))
                metrics = run_demo(args.out, args.quick, args.ablation, config, progress=not args.no_progress, ctx=ctx)
                summary = {
                    "test": {k: metrics["test"][k] for k in ("accuracy", "chance_accuracy", "auc_macro", "f1_macro")},
                    "pretrain": {k: metrics["pretrain"][k] for k in ("retrieval_r1", "retrieval_r5")},
                    "elapsed_s": metrics.get("elapsed_s"),
                }
            elif args.command in ("pretrain", "finetune"):
                summary = _run_stage(args, ctx)
            elif args.command in ("embed", "zero-shot"):
                summary = _embed(args, ctx) if args.command == "embed" else _zero_shot(args, ctx)
            else:
                summary = _evaluate(args, ctx)
        if ctx.is_main:
            print(json.dumps(summary, indent=2, default=str))
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
