"""Run configuration: one YAML file, loaded into a typed dataclass tree (:class:`RunConfig`) and validated once.

```yaml
seed: 0
data:      {path: CACHE, size: 32, loader: auto, classes: null}   # a folder written by `medmap-fast prepare`
demo:      {num_studies: 320, size: 32, test_fraction: 0.25, spacing: null}   # what `medmap-fast demo` generates
encoder:   {sharing: gated, embed_dim: 24, patch_size: 2, window_size: 4, depths: [2, 2, 2], num_heads: [3, 6, 12]}
text:      {model: null, pooling: mean, prompt_template: "{description} MRI"}
pretrain:  {model: {embed_dim: 128, lam: 0.5}, train: {epochs: 4, batch_size: 16, lr: 3.0e-4}}
finetune:  {model: {dim: 64, depth: 1, num_heads: 4}, train: {epochs: 4, batch_size: 8, lr: 3.0e-4}, size: 48}
evaluate:  {batch_size: 16}
```

``data`` (:class:`DataConfig`): the prepared cache (``--data`` on the command line), the crop size of every volume
(an int or 3 ints), the loader (``auto``: DALI on a GPU when installed, else torch) and optionally the class order.
``demo`` (:class:`DemoDataConfig`): the synthetic studies ``medmap-fast demo`` writes and prepares (``spacing``
null keeps the generated voxel size). ``encoder`` (:class:`EncoderConfig`): the arguments of
:class:`~medmap_fast.models.encoder.MedMAPEncoder` (``modalities``, ``sharing`` and the MONAI Swin arguments).
``text`` (:class:`TextConfig`): the frozen text encoder and the modality prompt. ``pretrain`` / ``finetune``
(:class:`PretrainConfig`, :class:`FinetuneConfig`): ``model`` (the arguments of
:class:`~medmap_fast.models.medmap.MedMAPPretrainModel` / :class:`~medmap_fast.models.medmap.MedMAPClassifier`),
``train`` (:class:`~medmap_fast.train.loop.TrainConfig`; its ``seed`` defaults to the top-level one), ``max_volumes``
(modalities per study and step), ``augment`` (false: none, a centre crop or pad as in evaluation; true: the
:class:`~medmap_fast.data.augment.AugmentConfig` defaults; or a mapping of its fields) and ``size`` (the crop of this
stage and of the evaluation of its model; null: ``data.size``). Keys left out take the defaults of these classes.

Every value is checked against its field's type on load (:func:`load_config`); a wrong key, type or value is a
``ValueError`` naming the dotted key, what came and what was expected, e.g. ``pretrain.train.lr: expected a number,
got 'fast'``. Numbers written ``1e-4`` (a string to YAML 1.1) are read as numbers. ``--set KEY=VALUE`` on the
command line sets one dotted key to a YAML value after the file (:func:`add_config_args`, :func:`resolve_config`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from medmap_fast import __version__, configs
from medmap_fast.data.augment import AugmentConfig
from medmap_fast.data.loaders import LOADER_KINDS
from medmap_fast.fileio import atomic_write_bytes
from medmap_fast.losses import AsymmetricContrastiveLoss
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.models.conv_branch import branch_settings
from medmap_fast.models.encoder import SHARING
from medmap_fast.models.fusion import POOLINGS as CCT_POOLINGS
from medmap_fast.models.medmap import MedMAPClassifier
from medmap_fast.models.swin3d import SwinViT3D, as_triple
from medmap_fast.models.text import POOLINGS as TEXT_POOLINGS
from medmap_fast.models.text import TextEncoder
from medmap_fast.train.loop import TrainConfig
from medmap_fast.validation import fail

STAGES = ("pretrain", "finetune")
RUN_CONFIG = "config.yaml"  # the resolved config, in every run folder
Size = tuple[int, int, int]
# A decimal number as text: PyYAML (YAML 1.1) reads 1e-4 as a string; a number field accepts it.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _default_of(fn: Callable[..., Any], name: str) -> Any:
    """The default of argument ``name`` of ``fn``: a key passed through to a constructor keeps one source of truth."""
    return inspect.signature(fn).parameters[name].default


# ---------------------------------------------------------------------------------------------------------------
# the sections


@dataclass
class DataConfig:
    """``data``: the prepared cache, the crop size of every volume, the loader and the class order."""

    path: str | None = None
    size: int | tuple[int, int, int] = 32
    loader: str = "auto"
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        as_triple(self.size, "size")
        if self.loader not in LOADER_KINDS:
            fail("loader", f"one of {LOADER_KINDS}", repr(self.loader))


@dataclass
class DemoDataConfig:
    """``demo``: the synthetic studies of ``medmap-fast demo`` (:class:`medmap_fast.synthetic.demo.DemoConfig` draws
    them); ``seed`` null = the top-level seed, ``spacing`` null = the generated voxel size (mm otherwise),
    ``num_workers`` null = one per CPU."""

    num_studies: int = 320
    size: int | tuple[int, int, int] = 32
    test_fraction: float = 0.25
    seed: int | None = None
    organs: list[str] | None = None
    classes: list[str] | None = None
    spacing: float | tuple[float, float, float] | None = None
    num_workers: int | None = None

    def __post_init__(self) -> None:
        if self.num_studies < 1:
            fail("num_studies", "an int >= 1", repr(self.num_studies))
        if not 0.0 < self.test_fraction < 1.0:
            fail("test_fraction", "a fraction in (0, 1)", repr(self.test_fraction))
        spacing = () if self.spacing is None else self.spacing if isinstance(self.spacing, tuple) else (self.spacing,)
        if any(s <= 0 for s in spacing):
            fail("spacing", "null or positive mm", repr(self.spacing))
        if self.num_workers is not None and self.num_workers < 0:
            fail("num_workers", "null or an int >= 0", repr(self.num_workers))
        self.generator()  # checks size, organs and classes

    def generator(self) -> Any:
        """The :class:`~medmap_fast.synthetic.demo.DemoConfig` of these settings."""
        from medmap_fast.synthetic.demo import DemoConfig

        subset: dict[str, Any] = {k: tuple(v) for k in ("organs", "classes") if (v := getattr(self, k))}
        return DemoConfig(size=self.size, **subset)


@dataclass
class EncoderConfig:
    """``encoder``: the arguments of :class:`~medmap_fast.models.encoder.MedMAPEncoder`: ``modalities`` (null = the
    twelve defaults; names, [name, description] pairs or a mapping), ``sharing``, ``conv_branch`` (null = none, or
    a :class:`~medmap_fast.models.conv_branch.ConvBranch`'s ``stages`` and ``unshuffle``) and :class:`SwinViT3D`'s
    (= MONAI ``SwinTransformer``'s) arguments."""

    modalities: list[str | tuple[str, str]] | dict[str, str] | None = None
    sharing: str = "gated"
    conv_branch: dict[str, Any] | None = None
    in_chans: int = 1
    embed_dim: int = 24
    patch_size: int | tuple[int, int, int] = 2
    window_size: int | tuple[int, int, int] = 4
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12)
    mlp_ratio: float = _default_of(SwinViT3D, "mlp_ratio")
    qkv_bias: bool = _default_of(SwinViT3D, "qkv_bias")
    drop_rate: float = _default_of(SwinViT3D, "drop_rate")
    attn_drop_rate: float = _default_of(SwinViT3D, "attn_drop_rate")
    drop_path_rate: float = _default_of(SwinViT3D, "drop_path_rate")
    patch_norm: bool = _default_of(SwinViT3D, "patch_norm")
    use_checkpoint: bool = _default_of(SwinViT3D, "use_checkpoint")
    downsample: str = _default_of(SwinViT3D, "downsample")
    use_v2: bool = _default_of(SwinViT3D, "use_v2")
    use_flash_attention: bool = _default_of(SwinViT3D, "use_flash_attention")

    def __post_init__(self) -> None:
        if self.sharing not in SHARING:
            fail("sharing", f"one of {SHARING}", repr(self.sharing))
        ModalityRegistry(self.modalities)  # checks the names
        if self.conv_branch is not None:
            self.conv_branch = branch_settings(self.conv_branch, "encoder.conv_branch")
        as_triple(self.patch_size, "patch_size")
        as_triple(self.window_size, "window_size")
        if not self.depths or len(self.depths) != len(self.num_heads):
            fail("num_heads", f"one count per stage of depths {list(self.depths)}", repr(list(self.num_heads)))


@dataclass
class TextConfig:
    """``text``: the frozen text encoder (``model`` null = the offline MiniLM-L6 default, or a local Hugging Face
    folder), its pooling, and ``prompt_template``, the stage-2 prompt of each modality (``{name}``, ``{description}``
    filled from the modality registry)."""

    model: str | None = None
    pooling: str = "mean"
    prompt_template: str = "{description} MRI"
    max_length: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in TEXT_POOLINGS:
            fail("pooling", f"one of {TEXT_POOLINGS}", repr(self.pooling))
        try:
            self.prompt_template.format(name="T1", description="T1-weighted")
        except (KeyError, IndexError, ValueError) as err:
            fail(
                "prompt_template",
                "a format string with no fields other than {name} and {description}",
                f"{self.prompt_template!r} ({type(err).__name__}: {err})",
            )

    def text_encoder(self) -> TextEncoder:
        """The frozen :class:`TextEncoder` of these settings."""
        return TextEncoder(self.model, pooling=self.pooling, max_length=self.max_length, cache_dir=self.cache_dir)


@dataclass
class PretrainModelConfig:
    """``pretrain.model``: the arguments of :class:`~medmap_fast.models.medmap.MedMAPPretrainModel` (its ``text_dim``
    comes from the text encoder) and of its :class:`~medmap_fast.losses.AsymmetricContrastiveLoss`."""

    embed_dim: int = 128
    lam: float = _default_of(AsymmetricContrastiveLoss, "lam")
    local_loss: bool = _default_of(AsymmetricContrastiveLoss, "local_loss")
    logit_scale_init: float = _default_of(AsymmetricContrastiveLoss, "logit_scale_init")
    logit_scale_max: float = _default_of(AsymmetricContrastiveLoss, "logit_scale_max")
    learnable_scale: bool = _default_of(AsymmetricContrastiveLoss, "learnable_scale")


@dataclass
class ClassifierConfig:
    """``finetune.model``: the arguments of :class:`~medmap_fast.models.medmap.MedMAPClassifier` (its classes, task
    and prompt embeddings come from the data and the text encoder)."""

    dim: int = 64
    depth: int = 1
    num_heads: int = 4
    mlp_ratio: float = _default_of(MedMAPClassifier, "mlp_ratio")
    dropout: float = _default_of(MedMAPClassifier, "dropout")
    pool: str = _default_of(MedMAPClassifier, "pool")
    loss: str = _default_of(MedMAPClassifier, "loss")
    align_weight: float = _default_of(MedMAPClassifier, "align_weight")
    focal_alpha: float | None = _default_of(MedMAPClassifier, "focal_alpha")
    focal_gamma: float = _default_of(MedMAPClassifier, "focal_gamma")

    def __post_init__(self) -> None:
        if self.pool not in CCT_POOLINGS:
            fail("pool", f"one of {CCT_POOLINGS}", repr(self.pool))


@dataclass
class StageConfig:
    """What both training stages share: ``train``, ``max_volumes`` (null: every modality of a study), ``augment``
    (false, true or a mapping of AugmentConfig fields other than ``size``) and ``size`` (null: ``data.size``)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    max_volumes: int | None = None
    augment: bool | dict[str, Any] = False
    size: int | tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.max_volumes is not None and self.max_volumes < 1:
            fail("max_volumes", "null or an int >= 1", repr(self.max_volumes))
        if self.size is not None:
            as_triple(self.size, "size")


@dataclass
class PretrainConfig(StageConfig):
    """``pretrain``: stage 1."""

    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)


@dataclass
class FinetuneConfig(StageConfig):
    """``finetune``: stage 2."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class EvaluateConfig:
    """``evaluate``: studies per evaluation batch."""

    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            fail("batch_size", "an int >= 1", repr(self.batch_size))


@dataclass
class RunConfig:
    """The whole run configuration (the YAML file's sections; see the module docstring)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        for stage in STAGES:
            self.augment(stage, training=True)  # checks each augment mapping at its stage's size

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build and check the tree from plain values (a loaded YAML file); missing keys take the defaults, and a
        stage's ``train.seed`` the top-level ``seed``."""
        config = build(cls, values, "")
        for stage in STAGES:
            section = getattr(config, stage)
            if "seed" not in ((values.get(stage) or {}).get("train") or {}):
                section.train = dataclasses.replace(section.train, seed=config.seed)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples): YAML / JSON ready; :meth:`from_dict` rebuilds the same config."""
        return as_dict(self)

    def sections(self, *names: str) -> dict[str, Any]:
        """The named sections as plain values (what a checkpoint's run must match to resume it)."""
        return {name: as_dict(getattr(self, name)) for name in names}

    def stage(self, name: str) -> StageConfig:
        """The section of training stage ``name`` ("pretrain" or "finetune")."""
        if name not in STAGES:
            fail("stage", f"one of {STAGES}", repr(name))
        section: StageConfig = getattr(self, name)
        return section

    def crop_size(self, stage: str | None) -> Size:
        """The (X, Y, Z) crop of ``stage``'s volumes, in training and when its model is evaluated: its ``size``, else
        ``data.size`` (also for ``stage=None``)."""
        size = self.stage(stage).size if stage is not None else None
        return as_triple(self.data.size if size is None else size, "size")

    def augment(self, stage: str | None, training: bool) -> AugmentConfig:
        """The crop and augmentation of ``stage``'s studies at :meth:`crop_size`: its ``augment`` setting when
        ``training``, else a centre crop or pad (evaluation)."""
        size = self.crop_size(stage)
        value = self.stage(stage).augment if training and stage is not None else False
        if isinstance(value, bool):
            return AugmentConfig(size=size) if value else AugmentConfig.eval(size)
        augment: AugmentConfig = build(AugmentConfig, value, f"{stage}.augment", fixed={"size": size})
        return augment

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, atomically (``--config PATH`` repeats the run's settings)."""
        header = f"# the resolved run configuration (medmap-fast {__version__}); --config this file repeats it\n"
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)
        atomic_write_bytes(path, (header + body).encode())


# ---------------------------------------------------------------------------------------------------------------
# typed building and checking


def as_dict(value: Any) -> Any:
    """A config value as plain YAML / JSON values: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    return value


def build(cls: type, values: Any, path: str, fixed: Mapping[str, Any] | None = None) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``values`` (None = empty) found at dotted ``path`` ("" = the
    whole config): unknown keys and values of the wrong type are errors naming ``path.key``; nested dataclass fields
    are built the same way; the class's own checks (``__post_init__``) run last, their errors named under ``path``.
    ``fixed`` supplies fields the config does not set (they are not valid keys)."""
    name = path or "config"
    values = {} if values is None else values
    fixed = dict(fixed or {})
    hints = get_type_hints(cls)
    keys = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]
    if not isinstance(values, Mapping):
        fail(name, f"a mapping with keys among {keys}", repr(values))
    unknown = [k for k in values if k not in keys]
    if unknown:
        fail(name, f"keys among {keys}", f"unknown keys {unknown}")
    kwargs = {k: check_value(v, hints[k], f"{path}.{k}" if path else k) for k, v in values.items()}
    try:
        return cls(**kwargs, **fixed)
    except ValueError as err:
        if not path:
            raise
        raise ValueError(_under(path, str(err), keys)) from None


def _under(path: str, message: str, keys: Sequence[str]) -> str:
    """``message`` of a check inside section ``path`` with its key named in full: "lr: ..." -> "path.lr: ...";
    "augment.flip: ..." (a class naming itself) -> "pretrain.augment.flip: ..."."""
    head = message.split(":", 1)[0]
    first, _, rest = head.partition(".")
    if first in keys:
        return f"{path}.{message}"
    if first == path.rsplit(".", 1)[-1] and rest:
        return f"{path}{message[len(first) :]}"
    return f"{path}: {message}"


def check_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against type ``hint`` and normalised (lists to tuples for tuple types; ints and numeric
    strings to floats for float); a mismatch is an error naming ``name``. Dataclasses are built (:func:`build`);
    annotations other than None, bool, int, float, str, classes, Any, Literal, unions, tuples, lists and dicts are
    left to the class's own checks."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, name)
    try:
        return _convert(value, hint)
    except _Mismatch:
        fail(name, describe_type(hint), repr(value))


class _Mismatch(Exception):
    """A value (or an item of it) that does not have its annotated type; reported for the whole value."""


def _convert(value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _convert(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        fixed_length = origin is tuple and args[-1] is not Ellipsis
        if fixed_length and len(value) != len(args):
            raise _Mismatch
        items = [_convert(v, h) for v, h in zip(value, args if fixed_length else args[:1] * len(value), strict=True)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise _Mismatch
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML true/false are not numbers
        if not (number or (isinstance(value, str) and _NUMBER.fullmatch(value.strip()))):
            raise _Mismatch
        return float(value)
    if hint is int:
        matches = isinstance(value, int) and not isinstance(value, bool)
    elif origin is Literal:
        matches = value in args
    elif isinstance(hint, type):  # bool, str, None and other classes
        matches = isinstance(value, hint)
    else:  # other annotations: left to the class's own checks
        matches = True
    if not matches:
        raise _Mismatch
    return value


_NOUNS = {int: "ints", float: "numbers", str: "strings", bool: "true/false values", type(None): "nulls"}


def describe_type(hint: Any) -> str:
    """A type in words for error messages, e.g. ``int | tuple[int, int, int]`` -> "an int or a list of 3 ints"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return f"one of {args}"
    if origin in (tuple, list, Sequence):
        if origin is tuple and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return f"a list [{', '.join(describe_type(a) for a in args)}]"
        return f"a list of {_plural(args[0])}"
    if origin in (dict, Mapping):
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    words = {type(None): "null", bool: "true or false", int: "an int", float: "a number", str: "a string"}
    return words.get(hint, "any value" if hint is Any else getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return _NOUNS.get(hint, f"items ({describe_type(hint)})")


# ---------------------------------------------------------------------------------------------------------------
# loading, overrides, the command line


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def set_key(values: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (e.g. ``pretrain.train.lr``) of the plain config ``values`` in place; a mapping merges into
    a mapping already there, and a missing or non-mapping level on the way becomes a mapping. Key names are checked
    when the config is built (an unknown one is an error listing the valid keys of its level)."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        fail("--set", "KEY=VALUE with a dotted KEY such as pretrain.train.lr", repr(key))
    node = values
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    node[last] = merge(node[last], value) if isinstance(value, Mapping) and isinstance(node.get(last), dict) else value


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None
) -> RunConfig:
    """The defaults, then the YAML file at ``path`` (if any), then ``overrides`` (dotted key -> value, in order);
    built and checked once (:meth:`RunConfig.from_dict`)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            fail(str(path), "a YAML mapping of config sections", type(loaded).__name__)
        values = loaded or {}
    items = overrides.items() if isinstance(overrides, Mapping) else overrides or ()
    for key, value in items:
        set_key(values, key, copy.deepcopy(value))
    return RunConfig.from_dict(values)


def parse_override(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: (dotted key, VALUE parsed as YAML, e.g. ``1e-4`` -> 0.0001, ``[64,64,32]`` -> a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a dotted config key, a YAML value), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({err})") from None


def _config_arg(text: str) -> Path:
    """--config: a YAML file, or the name of a config shipped in the package (``paper`` or ``paper.yaml``)."""
    try:
        return configs.resolve(text)
    except FileNotFoundError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_config_args(parser: argparse.ArgumentParser, default: str = "built-in defaults", data: bool = True) -> None:
    """The config options of a subcommand: ``--config``, ``--set KEY=VALUE`` (repeatable), ``--seed`` and, with
    ``data``, ``--data CACHE``; :func:`resolve_config` reads them. ``default`` says what applies without --config."""
    shipped = ", ".join(configs.names())
    parser.add_argument(
        "--config",
        type=_config_arg,
        default=None,
        help=f"a YAML file, or the name of a shipped config: {shipped} (with or without .yaml; default: {default})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="set one config key after --config: a dotted key and a YAML value, "
        "e.g. --set pretrain.train.lr=1e-4 --set data.size=[64,64,32] (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=None, help="the config's seed (= --set seed=N)")
    if data:
        parser.add_argument(
            "--data",
            type=Path,
            default=None,
            help="prepared cache folder from `medmap-fast prepare` (= --set data.path=CACHE)",
        )


def resolve_config(args: argparse.Namespace, default: str | Path | None = None) -> RunConfig:
    """The config of a subcommand given :func:`add_config_args`' options: ``--config`` (else ``default``, else the
    built-in defaults), then every ``--set`` in order, then ``--seed`` and ``--data``."""
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(("seed", args.seed))
    if getattr(args, "data", None) is not None:
        overrides.append(("data.path", str(args.data)))
    return load_config(args.config if args.config is not None else default, overrides)
