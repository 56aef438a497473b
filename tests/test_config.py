"""Every setting of a run is checked before anything is read or built, and parsed by its
type."""

import argparse
import dataclasses
import math

import pytest

from gpt2lib.config import (
    PRESETS,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    value_parser,
)
from gpt2lib.modern import ModernConfig
from gpt2lib.runtime import Rule, check_settings

SMOKE = PRESETS["smoke"]


def test_presets_are_valid():
    for name, preset in PRESETS.items():
        assert preset.validate() is preset, name


def test_every_setting_has_its_rule_beside_it():
    for kind in (TrainConfig, ModernConfig):
        for field in dataclasses.fields(kind):
            assert field.name == "model" or isinstance(field.metadata["rule"], Rule)


def test_a_setting_declared_without_a_rule_fails_the_check_not_a_run():
    @dataclasses.dataclass
    class Loose:
        n_layer: int = 1

    with pytest.raises(TypeError, match="Loose.n_layer has no rule"):
        check_settings(Loose())


# (field, a value out of its range, words the error must contain)
BAD = [
    ("data", " ", "shipped text"),
    ("val_fraction", 1.0, "below 1"),
    ("val_fraction", -0.1, "at least 0"),
    ("val_fraction", math.nan, "below 1"),
    ("n_layer", 0, "at least 1"),
    ("n_embd", 33, "divisible by n_head"),
    ("n_embd", 0, "at least 1"),
    ("block_size", -1, "at least 1"),
    ("vocab_size", 70000, "65,536"),
    ("vocab_size", 1000, "whole vocabulary"),
    ("pad_vocab_to", 0, "1 to 1024"),
    ("batch_size", 0, "at least 1"),
    ("total_batch_size", 1000, "multiple of batch_size"),
    ("max_lr", 0.0, "above 0"),
    ("max_lr", math.nan, "finite"),
    ("max_lr", math.inf, "finite"),
    ("min_lr_ratio", 1.5, "between 0 and 1"),
    ("warmup_steps", -1, "0 or more"),
    ("warmup_steps", 7, "at most max_steps"),
    ("max_steps", 0, "at least 1"),
    ("weight_decay", -0.1, "0 or more"),
    ("weight_decay", math.nan, "finite"),
    ("grad_clip", 0.0, "above 0"),
    ("grad_clip", math.nan, "above 0"),
    ("eval_every", -1, "0 (never)"),
    ("eval_batches", 0, "at least 1"),
    ("hellaswag", "/no/such.jsonl", "existing"),
    ("hellaswag_limit", -1, "0 (all)"),
    ("sample_every", -5, "0 (never)"),
    ("sample_prompt", "word " * 40, "block_size=32"),
    ("num_samples", 0, "at least 1"),
    ("sample_tokens", -1, "0 or more"),
    ("checkpoint_every", -1, "0 (never)"),
    ("keep_checkpoints", 0, "at least 1"),
    ("keep_checkpoints", -1, "at least 1"),
    ("seed", -1, "0 to 2**63"),
    ("batch_size", "four", "or auto"),
    ("batch_size", 2.5, "of type int | str"),
    ("precision", "fp8", "bf16, fp16 or fp32"),
    ("max_lr", "1e-3", "of type float"),
    ("n_layer", True, "of type int"),
]


@pytest.mark.parametrize(
    "field, value, words", BAD, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD]
)
def test_out_of_range_setting_names_itself_and_the_range(field, value, words):
    # the model's settings are refused when its config is made, the run's at validate()
    with pytest.raises(ValueError) as err:
        SMOKE.replace(**{field: value}).validate()
    message = str(err.value)
    assert (
        message.startswith(f"{field} = ") and words in message and "\n" not in message
    )
    assert f"--{field.replace('_', '-')}" in message


def test_the_budget_is_checked_for_the_number_of_processes():
    SMOKE.validate(world_size=2)  # 256 = 4 x 32 x 2 x 1
    with pytest.raises(ValueError, match="4 × 32 × 3 = 384"):
        SMOKE.validate(world_size=3)


def test_auto_batch_size_needs_a_budget_that_one_sequence_divides():
    for precision in ("auto", "bf16", "fp16", "fp32"):
        SMOKE.replace(batch_size="auto", precision=precision).validate()
    # 256 tokens per step are not a whole number of sequences of 48 tokens
    with pytest.raises(ValueError, match="1 × 48 × 1 = 48"):
        SMOKE.replace(batch_size="auto", block_size=48).validate()


def test_boundary_values_are_allowed():
    SMOKE.replace(
        val_fraction=0.0,
        min_lr_ratio=1.0,
        warmup_steps=SMOKE.max_steps,
        eval_every=0,
        sample_tokens=0,
        grad_clip=math.inf,
        max_lr=1,
        sample_prompt="",
    ).validate()


def test_value_parser_reads_booleans_and_optionals_by_their_type():
    parse_bool = value_parser(bool)
    assert [parse_bool(t) for t in ("True", "false", "0", "YES", "off")] == [
        True,
        False,
        False,
        True,
        False,
    ]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bool("maybe")
    parse_batch = value_parser(int | str)  # batch_size
    assert parse_batch("auto") == "auto" and parse_batch("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="a whole number or auto"):
        parse_batch("four")
    parse_opt = value_parser(int | None)
    assert parse_opt("none") is None and parse_opt("7") == 7
    assert value_parser(float)("1e-3") == 1e-3


def test_command_line_settings_replace_only_what_is_given():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smoke")
    add_config_arguments(ap)
    cfg = config_from_args(
        ap.parse_args(["--max-lr", "3e-4", "--hellaswag", "", "--n-layer", "1"])
    )
    assert cfg == SMOKE.replace(max_lr=3e-4, hellaswag="", n_layer=1)
    assert config_from_args(ap.parse_args([])) == SMOKE
    with pytest.raises(SystemExit):
        ap.parse_args(["--batch-size", "four"])
    assert config_from_args(ap.parse_args(["--batch-size", "auto"])).batch_size == (
        "auto"
    )


def test_replace_routes_the_models_settings_to_the_nested_config():
    cfg = SMOKE.replace(n_layer=1, rope_base=500.0, max_lr=2e-3)
    assert (cfg.model.n_layer, cfg.model.rope_base, cfg.max_lr) == (1, 500.0, 2e-3)
    assert cfg.model.n_embd == SMOKE.model.n_embd and SMOKE.model.n_layer == 2
    with pytest.raises(TypeError):
        SMOKE.replace(n_layers=1)  # a misspelt setting is not silently dropped


def test_settings_are_one_flat_dict_that_rebuilds_the_config():
    # what logs and checkpoints record: every setting once, the model's included
    for name, preset in PRESETS.items():
        settings = preset.settings()
        names = [f.name for f in dataclasses.fields(ModernConfig)] + [
            f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"
        ]
        assert sorted(settings) == sorted(names), name
        assert TrainConfig().replace(**settings) == preset, name
