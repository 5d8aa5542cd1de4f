"""KTO: the loss by hand and against TRL's ``KTOTrainer``, the data (unpaired records, paired data converted,
KL pairs, errors), the reference cache, and runs of ``rlhfkit kto`` on the tiny model.

Expected numbers are written out as arithmetic on literals, never computed by the function under test.
Runs are fp32.
"""

from __future__ import annotations

import collections
import math
import types
from pathlib import Path

import pytest
import torch

from rlhfkit import cli, kto
from rlhfkit.data.io import DataError
from rlhfkit.data.unpaired import collate_unpaired, kl_partners, load_unpaired, load_unpaired_splits, tokenize_unpaired
from rlhfkit.kto import KTOConfig, KTOTask
from rlhfkit.losses import kto_loss, kto_reference_point
from rlhfkit.modeling import models
from rlhfkit.run_layout import EVAL_PREFIX
from rlhfkit.run_layout import PreferenceMetric as PM
from tests.helpers import QA_PAIRS, read_jsonl, train_entries, write_jsonl
from tests.test_dpo import HELDOUT_QA, POLITE, RUDE, polite_rude_records, reference_sequence_logps

# ----------------------------------------------------------------------------- data


def thumbs_records(qa=QA_PAIRS, shift: int = 0) -> list[dict]:
    """For each question a polite answer (desirable) and a rude refusal (undesirable), unpaired records."""
    records = []
    for i, (question, answer) in enumerate(qa):
        records.append({"prompt": question, "completion": POLITE[(i + shift) % 4].format(answer), "label": True})
        records.append({"prompt": question, "completion": RUDE[(i + 2 * shift) % 4], "label": False})
    return records


def kto_config(tmp_path: Path, name: str, **fields) -> KTOConfig:
    """A fast fp32 KTOConfig writing to ``tmp_path/name``."""
    defaults = dict(
        model=models.TINY,
        output_dir=str(tmp_path / name),
        eval_fraction=0.0,
        max_length=64,
        precision="fp32",
        progress=False,
        tensorboard=False,
        lr=1e-3,  # the tiny random model needs a far larger step than KTO's usual 5e-7..5e-6
        lr_schedule="constant",
        warmup_ratio=0.0,
        batch_size=8,
    )
    defaults.update(fields)
    return KTOConfig(**defaults)


# ----------------------------------------------------------------------------- the loss by hand

# Four examples, beta = 0.1, z0 = 0.5, lambda_D = 1.0, lambda_U = 1.5. r = log pi - log ref:
#   0 desirable:   -5 - -6 =  1   beta (r - z0) = 0.1 (1 - 0.5)  =  0.05   loss 1.0 (1 - sigmoid(0.05))
#   1 desirable:   -9 - -6 = -3   beta (r - z0) = 0.1 (-3 - 0.5) = -0.35   loss 1.0 (1 - sigmoid(-0.35))
#   2 undesirable: -7 - -5 = -2   beta (z0 - r) = 0.1 (0.5 + 2)  =  0.25   loss 1.5 (1 - sigmoid(0.25))
#   3 undesirable: -4 - -8 =  4   beta (z0 - r) = 0.1 (0.5 - 4)  = -0.35   loss 1.5 (1 - sigmoid(-0.35))
# with 1 - sigmoid(x) = 1 / (1 + e^x). Implicit rewards beta r: 0.1, -0.3, -0.2, 0.4.
POLICY = [-5.0, -9.0, -7.0, -4.0]
REF = [-6.0, -6.0, -5.0, -8.0]
DESIRABLE = [True, True, False, False]


def test_kto_loss_by_hand():
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    z0 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    losses, rewards = kto_loss(
        policy, torch.tensor(REF, dtype=torch.float64), torch.tensor(DESIRABLE), z0, beta=0.1, undesirable_weight=1.5
    )
    assert losses.tolist() == pytest.approx(
        [1 / (1 + math.exp(0.05)), 1 / (1 + math.exp(-0.35)), 1.5 / (1 + math.exp(0.25)), 1.5 / (1 + math.exp(-0.35))], rel=1e-12
    )
    assert rewards.tolist() == pytest.approx([0.1, -0.3, -0.2, 0.4], rel=1e-12)
    assert not rewards.requires_grad
    losses.sum().backward()

    # d/dr lambda (1 - sigmoid(s beta (r - z0))) = -s lambda beta sigmoid(x) (1 - sigmoid(x)), s = +1 desirable, -1 not;
    # sigmoid(x) (1 - sigmoid(x)) = e^x / (1 + e^x)^2.
    def slope(x):
        return math.exp(x) / (1 + math.exp(x)) ** 2

    assert policy.grad.tolist() == pytest.approx(
        [-0.1 * slope(0.05), -0.1 * slope(-0.35), 1.5 * 0.1 * slope(0.25), 1.5 * 0.1 * slope(-0.35)], rel=1e-12
    )
    assert z0.grad is None  # the reference point is a constant of the loss (the paper; TRL detaches it)

    # APO-zero, unpaired: desirable 1 - sigmoid(beta r), undesirable sigmoid(beta r); no z0.
    apo, _ = kto_loss(
        policy.detach(),
        torch.tensor(REF, dtype=torch.float64),
        torch.tensor(DESIRABLE),
        123.0,
        beta=0.1,
        undesirable_weight=1.5,
        loss_type="apo_zero_unpaired",
    )
    assert apo.tolist() == pytest.approx(
        [1 / (1 + math.exp(0.1)), 1 / (1 + math.exp(-0.3)), 1.5 / (1 + math.exp(0.2)), 1.5 / (1 + math.exp(-0.4))], rel=1e-12
    )
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(policy, policy, torch.tensor(DESIRABLE), 0.0, loss_type="sigmoid")


def test_reference_point_is_the_clamped_detached_mean():
    # KL-pair log-ratios 1.0, 0.5, -0.3, 0.2: mean 1.4 / 4 = 0.35.
    ratios = torch.tensor([1.0, 0.5, -0.3, 0.2], dtype=torch.float64, requires_grad=True)
    z0 = kto_reference_point(ratios.sum(), 4)
    assert float(z0) == pytest.approx(0.35, rel=1e-12)
    assert not z0.requires_grad
    assert float(kto.batch_reference_point(ratios)) == pytest.approx(0.35, rel=1e-12)
    # A negative mean, (-1 + 0.2) / 2 = -0.4, is clamped to 0 (the paper's max(0, .)).
    assert float(kto.batch_reference_point(torch.tensor([-1.0, 0.2]))) == 0.0


# ----------------------------------------------------------------------------- against TRL


class _TRLModel:
    """Stands in for the model in TRL's ``KTOTrainer._compute_loss``: row ``i`` of ``input_ids`` is ``[i, 0]`` and its
    one completion token's log-prob is ``table[i]``; the per-token log-probs then sum to ``table[i]``."""

    training = True

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=False, **kwargs):
        log_probs = self.table[input_ids[:, 0]].unsqueeze(1)  # (B, T - 1) with T = 2
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):  # one process
        return x


def trl_kto_loss(policy, ref, policy_kl, ref_kl, desirable, *, beta, desirable_weight, undesirable_weight, loss_type="kto"):
    """TRL 1.16's KTO loss of a batch with precomputed reference log-probs: ``KTOTrainer._compute_loss``
    (trl/trainer/kto_trainer.py) called on a bare trainer holding only the attributes it reads. Returns the loss
    and TRL's metrics (kl, rewards/chosen, rewards/rejected...)."""
    from trl import KTOTrainer

    n = len(desirable)
    trainer = object.__new__(KTOTrainer)  # no __init__: no model, data or accelerate state
    model = _TRLModel(torch.cat([policy, policy_kl]))
    vars(trainer).update(
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
        calculate_KL=loss_type != "apo_zero_unpaired",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        accelerator=_Accelerator(),
        model=model,
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    rows = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], dim=1)
    ones = torch.ones(n, 2, dtype=torch.long)
    batch = {
        "input_ids": rows,
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": rows + torch.tensor([n, 0]),  # the KL rows look up table[n:]
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": torch.tensor(desirable),
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# Six examples: log-probs of each completion and of its KL pair (prompt i, another completion), policy and reference.
BATCH = dict(
    policy=[-5.0, -9.0, -7.0, -4.0, -12.5, -3.25],
    ref=[-6.0, -6.0, -5.0, -8.0, -11.0, -3.0],
    policy_kl=[-10.0, -12.0, -7.5, -9.0, -14.0, -6.0],
    ref_kl=[-11.0, -12.5, -7.0, -9.25, -13.0, -6.5],
)


@pytest.mark.parametrize(
    "desirable, loss_type, weights",
    [
        ([True, False, True, False, False, True], "kto", (1.0, 1.0)),
        ([True, False, True, False, False, True], "kto", (1.33, 0.75)),
        ([True] * 6, "kto", (1.0, 1.0)),  # one class only
        ([False] * 6, "kto", (1.0, 2.0)),
        ([True, False, True, False, False, True], "apo_zero_unpaired", (1.0, 1.0)),
    ],
)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # a positive mean KL-pair log-ratio, and a negative one (z0 = 0)
def test_kto_loss_equals_trl(desirable, loss_type, weights, kl_sign):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in BATCH.items()}
    ref_kl = t["policy_kl"] - kl_sign * (t["policy_kl"] - t["ref_kl"])  # mirrors the log-ratios for kl_sign -1
    beta, (w_d, w_u) = 0.1, weights
    want, metrics = trl_kto_loss(
        t["policy"],
        t["ref"],
        t["policy_kl"],
        ref_kl,
        desirable,
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        loss_type=loss_type,
    )
    z0 = kto.batch_reference_point(t["policy_kl"] - ref_kl) if loss_type == "kto" else 0.0
    losses, rewards = kto_loss(
        t["policy"],
        t["ref"],
        torch.tensor(desirable),
        z0,
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        loss_type=loss_type,
    )
    assert abs(float(losses.mean()) - float(want)) < 1e-6, (float(losses.mean()), float(want))
    if loss_type == "kto":
        assert float(z0) == pytest.approx(metrics["kl"], abs=1e-12)
        assert (float(z0) > 0) == (kl_sign > 0)
    mask = torch.tensor(desirable)
    if mask.any():
        assert float(rewards[mask].mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-12)
    if not mask.all():
        assert float(rewards[~mask].mean()) == pytest.approx(metrics["rewards/rejected"], abs=1e-12)


def test_kto_task_on_the_tiny_model_equals_trl(tokenizer, tmp_path):
    """The stage's loss of a real batch (packed, the tiny model's log-probs, KL pairs as the data module builds them)
    equals TRL's loss of the same examples, whose sequence log-probs come from the slow reference (full logits, one
    token at a time, padded). Policy and reference are two random models (the policy the flatter), so neither the
    log-ratios nor the reference point are 0."""
    examples = tokenize_unpaired(tokenizer, load_unpaired(write_jsonl(tmp_path / "t.jsonl", thumbs_records()[:6])), max_length=64)
    config = kto_config(tmp_path, "task", beta=0.5, desirable_weight=1.2, undesirable_weight=0.8)
    policy, reference = models.build_tiny(seed=2).eval(), models.build_tiny(seed=1).eval()
    with torch.no_grad():  # a flatter policy and a peaked reference: on other completions log pi - log ref > 0
        policy.lm_head.weight.mul_(0.1)
        reference.lm_head.weight.mul_(5.0)
    pad = tokenizer.pad_token_id

    def slow(model, key):  # per-sequence log-probs of the examples (key "") or their KL pairs (key "kl_")
        seqs = [{"input_ids": e[key + "input_ids"], "labels": e[key + "labels"]} for e in examples]
        from rlhfkit.data.sft import collate_sft

        return torch.tensor(reference_sequence_logps(model, collate_sft(seqs, pad))[0], dtype=torch.float64)

    ref, ref_kl = slow(reference, ""), slow(reference, "kl_")
    for e, r, rk in zip(examples, ref.tolist(), ref_kl.tolist()):
        e["ref_logps"], e["ref_kl_logps"] = r, rk
    desirable = [e["label"] for e in examples]
    want, metrics = trl_kto_loss(
        slow(policy, ""), ref, slow(policy, "kl_"), ref_kl, desirable, beta=0.5, desirable_weight=1.2, undesirable_weight=0.8
    )
    assert metrics["kl"] > 0.01  # the reference point is in play

    models.set_attention(policy)
    with torch.no_grad():
        loss_sum, stats = KTOTask(config).loss(policy, collate_unpaired(examples, pad, packed=True))
    assert float(loss_sum) / len(examples) == pytest.approx(float(want), abs=1e-5)
    assert float(stats["kl"]) / len(examples) == pytest.approx(metrics["kl"], abs=1e-5)
    # The class means: each reward scaled by its class_scale (6 examples / 3 of its class = 2), over the 6 examples.
    assert float(stats[PM.REWARDS_CHOSEN]) / len(examples) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(stats[PM.REWARDS_REJECTED]) / len(examples) == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


# ----------------------------------------------------------------------------- data


def test_unpaired_records_load(tmp_path):
    records = [
        {"prompt": "Hi?", "completion": "Hello!", "label": True},
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
            "completion": "Go away.",
            "label": False,
        },
        {"prompt": "Bye?", "completion": [{"role": "assistant", "content": "Goodbye!"}], "label": True, "source": "x"},
    ]
    examples = load_unpaired(write_jsonl(tmp_path / "k.jsonl", records))
    assert [(e.prompt, e.completion, e.desirable) for e in examples] == [
        ("Hi?", "Hello!", True),
        ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}], "Go away.", False),
        ("Bye?", "Goodbye!", True),
    ]
    assert examples[1].source == f"{tmp_path / 'k.jsonl'}:2"


GOOD = {"prompt": "Hi?", "completion": "Hello!", "label": True}


@pytest.mark.parametrize(
    "bad, field, problem",
    [
        (
            {"prompt": "Hi?", "completion": "Hello!", "label": "yes"},
            "label",
            'expected true (desirable) or false (undesirable), got "yes"',
        ),
        ({"prompt": "Hi?", "completion": "Hello!", "label": 1}, "label", "got 1"),
        ({"prompt": "Hi?", "completion": "Hello!"}, "label", "missing"),
        ({"prompt": "Hi?", "label": True}, "completion", "missing"),
        ({"prompt": "Hi?", "completion": "  ", "label": True}, "completion", "empty"),
        ({"prompt": "Hi?", "completion": 3, "label": True}, "completion", "expected a string or a list of messages"),
        ({"prompt": "Hi?", "completion": [{"role": "user", "content": "x"}], "label": True}, "completion", "one assistant turn"),
        ({"completion": "Hello!", "label": True}, "prompt", "missing"),
        ({"prompt": "Hi?", "completion": "Hello!", "label": True, "chosen": "x"}, "chosen", "KTO field 'completion'"),
        ({"prompt": "Hi?", "text": "Hello!"}, None, "unrecognised KTO record"),
        ({"prompt": "Hi?", "response_a": "A", "response_b": "B", "preferred": "c"}, "preferred", "'a', 'b' or 'tie'"),
    ],
)
def test_a_bad_record_names_file_line_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as caught:
        load_unpaired(path)
    e = caught.value
    assert (e.path, e.line, e.field) == (str(path), 2, field)
    assert problem in e.problem
    assert str(e).startswith(f"{path}:2: ")


def test_paired_data_converts_to_kto_examples(tmp_path):
    records = [
        {"prompt": "Q1?", "response_a": "bad one", "response_b": "good one", "preferred": "b"},  # seed
        {"prompt": "Q2?", "chosen": "yes, gladly", "rejected": "no"},  # TRL, strings
        {
            "prompt": [{"role": "user", "content": "Q3?"}],
            "chosen": [{"role": "assistant", "content": "sure"}],
            "rejected": [{"role": "assistant", "content": "nope"}],
        },
        {"prompt": "Q4?", "response_a": "same", "response_b": "same too", "preferred": "tie"},  # skipped
        {"prompt": "Q5?", "completion": "unpaired", "label": False},  # formats mix in one file
    ]
    examples = load_unpaired(write_jsonl(tmp_path / "p.jsonl", records))
    assert [(e.prompt, e.completion, e.desirable) for e in examples] == [
        ("Q1?", "good one", True),
        ("Q1?", "bad one", False),
        ("Q2?", "yes, gladly", True),
        ("Q2?", "no", False),
        ([{"role": "user", "content": "Q3?"}], "sure", True),
        ([{"role": "user", "content": "Q3?"}], "nope", False),
        ("Q5?", "unpaired", False),
    ]


def test_splits_keep_a_pair_together_and_report_ties(tmp_path, tokenizer, capsys):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        polite_rude_records() + [{"prompt": "Q?", "response_a": "A", "response_b": "B", "preferred": "tie"}],
    )
    train_set, held = load_unpaired_splits(
        tokenizer, str(path), eval_data="", eval_fraction=0.25, seed=0, max_length=64, chat_template=True
    )
    out = capsys.readouterr().out
    assert "9 of the file's 9 records were preference records, converted (1 ties skipped)" in out
    # 9 records, 2 held out (round(0.25 x 9)), split by record: each prompt's two examples (its pair's halves) are
    # on one side, both of them (a held-out tie gives none).
    assert len(train_set) + len(held) == 16 and len(held) in (2, 4)

    def prompts(split):  # each example's prompt tokens (those before its labelled completion), counted
        starts = [next(t for t, label in enumerate(e["labels"]) if label != -100) for e in split]
        return collections.Counter(tuple(e["input_ids"][:start]) for e, start in zip(split, starts))

    train_prompts, held_prompts = prompts(train_set), prompts(held)
    assert set(train_prompts.values()) == set(held_prompts.values()) == {2}
    assert not train_prompts.keys() & held_prompts.keys()
    for split in (train_set, held):
        assert 2 * sum(e["label"] for e in split) == len(split)


def test_kl_pairs_are_mismatched_and_seeded(tokenizer, tmp_path):
    # Converted pairs (each prompt twice, next to each other), one prompt with 3 completions, one with 1: no KL
    # pair may take a completion of its own prompt, and each completion is used once (a permutation).
    prompts = [q for q, _ in QA_PAIRS for _ in range(2)] + ["Three?"] * 3 + [[{"role": "user", "content": "Chat?"}]]
    for seed in range(5):
        partners = kl_partners(prompts, seed=seed)
        assert all(prompts[j] != prompts[i] for i, j in enumerate(partners)), seed
        assert sorted(partners) == list(range(20)), seed
    assert kl_partners(prompts, seed=0) == kl_partners(prompts, seed=0)
    assert kl_partners(prompts, seed=1) != kl_partners(prompts, seed=0)
    # All distinct prompts: a seeded rotation, every example taking the completion before it in a shuffled order.
    distinct = [q for q, _ in QA_PAIRS]
    partners = kl_partners(distinct, seed=3)
    order = [0]
    while len(order) < 8:
        order.append(partners[order[-1]])
    assert sorted(order) == list(range(8))  # one cycle through all 8
    assert kl_partners(["only"], seed=0) == [0]  # nothing to mismatch with
    assert kl_partners(["same", "same", "other"], seed=0) != [0, 1, 2]  # a prompt with most examples: rotate by one
    loaded = load_unpaired(write_jsonl(tmp_path / "t.jsonl", thumbs_records()))
    examples = tokenize_unpaired(tokenizer, loaded, max_length=64, seed=0)
    partners = kl_partners([e.prompt for e in loaded], seed=0)

    def completion_start(e):  # where the completion's tokens (the labelled ones) begin
        return next(t for t, label in enumerate(e["labels"]) if label != -100)

    for e, j in zip(examples, partners):  # the KL pair: the example's prompt, then its partner's completion
        own, other = completion_start(e), completion_start(examples[j])
        assert loaded[j].prompt != loaded[examples.index(e)].prompt
        assert e["kl_input_ids"][:own] == e["input_ids"][:own]
        assert e["kl_input_ids"][own:] == examples[j]["input_ids"][other:]
        assert e["kl_labels"][own:] == examples[j]["labels"][other:]
    assert [e["class_scale"] for e in examples] == [2.0] * 16  # 16 examples, 8 of each class


# ----------------------------------------------------------------------------- runs


def test_rlhfkit_kto_learns_thumbs_up_over_thumbs_down(tmp_path, capsys):
    """``rlhfkit kto`` on 16 unpaired examples (8 questions, a polite answer up, a rude refusal down): on 12 held-out
    examples with new questions the desirable implicit reward ends above 0 and the undesirable one below, each the
    exact class mean; the saved model loads with ``from_pretrained``.

    In trial runs (20 steps, lr 1e-3): held-out rewards/chosen 0.75 and rewards/rejected -0.99 (margin 1.74); the
    training loss fell from 0.5 to 0.26. With lr = 0 every reward stayed 0 and the test failed."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "kto.jsonl", thumbs_records())
    held = write_jsonl(tmp_path / "held.jsonl", thumbs_records(HELDOUT_QA, shift=1))
    out = tmp_path / "out"
    overrides = dict(
        model="tiny", data=data, eval_data=held, output_dir=out, max_steps=20, precision="fp32", progress="false",
        tensorboard="false", lr=1e-3, lr_schedule="constant", warmup_ratio=0, batch_size=8, max_length=64, ref_cache="false",
    )  # fmt: skip
    assert cli.main(["kto", *(f"{k}={v}" for k, v in overrides.items())]) == 0
    assert "kto data: 16 train examples (8 desirable, 8 undesirable)" in capsys.readouterr().out

    entries = train_entries(out)
    assert [e["step"] for e in entries] == list(range(1, 21))
    # Step 1: the policy is the reference: every log-ratio 0, z0 = 0, each loss 1 - sigmoid(0) = 0.5.
    assert entries[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert entries[0][kto.KL] == pytest.approx(0.0, abs=1e-5)
    assert entries[0][PM.REWARDS_CHOSEN] == pytest.approx(0.0, abs=1e-5)
    assert entries[-1]["loss"] < 0.35
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if EVAL_PREFIX + "loss" in r]
    assert [r["step"] for r in evals] == [20]
    chosen, rejected = evals[0][EVAL_PREFIX + PM.REWARDS_CHOSEN], evals[0][EVAL_PREFIX + PM.REWARDS_REJECTED]
    assert chosen > 0.25 and rejected < -0.25, (chosen, rejected)
    assert evals[0][EVAL_PREFIX + PM.MARGIN] == pytest.approx(chosen - rejected, rel=1e-5)

    # The held-out rewards are the class means: recomputed from the saved model and the starting one (the reference).
    config = kto_config(tmp_path, "check", data=str(data), eval_data=str(held), ref_cache=False)
    tokenizer = models.load_tokenizer(models.TINY)
    train_set, held_set = load_unpaired_splits(
        tokenizer, str(data), eval_data=str(held), eval_fraction=0.0, seed=0, max_length=64, chat_template=True
    )
    kto.attach_reference(config, models.load_causal_lm(models.TINY), tokenizer, train_set, held_set)
    from rlhfkit.data.sft import collate_sft
    from rlhfkit.modeling.forward import sequence_logps

    # The precomputed reference log-probs (packed) are the starting model's, padded, of the examples and their KL pairs.
    start = models.load_causal_lm(models.TINY).eval()
    kl_pairs = [{"input_ids": e["kl_input_ids"], "labels": e["kl_labels"]} for e in held_set]
    with torch.no_grad():
        start_logps = sequence_logps(start, collate_sft(held_set, tokenizer.pad_token_id))[0].tolist()
        start_kl_logps = sequence_logps(start, collate_sft(kl_pairs, tokenizer.pad_token_id))[0].tolist()
    assert [e["ref_logps"] for e in held_set] == pytest.approx(start_logps, abs=1e-4)
    assert [e["ref_kl_logps"] for e in held_set] == pytest.approx(start_kl_logps, abs=1e-4)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logps, _ = sequence_logps(saved, collate_sft(held_set, tokenizer.pad_token_id))
    rewards = [0.1 * (lp - e["ref_logps"]) for lp, e in zip(logps.tolist(), held_set)]
    up = [r for r, e in zip(rewards, held_set) if e["label"]]
    down = [r for r, e in zip(rewards, held_set) if not e["label"]]
    assert (len(up), len(down)) == (6, 6)
    assert chosen == pytest.approx(sum(up) / 6, abs=1e-4)
    assert rejected == pytest.approx(sum(down) / 6, abs=1e-4)
    assert (out / "config.yaml").read_text().startswith("stage: kto\n")


def test_paired_data_trains_and_the_reference_cache_is_reused(tmp_path, monkeypatch, capsys):
    """``rlhfkit kto`` on DPO's seed-format pairs (converted); a rerun in the same output_dir reads the reference
    log-probs from the cache (computing them again fails the test) and trains the same."""
    data = write_jsonl(tmp_path / "prefs.jsonl", polite_rude_records())
    config = kto_config(tmp_path, "paired", data=str(data), max_steps=2, resume="never")
    kto.train(config)
    first_out = capsys.readouterr().out
    assert "16 train examples (8 desirable, 8 undesirable) from 8 records" in first_out
    assert "8 of the file's 8 records were preference records" in first_out
    assert "reference log-probs cached at" in first_out
    first = train_entries(config.output_dir)

    def no_recompute(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed despite a valid cache")

    monkeypatch.setattr(kto, "compute_ref_logps", no_recompute)
    kto.train(config)
    assert "reference log-probs loaded from cache" in capsys.readouterr().out
    again = train_entries(config.output_dir)
    assert [e["loss"] for e in again] == pytest.approx([e["loss"] for e in first], rel=1e-6)
    assert [e[kto.KL] for e in again] == pytest.approx([e[kto.KL] for e in first], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "n_up, n_down, weights, warned",
    [
        (4, 4, (1.0, 1.0), False),  # 1 x 4 / (1 x 4) = 1: in [1, 4/3]
        (2, 6, (1.0, 1.0), True),  # 2 / 6 = 0.33
        (2, 6, (3.5, 1.0), False),  # 3.5 x 2 / 6 = 1.17
        (6, 2, (1.0, 1.0), True),  # 6 / 2 = 3
        (6, 2, (1.0, 2.5), False),  # 6 / (2.5 x 2) = 1.2
        (3, 0, (1.0, 1.0), True),  # one class only
    ],
)
def test_class_weights_outside_the_papers_range_are_warned_about(n_up, n_down, weights, warned, capsys):
    config = KTOConfig(desirable_weight=weights[0], undesirable_weight=weights[1])
    kto.check_weights(config, [{"label": True}] * n_up + [{"label": False}] * n_down)
    assert ("kto:" in capsys.readouterr().out) == warned


def test_config_lists_kto_keys(capsys):
    assert cli.main(["config", "kto"]) == 0
    out = capsys.readouterr().out
    for key in (
        "beta: 0.1",
        "desirable_weight: 1.0",
        "undesirable_weight: 1.0",
        "loss_type: 'kto'",
        "data: ''",
        "ref_cache: True",
    ):
        assert key in out


@pytest.mark.slow
def test_kto_on_two_processes_equals_one_process(tmp_path):
    """Under a 2-process CPU launch each process holds half of each global batch; the reference point is the mean
    over the KL pairs of the whole global batch (summed across processes), so training equals one process with
    the joint batch. (Each process taking its own half's z0 changes the loss and fails this.)"""
    import yaml

    from rlhfkit.config import to_dict
    from tests.helpers import assert_same_weights, launch_two_cpu_processes, saved_weights

    data = write_jsonl(tmp_path / "kto.jsonl", thumbs_records())
    common = dict(data=str(data), max_steps=3, ref_cache=False, seed=5)
    two = kto_config(tmp_path, "two", batch_size=4, **common)
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(two)), encoding="utf-8")
    proc = launch_two_cpu_processes(["-m", "rlhfkit.cli", "kto", str(config_file)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = kto_config(tmp_path, "one", batch_size=8, **common)
    kto.train(one)
    two_log, one_log = train_entries(two.output_dir), train_entries(one.output_dir)
    assert [r["step"] for r in two_log] == [1, 2, 3]
    assert max(r[kto.KL] for r in one_log) > 0.01  # z0 is in play
    for key in ("loss", "grad_norm", kto.KL):
        assert [r[key] for r in two_log] == pytest.approx([r[key] for r in one_log], rel=1e-4, abs=1e-6), key
    # 5e-5: the two processes' all-reduce adds in another order (1.7e-5 apart on an avx512_bf16 CPU, 3 steps at lr 1e-3)
    assert_same_weights(saved_weights(two.output_dir), saved_weights(one.output_dir), atol=5e-5)
