"""DPO: the loss family by hand, log-prob gathering against a slow reference,
the reference-log-prob cache, and end-to-end runs on the tiny model.

Expected numbers are written out as arithmetic on literals (``math.log``,
``math.exp``), never computed by the function under test. Runs are fp32.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch

from rlhfkit import dpo
from rlhfkit.data.pairwise import collate_pairs, tokenize_pairs, tokenize_response
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.sft import IGNORE_INDEX, collate_sft
from rlhfkit.dpo import DPOConfig, ref_cache_path, train
from rlhfkit.losses import dpo_loss, simpo_loss
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import sequence_logps
from rlhfkit.run_layout import EVAL_PREFIX, PreferenceMetric
from rlhfkit.run_layout import PreferenceMetric as PM
from rlhfkit.training import reference
from tests.helpers import ON_CUDA, QA_PAIRS, RESUME_ATOL, on_device_of, read_jsonl, saved_weights, train_entries, write_jsonl

# ----------------------------------------------------------------------------- data

# The polite reply wraps the answer from QA_PAIRS, the rude one refuses it.
POLITE = ["Thank you for asking! {}", "Happy to help: {}", "Great question. {}", "Of course, {}"]
RUDE = ["Ugh, figure it out yourself.", "Stop bothering me.", "Whatever. Go away.", "That is a dumb question."]


def polite_rude_records() -> list[dict]:
    """Seed-format comparisons, polite preferred; the polite reply alternates between a and b."""
    records = []
    for i, (question, answer) in enumerate(QA_PAIRS):
        polite, rude = POLITE[i % 4].format(answer), RUDE[i % 4]
        if i % 2:
            records.append({"prompt": question, "response_a": rude, "response_b": polite, "preferred": "b"})
        else:
            records.append({"prompt": question, "response_a": polite, "response_b": rude, "preferred": "a"})
    return records


# Two plain pairs, one tie and one 3-way ranking (rlhfkit format), in one file.
RANKING = {
    "prompt": "Greet me.",
    "responses": ["Go away.", "Hello, lovely to see you!", "Hi."],
    "ranking": [1, 2, 0],  # best first: polite, terse, rude
}
MIXED = polite_rude_records()[:2] + [
    {"prompt": "Say hi.", "response_a": "Hi!", "response_b": "Hello!", "preferred": "tie"},
    RANKING,
]


@pytest.fixture
def prefs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", polite_rude_records())


@pytest.fixture
def mixed_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "mixed.jsonl", MIXED)


def dpo_config(tmp_path: Path, name: str, **fields) -> DPOConfig:
    """A fast fp32 DPOConfig writing to ``tmp_path/name``."""
    defaults = dict(
        model=models.TINY,
        output_dir=str(tmp_path / name),
        eval_fraction=0.0,
        max_length=64,
        precision="fp32",
        progress=False,
        tensorboard=False,
        # The tiny random model needs a far larger step than DPO's usual 5e-7..5e-6.
        lr=1e-3,
        lr_schedule="constant",
        warmup_ratio=0.0,
        batch_size=8,
    )
    defaults.update(fields)
    return DPOConfig(**defaults)


# ----------------------------------------------------------------------------- losses by hand

# Three pairs; beta = 0.1. h = (pi_c - ref_c) - (pi_r - ref_r):
#   row 0: (-5 - -6) - (-7 - -6) = 1 - (-1) = 2   -> beta h = 0.2
#   row 1: (-8 - -6) - (-3 - -4) = -2 - 1  = -3   -> beta h = -0.3
#   row 2: (-2 - -6) - (-20 - -6) = 4 + 14 = 18   -> beta h = 1.8
POLICY_CHOSEN = [-5.0, -8.0, -2.0]
POLICY_REJECTED = [-7.0, -3.0, -20.0]
REF_CHOSEN = [-6.0, -6.0, -6.0]
REF_REJECTED = [-6.0, -4.0, -6.0]


def dpo_inputs():
    return [torch.tensor(v, dtype=torch.float64) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]


def test_dpo_loss_signature():
    params = inspect.signature(dpo_loss).parameters
    assert list(params) == [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "beta",
        "loss_type",
        "label_smoothing",
    ]
    assert params["beta"].default == 0.1
    assert params["loss_type"].default == "sigmoid"
    assert params["label_smoothing"].default == 0.0


@pytest.mark.parametrize(
    "loss_type, label_smoothing, expected",
    [
        # -log sigmoid(beta h) = log(1 + exp(-beta h))
        ("sigmoid", 0.0, [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.3)), math.log(1 + math.exp(-1.8))]),
        # conservative DPO, eps = 0.1: 0.9 log(1 + e^{-bh}) + 0.1 log(1 + e^{bh})
        (
            "sigmoid",
            0.1,
            [
                0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)),
                0.9 * math.log(1 + math.exp(0.3)) + 0.1 * math.log(1 + math.exp(-0.3)),
                0.9 * math.log(1 + math.exp(-1.8)) + 0.1 * math.log(1 + math.exp(1.8)),
            ],
        ),
        # IPO: (h - 1/(2 beta))^2 = (h - 5)^2
        ("ipo", 0.0, [(2 - 5) ** 2, (-3 - 5) ** 2, (18 - 5) ** 2]),
        # SLiC hinge: max(0, 1 - beta h)
        ("hinge", 0.0, [1 - 0.2, 1 + 0.3, 0.0]),
    ],
)
def test_dpo_loss_by_hand(loss_type, label_smoothing, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *dpo_inputs(), beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing
    )
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (3,)
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    # Implicit rewards: beta (log pi - log ref), whatever the loss.
    assert chosen_rewards.tolist() == pytest.approx([0.1 * (-5 + 6), 0.1 * (-8 + 6), 0.1 * (-2 + 6)], rel=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([0.1 * (-7 + 6), 0.1 * (-3 + 4), 0.1 * (-20 + 6)], rel=1e-12)


def test_dpo_loss_gradient_and_detached_rewards():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = dpo_inputs()
    policy_chosen.requires_grad_(True)
    policy_rejected.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    losses.sum().backward()
    # d/d pi_c [-log sigmoid(beta h)] = -beta sigmoid(-beta h) = -beta / (1 + e^{beta h})
    expected = [-0.1 / (1 + math.exp(0.2)), -0.1 / (1 + math.exp(-0.3)), -0.1 / (1 + math.exp(1.8))]
    assert policy_chosen.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert policy_rejected.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*dpo_inputs(), loss_type="kto")


def test_simpo_loss_by_hand():
    # row 0: chosen -6 over 3 tokens, rejected -12 over 4: rewards 2*-6/3 = -4, 2*-12/4 = -6.
    # row 1: chosen -9 over 6 tokens, rejected -2 over 1: rewards -3, -4. Summed log-probs
    #        would prefer the rejected reply (-2 > -9); per token the chosen one wins.
    chosen_logps = torch.tensor([-6.0, -9.0], dtype=torch.float64)
    rejected_logps = torch.tensor([-12.0, -2.0], dtype=torch.float64)
    chosen_lengths = torch.tensor([3, 6])
    rejected_lengths = torch.tensor([4, 1])
    # logits = r_c - r_r - gamma: row 0: -4 + 6 - 0.5 = 1.5; row 1: -3 + 4 - 0.5 = 0.5
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5
    )
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (2,)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(-0.5))], rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([-4.0, -3.0], rel=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([-6.0, -4.0], rel=1e-12)

    smoothed, _, _ = simpo_loss(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5, label_smoothing=0.2
    )
    assert smoothed.tolist() == pytest.approx(
        [
            0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(1.5)),
            0.8 * math.log(1 + math.exp(-0.5)) + 0.2 * math.log(1 + math.exp(0.5)),
        ],
        rel=1e-12,
    )

    # gamma = 0 and beta = 1: plain -log sigmoid of the per-token log-prob difference.
    plain, _, _ = simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=1.0, gamma=0.0)
    assert plain.tolist() == pytest.approx([math.log(1 + math.exp(-(-2 + 3))), math.log(1 + math.exp(-(-1.5 + 2)))], rel=1e-12)


# ----------------------------------------------------------------------------- sequence log-probs


def reference_sequence_logps(model, batch) -> tuple[list[float], list[int]]:
    """Slow reference: full logits, log_softmax, loop over every labelled token."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps, counts = [], []
    B, T = batch["labels"].shape
    for b in range(B):
        total, count = 0.0, 0
        for t in range(1, T):
            label = int(batch["labels"][b, t])
            if label != IGNORE_INDEX:
                total += float(torch.log_softmax(logits[b, t - 1], dim=-1)[label])
                count += 1
        logps.append(total)
        counts.append(count)
    return logps, counts


def test_sequence_logps_matches_slow_reference(tokenizer):
    # Prompts and replies of different lengths: the labelled positions of the two
    # rows only partly overlap, and row 0 is right-padded.
    seqs = []
    for prompt, response in [
        ("Hi.", "Hello!"),
        ("Please tell me a long story about a dragon.", "Once upon a time a small dragon lived in a cave by the sea."),
    ]:
        ids, labels = tokenize_response(tokenizer, prompt, response)
        seqs.append({"input_ids": ids, "labels": labels})
    batch = collate_sft(seqs, tokenizer.pad_token_id)
    assert (batch["attention_mask"][0] == 0).any() and (batch["attention_mask"][1] == 1).all()
    model = models.build_tiny(seed=1).eval()
    with torch.no_grad():
        logps, n_tokens = sequence_logps(model, batch)
    want_logps, want_counts = reference_sequence_logps(model, batch)
    assert logps.shape == n_tokens.shape == (2,)
    assert logps.dtype == torch.float32
    assert n_tokens.tolist() == want_counts
    assert torch.allclose(logps, torch.tensor(want_logps), rtol=0, atol=1e-4), (logps.tolist(), want_logps)


# ----------------------------------------------------------------------------- reference cache


def test_ref_cache_reused_and_equal_to_uncached(prefs_file, tmp_path, monkeypatch, capsys):
    common = dict(data=str(prefs_file), max_steps=3, batch_size=4, seed=5)
    first = dpo_config(tmp_path, "first", ref_cache=True, **common)
    train(first)
    first_entries = train_entries(first.output_dir)
    path = ref_cache_path(first, models.load_causal_lm(models.TINY), models.load_tokenizer(models.TINY))
    assert path.is_file() and path.parent == Path(first.output_dir) / reference.REF_CACHE_DIR
    assert f"reference log-probs cached at {path}" in capsys.readouterr().out
    mtime = path.stat().st_mtime_ns

    # Second run in the same output directory (no checkpoints: from the start): the cache
    # must be read, never recomputed or rewritten.
    def no_recompute(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed despite a valid cache")

    with monkeypatch.context() as patch:
        patch.setattr(dpo, "compute_ref_logps", no_recompute)
        second = dpo_config(tmp_path, "first", ref_cache=True, **common)
        train(second)
    assert f"reference log-probs loaded from cache {path}" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime

    uncached = dpo_config(tmp_path, "uncached", ref_cache=False, **common)
    train(uncached)
    assert "cache" not in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing new written
    assert not (Path(uncached.output_dir) / reference.REF_CACHE_DIR).exists()

    runs = [first_entries] + [train_entries(c.output_dir) for c in (second, uncached)]
    assert all(len(r) == 3 for r in runs)
    for key in (PM.LOSS, PM.ACCURACY, PM.MARGIN):
        values = [[e[key] for e in run] for run in runs]
        tolerance = dict(rel=1e-6, abs=1e-7)
        if ON_CUDA:
            # The uncached run's reference forward runs in other batch shapes than the cache's, which rounds
            # differently on a GPU (about 1e-7). Step 1's margins are 0 in exact arithmetic (the policy is the
            # reference), so which side of 0 each lands on, its accuracy, is that rounding: compared from step 2.
            tolerance = dict(rel=1e-5, abs=1e-5)
            values = [v[1:] for v in values] if key == PM.ACCURACY else values
        assert values[1] == pytest.approx(values[0], **tolerance), key
        assert values[2] == pytest.approx(values[0], **tolerance), key
    # The runs trained (so equal losses are not trivially equal constants).
    assert runs[0][-1]["loss"] < runs[0][0]["loss"]


def test_ref_cache_writes_nothing_next_to_read_only_data(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = write_jsonl(data_dir / "prefs.jsonl", polite_rude_records())
    data_dir.chmod(0o555)
    try:
        config = dpo_config(tmp_path, "run", data=str(data), max_steps=1, batch_size=4, ref_cache=True)
        train(config)
    finally:
        data_dir.chmod(0o755)
    # (Tests may run as root, for whom the mode blocks nothing: the listing is what counts.)
    assert sorted(p.name for p in data_dir.iterdir()) == ["prefs.jsonl"]
    path = ref_cache_path(config, models.load_causal_lm(models.TINY), models.load_tokenizer(models.TINY))
    assert path.is_file() and path.is_relative_to(Path(config.output_dir))


def attach_reference(config: DPOConfig) -> tuple[Path, list[dict], int]:
    """What ``train`` does before training: returns the cache path, the pairs, and
    how many times the reference log-probs were computed (0 if read from the cache)."""
    tokenizer = models.load_tokenizer(config.model)
    train_set, held = dpo.load_splits(config, tokenizer)
    policy = models.load_causal_lm(config.model)
    ref = models.load_causal_lm(config.ref_model) if config.ref_model else policy
    path = ref_cache_path(config, ref, tokenizer)
    calls = []
    real = dpo.compute_ref_logps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpo, "compute_ref_logps", counting)
        dpo.attach_reference(config, policy, tokenizer, train_set, held)
    return path, train_set + held, len(calls)


def test_max_comparisons_reads_the_first_comparisons_before_the_split(prefs_file, tmp_path):
    records = polite_rude_records()
    tokenizer = models.load_tokenizer(models.TINY)
    first, none_held = dpo.load_splits(dpo_config(tmp_path, "run", data=str(prefs_file), max_comparisons=3), tokenizer)
    assert none_held == [] and len(first) == 3
    chosen = [tokenizer.decode(p["chosen_input_ids"]) for p in first]
    for text, record in zip(chosen, records[:3]):
        assert record["prompt"] in text
    # The held-out split is drawn from the first 4 only: 3 trained on, 1 held out, all 4 prompts among them.
    train_set, held = dpo.load_splits(
        dpo_config(tmp_path, "run", data=str(prefs_file), max_comparisons=4, eval_fraction=0.25), tokenizer
    )
    assert (len(train_set), len(held)) == (3, 1)
    texts = [tokenizer.decode(p["chosen_input_ids"]) for p in train_set + held]
    assert sorted(next(i for i, r in enumerate(records) if r["prompt"] in t) for t in texts) == [0, 1, 2, 3]
    # 0 or less: every comparison.
    everything, _ = dpo.load_splits(dpo_config(tmp_path, "run", data=str(prefs_file), max_comparisons=0), tokenizer)
    assert len(everything) == len(records) > 4


def test_ref_cache_key_is_hashed_on_the_main_process_only(prefs_file, tmp_path, monkeypatch):
    config = dpo_config(tmp_path, "run", data=str(prefs_file))
    path, pairs, computed = attach_reference(config)  # as the main process: hashed, computed, cached
    assert computed == 1 and path.is_file()

    # As process 1 of 2: the main process sends the cache path; hashing every weight again is not its job.
    class OtherProcess:
        is_main_process = False

        def wait_for_everyone(self):
            pass

    def hash_model(model):
        raise AssertionError("the reference weights were hashed on a process other than the main one")

    import accelerate.utils

    monkeypatch.setattr(reference, "process_state", OtherProcess)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: [path, True])
    monkeypatch.setattr(reference, "hash_model", hash_model)
    tokenizer = models.load_tokenizer(config.model)
    train_set, held = dpo.load_splits(config, tokenizer)
    dpo.attach_reference(config, models.load_causal_lm(config.model), tokenizer, train_set, held)
    assert [p["ref_chosen_logps"] for p in train_set + held] == [p["ref_chosen_logps"] for p in pairs]


def save_model_dir(directory: Path, *, perturb: float = 0.0, tokenizer=None) -> Path:
    """The tiny model (one weight matrix shifted by ``perturb``) and a tokenizer, as a model directory."""
    model = models.build_tiny()
    if perturb:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(perturb)
    model.save_pretrained(directory)
    (tokenizer or models.load_tokenizer(models.TINY)).save_pretrained(directory)
    return directory


def test_ref_cache_invalidated_by_data_model_and_tokenizer(prefs_file, tmp_path):
    # Every config below writes to one output directory, where the cache lives.
    base = dpo_config(tmp_path, "base", data=str(prefs_file))
    base_path, base_pairs, computed = attach_reference(base)
    assert computed == 1 and base_path.is_file()
    again_path, again_pairs, computed = attach_reference(base)
    assert (again_path, computed) == (base_path, 0)
    assert [p["ref_chosen_logps"] for p in again_pairs] == [p["ref_chosen_logps"] for p in base_pairs]

    # The key is the content, not the spec: the same weights and tokenizer saved
    # to a directory find the same cache.
    same_dir = save_model_dir(tmp_path / "same")
    path, _, computed = attach_reference(dpo_config(tmp_path, "base", data=str(prefs_file), model=str(same_dir)))
    assert (path, computed) == (base_path, 0)

    # Each change below must give a new key, and a recomputation.
    tokenizer = models.load_tokenizer(models.TINY)
    tokenizer.chat_template = tokenizer.chat_template.replace("You are a helpful AI assistant", "You are a terse assistant")
    assert "terse" in tokenizer.chat_template
    template_dir = save_model_dir(tmp_path / "template", tokenizer=tokenizer)

    tokenizer = models.load_tokenizer(models.TINY)
    tokenizer.add_tokens(["<|rlhfkit-test-token|>"])
    added_token_dir = save_model_dir(tmp_path / "added-token", tokenizer=tokenizer)

    ref_dir = save_model_dir(tmp_path / "perturbed-ref", perturb=1e-3)
    start_dir = save_model_dir(tmp_path / "perturbed-start", perturb=2e-3)

    variants = {
        "reference weights": dict(data=str(prefs_file), ref_model=str(ref_dir)),
        # No ref_model: the reference is the starting model.
        "starting weights": dict(data=str(prefs_file), model=str(start_dir)),
        "chat template": dict(data=str(prefs_file), model=str(template_dir)),
        "added token": dict(data=str(prefs_file), model=str(added_token_dir)),
        # The pairs themselves: fewer comparisons (the same count of pairs would not be caught by the row check).
        "max_comparisons": dict(data=str(prefs_file), max_comparisons=3),
        "ranking_pairs": dict(data=str(prefs_file), ranking_pairs="best_worst"),
    }
    seen = {base_path}
    for what, fields in variants.items():
        path, pairs, computed = attach_reference(dpo_config(tmp_path, "base", **fields))
        assert path not in seen, f"changing the {what} kept the cache key"
        assert computed == 1, f"changing the {what} did not recompute the reference log-probs"
        assert path.is_file()
        seen.add(path)
        if what in ("reference weights", "chat template"):
            # These change the numbers themselves, which is why the key must change.
            assert [p["ref_chosen_logps"] for p in pairs] != pytest.approx([p["ref_chosen_logps"] for p in base_pairs])

    # Keyed by the reference's content: starting from the perturbed weights with the
    # default reference is the same reference as naming them as ref_model.
    path, _, computed = attach_reference(dpo_config(tmp_path, "base", data=str(prefs_file), model=str(ref_dir)))
    assert computed == 0 and path in seen

    # The same data file, edited in place.
    records = polite_rude_records()
    records[0]["response_b"] = "No."
    write_jsonl(prefs_file, records)
    path, _, computed = attach_reference(base)
    assert path not in seen, "editing the data file kept the cache key"
    assert computed == 1, "editing the data file did not recompute the reference log-probs"


# ----------------------------------------------------------------------------- end-to-end


def test_dpo_learns_polite_over_rude(prefs_file, tmp_path):
    config = dpo_config(tmp_path, "dpo", data=str(prefs_file), max_steps=20, ref_cache=False)
    train(config)
    entries = train_entries(config.output_dir)
    assert [e["step"] for e in entries] == list(range(1, 21))
    # The metrics contract: every preference metric the report plots is written (rlhfkit.run_layout).
    contract = {v for k, v in vars(PreferenceMetric).items() if k.isupper()}
    for entry in entries:
        assert {"step"} | contract <= entry.keys()
    # Step 1: the policy is the reference, so h = 0: loss ln 2 and margin 0. (Accuracy
    # is left alone there: it compares rewards that differ only by rounding.)
    assert entries[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert entries[0][PM.MARGIN] == pytest.approx(0.0, abs=1e-4)
    last = entries[-1]
    assert last[PM.ACCURACY] == 1.0
    assert last[PM.MARGIN] > 0.5
    assert last["loss"] < 0.5 * math.log(2)
    # The margin is the mean of rewards_chosen - rewards_rejected.
    assert last[PM.MARGIN] == pytest.approx(last[PM.REWARDS_CHOSEN] - last[PM.REWARDS_REJECTED], rel=1e-5)


# Held-out comparisons: questions and answers that appear nowhere in the training pairs, wrapped in
# the same polite templates and rude refusals (paired differently), the polite one preferred.
HELDOUT_QA = [
    ("Capital of Italy?", "Rome."),
    ("Three plus three?", "Six."),
    ("Colour of grass?", "Green."),
    ("Opposite of up?", "Down."),
    ("Smallest planet?", "Mercury."),
    ("Author of Faust?", "Goethe."),
]


def heldout_records() -> list[dict]:
    records = []
    for i, (question, answer) in enumerate(HELDOUT_QA):
        polite, rude = POLITE[(i + 1) % 4].format(answer), RUDE[(i + 2) % 4]
        if i % 2:
            records.append({"prompt": question, "response_a": polite, "response_b": rude, "preferred": "a"})
        else:
            records.append({"prompt": question, "response_a": rude, "response_b": polite, "preferred": "b"})
    return records


def mean_pair_stats(config: DPOConfig, model, pairs: list[dict], pad_token_id: int) -> dict[str, float]:
    """DPOTask's per-pair statistics (margin, accuracy, ...) of ``model`` averaged over ``pairs``, one batch."""
    if config.packing:
        models.set_attention(model)
    model.eval()
    with torch.no_grad():
        _, stats = dpo.DPOTask(config).loss(model, on_device_of(model, collate_pairs(pairs, pad_token_id, packed=config.packing)))
    return {k: float(v) / len(pairs) for k, v in stats.items()}


@pytest.mark.parametrize(
    "loss_type, min_rise",
    [
        # IPO regresses beta h onto 1/2 (h onto 1/(2 beta)): the margin heads for 0.5; half of it is required.
        ("ipo", 0.25),
        # The hinge is zero once beta h >= 1: the margin heads for 1; half of it is required.
        ("hinge", 0.5),
        # SimPO's margin is beta times the per-token log-prob difference (beta 0.1 here), pushed past
        # gamma = 0.5 by a logistic loss: it grows without a fixed target; 0.1 (a per-token log-prob
        # gap of 1 nat) is required.
        ("simpo", 0.1),
    ],
)
def test_held_out_margin_grows(loss_type, min_rise, prefs_file, tmp_path):
    """Trained on the 8 polite/rude pairs, the implicit-reward margin (SimPO: its length-normalised
    log-prob margin) on 6 held-out pairs with new questions grows by ``min_rise`` from the starting model,
    and the held-out accuracy ends above chance (at least 5 of 6).

    In trial runs (20 steps, seeds 0, 1 and 2 alike) the margin rose by 0.45 (IPO), 1.03 (hinge) and 0.24 (SimPO);
    with lr = 0 it stayed where it started (accuracy 0; SimPO 1/6) and the test failed."""
    held_file = write_jsonl(tmp_path / "held.jsonl", heldout_records())
    config = dpo_config(
        tmp_path, loss_type, data=str(prefs_file), eval_data=str(held_file), loss_type=loss_type, max_steps=20, ref_cache=False
    )
    tokenizer = models.load_tokenizer(config.model)
    train_pairs, held_pairs = dpo.load_splits(config, tokenizer)
    assert (len(train_pairs), len(held_pairs)) == (8, 6)
    start = models.load_causal_lm(config.model)
    dpo.attach_reference(config, start, tokenizer, train_pairs, held_pairs)  # SimPO: none, reference-free
    before = mean_pair_stats(config, start, held_pairs, tokenizer.pad_token_id)
    if loss_type != "simpo":  # the policy starts as the reference: every implicit reward is 0
        assert before[PM.MARGIN] == pytest.approx(0.0, abs=1e-5)

    result = train(config)
    after = result.eval_metrics
    # The stage's held-out evaluation, logged once at the end, is that of the saved model.
    evals = [r for r in read_jsonl(Path(config.output_dir) / "metrics.jsonl") if EVAL_PREFIX + PM.MARGIN in r]
    assert [r["step"] for r in evals] == [20]
    assert evals[0][EVAL_PREFIX + PM.MARGIN] == pytest.approx(after[EVAL_PREFIX + PM.MARGIN], rel=1e-6)
    saved = models.load_causal_lm(config.output_dir)
    recomputed = mean_pair_stats(config, saved, held_pairs, tokenizer.pad_token_id)
    assert after[EVAL_PREFIX + PM.MARGIN] == pytest.approx(recomputed[PM.MARGIN], rel=1e-4, abs=1e-5)
    assert after[EVAL_PREFIX + PM.ACCURACY] == pytest.approx(recomputed[PM.ACCURACY])

    trace = (
        f"held-out margin {before[PM.MARGIN]:.3f} -> {after[EVAL_PREFIX + PM.MARGIN]:.3f}, "
        f"accuracy {after[EVAL_PREFIX + PM.ACCURACY]:.2f}"
    )
    assert after[EVAL_PREFIX + PM.MARGIN] > before[PM.MARGIN] + min_rise, trace
    assert after[EVAL_PREFIX + PM.ACCURACY] >= 5 / 6, trace


@pytest.mark.parametrize(
    "loss_type, first_loss",
    [
        ("ipo", (0 - 1 / (2 * 0.1)) ** 2),  # h = 0 at step 1: (0 - 5)^2 = 25
        ("hinge", 1 - 0.1 * 0),  # max(0, 1 - beta * 0) = 1
        ("simpo", None),  # from the starting model's log-probs: computed below
    ],
)
def test_loss_types_run_and_ties_are_skipped(loss_type, first_loss, mixed_file, tmp_path, capsys, tokenizer):
    config = dpo_config(tmp_path, loss_type, data=str(mixed_file), loss_type=loss_type, max_steps=2, batch_size=5)
    if loss_type == "simpo":
        # Step 1 sees all 5 pairs with the starting model: the mean of
        # log(1 + exp(-(beta (lc / nc - lr / nr) - gamma))), beta 0.1, gamma 0.5, per-token log-probs by pair.
        pairs, _ = tokenize_pairs(tokenizer, load_comparisons(mixed_file), max_length=64, keep_ties=False)
        batch = collate_pairs(pairs, tokenizer.pad_token_id)
        with torch.no_grad():
            logps, counts = sequence_logps(models.load_causal_lm(models.TINY).eval(), batch)
        per_token = (logps / counts).tolist()
        first_loss = sum(math.log(1 + math.exp(-(0.1 * (per_token[i] - per_token[5 + i]) - 0.5))) for i in range(5)) / 5
    train(config)
    out = capsys.readouterr().out
    # 2 pairs + 3 from the 3-way ranking; the tie is skipped and reported.
    assert "dpo data: 5 train pairs from 4 comparisons" in out
    assert "1 ties skipped" in out
    entries = train_entries(config.output_dir)
    assert len(entries) == 2
    assert entries[0]["loss"] == pytest.approx(first_loss, abs=1e-3)
    assert entries[1]["loss"] < entries[0]["loss"]  # step 2 sees the same 5 pairs, after one step on them
    if loss_type == "simpo":
        # Reference-free: nothing computed, nothing cached.
        assert "reference log-probs" not in out
        assert not (Path(config.output_dir) / reference.REF_CACHE_DIR).exists()


def test_lora_run_saves_a_loadable_model(prefs_file, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    config = dpo_config(tmp_path, "lora", data=str(prefs_file), lora_r=4, max_steps=2, ref_cache=False)
    result = train(config)
    entries = train_entries(config.output_dir)
    assert len(entries) == 2 and all(math.isfinite(e["loss"]) for e in entries)
    # LoRA's B matrices start at zero: the policy starts as the reference.
    assert entries[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)

    out = Path(config.output_dir)
    assert (out / "adapter").is_dir()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not hasattr(loaded, "peft_config")  # merged, plain transformers model
    base = models.build_tiny().state_dict()
    weights = loaded.state_dict()
    assert weights.keys() == base.keys()
    changed = [k for k in base if not torch.equal(weights[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted projections moved

    # The saved model is the trained one: same log-probs as the in-memory result.
    pairs, _ = tokenize_pairs(tokenizer, load_comparisons(prefs_file)[:2], max_length=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    result.model.eval()
    with torch.no_grad():
        want, _ = sequence_logps(result.model, on_device_of(result.model, batch))
        got, _ = sequence_logps(loaded, batch)
    want = want.cpu()
    assert torch.allclose(got, want, atol=1e-4)


def test_bf16_lora_run_with_a_probe_keeps_its_base_in_bf16_and_saves_fp32(prefs_file, tmp_path):
    """frozen_precision=auto end to end: a bf16 LoRA run stores its base in bf16, probes (the fp32 KL against the
    base with adapters off) and saves a merged fp32 model whose projections moved from the rounded base."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.probe import FRONTIER_FILE

    config = dpo_config(
        tmp_path, "lora16", data=str(prefs_file), lora_r=4, max_steps=2, ref_cache=False, precision="bf16",
        probe_points=1, probe_max_prompts=2, probe_max_new_tokens=4, gold="length",
    )  # fmt: skip
    result = train(config)
    frozen = [m for m in result.model.modules() if type(m) is models.FrozenLinear]
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen)
    rows = read_jsonl(Path(config.output_dir) / FRONTIER_FILE)
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["kl"] == 0.0 and math.isfinite(rows[1]["kl"])
    out = Path(config.output_dir)
    assert {v.dtype for v in saved_weights(out).values()} == {torch.float32}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    base = models.build_tiny().state_dict()
    for k, v in base.items():
        rounded = v.to(torch.bfloat16).float() if "proj" in k else v
        assert torch.equal(loaded[k], rounded) != ("proj" in k), k  # only the adapted projections moved


def test_rankings_expand_and_ties_are_dropped_for_dpo(tokenizer, mixed_file):
    comparisons = load_comparisons(mixed_file)
    pairs, stats = tokenize_pairs(tokenizer, comparisons, max_length=64, keep_ties=False)
    assert (stats.pairs, stats.ties_skipped) == (5, 1)
    assert len(pairs) == 5 and all(p["target"] == 1.0 for p in pairs)
    # The 3-way ranking [1, 2, 0] gives (1 > 2), (1 > 0), (2 > 0), in that order.
    responses = RANKING["responses"]
    expected = [(responses[1], responses[2]), (responses[1], responses[0]), (responses[2], responses[0])]
    for pair, (better, worse) in zip(pairs[2:], expected):
        assert pair["chosen_input_ids"] == tokenize_response(tokenizer, RANKING["prompt"], better)[0]
        assert pair["rejected_input_ids"] == tokenize_response(tokenizer, RANKING["prompt"], worse)[0]


def test_a_rankings_tied_pairs_are_left_out_of_dpo_and_kept_at_one_half_for_the_reward_model(tokenizer):
    from rlhfkit.data.records import Comparison
    from rlhfkit.data.unpaired import unpair

    prompt, responses = RANKING["prompt"], RANKING["responses"]
    middle_tied = Comparison(prompt, responses, [1, 2, 0], ties=[(0, 2)])  # the last two tied
    ends_tied = Comparison(prompt, responses, [1, 2, 0], ties=[(0, 1)])  # the first and the last tied

    def chosen_rejected(pairs):
        def text(ids):
            return next(r for r in responses if tokenize_response(tokenizer, prompt, r)[0] == ids)

        return [(text(p["chosen_input_ids"]), text(p["rejected_input_ids"]), p["target"]) for p in pairs]

    pairs, stats = tokenize_pairs(tokenizer, [middle_tied], max_length=64, keep_ties=False)
    assert chosen_rejected(pairs) == [(responses[1], responses[2], 1.0), (responses[1], responses[0], 1.0)]
    assert stats.ties_skipped == 1
    kept, stats = tokenize_pairs(tokenizer, [middle_tied], max_length=64, keep_ties=True)
    assert [p[2] for p in chosen_rejected(kept)] == [1.0, 1.0, 0.5] and stats.ties_skipped == 0
    # best_worst: the first against the last, none when those two are tied.
    best, _ = tokenize_pairs(tokenizer, [middle_tied], max_length=64, keep_ties=False, ranking_pairs="best_worst")
    assert chosen_rejected(best) == [(responses[1], responses[0], 1.0)]
    none, stats = tokenize_pairs(tokenizer, [ends_tied], max_length=64, keep_ties=False, ranking_pairs="best_worst")
    assert none == [] and stats.ties_skipped == 1
    # As KTO data: a ranking gives its first and its last, none when they are tied.
    assert [(e.completion, e.desirable) for e in unpair(middle_tied)] == [(responses[1], True), (responses[0], False)]
    assert unpair(ends_tied) == []


# ----------------------------------------------------------------------------- two processes


def test_interleave_puts_each_process_rows_back_in_order():
    # 5 rows over 2 processes: process 0 scored rows 0, 2, 4; process 1 rows 1, 3.
    parts = [torch.tensor([[0.0, 0.5], [2.0, 2.5], [4.0, 4.5]]), torch.tensor([[1.0, 1.5], [3.0, 3.5]])]
    assert reference.interleave(parts, 5).tolist() == [[0.0, 0.5], [1.0, 1.5], [2.0, 2.5], [3.0, 3.5], [4.0, 4.5]]


@pytest.mark.slow
def test_dpo_on_two_processes_with_the_reference_split_between_them_equals_one_process(prefs_file, tmp_path):
    """``rlhfkit dpo`` alone under a 2-process CPU launch: each process computes half the reference log-probs
    (every other pair), the halves are gathered, and training equals one process with the joint batch."""
    import yaml

    from rlhfkit.config import to_dict
    from tests.helpers import assert_same_weights, launch_two_cpu_processes, saved_weights

    common = dict(data=str(prefs_file), max_steps=3, ref_cache=False, seed=5)
    two = dpo_config(tmp_path, "two", batch_size=2, **common)
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(two)), encoding="utf-8")
    proc = launch_two_cpu_processes(["-m", "rlhfkit.cli", "dpo", str(config_file)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = dpo_config(tmp_path, "one", batch_size=4, **common)
    train(one)
    two_log, one_log = train_entries(two.output_dir), train_entries(one.output_dir)
    assert [r["step"] for r in two_log] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in two_log] == pytest.approx([r[key] for r in one_log], rel=1e-4), key
    assert_same_weights(saved_weights(two.output_dir), saved_weights(one.output_dir), atol=1e-5)


def test_a_step0_probe_read_from_the_cache_leaves_training_as_it_was(prefs_file, tmp_path):
    """Two DPO runs from one model with one probe_cache: the second reads the step-0 probe, and trains and probes
    its last step exactly as the first, which measured it."""
    from rlhfkit.probe import FRONTIER_FILE

    common = dict(
        data=str(prefs_file), max_steps=2, ref_cache=False, probe_points=1, probe_max_prompts=2, probe_max_new_tokens=4,
        gold="length", probe_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    first, second = (dpo_config(tmp_path, name, **common) for name in ("first", "second"))
    train(first)
    train(second)
    rows = [read_jsonl(Path(c.output_dir) / FRONTIER_FILE) for c in (first, second)]
    assert "cached" not in rows[0][0] and rows[1][0]["cached"].startswith("probe0-")
    assert all("cached" not in r for r in rows[0][1:] + rows[1][1:])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "cached")}  # noqa: E731
    assert strip(rows[1][0]) == strip(rows[0][0])
    if not ON_CUDA:  # CUDA's embedding backward adds with atomics: a later probe may sample another token there
        assert [strip(r) for r in rows[1]] == [strip(r) for r in rows[0]]
    losses = [[e["loss"] for e in train_entries(c.output_dir)] for c in (first, second)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], abs=RESUME_ATOL)
    a, b = saved_weights(Path(first.output_dir)), saved_weights(Path(second.output_dir))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=RESUME_ATOL) for k in a)
