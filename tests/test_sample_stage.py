"""The sampling stage (`rlhfkit sample`): incremental JSONL output, resume after a crash, stop strings."""

from __future__ import annotations

import json

import pytest

from rlhfkit import sample
from rlhfkit.config import ConfigError
from rlhfkit.data.io import DataError
from rlhfkit.modeling import models
from rlhfkit.sample import SampleConfig, cut_at_stop
from tests.helpers import write_jsonl


def test_cut_at_stop_keeps_the_text_before_the_first_stop_string():
    assert cut_at_stop("  First line.\n\nSecond.\n\nThird.", ["\n\n"]) == "First line."
    assert cut_at_stop("a END b\n\nc", ["\n\n", "END"]) == "a"  # the earliest of several stops
    assert cut_at_stop("\n\nOpens with a blank line.", ["\n\n"]) == "Opens with a blank line."
    assert cut_at_stop(" no stop here ", ["\n\n"]) == "no stop here"
    assert cut_at_stop(" a\n\nb ", []) == "a\n\nb"
    assert cut_at_stop("a\n\nb", [""]) == "a\n\nb"  # an empty stop string matches nothing


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question number {i}?"} for i in range(5)])


def _config(prompts_file, output, **fields) -> SampleConfig:
    fields = {"temperatures": [0.7, 1.2], **fields}
    return SampleConfig(
        model=models.TINY,
        prompts=str(prompts_file),
        output=str(output),
        max_new_tokens=6,
        batch_size=2,
        precision="fp32",
        progress=False,
        **fields,
    )


def test_resume_after_a_torn_write_neither_duplicates_nor_loses_prompts(tmp_path, prompts_file):
    out = tmp_path / "samples.jsonl"
    sample.run(_config(prompts_file, out))
    full = _records(out)
    assert [r["prompt_index"] for r in full] == [0, 1, 2, 3, 4]
    assert all(len(r["responses"]) == 2 and r["temperatures"] == [0.7, 1.2] for r in full)

    # A crash after two records and part of a third: the torn line is dropped, the rest resumed.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    sample.run(_config(prompts_file, out))
    resumed = _records(out)
    assert sorted(r["prompt_index"] for r in resumed) == [0, 1, 2, 3, 4]
    assert resumed[:2] == full[:2]  # what was written before the crash is kept as it was
    assert [r["prompt"] for r in sorted(resumed, key=lambda r: r["prompt_index"])] == [r["prompt"] for r in full]

    # Nothing left to do: a rerun leaves the file byte for byte.
    before = out.read_bytes()
    sample.run(_config(prompts_file, out))
    assert out.read_bytes() == before


def test_a_bad_record_in_the_middle_is_an_error_naming_file_and_line(tmp_path, prompts_file):
    out = tmp_path / "samples.jsonl"
    sample.run(_config(prompts_file, out, max_prompts=3))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    with pytest.raises(DataError) as err:
        sample.run(_config(prompts_file, out))
    assert "samples.jsonl" in str(err.value) and "2" in str(err.value)


def test_stop_strings_cut_every_response(tmp_path, prompts_file, monkeypatch):
    # The tiny random model rarely emits "\n\n"; a fixed generator makes the check exact.
    texts = ["Short answer.\n\nA longer second paragraph.", "  One paragraph only "]

    class Fixed:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, options):  # prompt j of a batch gets texts[j]
            return [texts[j % 2] for j in range(len(prompts))]

    monkeypatch.setattr(sample, "HFGenerator", Fixed)
    out = tmp_path / "samples.jsonl"
    sample.run(_config(prompts_file, out, max_prompts=2, stop=["\n\n"]))
    assert [r["responses"] for r in _records(out)] == [["Short answer."] * 2, ["One paragraph only"] * 2]


def test_a_repeated_temperature_is_one_call_whose_rows_fill_its_slots_in_order(tmp_path, prompts_file, monkeypatch):
    calls = []

    class Labelled:  # each response names its temperature, prompt and row within the call
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, options):
            calls.append((options.temperature, len(prompts)))
            return [f"t{options.temperature} {p[-2]} row{j}" for j, p in enumerate(prompts)]

    monkeypatch.setattr(sample, "HFGenerator", Labelled)
    out = tmp_path / "samples.jsonl"
    sample.run(_config(prompts_file, out, max_prompts=2, temperatures=[0.7, 1.0, 0.7, 0.7]))
    assert calls == [(0.7, 6), (1.0, 2)]  # 3 x 2 rows at 0.7, then 2 at 1.0
    # Rows of the 0.7 call are grouped by prompt: prompt 1's are rows 3, 4, 5, for slots 0, 2, 3.
    assert [r["responses"] for r in _records(out)] == [
        ["t0.7 0 row0", "t1.0 0 row0", "t0.7 0 row1", "t0.7 0 row2"],
        ["t0.7 1 row3", "t1.0 1 row1", "t0.7 1 row4", "t0.7 1 row5"],
    ]


def test_a_batch_left_partly_written_is_sampled_again_whole(tmp_path, prompts_file, capsys):
    full = tmp_path / "uninterrupted.jsonl"
    sample.run(_config(prompts_file, full))
    # Batches are [0, 1], [2, 3], [4]. A full disk (or a kill inside the write) cut the second batch after
    # prompt 2's record and half of prompt 3's.
    out = tmp_path / "samples.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (tmp_path / "samples.jsonl.meta.json").write_bytes((tmp_path / "uninterrupted.jsonl.meta.json").read_bytes())
    sample.run(_config(prompts_file, out))
    # Every prompt sampled under its batch's seed, as the uninterrupted run did: the same file, byte for byte.
    assert out.read_bytes() == full.read_bytes()
    assert "dropped the 1 record(s) of 1 batch(es) only partly written (prompt_index 2-3)" in capsys.readouterr().out


def test_batches_keep_their_seeds_when_max_prompts_grows(tmp_path, prompts_file):
    full = tmp_path / "uninterrupted.jsonl"
    sample.run(_config(prompts_file, full))
    out = tmp_path / "samples.jsonl"
    sample.run(_config(prompts_file, out, max_prompts=3))  # batches [0, 1] and [2] (cut short)
    sample.run(_config(prompts_file, out))  # [2] is part of [2, 3] now: sampled again whole, then [4]
    assert out.read_bytes() == full.read_bytes()


class _FullDisk:
    """``open`` for the sample module: its output file takes ``budget`` bytes, then refuses (ENOSPC) after a short
    write, as a filling disk does; every ``write()`` call is counted."""

    def __init__(self, budget: int):
        self.budget, self.writes = budget, []

    def __call__(self, file, mode="r", *args, **kwargs):
        import builtins

        if "a" not in mode:
            return builtins.open(file, mode, *args, **kwargs)
        real = builtins.open(file, "ab", buffering=0)
        disk = self

        class File:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def fileno(self):
                return real.fileno()

            def flush(self):
                pass

            def write(self, data):
                whole = data.encode("utf-8") if isinstance(data, str) else bytes(data)
                disk.writes.append(len(whole))
                if disk.budget <= 0:
                    raise OSError(28, "No space left on device")
                part = whole[: disk.budget]
                disk.budget -= len(part)
                written = real.write(part)
                return len(data) if written == len(whole) else written

        return File()


def test_a_full_disk_mid_batch_then_a_rerun_gives_the_uninterrupted_file(tmp_path, prompts_file, monkeypatch):
    full = tmp_path / "uninterrupted.jsonl"
    sample.run(_config(prompts_file, full))
    lines = full.read_bytes().splitlines(keepends=True)
    first_batch = len(lines[0] + lines[1])
    out = tmp_path / "samples.jsonl"
    disk = _FullDisk(budget=first_batch + len(lines[2]) + 50)  # the second batch's first record and a bit fit
    with monkeypatch.context() as patch:
        patch.setattr(sample, "open", disk, raising=False)
        with pytest.raises(OSError, match="No space left"):
            sample.run(_config(prompts_file, out))
    assert disk.writes[0] == first_batch  # a batch is one write()
    assert out.read_bytes()[:first_batch] == full.read_bytes()[:first_batch]
    sample.run(_config(prompts_file, out))  # space freed
    assert out.read_bytes() == full.read_bytes()


def test_two_worker_processes_write_the_samples_of_one(tmp_path, prompts_file):
    one = tmp_path / "one.jsonl"
    sample.run(_config(prompts_file, one))
    two = tmp_path / "two.jsonl"
    sample.run(_config(prompts_file, two, workers=2, max_prompts=3))  # batches [0, 1] and [2], then resumed
    sample.run(_config(prompts_file, two, workers=2))
    assert two.read_bytes() == one.read_bytes()
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        sample.run(_config(prompts_file, tmp_path / "none.jsonl", workers=0))
