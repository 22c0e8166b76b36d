"""The ``medmap-fast`` command line: demo, manifest, prepare, pretrain, finetune, evaluate.

    medmap-fast demo [--out DIR] [--quick] [--ablation]
    medmap-fast manifest folders ROOT [--out ROOT/manifest.jsonl]     # or: manifest msd Task01_BrainTumour
    medmap-fast prepare manifest.jsonl --out CACHE [--spacing 1.5] [--workers N] [--strict]
    medmap-fast pretrain --config demo --data CACHE --out runs/stage1     # a shipped config (demo, demo_quick, paper)
    medmap-fast finetune --config my.yaml --data CACHE --init runs/stage1/model --out runs/stage2   # or a YAML file
    medmap-fast evaluate --model runs/stage2/model [--data CACHE] [--split test]
    medmap-fast --version
    torchrun --nproc-per-node=4 -m medmap_fast.cli pretrain ...        # DDP (NCCL on GPU, gloo on CPU)

pretrain / finetune / evaluate write ``metrics.json`` (held-out metrics) and ``config.json`` (the merged config) into
their folder; training resumes from ``checkpoint.pt`` when re-run with the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from medmap_fast import __version__, configs

CONFIG_NAME = "config.json"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="kernel backend (default: $MEDMAP_FAST_BACKEND or auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_arg(text: str) -> Path:
    """--config: a YAML file, or the name of a config shipped in the package (``paper`` or ``paper.yaml``)."""
    try:
        return configs.resolve(text)
    except FileNotFoundError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _config_help() -> str:
    return f"a YAML file, or the name of a shipped config: {', '.join(configs.names())} (with or without .yaml)"


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=_config_arg, default=None, help=f"{_config_help()} (default: built-in defaults)")
    p.add_argument("--data", type=Path, default=None,
                   help="prepared cache folder (from `medmap-fast prepare`; default: the config's data.path)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmap-fast", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"medmap-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate synthetic studies, pre-train, fine-tune, evaluate, write a report")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="the small configuration (a few minutes on 2 CPU cores)")
    p.add_argument("--ablation", action="store_true", help="also fine-tune from a random initialisation")
    p.add_argument("--config", type=_config_arg, default=None,
                   help=f"{_config_help()}; replaces the demo's own (default: demo, or demo_quick with --quick)")
    _common(p)

    p = sub.add_parser("manifest", help="write a manifest (JSONL) for a folder of studies")
    p.add_argument("layout", choices=("folders", "msd"),
                   help="folders: one folder per study (<modality>.nii.gz, report.txt, labels.txt); "
                        "msd: a Medical Segmentation Decathlon task (dataset.json, 4-D imagesTr/)")
    p.add_argument("root", type=Path, help="the dataset folder")
    p.add_argument("--out", type=Path, default=None, help="manifest file (default: ROOT/manifest.jsonl)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="studies assigned to val (by a hash of the id)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="studies assigned to test (by a hash of the id)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash")

    p = sub.add_parser("prepare", help="read, reorient, resample, crop and normalise studies into a cache")
    p.add_argument("manifest", type=Path, help="manifest (.jsonl or .csv)")
    p.add_argument("--out", type=Path, required=True, help="cache folder (index.jsonl, errors.jsonl, studies/)")
    p.add_argument("--spacing", type=_spacing, default=1.5,
                   help="voxel size in mm: one number, three (x,y,z), or 'native' (the first modality's own)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any study is skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("pretrain", help="stage 1: vision-language pre-training")
    _data_args(p)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, model/, metrics.json)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint.pt")
    _common(p)

    p = sub.add_parser("finetune", help="stage 2: fine-tune a classifier")
    _data_args(p)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, model/, metrics.json)")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--init", type=Path, help="stage-1 model folder (from `pretrain`: <out>/model)")
    init.add_argument("--random-init", action="store_true", help="start from a randomly initialised encoder")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint.pt")
    _common(p)

    p = sub.add_parser("evaluate", help="held-out metrics of a saved stage-1 or stage-2 model")
    _data_args(p)
    p.add_argument("--model", type=Path, required=True, help="a model/ folder written by pretrain or finetune")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="the split to score")
    p.add_argument("--out", type=Path, default=None, help="metrics file (default: print only)")
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


def _load_config(args: argparse.Namespace, fallback: Path | None = None) -> dict[str, Any]:
    from medmap_fast.train.config import load_config

    overrides: dict[str, Any] = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if getattr(args, "data", None):
        overrides["data"] = {"path": str(args.data)}
    if args.config is None and fallback is not None and fallback.is_file():
        from medmap_fast.train.config import merge

        return load_config(None, merge(json.loads(fallback.read_text()), overrides))
    return load_config(args.config, overrides)


def _text_encoder(config: dict[str, Any]) -> Any:
    from medmap_fast.models.text import TextEncoder

    t = config["text"]
    return TextEncoder(t["model"], pooling=t["pooling"], max_length=t.get("max_length"), cache_dir=t.get("cache_dir"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from medmap_fast.train.demo import write_json

    write_json(path, data)


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

    config = _load_config(args)
    progress = not args.no_progress and ctx.is_main
    cache = open_cache(config["data"])
    text_encoder = _text_encoder(config)
    if ctx.is_main:
        _write_json(args.out / CONFIG_NAME, config)
    if args.command == "pretrain":
        from medmap_fast.train.pretrain import pretrain, retrieval_metrics

        texts = [e.report for entries in cache.splits.values() for e in entries if e.report is not None]
        reports = TextTable(texts, text_encoder, progress=progress)
        model, _ = pretrain(cache, config, reports, ctx, args.out, progress=progress, resume=not args.no_resume)
        held_out = _held_out(cache, "report", ctx)
        metrics = {"pretrain": retrieval_metrics(model, held_out, cache, config, reports, ctx)} if held_out else {}
    else:
        from medmap_fast.train.demo import evaluate_classifier
        from medmap_fast.train.finetune import finetune

        init = None if args.random_init else args.init
        model, _ = finetune(cache, config, text_encoder, ctx, init=init, run_dir=args.out, progress=progress,
                            resume=not args.no_resume)
        held_out = _held_out(cache, "labels", ctx)
        metrics = {held_out[0].split: evaluate_classifier(model, cache, config, ctx, held_out[0].split)["metrics"]
                   } if held_out else {}
    if ctx.is_main:
        _write_json(args.out / "metrics.json", metrics)
    return metrics


def _evaluate(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.data.cache import LabelSpace
    from medmap_fast.train.data import TextTable, open_cache
    from medmap_fast.train.demo import evaluate_classifier
    from medmap_fast.train.finetune import CONFIG_FILE, load_classifier

    config = _load_config(args) if args.config else _load_config(args, args.model.parent / CONFIG_NAME)
    cache = open_cache(config["data"])
    if (args.model / CONFIG_FILE).is_file():
        model, meta = load_classifier(args.model)
        labelled = [e.labels for entries in cache.splits.values() for e in entries if e.labels is not None]
        cache.labels = LabelSpace(labelled, meta["class_names"])  # the classifier's classes, in its order
        model.to(ctx.device)
        return {args.split: evaluate_classifier(model, cache, config, ctx, args.split)["metrics"]}
    from medmap_fast.models.medmap import HEADS_CONFIG, MedMAPPretrainModel
    from medmap_fast.train.pretrain import retrieval_metrics

    if not (args.model / HEADS_CONFIG).is_file():
        raise SystemExit(f"--model {args.model}: expected a folder written by `medmap-fast pretrain` ({HEADS_CONFIG}) "
                         f"or `medmap-fast finetune` ({CONFIG_FILE})")
    model = MedMAPPretrainModel.from_pretrained(args.model).to(ctx.device)
    entries = cache.split(args.split, "report", ctx)
    reports = TextTable([e.report for e in entries], _text_encoder(config))
    return {"pretrain": retrieval_metrics(model, entries, cache, config, reports, ctx)}


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

    summary = prepare(args.manifest, args.out, spacing=args.spacing, workers=args.workers, strict=args.strict,
                      progress=not args.no_progress)
    return summary.to_json(), 1 if args.strict and summary.skipped else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("manifest", "prepare"):  # data commands: no model, no process group
        from medmap_fast.data.manifest import ManifestError

        try:
            summary, code = (_manifest(args), 0) if args.command == "manifest" else _prepare(args)
        except (ManifestError, FileNotFoundError) as err:
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
                from medmap_fast.train.demo import run_demo

                metrics = run_demo(args.out, args.quick, args.ablation, args.config, args.seed,
                                   progress=not args.no_progress, ctx=ctx)
                summary = {"test": {k: metrics["test"][k] for k in ("accuracy", "chance_accuracy", "auc_macro",
                                                                    "f1_macro")},
                           "pretrain": {k: metrics["pretrain"][k] for k in ("retrieval_r1", "retrieval_r5")},
                           "elapsed_s": metrics.get("elapsed_s")}
            elif args.command in ("pretrain", "finetune"):
                summary = _run_stage(args, ctx)
            else:
                summary = _evaluate(args, ctx)
                if args.out is not None and ctx.is_main:
                    _write_json(args.out, summary)
        if ctx.is_main:
            print(json.dumps(summary, indent=2, default=str))
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
