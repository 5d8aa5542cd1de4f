"""Typed configs: YAML + ``key=value`` overrides, with errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from rlhfkit.config import ConfigError, field_docs, load_config, parse_overrides
from rlhfkit.sft import SFTConfig


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str):
        path = tmp_path / "config.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_unknown_yaml_key_names_key_and_file(yaml_file):
    path = yaml_file("model: tiny\nlearning_rate: 0.001\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path)
    assert "'learning_rate'" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_override_key_names_key(yaml_file):
    with pytest.raises(ConfigError, match="'learnin_rate'") as info:
        load_config(SFTConfig, yaml_file("model: tiny\n"), ["learnin_rate=0.1"])
    assert "command line" in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [("max_steps=abc", "max_steps"), ("max_steps=2.5", "max_steps"), ("lr=fast", "lr"),
     ("progress=maybe", "progress"), ("overlong=cut", "overlong")],
)
def test_mistyped_override_names_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(SFTConfig, None, [override])


def test_mistyped_yaml_value_names_key(yaml_file):
    with pytest.raises(ConfigError, match="'batch_size'"):
        load_config(SFTConfig, yaml_file("batch_size: eight\n"))


def test_overrides_beat_yaml(yaml_file):
    path = yaml_file("model: tiny\nlr: 0.5\nmax_steps: 10\noutput_dir: runs/a\n")
    config = load_config(SFTConfig, path, ["lr=1e-4", "max_steps=3"])
    assert config.lr == 1e-4
    assert config.max_steps == 3
    assert config.output_dir == "runs/a"  # untouched YAML values stay


def test_yaml_values_beat_defaults_and_types_are_coerced(yaml_file):
    # PyYAML (YAML 1.1) reads "1e-4" without a dot as a string; it must still be a float.
    config = load_config(SFTConfig, yaml_file("lr: 1e-4\nweight_decay: 0\nnum_epochs: 2\nprogress: false\n"))
    assert config.lr == 1e-4 and isinstance(config.lr, float)
    assert config.weight_decay == 0.0 and isinstance(config.weight_decay, float)
    assert config.num_epochs == 2.0
    assert config.progress is False
    assert config.max_steps == SFTConfig().max_steps


@pytest.mark.parametrize("raw, value", [("1e-4", 1e-4), ("3e-3", 3e-3), ("0.5", 0.5), ("2", 2.0), ("1.5E-5", 1.5e-5)])
def test_float_overrides_parse(raw, value):
    config = load_config(SFTConfig, None, [f"lr={raw}"])
    assert config.lr == value and isinstance(config.lr, float)


def test_list_and_string_overrides():
    config = load_config(SFTConfig, None, ["lora_target_modules=q_proj,v_proj", "data=my file.jsonl", "model=tiny"])
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.data == "my file.jsonl"


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_every_sft_field_is_documented():
    docs = field_docs(SFTConfig)
    undocumented = [f.name for f in dataclasses.fields(SFTConfig) if not docs.get(f.name)]
    assert undocumented == []


def test_a_runs_stage_key_is_accepted_only_for_its_stage(yaml_file):
    path = yaml_file("stage: sft\nmodel: tiny\nlr: 0.5\n")
    assert load_config(SFTConfig, path, stages={"sft"}).lr == 0.5
    with pytest.raises(ConfigError, match="'stage'.*'sft' config") as info:
        load_config(SFTConfig, path, stages={"dpo"})
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="'stage'"):
        load_config(SFTConfig, path)  # no stage given: the key is unknown


@pytest.mark.parametrize("raw", ["1e3", "Infinity", "1_000", "0.10", "007"])
def test_a_string_field_keeps_the_override_text(raw):
    # Before the fix parse_overrides turned any float()-able text into a number first, so
    # output_dir=1e3 became "1000.0" and model=Infinity became "inf".
    config = load_config(SFTConfig, None, [f"output_dir={raw}", f"model={raw}"])
    assert config.output_dir == raw and config.model == raw


def test_an_integer_field_reads_exponent_text():
    assert load_config(SFTConfig, None, ["max_steps=1e3"]).max_steps == 1000


def test_online_rl_configs_have_no_eval_every():
    # RL has no held-out split; a field listed by `rlhfkit config ppo` must be read by the trainer.
    from rlhfkit.dpo import DPOConfig
    from rlhfkit.reward import RewardConfig
    from rlhfkit.rl import GRPOConfig, RLConfig

    assert "eval_every" not in {f.name for f in dataclasses.fields(RLConfig)}
    assert "eval_every" not in {f.name for f in dataclasses.fields(GRPOConfig)}
    for cls in (SFTConfig, RewardConfig, DPOConfig):
        assert "eval_every" in {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(ConfigError, match="'eval_every'"):
        load_config(RLConfig, None, ["eval_every=5"])
