"""Settings declared once (idjax/options.py, idjax/configs.py): the flags of `idjax`, the keys of an
`idjax run` config and the Python dataclasses take their defaults, choices and ranges from one
declaration, and a bad value gets the same reason in all three front ends."""

import argparse
import dataclasses

import pytest

from idjax import options
from idjax.cli import COMMANDS
from idjax.cli_args import build_parser
from idjax.configs import EmbedConfig, SelectConfig, TrainRecipe, WarmupRecipe
from idjax.demo import DemoConfig
from idjax.run_config import RunConfig

REQUIRED = {"select": ["--train", "p.jsonl", "--target", "t.jsonl", "--out", "s.jsonl", "--k", "3"],
            "embed": ["--train", "p.jsonl", "--store", "s"],
            "train": ["--data", "p.jsonl", "--out", "o"], "warmup": ["--data", "p.jsonl", "--out", "o"]}


def parse(command, *extra):
    return build_parser(COMMANDS).parse_args([command, *REQUIRED[command], *map(str, extra)])


@pytest.mark.parametrize("command, cls, values", [
    ("select", SelectConfig, {"k": 3}), ("select", EmbedConfig, {}), ("embed", EmbedConfig, {}),
    ("train", TrainRecipe, {"batch_size": 8}), ("warmup", WarmupRecipe, {"batch_size": 8}),
])
def test_flag_defaults_are_the_dataclass_defaults(command, cls, values):
    """Every field with a flag: parsing no flag builds the dataclass's own defaults (the commands' batch
    size of 8 is the one documented override)."""
    assert options.from_args(cls, parse(command)) == cls(**values)
    help_text = build_parser(COMMANDS)._subparsers._group_actions[0].choices[command].format_help()
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) and not (command == "embed" and cls is SelectConfig):
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            assert f"--{flag}" in help_text or f"--no-{flag}" in help_text, f.name


# (command, flag, field, dataclass, bad value)
BAD = [
    ("select", "--k", "k", SelectConfig, 0),
    ("select", "--landmarks", "landmarks", SelectConfig, 1.5),
    ("select", "--lam", "lam", SelectConfig, -1.0),
    ("select", "--lr", "learning_rate", SelectConfig, 0.0),
    ("select", "--proj-dim", "proj_dim", SelectConfig, -2),
    ("select", "--params", "params", SelectConfig, "down_proj("),
    ("select", "--embed-dim", "dim", EmbedConfig, 0),
    ("train", "--batch-size", "batch_size", TrainRecipe, 0),
    ("train", "--warmup-ratio", "lr_warmup_ratio", TrainRecipe, 1.5),
    ("train", "--momentum", "momentum", TrainRecipe, 1.0),
    ("warmup", "--fraction", "fraction", WarmupRecipe, 0.0),
]


@pytest.mark.parametrize("command, flag, name, cls, bad", BAD)
def test_one_reason_in_every_front_end(command, flag, name, cls, bad):
    """The same value is refused with the same reason by the flag check, the dataclass and the YAML
    loader (RunConfig's own keys, or its train: / warmup: sections)."""
    base = {"k": 3} if cls is SelectConfig and name != "k" else {}
    with pytest.raises(options.ConfigError) as python:
        cls(**base, **{name: bad})
    why = python.value.text
    assert python.value.key == name and why
    assert options.flag_problem(parse(command, flag, bad)) == f"{flag} {why}"

    run = {"pool": "p.jsonl", "target": "t.jsonl", "k": 3}
    if cls in (TrainRecipe, WarmupRecipe):
        section = "train" if cls is TrainRecipe else "warmup"
        run[section], key = {name: bad}, f"{section}.{name}"
    else:
        key = next(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("same_as") == (cls, name)) \
            if name != "k" else "k"
        run[key] = bad
    with pytest.raises(options.ConfigError) as yaml_error:
        options.from_mapping(RunConfig, run)
    assert yaml_error.value.key == key
    if name != "k":  # a run's k may also be a fraction: its own rule
        assert yaml_error.value.text == why


def test_run_config_selection_keys_are_select_config_fields():
    """A run config with no selection keys selects like SelectConfig's defaults; each shared key has
    the declaration (default, choices, range) of the field it stands for."""
    run = RunConfig(pool="p.jsonl", target="t.jsonl", k=5)
    assert run.select_config(5) == SelectConfig(k=5)
    shared = [f for f in dataclasses.fields(RunConfig) if "same_as" in f.metadata]
    assert len(shared) == 24
    for f in shared:
        cls, name = f.metadata["same_as"]
        src = next(g for g in dataclasses.fields(cls) if g.name == name)
        assert (f.default, f.metadata["choices"], f.metadata["check"]) == \
               (src.default, src.metadata["choices"], src.metadata["check"]), f.name
    changed = RunConfig(pool="p.jsonl", target="t.jsonl", k=5, order=2, gd_lr=3e-4, embed_dim=64, seed=7)
    config = changed.select_config(5)
    assert (config.order, config.learning_rate, config.embed.dim, config.embed.seed, config.seed) == \
           (2, 3e-4, 64, 7, 7)


def test_choices_and_nested_sections():
    with pytest.raises(options.ConfigError, match="expected one of random, kmeans"):
        SelectConfig(k=1, landmark_method="farthest")
    with pytest.raises(options.ConfigError) as e:
        options.from_mapping(RunConfig, {"pool": "p", "target": "t", "k": 2, "warmup": {"schedule": "step"}})
    assert e.value.key == "warmup.schedule" and "expected one of constant, linear, cosine" in e.value.text
    with pytest.raises(options.ConfigError, match="give steps or epochs, not both"):
        TrainRecipe(steps=3, epochs=1.0)
    assert WarmupRecipe().schedule == "constant" and TrainRecipe().schedule == "linear"


def test_demo_flags_keep_the_quick_settings_unless_given():
    """`idjax demo` flags absent from the command line leave the config (and --quick's) values alone."""
    parser = build_parser(COMMANDS)
    args = parser.parse_args(["demo", "--quick", "--seed", "3"])
    assert not hasattr(args, "task") and args.seed == 3
    assert options.flag_problem(parser.parse_args(["demo", "--k-fraction", "0"])) == \
           "--k-fraction must be in (0, 1], got 0.0"
    with pytest.raises(options.ConfigError, match="pool_limit: must be >= 2"):
        DemoConfig(pool_limit=1)


def test_a_bool_field_defaulting_to_true_is_a_no_flag():
    parser = argparse.ArgumentParser()
    options.add_flags(parser, SelectConfig, only=("normalize", "exact"))
    assert parser.parse_args([]).normalize is True and parser.parse_args(["--no-normalize"]).normalize is False
    assert parser.parse_args(["--exact"]).exact is True


def test_the_example_config_is_the_demo(tmp_path):
    """`idjax demo` is `idjax run` on the configuration idjax/assets/run-example.yaml spells out (plus
    the random comparison): the file and DemoConfig's defaults give the same RunConfig."""
    from pathlib import Path

    import idjax
    from idjax.run_config import load_config

    example = Path(idjax.__file__).parent / "assets" / "run-example.yaml"
    assert load_config(example, out=tmp_path / "o") == DemoConfig().run_config(tmp_path / "o")
