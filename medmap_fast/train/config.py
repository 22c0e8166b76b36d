"""Run configuration: one YAML file with the sections below, merged over built-in defaults.

```yaml
seed: 0
data:      {path: CACHE, size: 32, loader: auto, classes: null}   # a folder written by `medmap-fast prepare`
demo:      {num_studies: 320, size: 32, test_fraction: 0.25, spacing: null}   # what `medmap-fast demo` generates
encoder:   {sharing: gated, embed_dim: 24, patch_size: 2, window_size: 4, depths: [2, 2, 2], num_heads: [3, 6, 12]}
text:      {model: null, pooling: mean, prompt_template: "{description} MRI"}
pretrain:  {model: {embed_dim: 128, lam: 0.5}, train: {epochs: 4, batch_size: 16, lr: 3.0e-4}}
finetune:  {model: {dim: 64, depth: 1, num_heads: 4}, train: {epochs: 4, batch_size: 8, lr: 3.0e-4}}
evaluate:  {batch_size: 16}
```

``data``: the prepared cache (``--data`` on the command line), the crop size of every volume (an int or 3 ints),
the loader (``auto``: DALI on a GPU when installed, else torch) and optionally the class order. ``demo``: the
synthetic studies ``medmap-fast demo`` writes and prepares (``spacing`` null keeps the generated voxel size).
``pretrain.augment`` / ``finetune.augment``: false (none: a centre crop or pad, as in evaluation), true (random
crop, flips, per-volume intensity) or a mapping of :class:`~medmap_fast.data.augment.AugmentConfig` fields.
``encoder`` is passed to :class:`~medmap_fast.models.encoder.MedMAPEncoder` (``modalities``, ``sharing`` and the
MONAI Swin arguments), ``pretrain.model`` to :class:`~medmap_fast.models.medmap.MedMAPPretrainModel`, ``finetune.model`` to
:class:`~medmap_fast.models.medmap.MedMAPClassifier`, each ``train`` to :class:`~medmap_fast.train.loop.TrainConfig`
(its ``seed`` defaults to the top-level one). Unknown top-level sections or data/demo/text keys are errors naming
them.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from medmap_fast.data.augment import AugmentConfig
from medmap_fast.data.loaders import LOADER_KINDS
from medmap_fast.train.loop import TrainConfig
from medmap_fast.validation import fail

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {"path": None, "size": 32, "loader": "auto", "classes": None},
    "demo": {"num_studies": 320, "size": 32, "test_fraction": 0.25, "seed": None, "organs": None, "classes": None,
             "spacing": None, "num_workers": None},
    "encoder": {"modalities": None, "sharing": "gated", "in_chans": 1, "embed_dim": 24, "patch_size": 2,
                "window_size": 4, "depths": [2, 2, 2], "num_heads": [3, 6, 12]},
    "text": {"model": None, "pooling": "mean", "prompt_template": "{description} MRI"},
    "pretrain": {"model": {"embed_dim": 128, "lam": 0.5}, "train": {}, "max_volumes": None, "augment": False},
    "finetune": {"model": {"dim": 64, "depth": 1, "num_heads": 4}, "train": {}, "max_volumes": None, "augment": False},
    "evaluate": {"batch_size": 16},
}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_keys(section: dict[str, Any], allowed: set[str], name: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        fail(name, f"keys among {sorted(allowed)}", f"unknown keys {unknown}")


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check section names and build the stage TrainConfigs once (their own checks name bad values)."""
    _check_keys(config, set(DEFAULTS), "config")
    for section in ("data", "demo"):
        _check_keys(config[section], set(DEFAULTS[section]), section)
    if config["data"]["loader"] not in LOADER_KINDS:
        fail("data.loader", f"one of {LOADER_KINDS}", repr(config["data"]["loader"]))
    _check_keys(config["text"], set(DEFAULTS["text"]) | {"max_length", "cache_dir"}, "text")
    for stage in ("pretrain", "finetune"):
        _check_keys(config[stage], set(DEFAULTS[stage]), stage)
        train_config(config, stage)
        augment_config(config, stage)
    if not 0.0 < float(config["demo"]["test_fraction"]) < 1.0:
        fail("demo.test_fraction", "a fraction in (0, 1)", repr(config["demo"]["test_fraction"]))
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated."""
    import yaml

    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            fail(str(path), "a YAML mapping of config sections", type(loaded).__name__)
        config = merge(config, loaded)
    return validate(merge(config, overrides or {}))


def train_config(config: dict[str, Any], stage: str) -> TrainConfig:
    """The :class:`TrainConfig` of ``stage`` ("pretrain" or "finetune"), seeded by the top-level seed by default."""
    return TrainConfig.from_dict({"seed": config["seed"], **config[stage]["train"]}, f"{stage}.train")


def augment_config(config: dict[str, Any], stage: str | None) -> AugmentConfig:
    """The augmentation of ``stage`` ("pretrain"/"finetune": its ``augment`` key: false = none (centre crop or pad,
    as for evaluation), true = the AugmentConfig defaults, or a mapping of AugmentConfig fields) at ``data.size``;
    ``stage=None`` is evaluation."""
    size = config["data"]["size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size,) * 3
    value = False if stage is None else config[stage]["augment"]
    if isinstance(value, bool):
        return AugmentConfig(size=size) if value else AugmentConfig.eval(size)
    if not isinstance(value, dict):
        fail(f"{stage}.augment", "true, false or a mapping of AugmentConfig fields", repr(value))
    _check_keys(value, {f.name for f in dataclasses.fields(AugmentConfig)} - {"size"}, f"{stage}.augment")
    return AugmentConfig(size=size, **value)
