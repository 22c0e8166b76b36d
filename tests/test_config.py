"""The run config: the shipped YAML files load into the typed tree with their meaning, every bad key, type or value is
an error naming the dotted key, ``--set KEY=VALUE`` overrides any key on every config-taking subcommand, and a CLI run
writes the resolved config (``config.yaml``) that reloads to the same config."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from collections.abc import Sequence
from typing import Literal

import pytest
import yaml

from medmap_fast import configs
from medmap_fast.data.augment import AugmentConfig
from medmap_fast.losses import AsymmetricContrastiveLoss
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.models.swin3d import SwinViT3D
from medmap_fast.train.config import (
    RUN_CONFIG,
    ClassifierConfig,
    EncoderConfig,
    PretrainModelConfig,
    RunConfig,
    add_config_args,
    check_value,
    load_config,
    parse_override,
    resolve_config,
)
from medmap_fast.train.loop import TrainConfig

# ---------------------------------------------------------------------------------------------------------------
# the shipped configs


def test_shipped_configs_load_into_the_typed_tree_with_their_meaning():
    loaded = {name: load_config(configs.resolve(name)) for name in configs.names()}
    assert set(loaded) == {"demo", "demo_quick", "paper"}
    for name, config in loaded.items():
        assert isinstance(config, RunConfig) and isinstance(config.pretrain.train, TrainConfig), name
        assert config.data.path is None, name  # the demo fills it in; the paper config takes --data CACHE
        assert config.pretrain.train.seed == config.finetune.train.seed == config.seed == 0, name
        assert RunConfig.from_dict(config.to_dict()) == config, name  # to_dict is complete and lossless
    paper = loaded["paper"]
    assert paper.crop_size("pretrain") == (96, 96, 96) and paper.crop_size("finetune") == (128, 128, 128)
    assert paper.augment("finetune", training=True) == AugmentConfig(size=(128, 128, 128))
    assert paper.augment("finetune", training=False) == AugmentConfig.eval((128, 128, 128))
    assert (paper.encoder.embed_dim, paper.encoder.patch_size, paper.encoder.window_size) == (48, 2, 7)
    assert paper.encoder.depths == (2, 2, 2, 2) and paper.encoder.num_heads == (3, 6, 12, 24)
    train = paper.pretrain.train
    assert (train.lr, train.weight_decay, train.epochs) == (1e-4, 1e-5, 100)
    assert (paper.finetune.model.dim, paper.finetune.model.depth, paper.pretrain.model.embed_dim) == (256, 2, 512)
    for name, studies, epochs, v2, depths, patch in (("demo", 2400, (6, 10), True, (2, 2), 4),
                                                     ("demo_quick", 1200, (1, 14), False, (1, 1), 8)):
        demo = loaded[name]
        assert demo.demo.num_studies == studies and demo.crop_size("finetune") == (32, 32, 32)
        assert (demo.pretrain.train.epochs, demo.finetune.train.epochs) == epochs
        assert demo.encoder.use_v2 == v2 and demo.encoder.depths == depths and demo.encoder.patch_size == patch
        assert demo.finetune.model.pool == "max" and demo.finetune.train.lr == 3e-4 and demo.pretrain.max_volumes == 2
        assert demo.augment("pretrain", training=True) == AugmentConfig.eval((32, 32, 32))  # augment: false


def test_missing_keys_take_the_defaults_and_stages_take_the_top_level_seed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nencoder: {embed_dim: 12}\nfinetune: {train: {epochs: 2, seed: 7}}\npretrain:\n")
    config = load_config(path)
    assert config.seed == 3 and config.encoder.embed_dim == 12 and config.encoder.patch_size == 2
    assert config.finetune.train == TrainConfig(epochs=2, seed=7)  # its own seed wins
    assert config.pretrain.train == TrainConfig(seed=3)
    assert load_config(None) == RunConfig()


def test_model_sections_take_their_constructors_arguments_and_defaults():
    """Each section that is passed to a constructor holds exactly its configurable arguments, with its defaults
    where the config does not choose its own."""
    own = {"embed_dim", "depths", "num_heads", "window_size", "patch_size"}  # the config's smaller default trunk
    cases = [
        (EncoderConfig, [MedMAPEncoder, SwinViT3D], {"norm_layer", "spatial_dims", "num_modalities", "modality_gate"},
         own),
        (PretrainModelConfig, [MedMAPPretrainModel, AsymmetricContrastiveLoss], {"encoder", "text_dim"}, {"embed_dim"}),
        (
            ClassifierConfig,
            [MedMAPClassifier],
            {"encoder", "num_classes", "prompt_embeddings", "task", "label_embeddings"},
            {"dim", "depth", "num_heads"},
        ),
    ]
    for section, constructors, not_configurable, own_defaults in cases:
        params = {
            name: p
            for c in constructors
            for name, p in inspect.signature(c).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
        }
        fields = {f.name: f.default for f in dataclasses.fields(section)}
        assert set(fields) == set(params) - not_configurable, section
        for name, default in fields.items():
            if name in params and name not in own_defaults and params[name].default is not inspect.Parameter.empty:
                assert default == params[name].default, (section, name)
    from medmap_fast.train.pretrain import build_encoder

    assert build_encoder(load_config(None)).swin_kwargs["embed_dim"] == 24  # every key is a valid argument


# ---------------------------------------------------------------------------------------------------------------
# errors name the dotted key, what came and what was expected


@pytest.mark.parametrize(
    "text, key, expected, got",
    [
        # unknown keys, at every level: the valid ones are listed
        ("pretrian: {}", "config", r"keys among \['seed', 'data'.*'evaluate'\]", r"unknown keys \['pretrian'\]"),
        ("data: {sise: 32}", "data", r"keys among \['path', 'size', 'loader', 'classes'\]", r"\['sise'\]"),
        ("demo: {num_studis: 3}", "demo", r"keys among \['num_studies'", r"\['num_studis'\]"),
        ("pretrain: {train: {lrr: 1}}", "pretrain.train", r"keys among \['epochs'.*'lr'", r"\['lrr'\]"),
        (
            "finetune: {augment: {flips: [0, 0, 0]}}",
            "finetune.augment",
            r"keys among \['random_crop', 'flip'",
            r"\['flips'\]",
        ),
        ("finetune: {augment: {size: 8}}", "finetune.augment", r"keys among \['random_crop'", r"\['size'\]"),
        ("finetune: {model: {width: 8}}", "finetune.model", r"keys among \['dim', 'depth'", r"\['width'\]"),
        # wrong types
        ("data: 32", "data", "a mapping with keys among", "32"),
        ("data: {size: big}", "data.size", "an int or a list of 3 ints", "'big'"),
        ("data: {size: [32, 32]}", "data.size", "an int or a list of 3 ints", r"\[32, 32\]"),
        ("seed: true", "seed", "an int", "True"),
        ("pretrain: {train: {lr: fast}}", "pretrain.train.lr", "a number", "'fast'"),
        ("pretrain: {train: {betas: 0.9}}", "pretrain.train.betas", "a list of 2 numbers", "0.9"),
        ("encoder: {depths: [2, x]}", "encoder.depths", "a list of ints", r"\[2, 'x'\]"),
        ("text: {model: 3}", "text.model", "a string or null", "3"),
        ("pretrain: {augment: 1}", "pretrain.augment", "true or false or a mapping", "1"),
        ("finetune: {augment: {flip: 0.5}}", "finetune.augment.flip", "a list of 3 numbers", "0.5"),
        # bad values
        ("data: {loader: fast}", "data.loader", r"one of \('auto', 'dali', 'torch'\)", "'fast'"),
        ("data: {size: 0}", "data.size", "a positive int or 3 positive ints", "0"),
        ("demo: {test_fraction: 1.0}", "demo.test_fraction", r"a fraction in \(0, 1\)", "1.0"),
        ("demo: {classes: [unicorn]}", "demo.classes", "a non-empty subset of", "unicorn"),
        ("pretrain: {train: {epochs: 0}}", "pretrain.train.epochs", "an int >= 1", "0"),
        ("finetune: {train: {amp: fp8}}", "finetune.train.amp", "one of", "'fp8'"),
        ("finetune: {max_volumes: 0}", "finetune.max_volumes", "null or an int >= 1", "0"),
        (
            "finetune: {augment: {flip: [0.5, 2, 0]}}",
            "finetune.augment.flip",
            r"3 probabilities in \[0, 1\]",
            r"\(0.5, 2.0, 0.0\)",
        ),
        (
            "pretrain: {augment: {rot90: true}}\ndata: {size: [32, 16, 32]}",
            "pretrain.augment.rot90",
            "size X == Y",
            r"\(32, 16, 32\)",
        ),
        ("encoder: {sharing: shared}", "encoder.sharing", r"one of \('gated', 'separate'\)", "'shared'"),
        ("encoder: {depths: [2, 2], num_heads: [3]}", "encoder.num_heads", "one count per stage", r"\[3\]"),
        ("encoder: {modalities: [T1, t1]}", "encoder.modalities", "unique names", "'t1' twice"),
        ("finetune: {model: {pool: sum}}", "finetune.model.pool", "one of", "'sum'"),
        (
            "text: {prompt_template: '{organ} MRI'}",
            "text.prompt_template",
            r"a format string with no fields other than \{name\}",
            "KeyError",
        ),
        ("evaluate: {batch_size: 0}", "evaluate.batch_size", "an int >= 1", "0"),
    ],
)
def test_errors_name_the_dotted_key_what_came_and_what_was_expected(tmp_path, text, key, expected, got):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"^{key}: expected {expected}.*, got .*{got}"):
        load_config(path)


def test_a_file_that_is_not_a_yaml_mapping_is_an_error_naming_it(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- seed\n")
    with pytest.raises(ValueError, match=rf"^{path}: expected a YAML mapping of config sections, got list"):
        load_config(path)
    path.write_text("data: {size: [32, 32\n")
    with pytest.raises(ValueError, match=rf"(?s)^{path}: not valid YAML \(.*line 2"):
        load_config(path)


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads 1e-4 as a string (YAML 1.1); a number field takes it as the number it says."""
    path = tmp_path / "c.yaml"
    path.write_text("pretrain: {train: {lr: 1e-4, weight_decay: 5E-2, grad_clip: 2}}\n")
    train = load_config(path).pretrain.train
    assert (train.lr, train.weight_decay, train.grad_clip) == (1e-4, 5e-2, 2.0)
    assert isinstance(train.grad_clip, float)


def test_check_value_types():
    assert check_value([1, 2], Sequence[int], "k") == [1, 2]
    assert check_value("b", Literal["a", "b"], "k") == "b"
    assert check_value({"encoder.": 1}, dict[str, float], "k") == {"encoder.": 1.0}
    assert check_value([3, 4, 5], tuple[int, int, int] | None, "k") == (3, 4, 5)
    for value, hint, expected in [
        ("c", Literal["a", "b"], r"one of \('a', 'b'\)"),
        (1.5, int, "an int"),
        ([1, 2.5], list[int], "a list of ints"),
        (None, str, "a string"),
    ]:
        with pytest.raises(ValueError, match=rf"^k: expected {expected}, got "):
            check_value(value, hint, "k")


# ---------------------------------------------------------------------------------------------------------------
# --set KEY=VALUE


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return parser.parse_args(list(argv))


def test_set_parses_dotted_keys_and_yaml_values():
    assert parse_override("pretrain.train.lr=1e-4") == ("pretrain.train.lr", "1e-4")  # a number field reads it
    assert parse_override("data.size=[64,64,32]") == ("data.size", [64, 64, 32])
    assert parse_override("finetune.model={dim: 32, pool: max}") == ("finetune.model", {"dim": 32, "pool": "max"})
    assert parse_override("text.model=") == ("text.model", None)
    assert parse_override("text.prompt_template=a=b {name}") == ("text.prompt_template", "a=b {name}")
    for bad in ("data.size", "=3", "data.size=[64,"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_override(bad)


def test_set_applies_after_the_file_in_order_and_seed_and_data_after_it(tmp_path):
    settings = [
        "pretrain.train.lr=1e-3",
        "data.size=[64,64,32]",
        "finetune.model={dim: 32}",
        "finetune.augment.flip=[0,0,0.5]",
        "encoder.depths=[2, 2]",
        "encoder.num_heads=[3, 6]",
        "seed=1",
    ]
    args = _parse(
        "--config", "paper", *[a for s in settings for a in ("--set", s)], "--seed", "5", "--data", str(tmp_path)
    )
    config = resolve_config(args)
    assert config.pretrain.train.lr == 1e-3 and config.pretrain.train.weight_decay == 1e-5  # the rest of paper.yaml
    assert config.data.size == (64, 64, 32) and config.crop_size("pretrain") == (64, 64, 32)
    assert config.finetune.model.dim == 32 and config.finetune.model.depth == 2  # a mapping merges
    assert config.augment("finetune", training=True) == AugmentConfig(size=(128, 128, 128), flip=(0.0, 0.0, 0.5))
    assert config.encoder.depths == (2, 2)
    assert config.seed == config.pretrain.train.seed == 5 and config.data.path == str(tmp_path)
    assert resolve_config(_parse("--set", "pretrain.augment.rot90=true")).augment("pretrain", True).rot90
    later = resolve_config(_parse("--set", "data.size=16", "--set", "data={size: 24, loader: torch}"))
    assert (later.data.size, later.data.loader) == (24, "torch")


@pytest.mark.parametrize(
    "setting, key, valid",
    [
        ("pretrain.train.lrr=1", "pretrain.train", ["lr", "warmup_fraction", "batch_size"]),
        ("pretrian.train.lr=1", "config", ["pretrain", "finetune", "evaluate"]),
        ("finetune.model.width=8", "finetune.model", ["dim", "depth", "pool"]),
        ("data.size.x=1", "data.size", ["an int or a list of 3 ints"]),
    ],
)
def test_set_of_an_unknown_key_is_an_error_listing_the_valid_ones(setting, key, valid):
    with pytest.raises(ValueError, match=rf"^{key}: expected ") as err:
        resolve_config(_parse("--set", setting))
    assert all(v in str(err.value) for v in valid), err.value


def test_every_subcommand_that_takes_a_config_takes_set_and_seed():
    from medmap_fast.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    takes_config = {name for name, p in commands.items() if any("--config" in a.option_strings for a in p._actions)}
    assert {"demo", "pretrain", "finetune", "evaluate"} <= takes_config
    for name in takes_config:
        args = commands[name]._actions
        assert all(any(flag in a.option_strings for a in args) for flag in ("--set", "--seed")), name


# ---------------------------------------------------------------------------------------------------------------
# the resolved config in the run folder


def test_save_writes_yaml_that_reloads_to_the_same_config(tmp_path):
    config = load_config(
        configs.resolve("paper"),
        {"data.path": "/data/cache", "finetune.train.lr_scale": {"encoder.": 0.5}, "pretrain.augment": {"scale": 0.2}},
    )
    path = tmp_path / "run" / RUN_CONFIG
    config.save(path)
    text = path.read_text()
    assert text.startswith("# the resolved run configuration") and "{" not in text.splitlines()[0]
    assert yaml.safe_load(text)["finetune"]["size"] == 128
    assert load_config(path) == config
    assert [p.name for p in path.parent.iterdir()] == [RUN_CONFIG]  # no temporary file left


@pytest.mark.usefixtures("one_thread")
def test_cli_runs_write_the_resolved_config(tmp_path, capsys):
    """pretrain and evaluate --out write config.yaml with the --set values; it reloads to the run's config, and a
    re-run with another setting refuses to resume the checkpoint."""
    from test_export_embed import TINY, write_tiny_cache

    from medmap_fast.cli import main

    cache = tmp_path / "cache"
    write_tiny_cache(cache)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY.replace("TEXT_CACHE", str(tmp_path / "text")))
    run = tmp_path / "s1"
    common = ["--config", str(tiny), "--data", str(cache), "--out", str(run), "--no-progress"]
    settings = ["--set", "pretrain.train.lr=2e-3", "--set", "data.size=[16,16,16]", "--seed", "4"]
    assert main(["pretrain", *common, *settings]) == 0
    saved = load_config(run / RUN_CONFIG)
    assert saved.pretrain.train.lr == 2e-3 and saved.seed == saved.pretrain.train.seed == 4
    assert saved.data.path == str(cache) and saved.data.size == (16, 16, 16) and saved.encoder.embed_dim == 12
    expected = load_config(
        tiny, {"pretrain.train.lr": 2e-3, "data.size": [16, 16, 16], "seed": 4, "data.path": str(cache)}
    )
    assert saved == expected

    capsys.readouterr()
    out = tmp_path / "eval"
    evaluate = ["evaluate", "--model", str(run / "model"), "--out", str(out), "--no-progress"]
    assert main([*evaluate, "--set", "evaluate.batch_size=2"]) == 0
    evaluated = load_config(out / RUN_CONFIG)  # the run's config.yaml, then --set
    assert evaluated == dataclasses.replace(saved, evaluate=dataclasses.replace(saved.evaluate, batch_size=2))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["pretrain"]["retrieval_r1"] <= 1.0 and not math.isnan(metrics["pretrain"]["chance_r1"])

    with pytest.raises(ValueError, match="another configuration"):
        main(["pretrain", *common, "--set", "pretrain.train.lr=3e-3"])
    assert load_config(run / RUN_CONFIG) == saved  # still the config of the run the checkpoint holds


def test_the_module_docstring_example_is_a_valid_config():
    """The sections the module docstring documents are the tree's."""
    from medmap_fast.train import config

    example = yaml.safe_load(config.__doc__.split("```yaml")[1].split("```")[0])
    assert RunConfig.from_dict(example).finetune.size == 48
    assert set(example) == {f.name for f in dataclasses.fields(RunConfig)}
