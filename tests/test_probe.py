"""The frontier probes (rlhfkit.probe): which prompts they sample (spread over the file, not its first few), and
the step-0 probe that stages starting from one policy share."""

from __future__ import annotations

import json

from rlhfkit.probe import FrontierProbe, ProbeOptions, probe_steps, probe_subset


def test_probe_subset_is_spread_from_the_first_prompt_to_the_last():
    prompts = [f"p{i}" for i in range(10)]
    # round(i * 9 / 3) for i = 0..3: 0, 3, 6, 9; round(i * 9 / 4): 0, 2.25, 4.5, 6.75, 9 -> 0, 2, 4 (half to even), 7, 9
    assert probe_subset(prompts, 4) == ["p0", "p3", "p6", "p9"]
    assert probe_subset(prompts, 5) == ["p0", "p2", "p4", "p7", "p9"]
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
    assert index[0] == 0 and index[1] == round(324 / 31) == 10 and index[-1] == 324


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
    assert probe.prompts == ["question 0?", "question 4?", "question 8?"]  # round(i * 8 / 2)
    assert probe_steps(10, 1) == [0, 10]


def _tiny_probe(tmp_path, model, tokenizer, *, proxy=None, cache="", prompts_file=None, out="run"):
    path = prompts_file or tmp_path / "probe.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(4)))
    (tmp_path / out).mkdir(exist_ok=True)
    return FrontierProbe(
        ProbeOptions(probe_points=1, probe_prompts=str(path), probe_max_new_tokens=5, probe_cache=cache),
        tokenizer=tokenizer,
        reference=model,
        gold=lambda p, r: [float(len(x)) for x in r],
        proxy=proxy,
        output_dir=tmp_path / out,
        seed=0,
        precision="fp32",
    )


def test_step0_probe_is_read_from_the_cache_only_when_everything_it_depends_on_is_the_same(tmp_path, tokenizer):
    """Two stages starting from one policy share the step-0 probe (the pipeline's DPO and PPO); another weight,
    proxy (a rescaled one too) or later step is measured afresh."""
    import torch

    from rlhfkit.modeling import models

    torch.manual_seed(0)
    model = models.load_causal_lm(models.TINY)
    cache = str(tmp_path / "cache")
    proxy = lambda p, r: [0.1 * len(x) for x in r]  # noqa: E731
    first = _tiny_probe(tmp_path, model, tokenizer, proxy=proxy, cache=cache, out="a")(model, 0, 10)
    assert "cached" not in first and len(list((tmp_path / "cache").iterdir())) == 1
    second = _tiny_probe(tmp_path, model, tokenizer, proxy=proxy, cache=cache, out="b")(model, 0, 10)
    assert second["cached"] == next((tmp_path / "cache").iterdir()).name
    same = ("kl", "kl_se", "gold", "gold_se", "proxy", "proxy_se", "num_prompts", "response_length")
    assert {k: second[k] for k in same} == {k: first[k] for k in same}
    assert json.loads((tmp_path / "b" / "frontier.jsonl").read_text())["cached"] == second["cached"]
    # Measured afresh, and equal to the cached row: the cache holds what a measurement gives.
    fresh = _tiny_probe(tmp_path, model, tokenizer, proxy=proxy, out="c")(model, 0, 10)
    assert {k: fresh[k] for k in same} == {k: first[k] for k in same} and "cached" not in fresh

    rescaled = lambda p, r: [0.2 * len(x) for x in r]  # noqa: E731
    assert "cached" not in _tiny_probe(tmp_path, model, tokenizer, proxy=rescaled, cache=cache, out="d")(model, 0, 10)
    assert "cached" not in _tiny_probe(tmp_path, model, tokenizer, proxy=proxy, cache=cache, out="e")(model, 10, 10)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert "cached" not in _tiny_probe(tmp_path, model, tokenizer, proxy=proxy, cache=cache, out="f")(model, 0, 10)
    assert len(list((tmp_path / "cache").iterdir())) == 3  # the first, the rescaled proxy's, the changed weight's


def test_fingerprint_changes_with_prompts_options_and_gold(tmp_path, tokenizer):
    import dataclasses

    import torch

    from rlhfkit.modeling import models

    torch.manual_seed(0)
    model = models.load_causal_lm(models.TINY)
    base = _tiny_probe(tmp_path, model, tokenizer)
    digest = base.fingerprint(model)
    assert _tiny_probe(tmp_path, model, tokenizer).fingerprint(model) == digest
    other_prompts = tmp_path / "other.jsonl"
    other_prompts.write_text(json.dumps({"prompt": "another question?"}) + "\n")
    assert _tiny_probe(tmp_path, model, tokenizer, prompts_file=other_prompts).fingerprint(model) != digest
    longer = _tiny_probe(tmp_path, model, tokenizer)
    longer.options = dataclasses.replace(longer.options, probe_max_new_tokens=6)
    assert longer.fingerprint(model) != digest
    other_gold = _tiny_probe(tmp_path, model, tokenizer)
    other_gold.gold = lambda p, r: [-float(len(x)) for x in r]
    assert other_gold.fingerprint(model) != digest
    other_name = _tiny_probe(tmp_path, model, tokenizer)  # another scorer that scores the fixed response alike
    other_name.options = dataclasses.replace(other_name.options, gold="length", gold_args={"target": 3})
    assert other_name.fingerprint(model) != digest
    reseeded = _tiny_probe(tmp_path, model, tokenizer)
    reseeded.seed = 1
    assert reseeded.fingerprint(model) != digest
