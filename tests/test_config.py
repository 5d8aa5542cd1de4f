"""Typed configs: YAML + ``key=value`` overrides, with errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from rlhfkit.config import ConfigError, field_docs, from_dict, load_config, parse_overrides
from rlhfkit.label import LabelConfig
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
    [
        ("max_steps=abc", "max_steps"),
        ("max_steps=2.5", "max_steps"),
        ("lr=fast", "lr"),
        ("progress=maybe", "progress"),
        ("overlong=cut", "overlong"),
    ],
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


# ---------------------------------------------------------------- inputs found by benchmarks/reliability_fuzz.py


def _bomb(levels: int, width: int = 9) -> str:
    """A billion-laughs list: each level an anchored list of ``width`` aliases of the level before."""
    parts = [f"&l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize(
    "data, where",
    [
        ("model: tiny\ndata: caf\u00e9.jsonl\n".encode("latin-1"), "byte 0xe9 at offset 21 (line 2)"),
        ("model: tiny\ndata: caf\u00e9.jsonl\n".encode("utf-16"), "UTF-16"),
        (b"model: tiny\nlr: 0.1\ndata: \xc0\xaf\n", "byte 0xc0 at offset 26 (line 3)"),
        ("model: tiny\n".encode("utf-16-le"), "NUL byte at offset 1 (line 1)"),
    ],
)
def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path, data, where):
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="UTF-8") as info:  # was UnicodeDecodeError
        load_config(SFTConfig, path)
    assert str(path) in str(info.value) and where in str(info.value)


@pytest.mark.parametrize("nest", ["[" * 5000 + "]" * 5000, "{a: " * 20000 + "1" + "}" * 20000])
def test_deeply_nested_yaml_is_a_config_error(yaml_file, nest):
    path = yaml_file(f"model: tiny\ndata: {nest}\n")
    with pytest.raises(ConfigError, match="nested more than 100 levels") as info:  # was RecursionError
        load_config(SFTConfig, path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)
    assert load_config(LabelConfig, yaml_file("scorer_args: {a: " + "[" * 60 + "]" * 60 + "}\n")).scorer_args


@pytest.mark.parametrize("stage", ["[sft]", "{a: 1}", "3", "null"])
def test_a_stage_key_that_is_not_a_name_is_a_config_error(yaml_file, stage):
    path = yaml_file(f"stage: {stage}\nmodel: tiny\n")
    with pytest.raises(ConfigError, match="field 'stage'") as info:  # was TypeError: unhashable type
        load_config(SFTConfig, path, stages={"sft"})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("1: 2\nbogus: 3\n", "key 1 (of type int)"),
        ("true: 1\nyes_key: 2\n", "key True (of type bool)"),
        ("null: 1\n", "key None (of type NoneType)"),
    ],
)
def test_a_key_that_is_not_a_string_is_named(yaml_file, text, key):
    path = yaml_file(text)
    with pytest.raises(ConfigError) as info:  # was TypeError: '<' not supported between 'str' and 'int'
        load_config(SFTConfig, path)
    assert key in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="'scorer_args': its key 1 "):
        load_config(LabelConfig, yaml_file("scorer_args: {1: 2, a: 3}\n"))


def test_unknown_keys_are_reported_in_name_order(yaml_file):
    with pytest.raises(ConfigError, match="unknown key 'alpha'"):
        load_config(SFTConfig, yaml_file("zeta: 1\nalpha: 2\n"))


@pytest.mark.parametrize(
    "text, where",
    [
        (f"model: tiny\ndata: {_bomb(6)}\n", "line 2: key 'data'"),  # 9^6 values: the message was megabytes
        (f"data: {_bomb(10)}\n", "line 1: key 'data'"),  # 9^10: `rlhfkit sft` hung (and ate memory) in _coerce
        (
            "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
            + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefghi", "bcdefghij")),
            "line 10: key 'j'",
        ),
        (f"model: [&big [{', '.join(['y' * 100] * 2000)}], {', '.join(['*big'] * 5000)}]\n", "line 1: key 'model'"),
        ("lora_target_modules: &a [x, *a]\n", "line 1"),  # refers to itself
    ],
)
def test_an_alias_bomb_is_refused_when_loaded(yaml_file, text, where):
    path = yaml_file(text)
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}") and "alias" in message and len(message) < 500


def test_an_alias_bomb_in_an_override_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, [f"data={_bomb(6)}"])
    message = str(info.value)
    assert "command line override 'data=" in message and "alias" in message and len(message) < 500


def test_a_few_aliases_still_load(yaml_file):
    config = load_config(
        SFTConfig, yaml_file("model: &m tiny\noutput_dir: runs/x\ndata: *m\nlora_target_modules: &l [q_proj, v_proj]\n")
    )
    assert config.data == "tiny" and config.lora_target_modules == ["q_proj", "v_proj"]


def test_values_in_messages_are_bounded(yaml_file):
    long = "x" * 100_000
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, yaml_file(f"max_steps: {long}\n"))
    assert "'max_steps'" in str(info.value) and len(str(info.value)) < 300
    nested = [[[[[list(range(1000))]]]]] * 1000
    with pytest.raises(ConfigError) as info:
        from_dict(SFTConfig, {"model": nested})
    assert len(str(info.value)) < 300


def test_the_scorer_name_of_a_huge_argument_is_bounded():
    from rlhfkit.label import LabelConfig, _scorer_name

    bomb: list = ["lol"] * 9
    for _ in range(6):  # 9^7 values when expanded (shared references: cheap in memory)
        bomb = [bomb] * 9
    name = _scorer_name(LabelConfig(scorer="pkg.mod:fn", scorer_args={"b": bomb, "a": "y" * 100_000}))
    assert name.startswith("pkg.mod.fn(a='yyy") and len(name) < 10_000
    # Small arguments keep their plain repr (earlier labels recorded it; resuming compares names).
    args = {"target_words": 20, "w": {"b": [1, 2.5, "x"], "a": None}}
    assert (
        _scorer_name(LabelConfig(scorer="length", scorer_args=args))
        == "length(target_words=20, w={'b': [1, 2.5, 'x'], 'a': None})"
    )


@pytest.mark.parametrize(
    "text, line, first", [("model: tiny\nlr: 0.1\nmax_steps: 3\nlr: 0.2\n", 4, 2), ("{model: tiny, lr: 1, lr: 2}\n", 1, 1)]
)
def test_a_duplicated_key_is_a_config_error(yaml_file, text, line, first):
    path = yaml_file(text)
    with pytest.raises(ConfigError) as info:  # PyYAML kept the last value silently
        load_config(SFTConfig, path)
    assert f"{path}: line {line}: duplicate key 'lr' (first on line {first})" in str(info.value)


def test_a_duplicated_key_in_a_section_is_a_config_error(yaml_file):
    from rlhfkit.pipeline import PipelineConfig

    path = yaml_file("model: tiny\nreward:\n  lr: 0.1\n  num_epochs: 2\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="line 5: duplicate key 'lr' \\(first on line 3\\)"):
        load_config(PipelineConfig, path)
    # A key merged in (<<) may be overridden: not a duplicate.
    assert load_config(PipelineConfig, yaml_file("model: tiny\nreward: {<<: {lr: 0.1, num_epochs: 2}, lr: 0.2}\n")).reward == {
        "lr": 0.2,
        "num_epochs": 2,
    }


@pytest.mark.parametrize(
    "override, shown",
    [("max_steps=abc", "'abc'"), ("lr=fast", "'fast'"), ("max_steps.x=1", "{'x': 1}"), ("progress=maybe", "'maybe'")],
)
def test_a_bad_override_is_reported_against_the_command_line(yaml_file, override, shown):
    path = yaml_file("model: tiny\nmax_steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path, [override])
    message = str(info.value)
    assert message.startswith(f"command line override '{override}': key '{override.split('=')[0].split('.')[0]}'")
    assert shown in message and str(path) not in message
    with pytest.raises(ConfigError, match=f"^{path}: key 'max_steps'"):  # the file's own bad value names the file
        load_config(SFTConfig, yaml_file("max_steps: abc\n"), ["lr=0.1"])
