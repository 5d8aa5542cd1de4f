"""The sampling stage (`rlhfkit sample`): incremental JSONL output, resume after a crash, stop strings."""

from __future__ import annotations

import json

import pytest

from rlhfkit import models, sample
from rlhfkit.data.io import DataError
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
    return SampleConfig(model=models.TINY, prompts=str(prompts_file), output=str(output), temperatures=[0.7, 1.2],
                        max_new_tokens=6, batch_size=2, precision="fp32", progress=False, **fields)


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
