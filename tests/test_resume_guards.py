"""Resuming `rlhfkit sample` and `rlhfkit label` adds only to records made under the same settings.

Before these guards, both stages matched old records to the new run by index alone: after a change of model,
prompts, temperatures or labeller, the old records were kept silently, and a resumed simulated annotator drew
other random numbers than an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import pytest

from rlhfkit import cli, label, sample
from rlhfkit.config import ConfigError, field_docs, from_dict, load_config
from rlhfkit.data.io import ThrottledSave, read_jsonl_log, read_settings, settings_path, write_settings
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.feedback.simulated import SimulatedAnnotator
from rlhfkit.label import LabelConfig
from rlhfkit.modeling import models
from rlhfkit.sample import SampleConfig
from tests.helpers import read_jsonl, write_jsonl

PROMPTS = [f"Question number {i}?" for i in range(5)]


def sample_config(prompts_file, output, **fields) -> SampleConfig:
    defaults = dict(
        model=models.TINY,
        prompts=str(prompts_file),
        output=str(output),
        temperatures=[0.7, 1.2],
        max_new_tokens=6,
        batch_size=2,
        precision="fp32",
        progress=False,
    )
    return SampleConfig(**{**defaults, **fields})


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """``(prompts file, samples file)``: all 5 prompts sampled once, uninterrupted (with its settings file)."""
    root = tmp_path_factory.mktemp("sampled")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = root / "samples.jsonl"
    sample.run(sample_config(prompts, out))
    return prompts, out


def copy_samples(sampled, tmp_path, *, keep: int | None = None, settings: bool = True):
    """A copy of the sampled file in ``tmp_path`` holding its first ``keep`` records (as if the run had been
    killed after them), with or without its settings file."""
    prompts, full = sampled
    out = tmp_path / "samples.jsonl"
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:keep]), encoding="utf-8")
    if settings:
        shutil.copy(settings_path(full), settings_path(out))
    return prompts, out


# ----------------------------------------------------------------------------- sample


def test_sample_resumed_under_the_same_settings_gives_the_uninterrupted_file(sampled, tmp_path, capsys):
    prompts, out = copy_samples(sampled, tmp_path, keep=2)
    config = sample_config(prompts, out)
    sample.run(config)
    assert out.read_bytes() == sampled[1].read_bytes()
    assert read_settings(out) == json.loads(json.dumps(sample.sampling_settings(config)))
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "key, value",
    [
        ("temperatures", [0.5, 1.2]),
        ("top_p", 0.9),
        ("max_new_tokens", 7),
        ("stop", ["\n"]),
        ("seed", 1),
        ("precision", "bf16"),
        ("model", models.SMOLLM2),
    ],
)
def test_sample_refuses_records_made_under_other_settings(sampled, tmp_path, key, value):
    prompts, out = copy_samples(sampled, tmp_path, keep=2)
    before = out.read_bytes()
    with pytest.raises(ConfigError) as info:
        sample.run(sample_config(prompts, out, **{key: value}))
    message = str(info.value)
    assert f"{key}: " in message and str(out) in message
    assert "resume=force" in message and "resume=never" in message and "another output" in message
    assert out.read_bytes() == before  # nothing added to the file


def test_sample_refuses_records_of_other_prompts(sampled, tmp_path):
    prompts, out = copy_samples(sampled, tmp_path, keep=3)
    edited = write_jsonl(tmp_path / "edited.jsonl", [{"prompt": p.replace("1", "one")} for p in PROMPTS])
    with pytest.raises(ConfigError, match=r"prompt: 1 of 3 records differ from .*edited\.jsonl.*prompt_index 1"):
        sample.run(sample_config(edited, out))
    shorter = write_jsonl(tmp_path / "shorter.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    with pytest.raises(ConfigError, match="prompt_index 2 is past the 2 prompts"):
        sample.run(sample_config(shorter, out))
    # Fewer prompts by max_prompts is no change: the records are checked against the whole file.
    sample.run(sample_config(prompts, out, max_prompts=2))
    assert out.read_bytes() == b"".join(sampled[1].read_bytes().splitlines(keepends=True)[:3])


def test_sample_refuses_a_model_directory_changed_in_place(tmp_path, tokenizer):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    model_dir = models.save_pretrained(models.build_tiny(), tokenizer, tmp_path / "model")
    out = tmp_path / "samples.jsonl"
    sample.run(sample_config(prompts, out, model=str(model_dir), max_prompts=1))
    # Retrained in place: the same sizes, a new modification time.
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match="model_files: 'sha256:"):
        sample.run(sample_config(prompts, out, model=str(model_dir)))
    with pytest.raises(ConfigError, match=r"model: '.*model' -> 'tiny'"):
        sample.run(sample_config(prompts, out))


def test_sample_resume_force_keeps_the_records_and_says_what_differs(sampled, tmp_path, capsys):
    prompts, out = copy_samples(sampled, tmp_path, keep=2)
    sample.run(sample_config(prompts, out, temperatures=[0.5, 1.2], resume="force"))
    printed = capsys.readouterr().out
    assert f"resume=force: keeping the 2 records in {out}" in printed
    assert "temperatures: [0.7, 1.2] -> [0.5, 1.2]" in printed
    records = read_jsonl(out)
    assert records[:2] == read_jsonl(sampled[1])[:2]
    assert [r["temperatures"] for r in records[2:]] == [[0.5, 1.2]] * 3
    assert read_settings(out)["temperatures"] == [0.5, 1.2]  # what the next resume is checked against


def test_sample_resume_never_starts_over(sampled, tmp_path, capsys):
    prompts, out = copy_samples(sampled, tmp_path)
    sample.run(sample_config(prompts, out, temperatures=[0.5, 1.2], max_prompts=2, resume="never"))
    assert f"resume=never: deleted {out} and {settings_path(out)}" in capsys.readouterr().out
    records = read_jsonl(out)
    assert [r["prompt_index"] for r in records] == [0, 1]
    assert all(r["temperatures"] == [0.5, 1.2] for r in records)
    assert read_settings(out)["temperatures"] == [0.5, 1.2]


def test_sample_file_of_an_older_rlhfkit_is_checked_by_its_records(sampled, tmp_path, capsys):
    prompts, out = copy_samples(sampled, tmp_path, keep=2, settings=False)
    with pytest.raises(ConfigError, match=r"temperatures: 2 of 2 records were sampled at \[0.7, 1.2\]"):
        sample.run(sample_config(prompts, out, temperatures=[0.5, 1.2]))
    capsys.readouterr()
    sample.run(sample_config(prompts, out))
    printed = capsys.readouterr().out
    assert "has no settings file" in printed and "could not be checked" in printed
    assert out.read_bytes() == sampled[1].read_bytes()
    assert settings_path(out).exists()  # written before the records it added


def test_sample_settings_are_recorded_only_with_the_first_new_record(sampled, tmp_path):
    """A run that fails before it writes anything (here: a model that does not load) records no settings, so it
    cannot make the records already there look like another model's."""
    prompts, out = copy_samples(sampled, tmp_path, keep=2, settings=False)
    with pytest.raises(models.ModelLoadError):
        sample.run(sample_config(prompts, out, model=str(tmp_path / "no-such-model")))
    assert not settings_path(out).exists()
    sample.run(sample_config(prompts, out))
    assert out.read_bytes() == sampled[1].read_bytes()


def test_sample_resume_is_a_config_key(capsys):
    assert load_config(SampleConfig, None, ["resume=force"]).resume == "force"
    with pytest.raises(ConfigError, match="key 'resume'"):
        from_dict(SampleConfig, {"resume": "sometimes"})
    for cls in (SampleConfig, LabelConfig):
        docs = field_docs(cls)
        assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == []
    assert cli.main(["config", "sample"]) == 0
    assert "resume: 'auto'\n    What to do with records already in `output`" in capsys.readouterr().out


def test_jsonl_log_repair_cuts_a_write_torn_mid_character(tmp_path):
    path = tmp_path / "samples.jsonl"
    whole = json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=False).encode() + b"\n"
    torn = json.dumps({"prompt": "\u00e9t\u00e9"}, ensure_ascii=False).encode()[:13]  # cut inside a 2-byte character
    path.write_bytes(whole + torn)
    assert [row.data for row in read_jsonl_log(path)] == [{"prompt": "caf\u00e9"}]
    assert path.read_bytes() == whole + torn  # reading alone changes nothing
    read_jsonl_log(path, repair=True)
    assert path.read_bytes() == whole
    path.write_bytes(whole[:-1])  # a whole record, its newline cut off: appending must not join two lines
    assert [row.line for row in read_jsonl_log(path, repair=True)] == [1]
    assert path.read_bytes() == whole


# ----------------------------------------------------------------------------- label


def write_samples(path, n: int, seed: int = 0) -> list[dict]:
    """``n`` sample records of two replies each, mixing polite, rude and neutral words."""
    vocab = ["thanks", "great", "please", "glad", "idiot", "stupid", "hate", "not", "the", "soup", "is", "warm"]
    rng = random.Random(seed)
    records = [
        {
            "prompt_index": i,
            "prompt": f"Tip {i}?",
            "responses": [" ".join(rng.choices(vocab, k=rng.randint(2, 30))) for _ in range(2)],
        }
        for i in range(n)
    ]
    write_jsonl(path, records)
    return records


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_samples(path, 16)
    return path


def label_config(samples, output, **fields) -> LabelConfig:
    defaults = dict(samples=str(samples), output=str(output), scorer="demo", temperature=1.0, flip_rate=0.2, chunk_size=4, seed=5)
    return LabelConfig(**{**defaults, **fields})


def test_simulated_labels_of_a_resumed_run_equal_an_uninterrupted_run(samples, tmp_path, monkeypatch):
    """The regression test of the annotator's randomness: before, the resumed run's random stream restarted at
    the first unfinished item, so items 4..15 got other draws."""
    straight = label.run(label_config(samples, tmp_path / "straight.jsonl"))
    out = tmp_path / "resumed.jsonl"
    saves = []
    real_save = label.save_comparisons

    def save_then_crash(path, labels):
        real_save(path, labels)
        saves.append(len(labels))
        raise RuntimeError("killed after the first chunk")

    monkeypatch.setattr(label, "save_comparisons", save_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        label.run(label_config(samples, out, save_seconds=0))
    monkeypatch.setattr(label, "save_comparisons", real_save)
    assert saves == [4] and len(load_comparisons(out)) == 4  # a save that fails is not tried again
    resumed = label.run(label_config(samples, out))
    assert resumed == straight == load_comparisons(out)
    assert len({tuple(c.ranking) for c in straight}) == 2 and any(c.meta["flipped"] for c in straight)  # random


def counting_saves(monkeypatch) -> list[int]:
    """Record how many labels each save of `label.run` wrote."""
    saves: list[int] = []
    real_save = label.save_comparisons

    def save(path, labels):
        real_save(path, labels)
        saves.append(len(labels))

    monkeypatch.setattr(label, "save_comparisons", save)
    return saves


def test_throttled_save_writes_every_interval_and_at_most_a_fifth_of_the_time():
    """A fake clock: work takes 1 s a piece; each write takes `cost` s. Writes come once `seconds` have passed since
    the last write and 4x the last write's cost; flush writes only what is pending."""
    now = [0.0]
    cost = [0.0]
    written = []

    def write():
        now[0] += cost[0]
        written.append(now[0])

    saver = ThrottledSave(write, seconds=3, clock=lambda: now[0])
    for _ in range(7):
        now[0] += 1
        saver.changed()
    assert written == [3.0, 6.0] and saver.pending  # work ended at 7 s: the 7th piece waits
    saver.flush()
    assert written == [3.0, 6.0, 7.0] and not saver.pending
    saver.flush()
    assert len(written) == 3  # nothing pending, nothing written
    cost[0] = 2.0  # a write of 2 s: the next waits 8 s after the write ends
    for _ in range(20):
        now[0] += 1
        saver.changed()
    # 10 (+2 = 12), then 4x2 = 8 s after: 20 (+2 = 22), 30 (+2 = 32); the last work ends at 7 + 6 + 20 = 33
    assert written[3:] == [12.0, 22.0, 32.0]
    every = ThrottledSave(write, seconds=0, clock=lambda: now[0])  # writes of 2 s, after every piece of work
    every.changed()
    every.changed()
    assert written[-2:] == [35.0, 37.0]
    with pytest.raises(ValueError, match="at least 0"):
        ThrottledSave(write, seconds=float("nan"))


def test_label_rewrites_its_output_now_and_then_not_after_every_chunk(samples, tmp_path, monkeypatch):
    """Rewriting every label after every chunk made labelling quadratic (14,400 pairs: 63 s); now the file is
    rewritten every save_seconds and at the end, with the same labels."""
    saves = counting_saves(monkeypatch)
    every = label.run(label_config(samples, tmp_path / "every.jsonl", save_seconds=0))
    assert saves == [4, 8, 12, 16]
    saves.clear()
    rare = label.run(label_config(samples, tmp_path / "rare.jsonl", save_seconds=3600))
    assert saves == [16] and rare == every == load_comparisons(tmp_path / "rare.jsonl")


def test_label_keeps_the_labels_made_before_a_failure(samples, tmp_path, monkeypatch):
    """A labeller that fails on the third chunk: the first two chunks' labels are saved though no save was due,
    and a re-run gives the uninterrupted labels."""
    straight = label.run(label_config(samples, tmp_path / "straight.jsonl"))
    out = tmp_path / "failed.jsonl"
    real = SimulatedAnnotator.label_many
    calls = []

    def fail_third(self, items, **kwargs):
        calls.append(len(items))
        if len(calls) == 3:
            raise RuntimeError("judge went away")
        return real(self, items, **kwargs)

    monkeypatch.setattr(SimulatedAnnotator, "label_many", fail_third)
    saves = counting_saves(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        label.run(label_config(samples, out, save_seconds=3600))
    assert saves == [8] and load_comparisons(out) == straight[:8]
    monkeypatch.setattr(SimulatedAnnotator, "label_many", real)
    assert label.run(label_config(samples, out)) == straight == load_comparisons(out)


def test_label_refuses_a_bad_chunk_size_or_save_interval(samples, tmp_path):
    with pytest.raises(ConfigError, match="chunk_size must be at least 1"):
        label.run(label_config(samples, tmp_path / "a.jsonl", chunk_size=0))
    with pytest.raises(ConfigError, match="save_seconds must be at least 0"):
        label.run(label_config(samples, tmp_path / "a.jsonl", save_seconds=-1))
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize(
    "key, value",
    [
        ("scorer", "length"),
        ("scorer_args", {"weights": {"sentiment": 1.0}}),
        ("temperature", 0.5),
        ("flip_rate", 0.0),
        ("tie_threshold", 0.1),
        ("temperature_scale", "spread"),
        ("seed", 6),
        ("source", "judge"),
    ],
)
def test_label_refuses_labels_made_under_other_settings(samples, tmp_path, key, value):
    out = tmp_path / "labels.jsonl"
    labels = label.run(label_config(samples, out))
    save_comparisons(out, labels[:4])
    before = out.read_bytes()
    with pytest.raises(ConfigError) as info:
        label.run(label_config(samples, out, **{key: value}, judge_url="http://127.0.0.1:9/v1"))
    message = str(info.value)
    assert f"{key}: " in message and str(out) in message
    assert "resume=force" in message and "resume=never" in message and "another output" in message
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "key, value",
    [
        ("rubric", "Prefer short answers."),
        ("judge_name", "other"),
        ("judge_url", "http://127.0.0.1:10/v1"),
        ("judge_max_tokens", 64),
        ("judge_temperature", 0.7),
    ],
)
def test_label_refuses_judge_labels_made_under_other_judge_settings(samples, tmp_path, key, value):
    """Judge labels written by hand with the settings file a judge run writes: the check comes before any request."""
    out = tmp_path / "labels.jsonl"
    config = label_config(samples, out, source="judge", judge_url="http://127.0.0.1:9/v1")
    items = label.load_items(samples)
    save_comparisons(
        out,
        [
            Comparison(prompt, responses, [0, 1], source="judge:default", meta={"item_index": i})
            for i, (prompt, responses) in enumerate(items[:3])
        ],
    )
    from rlhfkit.data.io import write_settings

    write_settings(out, label.labeller_settings(config))
    with pytest.raises(ConfigError, match=f"{key}: "):
        label.run(dataclasses.replace(config, **{key: value}))
    # Keys that do not change verdicts are not recorded, so they may change.
    settings = label.labeller_settings(dataclasses.replace(config, judge_timeout=1.0, concurrency=1, chunk_size=2))
    assert settings == label.labeller_settings(config)


def test_label_refuses_labels_of_other_samples(samples, tmp_path):
    out = tmp_path / "labels.jsonl"
    label.run(label_config(samples, out))
    records = read_jsonl(samples)
    edited = [
        dict(r, responses=[r["responses"][0], r["responses"][1] + " changed"]) if i == 2 else r for i, r in enumerate(records)
    ]
    write_jsonl(samples, edited)
    with pytest.raises(
        ConfigError,
        match=r"samples: 1 of 16 labels are not of the item at their item_index "
        r"\(first: item_index 2 labels",
    ):
        label.run(label_config(samples, out))
    write_jsonl(samples, records[:10])
    with pytest.raises(ConfigError, match="item_index 10 is not an item of the 10"):
        label.run(label_config(samples, out))


def test_label_resume_force_keeps_the_labels_and_says_what_differs(samples, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    labels = label.run(label_config(samples, out))
    save_comparisons(out, labels[:4])
    capsys.readouterr()
    resumed = label.run(label_config(samples, out, temperature=0.5, resume="force"))
    printed = capsys.readouterr().out
    assert f"resume=force: keeping the 4 labels in {out}" in printed and "temperature: 1.0 -> 0.5" in printed
    assert resumed[:4] == labels[:4]
    assert [c.meta["temperature"] for c in resumed[4:]] == [0.5] * 12
    assert read_settings(out)["temperature"] == 0.5


def test_label_resume_never_starts_over(samples, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    label.run(label_config(samples, out))
    capsys.readouterr()
    again = label.run(label_config(samples, out, temperature=0.5, resume="never"))
    assert f"resume=never: deleted {out} and {settings_path(out)}" in capsys.readouterr().out
    assert [c.meta["item_index"] for c in again] == list(range(16))
    assert all(c.meta["temperature"] == 0.5 for c in again)
    assert again == label.run(label_config(samples, tmp_path / "fresh.jsonl", temperature=0.5))


def test_simulated_labels_made_before_ranking_ties_were_recorded_are_not_resumed(samples, tmp_path):
    """Their rankings order equal scores at random without saying so; new labels would record those ties."""
    out = tmp_path / "labels.jsonl"
    label.run(label_config(samples, out))
    old = {k: v for k, v in read_settings(out).items() if k != "ranking_ties"}
    write_settings(out, old)
    with pytest.raises(ConfigError, match=r"ranking_ties: \(unset\) -> 'recorded'"):
        label.run(label_config(samples, out))


def test_label_file_of_an_older_rlhfkit_is_checked_by_its_labels(samples, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    labels = label.run(label_config(samples, out))
    save_comparisons(out, labels[:4])
    settings_path(out).unlink()
    with pytest.raises(
        ConfigError,
        match=r"source: 4 of 4 labels are by 'simulated:demo', this config labels as "
        r"'simulated:length'",
    ):
        label.run(label_config(samples, out, scorer="length"))
    with pytest.raises(ConfigError, match=r"temperature: 4 of 4 labels were made at temperature 1.0"):
        label.run(label_config(samples, out, temperature=0.5))
    capsys.readouterr()
    assert label.run(label_config(samples, out)) == labels
    printed = capsys.readouterr().out
    assert "has no settings file" in printed and "could not be checked" in printed


def test_label_refuses_a_spread_that_moved_with_new_samples(tmp_path):
    """temperature_scale: spread is relative to the score spread of every item: items added to the samples change
    the temperature, which the labels already made were not made at."""
    samples = tmp_path / "samples.jsonl"
    records = write_samples(samples, 16)
    out = tmp_path / "labels.jsonl"
    label.run(label_config(samples, out, temperature_scale="spread"))
    more = records + [{"prompt_index": 16, "prompt": "Tip 16?", "responses": ["idiot " * 20, "thanks"]}]
    write_jsonl(samples, more)
    with pytest.raises(ConfigError, match=r"temperature: 16 of 16 labels were made at temperature .* this run uses"):
        label.run(label_config(samples, out, temperature_scale="spread"))


def test_label_resume_is_a_config_key(capsys):
    assert load_config(LabelConfig, None, ["resume=never"]).resume == "never"
    with pytest.raises(ConfigError, match="key 'resume'"):
        from_dict(LabelConfig, {"resume": "sometimes"})
    assert cli.main(["config", "label"]) == 0
    listing = capsys.readouterr().out
    assert "resume: 'auto'\n    Simulated and judge: what to do with labels already in `output`" in listing


def test_label_removes_the_temp_file_a_killed_save_left(tmp_path):
    """A kill during the labels' atomic rewrite leaves `.labels.jsonl.XXXXXXXX`; the next run removes it (and
    only it: a user's file of another name stays)."""
    import json

    from rlhfkit import label

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": [f"a{i}", f"bb{i}"]}) + "\n" for i in range(3)))
    left = tmp_path / ".labels.jsonl.ab12cd_9"
    left.write_text("half a file")
    mine = tmp_path / ".labels.jsonl.notes"
    mine.write_text("keep me")
    label.run(label.LabelConfig(samples=str(samples), output=str(tmp_path / "labels.jsonl"), scorer="length"))
    assert not left.exists() and mine.read_text() == "keep me"
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 3
