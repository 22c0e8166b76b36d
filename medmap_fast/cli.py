"""The ``medmap-fast`` command line: demo, pretrain, finetune, evaluate.

    medmap-fast demo [--out DIR] [--quick] [--ablation]
    medmap-fast pretrain --config configs/demo.yaml --data demo --out runs/stage1
    medmap-fast finetune --config configs/demo.yaml --data demo --init runs/stage1/model --out runs/stage2
    medmap-fast evaluate --model runs/stage2/model --data demo
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

from medmap_fast.train.data import DATA_SOURCES

CONFIG_NAME = "config.json"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="kernel backend (default: $MEDMAP_FAST_BACKEND or auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", choices=DATA_SOURCES, default=None, help="data source (default: the config's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmap-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate synthetic studies, pre-train, fine-tune, evaluate, write a report")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="the small configuration (a few minutes on 2 CPU cores)")
    p.add_argument("--ablation", action="store_true", help="also fine-tune from a random initialisation")
    p.add_argument("--config", type=Path, default=None, help="YAML config replacing the built-in demo one")
    _common(p)

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
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--out", type=Path, default=None, help="metrics file (default: print only)")
    _common(p)
    return parser


def _load_config(args: argparse.Namespace, fallback: Path | None = None) -> dict[str, Any]:
    from medmap_fast.train.config import load_config

    overrides: dict[str, Any] = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if getattr(args, "data", None):
        overrides["data"] = {"source": args.data}
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


def _run_stage(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.train.data import TextTable, load_studies

    config = _load_config(args)
    progress = not args.no_progress and ctx.is_main
    split = load_studies(config["data"], config["seed"], progress=progress)
    text_encoder = _text_encoder(config)
    batch_size = config["evaluate"]["batch_size"]
    if ctx.is_main:
        _write_json(args.out / CONFIG_NAME, config)
    if args.command == "pretrain":
        from medmap_fast.train.pretrain import pretrain, retrieval_metrics

        reports = TextTable([s.report for s in split.train + split.test], text_encoder, progress=progress)
        model, _ = pretrain(split.train, config, reports, ctx, args.out, progress=progress, resume=not args.no_resume)
        metrics = {"pretrain": retrieval_metrics(model, split.test, reports, batch_size, ctx.device)}
    else:
        from medmap_fast.train.demo import evaluate_classifier
        from medmap_fast.train.finetune import finetune

        init = None if args.random_init else args.init
        model, _ = finetune(split.train, config, len(split.class_names), text_encoder, ctx, init=init,
                            run_dir=args.out, class_names=split.class_names, progress=progress,
                            resume=not args.no_resume)
        metrics = {"test": evaluate_classifier(model, split, batch_size)["metrics"]}
    if ctx.is_main:
        _write_json(args.out / "metrics.json", metrics)
    return metrics


def _evaluate(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from medmap_fast.train.data import TextTable, load_studies
    from medmap_fast.train.demo import evaluate_classifier
    from medmap_fast.train.finetune import CONFIG_FILE, load_classifier

    if (args.model / CONFIG_FILE).is_file():
        model, meta = load_classifier(args.model)
        config = _load_config(args) if args.config else _load_config(args, args.model.parent / CONFIG_NAME)
        split = load_studies(config["data"], config["seed"], progress=not args.no_progress)
        if args.split == "train":
            split.test = split.train
        model.to(ctx.device)
        return {args.split: evaluate_classifier(model, split, config["evaluate"]["batch_size"])["metrics"]}
    from medmap_fast.models.medmap import HEADS_CONFIG, MedMAPPretrainModel
    from medmap_fast.train.pretrain import retrieval_metrics

    if not (args.model / HEADS_CONFIG).is_file():
        raise SystemExit(f"--model {args.model}: expected a folder written by `medmap-fast pretrain` ({HEADS_CONFIG}) "
                         f"or `medmap-fast finetune` ({CONFIG_FILE})")
    model = MedMAPPretrainModel.from_pretrained(args.model).to(ctx.device)
    config = _load_config(args) if args.config else _load_config(args, args.model.parent / CONFIG_NAME)
    split = load_studies(config["data"], config["seed"], progress=not args.no_progress)
    studies = split.train if args.split == "train" else split.test
    reports = TextTable([s.report for s in studies], _text_encoder(config))
    return {"pretrain": retrieval_metrics(model, studies, reports, config["evaluate"]["batch_size"], ctx.device)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
