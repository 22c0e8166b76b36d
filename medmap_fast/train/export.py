"""``medmap-fast export RUN --out DIR``: a finished pretrain or finetune run folder -> one self-contained model folder.

A run folder (``medmap-fast pretrain`` / ``finetune --out RUN``) holds ``config.yaml`` (written first),
``checkpoint.pt``, ``model/`` (written when training ends: ``encoder/`` plus ``heads.*`` for stage 1 or
``classifier.*`` for stage 2) and ``metrics.json`` (written last). The export flattens ``model/``::

    DIR/config.json  model.safetensors        the encoder: MedMAPEncoder.from_pretrained(DIR)
    DIR/heads.json   heads.safetensors        stage 1: MedMAPPretrainModel.from_pretrained(DIR)
    DIR/classifier.json  classifier.safetensors   stage 2: medmap_fast.train.finetune.load_classifier(DIR)
    DIR/run_config.yaml                       the resolved config: the run's config.yaml plus the overrides
    DIR/metrics.json                          the run's held-out metrics, as the run wrote them
    DIR/README.md                             the model card: model, data summary, metrics, config

Overrides (``--set`` / ``--config`` / ``--data``, resolved over the run's config.yaml) may change only the keys the
weights do not depend on, :data:`USAGE_KEYS`: where the cache and the text encoder are and how the model is read
and run (the loader, evaluation / embedding batch sizes, the speed-only training switches). Every other key shaped
or trained the weights: the encoder and the stage models (shapes, modalities, gating), the text encoder's pooling,
length and prompts (the text projection and the classifier's prompt embeddings were computed with them), the crop
sizes, classes, augmentation and optimisation, the demo's data and the seed. Changing one is refused with an error
naming the key, the value the weights were trained with and the one asked for. ``text.model`` may name another
copy of the same text encoder, not another encoder.

The model is loaded (every file checked) before anything is written, the weight files and metrics.json are copied
byte for byte into a temporary sibling folder with the config and the card, and that folder is renamed to DIR: a
reader sees no DIR or a complete one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections import Counter
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from medmap_fast import __version__
from medmap_fast.fileio import read_json_object
from medmap_fast.models.encoder import CONFIG_NAME as ENCODER_CONFIG
from medmap_fast.models.encoder import WEIGHTS_NAME as ENCODER_WEIGHTS
from medmap_fast.models.encoder import MedMAPEncoder, saved_encoder_dir
from medmap_fast.models.medmap import HEADS_CONFIG, HEADS_FILE, MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.train.checkpoint import CHECKPOINT_NAME
from medmap_fast.train.config import RUN_CONFIG, RunConfig, as_dict, load_config
from medmap_fast.train.data import open_cache
from medmap_fast.train.finetune import CONFIG_FILE as CLASSIFIER_CONFIG
from medmap_fast.train.finetune import MODEL_DIR, load_classifier
from medmap_fast.train.finetune import WEIGHTS_FILE as CLASSIFIER_WEIGHTS
from medmap_fast.train.rundir import RUN_METRICS

CARD = "README.md"
EXPORT_CONFIG = "run_config.yaml"  # the run's resolved config, renamed beside the encoder's config.json
# The config keys an export may change (dotted, "*" any run of characters): none of them enters the weights.
USAGE_KEYS = (
    "data.path",
    "data.loader",
    "text.model",
    "text.cache_dir",
    "evaluate.*",
    "*.train.num_workers",
    "*.train.log_every",
    "*.train.checkpoint_every",
    "*.train.eval_every",
    "*.train.compile",
    "*.train.activation_checkpointing",
)
STAGE_FILES = {"pretrain": (HEADS_CONFIG, HEADS_FILE), "finetune": (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS)}
SavedModel = MedMAPEncoder | MedMAPPretrainModel | MedMAPClassifier


def encoder_of(model: SavedModel) -> MedMAPEncoder:
    """The vision encoder of a saved model (itself for an encoder alone)."""
    return model if isinstance(model, MedMAPEncoder) else model.encoder


def saved_stage(directory: str | Path) -> str | None:
    """ "pretrain" (heads.json), "finetune" (classifier.json) or None (an encoder alone, or nothing) for a saved
    model folder: a run's ``model/`` or an export."""
    directory = Path(directory)
    return next((stage for stage, (config, _) in STAGE_FILES.items() if (directory / config).is_file()), None)


def load_saved_model(directory: str | Path) -> SavedModel:
    """The model of a saved folder, in eval mode on the CPU: a stage-2 classifier, a stage-1 model, or an encoder
    alone; each loader's errors name the damaged file."""
    directory = Path(directory)
    stage = saved_stage(directory)
    if stage == "finetune":
        return load_classifier(directory)[0]
    if stage == "pretrain":
        return MedMAPPretrainModel.from_pretrained(directory).eval()
    if not (saved_encoder_dir(directory) / ENCODER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory}: no saved model here: expected {CLASSIFIER_CONFIG} (stage 2), {HEADS_CONFIG} (stage 1) or "
            f"{ENCODER_CONFIG} (an encoder), as a run's {MODEL_DIR}/ folder or `medmap-fast export` writes them"
        )
    return MedMAPEncoder.from_pretrained(saved_encoder_dir(directory)).eval()


def run_config_file(model_dir: str | Path) -> Path:
    """The config a saved model was trained with: an export's ``run_config.yaml``, else the run folder's
    ``config.yaml`` (``model_dir`` being ``RUN/model``)."""
    model_dir = Path(model_dir)
    exported = model_dir / EXPORT_CONFIG
    return exported if exported.is_file() else model_dir.parent / RUN_CONFIG


def check_run(run: str | Path) -> str:
    """The stage ("pretrain" or "finetune") of a finished run folder; FileNotFoundError naming the folder and what
    is missing when it is not a run folder or the run has not finished."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a folder; expected a run folder of `medmap-fast pretrain` or `finetune`")
    model_dir = run / MODEL_DIR
    if not any((run / name).exists() for name in (RUN_CONFIG, CHECKPOINT_NAME, MODEL_DIR)):
        raise FileNotFoundError(
            f"{run}: not a run folder of `medmap-fast pretrain` or `finetune` (no {RUN_CONFIG}, "
            f"{CHECKPOINT_NAME} or {MODEL_DIR}/)"
        )
    stage = saved_stage(model_dir)
    if stage is None:
        raise FileNotFoundError(
            f"{run}: incomplete run: no {MODEL_DIR}/{HEADS_CONFIG} or {MODEL_DIR}/{CLASSIFIER_CONFIG} (the model is "
            "saved when training ends; re-run the same command to resume it)"
        )
    for name in (RUN_CONFIG, RUN_METRICS):
        if not (run / name).is_file():
            raise FileNotFoundError(
                f"{run}: incomplete run: no {name} (written by `medmap-fast {stage}`"
                f"{' after the held-out evaluation' if name == RUN_METRICS else ''})"
            )
    return stage


def config_leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every setting of a config tree (a dataclass) by dotted key, as plain values: ``{"encoder.embed_dim": 24,
    "pretrain.train.lr_scale": {}, ...}`` (mapping-valued settings stay whole)."""
    if not (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return {path: as_dict(value)}
    leaves: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        leaves |= config_leaves(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    return leaves


def changed_keys(trained: RunConfig, config: RunConfig, run: str | Path) -> dict[str, Any]:
    """The settings ``config`` changes from the config ``trained`` the run's weights were trained with (dotted key
    -> new value); a change to a key outside :data:`USAGE_KEYS` is a ValueError naming each such key, both values and
    the keys that may change."""
    old, new = config_leaves(trained), config_leaves(config)
    changed = {key: value for key, value in new.items() if value != old[key]}
    refused = [key for key in changed if not any(fnmatchcase(key, pattern) for pattern in USAGE_KEYS)]
    if refused:
        reasons = [f"{key}: the weights of {run} were trained with {old[key]!r}, got {new[key]!r}" for key in refused]
        raise ValueError(
            "; ".join(reasons)
            + f" (an export may change only the keys the weights do not depend on: {', '.join(USAGE_KEYS)})"
        )
    return changed


def data_summary(config: RunConfig) -> dict[str, Any]:
    """The cache of ``config.data``: path, studies per split (with a report, with labels), volumes per modality,
    classes and task; ``error`` instead when the cache cannot be read now."""
    try:
        cache = open_cache(config.data)
    except (FileNotFoundError, ValueError) as err:
        return {"cache": config.data.path, "error": str(err)}
    volumes = Counter(m for split in cache.splits.values() for e in split for m in e.modalities)
    return {
        "cache": str(cache.path.resolve()),
        "splits": {
            name: {
                "studies": len(split),
                "with_report": sum(e.report is not None for e in split),
                "with_labels": sum(e.labels is not None for e in split),
            }
            for name, split in cache.splits.items()
        },
        "volumes_per_modality": dict(volumes),
        "classes": list(cache.labels.class_names) if cache.labels else None,
        "task": cache.labels.task if cache.labels else None,
    }


def _scalars(metrics: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(section, key, value) of every number of a metrics.json, one section deep (per-class tables left out)."""
    return [
        (section, key, value)
        for section, values in metrics.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def model_card(
    stage: str,
    model: SavedModel,
    run: Path,
    config: RunConfig,
    metrics: dict[str, Any],
    data: dict[str, Any],
    changed: dict[str, Any] | None = None,
) -> str:
    """The README.md of an export (markdown): how to load it, the model, the data, the metrics and the config (with
    the keys ``changed`` from the run's)."""
    encoder = encoder_of(model)
    title = "stage 1 (vision-language pre-training)" if stage == "pretrain" else "stage 2 (fine-tuned classifier)"
    if stage == "pretrain":
        loader = "model = mf.MedMAPPretrainModel.from_pretrained(DIR)   # encoder + projection heads"
    else:
        loader = "from medmap_fast.train.finetune import load_classifier\nmodel, meta = load_classifier(DIR)"
    swin = encoder.swin_kwargs
    lines = [
        f"# medmap-fast model: {title}",
        "",
        f"Exported by medmap-fast {__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{run}`.",
        "",
        "```python",
        "import medmap_fast as mf",
        'DIR = "path/to/this/folder"',
        "encoder = mf.MedMAPEncoder.from_pretrained(DIR)",
        loader,
        "```",
        "`medmap-fast embed --model DIR --data CACHE --out embeddings.npz` embeds prepared studies"
        + (
            "; `medmap-fast zero-shot --model DIR --data CACHE` scores them against class prompts."
            if stage == "pretrain"
            else "."
        ),
        "",
        "## Model",
        "",
        f"- encoder: Swin-3D, sharing `{encoder.sharing}`, embed_dim {swin['embed_dim']}, depths "
        f"{list(swin['depths'])}, heads {list(swin['num_heads'])}, patch {list(swin['patch_size'])}, window "
        f"{list(swin['window_size'])}; {sum(p.numel() for p in encoder.parameters()):,} parameters",
        f"- modalities: {', '.join(encoder.modalities.names)}",
        f"- whole model: {sum(p.numel() for p in model.parameters()):,} parameters",
    ]
    if isinstance(model, MedMAPClassifier):
        lines.append(f"- task: {model.task}, {model.num_classes} output(s)")
    lines += ["", "## Data", ""]
    if "error" in data:
        lines.append(f"- cache `{data['cache']}`: not readable at export time ({data['error']})")
    else:
        lines.append(
            f"- cache: `{data['cache']}`; volumes centre-cropped or padded to "
            f"{'x'.join(map(str, config.crop_size(stage)))} for evaluation"
        )
        lines += [
            f"- {name}: {s['studies']} studies ({s['with_report']} with a report, {s['with_labels']} with labels)"
            for name, s in data["splits"].items()
        ]
        volumes = data["volumes_per_modality"]
        lines.append("- volumes per modality: " + ", ".join(f"{m} {n}" for m, n in volumes.items()))
        if data["classes"]:
            lines.append(f"- classes ({data['task']}): {', '.join(data['classes'])}")
    lines += ["", "## Metrics (`metrics.json`, held-out studies)", ""]
    scalars = _scalars(metrics)
    if scalars:
        lines += ["| section | metric | value |", "|---|---|---:|"]
        lines += [f"| {s} | {k} | {v:.4g} |" if isinstance(v, float) else f"| {s} | {k} | {v} |" for s, k, v in scalars]
    else:
        lines.append("None: the run had no held-out studies.")
    lines += ["", f"## Config (`{EXPORT_CONFIG}`)", ""]
    if changed:
        lines += [
            f"The run's {RUN_CONFIG} with, at export: " + ", ".join(f"`{k}: {v}`" for k, v in changed.items()) + ".",
            "",
        ]
    lines += [
        "```yaml",
        yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None, width=120).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _sibling(out: Path, what: str) -> Path:
    """A fresh hidden name beside ``out`` (same file system, so renames between them are atomic)."""
    return out.with_name(f".{out.name}.{what}-{uuid.uuid4().hex[:12]}")


def _check_out(out: Path, run: Path, force: bool) -> None:
    """``out`` may be created, or replaced: absent, an empty folder, or (with ``force``) a folder with files, and
    neither the run nor inside its model."""
    here, there = run.resolve(), out.resolve()
    if there == here or there in here.parents or (here / MODEL_DIR) in (there, *there.parents):
        raise ValueError(f"--out {out}: would replace or sit inside the run {run} it exports; choose another folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty; choose another --out or pass --force to replace it")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``: atomically when ``out`` is absent or empty; an ``out`` with
    files is moved aside first, then deleted."""
    if out.is_dir() and any(out.iterdir()):
        old = _sibling(out, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def export_run(
    run: str | Path, out: str | Path, force: bool = False, config: RunConfig | None = None
) -> dict[str, Any]:
    """Export the finished run folder ``run`` to ``out`` (see the module docstring) with ``config``, the run's config
    with overrides (None: the run's own; a change to a key the weights depend on is a ValueError naming it); returns
    a summary (folder, stage, files, changed keys)."""
    run, out = Path(run), Path(out)
    stage = check_run(run)
    _check_out(out, run, force)
    trained = load_config(run / RUN_CONFIG)
    config = trained if config is None else config
    changed = changed_keys(trained, config, run)
    model_dir = run / MODEL_DIR
    model = load_saved_model(model_dir)  # every weight file checked before anything is written
    metrics = read_json_object(run / RUN_METRICS, f"medmap-fast {stage}")
    sources = {name: saved_encoder_dir(model_dir) / name for name in (ENCODER_CONFIG, ENCODER_WEIGHTS)}
    sources |= {name: model_dir / name for name in STAGE_FILES[stage]}
    sources[RUN_METRICS] = run / RUN_METRICS
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        for name, source in sources.items():
            shutil.copyfile(source, tmp / name)
        config.save(tmp / EXPORT_CONFIG)
        card = model_card(stage, model, run, config, metrics, data_summary(config), changed)
        (tmp / CARD).write_text(card, encoding="utf-8")
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"export": str(out), "stage": stage, "files": sorted([*sources, EXPORT_CONFIG, CARD]), "changed": changed}
