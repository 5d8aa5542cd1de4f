"""End-to-end SFT on the tiny model: the loss, memorisation, equivalences, resume, outputs.

All runs are fp32 unless stated, so equivalence tests can use tight tolerances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.config import ConfigError
from rlhfkit.data.sft import IGNORE_INDEX, collate_sft, load_sft_file, tokenize_sft
from rlhfkit.generation.rollout import GenerationOptions, HFGenerator
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import sft_loss_sum
from rlhfkit.sft import SFTTask, train
from rlhfkit.training import loop
from rlhfkit.training.tracking import MetricsLogger
from tests.helpers import QA_PAIRS, RESUME_ATOL, assert_same_weights, read_jsonl, saved_weights, train_entries, write_jsonl


def reference_loss_sum(model, batch) -> torch.Tensor:
    """Slow reference: full logits, shift by one, loop over every target token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    total = torch.zeros((), dtype=torch.float64)
    B, T = batch["labels"].shape
    for b in range(B):
        for t in range(1, T):
            label = int(batch["labels"][b, t])
            if label != IGNORE_INDEX:
                total += -torch.log_softmax(logits[b, t - 1], dim=-1)[label].double()
    return total


def test_sft_loss_sum_matches_reference(tokenizer, qa_file):
    examples, _ = tokenize_sft(tokenizer, load_sft_file(qa_file)[:4], max_length=64)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padding is exercised
    model = models.build_tiny(seed=1).eval()
    with torch.no_grad():
        got = sft_loss_sum(model, batch)
        want = reference_loss_sum(model, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    n_targets = sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in examples)
    assert SFTTask().num_items(batch) == n_targets
    assert SFTTask().num_tokens(batch) == sum(len(e["input_ids"]) for e in examples)


def test_memorises_eight_examples(qa_file, make_config, tokenizer):
    # 80 full-batch steps at a constant 3e-3 reach ~0.02 (fp32); 0.5 leaves a wide margin.
    config = make_config("memorise", data=str(qa_file), max_steps=80, batch_size=8, lr_schedule="constant")
    result = train(config)
    losses = [r["loss"] for r in train_entries(config.output_dir)]
    assert len(losses) == 80
    assert losses[0] > 10.0  # a random model starts near ln(49152) = 10.8
    assert losses[-1] < 0.5, f"final training loss {losses[-1]:.3f}"
    # The behaviour, not just the number: greedy decoding reproduces the answers.
    generator = HFGenerator(result.model, tokenizer, precision="fp32")
    prompts = [p for p, _ in QA_PAIRS[:3]]
    replies = generator.generate(prompts, GenerationOptions(max_new_tokens=8, temperature=0.0))
    assert [r.strip() for r in replies] == [c for _, c in QA_PAIRS[:3]]


def test_grad_accum_equals_big_batch(varied_file, make_config, tokenizer):
    # Adam turns float-rounding differences in near-zero gradients into weight
    # differences ~1e-3 x lr, so lr stays at 1e-3 for an atol of 1e-5.
    common = dict(data=str(varied_file), max_steps=3, lr=1e-3, warmup_ratio=0.0, seed=3)
    small = make_config("accum", batch_size=2, grad_accum=4, **common)
    big = make_config("big", batch_size=8, grad_accum=1, **common)

    # The test only discriminates if micro-batches hold different numbers of target
    # tokens (else a mean of micro-batch means would equal the global mean).
    examples, _ = tokenize_sft(tokenizer, load_sft_file(varied_file), max_length=64)
    order = loop.epoch_order(len(examples), small.seed, 0)
    counts = {sum(sum(x != IGNORE_INDEX for x in examples[i]["labels"][1:]) for i in order[k * 2 : k * 2 + 2]) for k in range(4)}
    assert len(counts) > 1

    train(small)
    train(big)
    small_log, big_log = train_entries(small.output_dir), train_entries(big.output_dir)
    assert [r["loss"] for r in small_log] == pytest.approx([r["loss"] for r in big_log], rel=1e-6)
    # Adam and clipping hide a wrongly scaled gradient from the weights; the
    # logged pre-clipping norm does not.
    assert [r["grad_norm"] for r in small_log] == pytest.approx([r["grad_norm"] for r in big_log], rel=1e-5)
    before = models.build_tiny().state_dict()
    after = saved_weights(big.output_dir)
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 5e-4  # weights moved
    assert_same_weights(saved_weights(small.output_dir), after, atol=1e-5)


class Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted(qa_file, make_config, monkeypatch):
    # Same config both times (cosine schedule with warmup). B crashes after logging
    # step 4, one step past its step-3 checkpoint; the same call then resumes it,
    # so step 4 is redone from the checkpoint and logged once.
    common = dict(data=str(qa_file), max_steps=6, save_every=3, batch_size=4, warmup_ratio=0.34, seed=5)
    a = make_config("A", **common)
    b = make_config("B", **common)
    train(a)

    log = MetricsLogger.log

    def log_then_crash(self, step, metrics):
        log(self, step, metrics)
        if step == 4:
            raise Crash

    monkeypatch.setattr(MetricsLogger, "log", log_then_crash)
    with pytest.raises(Crash):
        train(b)
    monkeypatch.undo()
    assert not (Path(b.output_dir) / "model.safetensors").exists()
    assert [r["step"] for r in train_entries(b.output_dir)] == [1, 2, 3, 4]
    result = train(b)
    assert result.state.step == 6

    assert_resumed_equal(a, b)


def test_resume_with_more_max_steps_equals_uninterrupted(qa_file, make_config):
    # The recipe: run 3 steps, then call again with max_steps=6. The schedule
    # depends on max_steps, so it is constant here (a cosine over 3 steps would differ).
    common = dict(data=str(qa_file), save_every=3, batch_size=4, lr_schedule="constant", warmup_ratio=0.0)
    a = make_config("A", max_steps=6, **common)
    train(a)
    train(make_config("B", max_steps=3, **common))
    train(make_config("B", max_steps=6, resume="auto", **common))
    assert_resumed_equal(a, make_config("B", **common))


def test_resume_refuses_a_changed_config_naming_the_keys(qa_file, make_config):
    # Accelerate restores the optimizer's param groups and the scheduler its base_lrs, so
    # resuming under a new lr or betas once silently kept the old ones.
    common = dict(data=str(qa_file), batch_size=4, save_every=2, lr_schedule="constant", warmup_ratio=0.0)
    first = make_config("run", max_steps=2, **common)
    train(first)
    checkpoint = Path(first.output_dir) / "checkpoints" / "step-0000002"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    with pytest.raises(ConfigError) as info:
        train(make_config("run", max_steps=4, **{**common, "lr": 1e-3, "adam_beta2": 0.95}))
    message = str(info.value)
    assert "lr: 0.003 -> 0.001" in message
    assert "adam_beta2: 0.999 -> 0.95" in message
    assert "max_steps" not in message  # may change freely
    assert "resume=force" in message
    # Refused before anything ran or was written.
    assert [r["step"] for r in train_entries(first.output_dir)] == [1, 2]
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before


def test_resume_allows_free_keys_and_force_applies_the_new_values(qa_file, make_config, capsys):
    common = dict(data=str(qa_file), batch_size=4, save_every=2, lr_schedule="constant", warmup_ratio=0.0)
    out = Path(make_config("run").output_dir)
    train(make_config("run", max_steps=2, **common))
    # More steps and other logging, checkpointing and progress settings: resumed, no error.
    train(make_config("run", max_steps=4, log_every=2, keep_checkpoints=3, progress=True, **common))
    assert f"resumed from {out / 'checkpoints' / 'step-0000002'} at step 2" in capsys.readouterr().out
    assert [r["step"] for r in train_entries(out)] == [1, 2, 4]

    # resume=force: resumed from the newest checkpoint although lr changed, the change printed,
    # and the new lr is the one used from there on (constant schedule: lr is the peak lr).
    result = train(make_config("run", max_steps=6, resume="force", **{**common, "lr": 1e-3}))
    printed = capsys.readouterr().out
    assert "lr: 0.003 -> 0.001" in printed
    assert f"resumed from {out / 'checkpoints' / 'step-0000004'} at step 4" in printed
    assert result.state.step == 6
    entries = train_entries(out)
    assert [r["step"] for r in entries] == [1, 2, 4, 5, 6]
    assert [r["lr"] for r in entries] == [3e-3, 3e-3, 3e-3, 1e-3, 1e-3]


def assert_resumed_equal(a, b) -> None:
    a_steps, b_steps = train_entries(a.output_dir), train_entries(b.output_dir)
    assert [r["step"] for r in b_steps] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    assert [r["loss"] for r in b_steps] == pytest.approx([r["loss"] for r in a_steps], rel=1e-6)
    assert [r["lr"] for r in b_steps] == pytest.approx([r["lr"] for r in a_steps], rel=1e-9)
    assert [r["grad_norm"] for r in b_steps] == pytest.approx([r["grad_norm"] for r in a_steps], rel=1e-6)
    assert [r["tokens_seen"] for r in b_steps] == [r["tokens_seen"] for r in a_steps]
    wa, wb = saved_weights(a.output_dir), saved_weights(b.output_dir)
    assert_same_weights(wa, wb, atol=RESUME_ATOL)
    ckpts = sorted(p.name for p in (Path(b.output_dir) / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]


def test_output_dir_loads_with_transformers_and_logs_metrics(qa_file, tmp_path, make_config, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = [
        {"prompt": "Capital of Spain?", "completion": "Madrid."},
        {"prompt": "Say goodbye.", "completion": "Goodbye, friend!"},
    ]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", held_out)
    config = make_config("out", data=str(qa_file), eval_data=str(eval_file), max_steps=4, batch_size=4, eval_every=2)
    result = train(config)
    out = Path(config.output_dir)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert loaded_tok.eos_token == tokenizer.eos_token
    prompt = [{"role": "user", "content": "Capital of France?"}]

    def encode(tok) -> torch.Tensor:
        return tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]

    ids = encode(loaded_tok)
    assert torch.equal(ids, encode(tokenizer))
    trained = result.model.eval()
    # The saved config keeps transformers' default kernel; compare on the same one.
    loaded.set_attn_implementation(trained.config._attn_implementation)
    with torch.no_grad():
        ids = ids.to(trained.device)  # bitwise equality needs the same device's kernels (the GPU's, where there is one)
        assert torch.equal(loaded.to(trained.device)(ids).logits, trained(ids).logits)

    # metrics.jsonl: train entries every step, eval entries at step 2 and at the end.
    records = read_jsonl(out / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    # Step 1's loss is the untrained model's mean cross-entropy over the target tokens of the first batch
    # of the epoch order; by step 4 (a second pass over the 8 pairs) it has fallen (10.83 -> 9.97 when written).
    examples, _ = tokenize_sft(tokenizer, load_sft_file(qa_file), max_length=64)
    first = loop.shard_indices(loop.epoch_order(len(examples), config.seed, 0), 0, 4, 1, 0)
    batch = collate_sft([examples[i] for i in first], tokenizer.pad_token_id)
    with torch.no_grad():
        step1_loss = reference_loss_sum(models.load_causal_lm(models.TINY).eval(), batch).item()
    step1_loss /= int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert train_records[0]["loss"] == pytest.approx(step1_loss, rel=1e-5)
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5, [r["loss"] for r in train_records]
    assert [r["step"] for r in eval_records] == [2, 4]
    assert all("loss" not in r for r in eval_records)

    # The final eval_loss is the mean cross-entropy over the held-out target tokens.
    eval_examples, _ = tokenize_sft(loaded_tok, load_sft_file(eval_file), max_length=64)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in eval_examples:
            logits = loaded(torch.tensor([e["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(e["labels"][1:])
            total += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    assert eval_records[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result.eval_metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_bf16_then_fp32_in_one_process(qa_file, make_config):
    # accelerate's process-wide state once refused a second precision in the same
    # process; pipelines and notebooks run several stages in one.
    common = dict(data=str(qa_file), max_steps=2, batch_size=8)
    train(make_config("bf16", precision="bf16", **common))
    train(make_config("fp32", **common))
    bf16, fp32 = (train_entries(Path(make_config(n).output_dir)) for n in ("bf16", "fp32"))
    assert [r["step"] for r in bf16] == [r["step"] for r in fp32] == [1, 2]
    # Same data and initial weights: bf16 autocast changes the first loss only by rounding.
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=1e-2)
    assert bf16[0]["loss"] != fp32[0]["loss"]
