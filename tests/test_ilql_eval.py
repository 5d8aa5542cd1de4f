"""ILQL outputs under ``rlhfkit eval``: the policy that samples is ILQL's perturbed one (the same tokens as
``ILQLGenerator`` for the same seed), ``ilql_beta=0`` is plain decoding of the behaviour-cloned LM, and the KL is
that of the policy that sampled, whose per-token log-probs are checked against a slow step-by-step loop.

The ILQL directory is the tiny model with random heads (no training needed: what is tested is which policy
decodes, not what ILQL learns; ``test_ilql.py`` tests the learning).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from rlhfkit import evaluate, ilql
from rlhfkit.data.prompts import demo_data_path, load_prompts
from rlhfkit.generation.ilql_decode import ILQLDecodeOptions, ILQLGenerator, ilql_generate_ids, ilql_response_logps
from rlhfkit.generation.rollout import encode_prompts
from rlhfkit.modeling import models
from rlhfkit.modeling.ilql_heads import HEADS_FILE, ILQLHeads


def random_heads(lm, seed: int = 0) -> ILQLHeads:
    """Heads on ``lm`` with target heads apart from the Q heads, and Q values large enough to move the sampling."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ILQLHeads(lm.config.hidden_size, lm.config.vocab_size, two_qs=True)
        with torch.no_grad():
            for p in heads.target_q_heads.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return heads.eval()


@pytest.fixture(scope="module")
def ilql_dir(tmp_path_factory):
    """An ``rlhfkit ilql``-shaped output directory: the tiny model (so its LM is the baseline's) and random heads."""
    out = tmp_path_factory.mktemp("ilql_eval") / "ilql"
    lm, tok = models.load_causal_lm(models.TINY), models.load_tokenizer(models.TINY)
    ilql.save_ilql(ilql.ILQLModel(lm, random_heads(lm)), tok, out)
    return out


def _config(tmp_path, policy, **kw) -> evaluate.EvalConfig:
    base = dict(
        policy=str(policy),
        baseline=models.TINY,
        gold="length",
        max_prompts=4,
        max_new_tokens=6,
        batch_size=8,
        best_of_n=0,
        samples_per_prompt=1,
        temperature=0.7,
        seed=2,
        ilql_beta=4.0,
        ilql_top_k=10,
        precision="fp32",
        generation_precision="fp32",
        bootstrap=20,
        resamples=200,
        progress=False,
        output=str(tmp_path / "eval.json"),
    )
    base.update(kw)
    return evaluate.EvalConfig(**base)


def test_eval_samples_an_ilql_dir_as_ilql_generator_does(tmp_path, ilql_dir):
    results = evaluate.run(_config(tmp_path, ilql_dir))
    entry = results["players"]["ilql"]
    assert entry["decoding"] == {"method": "ilql", "beta": 4.0, "top_k": 10} == results["decoding"]
    assert results["players"]["tiny"]["decoding"] == {"method": "plain"}
    # eval seeds its first policy's first chunk of prompts with seed * 1_000_003 + 1 (one chunk here: 4 prompts)
    prompts = load_prompts(demo_data_path("prompts_eval.jsonl"))[:4]
    options = ILQLDecodeOptions(beta=4.0, top_k=10, temperature=0.7, max_new_tokens=6)
    expected = ILQLGenerator.from_dir(ilql_dir).generate(prompts, options, seed=2 * 1_000_003 + 1)
    assert [s["policy"] for s in results["samples"]] == [text.strip() for text in expected]
    # the perturbed policy is not the reference (the tiny model itself): its KL to it is positive
    assert entry["kl"] > 0.01


def test_ilql_beta_zero_is_plain_decoding_of_the_lm(tmp_path, ilql_dir):
    """At ilql_beta=0 the heads play no part: the same responses, KL and decoding record as the same LM saved
    without heads; and those responses differ from ILQL decoding's at beta 4 (the heads do move the sampling)."""
    plain_dir = tmp_path / "plain" / "ilql"  # the same player name, so the same seeds
    shutil.copytree(ilql_dir, plain_dir)
    (plain_dir / HEADS_FILE).unlink()
    zero = evaluate.run(_config(tmp_path / "zero", ilql_dir, ilql_beta=0.0))
    plain = evaluate.run(_config(tmp_path / "plain", plain_dir))
    assert zero["players"]["ilql"]["decoding"] == plain["players"]["ilql"]["decoding"] == {"method": "plain"}
    assert [s["policy"] for s in zero["samples"]] == [s["policy"] for s in plain["samples"]]
    assert zero["kl"] == plain["kl"] == 0.0  # the LM is the tiny baseline itself
    perturbed = evaluate.run(_config(tmp_path / "four", ilql_dir))
    assert [s["policy"] for s in perturbed["samples"]] != [s["policy"] for s in zero["samples"]]


def test_eval_refuses_top_p_with_ilql_decoding(tmp_path, ilql_dir):
    with pytest.raises(ValueError, match="top_p=0.9 with an ILQL policy"):
        evaluate.run(_config(tmp_path, ilql_dir, top_p=0.9))


def test_ilql_response_logps_match_a_slow_step_by_step_loop(tokenizer):
    """The log-prob of each sampled token under top_k(log_softmax(lm) + beta (min target Q - V)) / T, recomputed
    one row and one step at a time, without padding or a cache, the top k found by sorting."""
    lm = models.load_causal_lm(models.TINY).eval()
    heads = random_heads(lm, seed=1)
    beta, top_k, temperature = 3.0, 7, 0.8
    prompts = ["Say a word:", "Tell me something longer than that, please:", "Hi"]
    query_ids, query_mask = encode_prompts(tokenizer, prompts, chat_template=False)
    options = ILQLDecodeOptions(beta=beta, top_k=top_k, temperature=temperature, max_new_tokens=5)
    response = ilql_generate_ids(
        lm,
        heads,
        query_ids,
        query_mask,
        options,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    input_ids = torch.cat([query_ids, response], dim=1)
    attention_mask = torch.cat([query_mask.long(), torch.ones_like(response)], dim=1)
    fast = ilql_response_logps(lm, heads, input_ids, attention_mask, response, beta=beta, top_k=top_k, temperature=temperature)
    assert fast.shape == response.shape
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    for row in range(len(prompts)):
        prefix = query_ids[row][query_mask[row].bool()].tolist()
        for t, token in enumerate(response[row].tolist()):
            with torch.no_grad():
                state = decoder(input_ids=torch.tensor([prefix])).last_hidden_state[0, -1]
                logps = torch.log_softmax(head(state), -1)
                q = torch.stack([h(state) for h in heads.target_q_heads]).min(0).values
                v = heads.v_head(state)[0]
            scores = logps + beta * (q - v)
            kth = scores.sort(descending=True).values[top_k - 1]
            scores = torch.where(scores >= kth, scores, torch.tensor(float("-inf")))
            expected = torch.log_softmax(scores / temperature, -1)[token]
            assert torch.isfinite(expected)  # the sampled token was in the top k
            assert fast[row, t].item() == pytest.approx(expected.item(), abs=1e-4), (row, t)
            if token == tokenizer.eos_token_id:
                break
            prefix.append(token)
