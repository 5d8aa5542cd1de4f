"""Which prompts the frontier probes sample (rlhfkit.probe): spread over the file, not its first few."""

from __future__ import annotations

import json

from rlhfkit.probe import FrontierProbe, ProbeOptions, probe_steps, probe_subset


def test_probe_subset_takes_every_len_over_n_th_prompt():
    prompts = [f"p{i}" for i in range(10)]
    # i * 10 // 4 for i = 0..3: 0, 2, 5, 7 (worked by hand)
    assert probe_subset(prompts, 4) == ["p0", "p2", "p5", "p7"]
    assert probe_subset(prompts, 5) == ["p0", "p2", "p4", "p6", "p8"]
    assert probe_subset(prompts, 1) == ["p0"]
    assert probe_subset(prompts, 0) == prompts  # 0: all of them
    assert probe_subset(prompts, 10) == prompts
    assert probe_subset(prompts, 12) == prompts


def test_probe_subset_is_spread_over_the_demo_eval_file():
    """The demo's 32 probe prompts reach the end of its 325 eval prompts (the first 32 stop at prompt 31)."""
    from rlhfkit.data.prompts import demo_data_path, load_prompts

    prompts = load_prompts(demo_data_path("prompts_eval.jsonl"))
    chosen = probe_subset(prompts, 32)
    index = [prompts.index(p) for p in chosen]
    assert len(set(index)) == 32 and index == sorted(index)
    assert index[0] == 0 and index[1] == 325 // 32 and index[-1] == 31 * 325 // 32 == 314


def test_frontier_probe_samples_the_spread_subset(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(9)))
    probe = FrontierProbe(
        ProbeOptions(probe_points=1, probe_prompts=str(path), probe_max_prompts=3),
        tokenizer=None,
        reference=None,
        gold=lambda p, r: [0.0] * len(r),
        proxy=None,
        output_dir=tmp_path,
        seed=0,
        precision="fp32",
    )
    assert probe.prompts == ["question 0?", "question 3?", "question 6?"]
    assert probe_steps(10, 1) == [0, 10]
