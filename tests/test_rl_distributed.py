"""Online RL on two data-parallel CPU processes (gloo), and the ActorCritic's FSDP wrapping.

The two-process runs go through ``accelerate launch --multi_gpu --num_processes 2`` with
``ACCELERATE_USE_CPU=true``, as in ``tests/test_distributed.py`` (which says why not ``--cpu``).
A small driver runs ``rlhfkit.cli`` in each process and records, per rank, what every
``RLTrainer.step`` returned (its metrics, beta afterwards, the rollout's rows) and the final weights.

What two processes can match:

* **PPO with greedy decoding equals one process with the joint batch.** Each rank takes its slice of
  the step's prompts (``training.loop.shard_indices``); greedy responses do not depend on which
  process decodes them, and the losses are normalised by the global token counts. So the logged
  metrics, beta and the final weights agree with one process, within float rounding. The run keeps
  to what is per row or global: ``whiten_advantages`` and ``score_norm`` whiten over each process's
  own rows, and with ``num_minibatches > 1`` each process shuffles its own rows into minibatches, so
  those settings give two processes other updates than one (by design; TRL's PPO whitens per process too).
* **Sampled GRPO cannot equal one process.** The sampler draws from torch's global RNG, seeded alike
  on every rank (``start_accelerator``): two ranks' draws for their halves of the batch are not one
  process's draws for the whole, so the responses differ. What holds instead: every rank logs, and
  adapts beta from, the same numbers, and those are the means over both ranks' rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import load_file

from rlhfkit import rl
from rlhfkit.config import to_dict
from rlhfkit.modeling import models
from rlhfkit.modeling.policy import ActorCritic, load_critic
from rlhfkit.run_layout import RLMetric as M
from tests.helpers import assert_same_weights, launch_two_cpu_processes, read_jsonl

REWARDS = '''
def prompt_and_response(prompts, responses, **kwargs):
    """Characters of the response plus the prompt's length mod 5: greedy responses of the random tiny
    model are all whitespace (0 characters), so the prompt term gives the rows different scores."""
    return [float(len(r) + len(str(p)) % 5) for p, r in zip(prompts, responses)]


def checksum(prompts, responses, **kwargs):
    """A score for each response text that favours no length (the same in every process, unlike hash())."""
    import zlib

    return [float(zlib.crc32(r.encode()) % 7) for r in responses]
'''

DRIVER = '''
"""rlhfkit.cli in this process, recording what every RL step returned (RECORD_DIR/rank<r>.jsonl) and the final
weights (RECORD_DIR/weights<r>.pt). Usage: driver.py RECORD_DIR CLI_ARGS..."""
import json
import sys
from pathlib import Path

import torch

from rlhfkit import cli, rl

record_dir = Path(sys.argv[1])
step = rl.RLTrainer.step


def recording_step(self):
    scored, metrics = step(self)
    rank, rollout = self.acc.process_index, scored.rollout
    record = {
        "step": self.step_count,
        "metrics": metrics,
        "beta": self.kl_ctl.value,
        "scores": scored.scores.tolist(),
        "lengths": rollout.lengths.tolist(),
        "has_eos": rollout.has_eos.tolist(),
    }
    with (record_dir / f"rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\\n")
    if self.step_count == self.total_steps:
        torch.save(self.acc.unwrap_model(self.model).state_dict(), record_dir / f"weights{rank}.pt")
    return scored, metrics


rl.RLTrainer.step = recording_step
sys.exit(cli.main(sys.argv[2:]))
'''

# What depends on the clock, not on the run.
TIMINGS = {"time", "time_generate", "time_score_forward", "time_update", "time_step", "gen_tokens_per_s", "train_tokens_per_s"}


def rl_config(out: Path, config_class=rl.RLConfig, **fields) -> rl.RLConfig:
    defaults = dict(
        policy=models.TINY,
        reward_model="rl_dist_rewards:prompt_and_response",
        output_dir=str(out),
        precision="fp32",
        max_new_tokens=6,
        lr=1e-3,
        progress=False,
        tensorboard=False,
        log_samples=0,
        seed=1,
    )
    return config_class(**{**defaults, **fields})


def launch_two_processes(stage: str, config: rl.RLConfig, workdir: Path) -> list[list[dict]]:
    """Run ``rlhfkit STAGE`` on two gloo processes; returns each rank's step records."""
    config_file = workdir / f"{stage}.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)), encoding="utf-8")
    record_dir = Path(config.output_dir).with_name(Path(config.output_dir).name + "-records")
    record_dir.mkdir()
    driver = workdir / "rl_dist_driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    proc = launch_two_cpu_processes([str(driver), str(record_dir), stage, str(config_file)], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [read_jsonl(record_dir / f"rank{r}.jsonl") for r in range(2)]
    weights = [torch.load(record_dir / f"weights{r}.pt") for r in range(2)]
    assert_same_weights(weights[0], weights[1], atol=0.0)  # DDP: the ranks step alike
    return ranks


def assert_ranks_agree(ranks: list[list[dict]]) -> None:
    """Both ranks logged the same metrics (bar timings) and hold the same beta after every step."""
    for a, b in zip(*ranks, strict=True):
        assert a["step"] == b["step"]
        assert a["beta"] == b["beta"], f"step {a['step']}: beta {a['beta']} on rank 0, {b['beta']} on rank 1"
        differ = {
            k: (a["metrics"][k], b["metrics"].get(k))
            for k in a["metrics"].keys() - TIMINGS
            if a["metrics"][k] != b["metrics"].get(k)
        }
        assert not differ, f"step {a['step']}: the ranks logged {differ}"


def assert_beta_follows_the_global_kl(records: list[dict], config: rl.RLConfig, rows_per_step: int) -> bool:
    """beta after each step is the controller's update from the logged (global) KL over ``rows_per_step`` rows.
    Returns whether some step's error was inside the clip, where a different KL would give a different beta."""
    beta, unclipped = config.beta, False
    for r in records:
        error = r["metrics"][M.KL] / config.target_kl - 1.0
        unclipped |= abs(error) < 0.2
        beta *= 1.0 + min(max(error, -0.2), 0.2) * rows_per_step / config.kl_horizon
        assert r["beta"] == pytest.approx(beta, rel=1e-12), f"step {r['step']}"
    return unclipped


def eos_prone_policy(out: Path) -> Path:
    """The tiny model, saved to ``out`` with EOS likely (p ~ 0.2-0.3 a token; the random model's is ~1/49k), so
    sampled responses end at different lengths: its output-embedding row (untied from the input one) is set along
    the mean final hidden state of random tokens after chat prompts."""
    model, tokenizer = models.build_tiny(), models.load_tokenizer(models.TINY)
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.data = model.get_output_embeddings().weight.detach().clone()
    model.lm_head = head
    generator, states = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for question in ("How do I take better photos?", "Write a haiku about summer.", "What is a hybrid car?"):
            chat = [{"role": "user", "content": question}]
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = torch.cat([ids["input_ids"], torch.randint(0, model.config.vocab_size, (1, 6), generator=generator)], 1)
            states.append(model.model(input_ids=ids).last_hidden_state[0, -6:])
        mean = torch.cat(states).mean(0)
        head.weight[tokenizer.eos_token_id] = 2.5 * mean / mean.norm()
    models.save_pretrained(model, tokenizer, out)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "rl_dist_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_ppo_on_two_processes_equals_one_with_the_joint_batch(workdir):
    steps = 4
    common = dict(
        algorithm="ppo",
        value="head",
        temperature=0.0,  # greedy: the responses do not depend on the process or the RNG
        max_steps=steps,
        ppo_epochs=2,  # the second epoch's ratios are off 1, so the clipping is exercised too
        num_minibatches=1,
        whiten_advantages=False,
        adaptive_kl=True,
        target_kl=4.2,  # near the KL of steps 3 and 4 (3.5 and 4.8): the controller's error is not clipped there
        kl_horizon=100,
    )
    one = rl_config(workdir / "one", batch_size=4, **common)
    two = rl_config(workdir / "two", batch_size=2, **common)
    ranks = launch_two_processes("ppo", two, workdir)
    rl.train(one)

    assert_ranks_agree(ranks)
    one_log, two_log = read_jsonl(workdir / "one" / "metrics.jsonl"), read_jsonl(workdir / "two" / "metrics.jsonl")
    assert [e["step"] for e in two_log] == list(range(1, steps + 1))
    for a, b in zip(one_log, two_log, strict=True):
        assert a.keys() == b.keys()
        for k in a.keys() - TIMINGS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (
                f"step {a['step']}: {k} {b[k]} on two processes, {a[k]} on one"
            )
    # beta (logged above as the value each step used) ends where one process's does: the controller was fed
    # the KL of all 4 rows of every step, not of a rank's 2.
    final_beta = json.loads((workdir / "one" / "rl_state.json").read_text())["beta"]
    assert ranks[1][-1]["beta"] == pytest.approx(final_beta, rel=1e-6)
    assert assert_beta_follows_the_global_kl(ranks[1], two, rows_per_step=4), "every step's beta error was clipped"
    assert_same_weights(
        load_file(str(workdir / "two" / "model.safetensors")), load_file(str(workdir / "one" / "model.safetensors")), atol=1e-5
    )
    head_one, head_two = (load_file(str(workdir / d / "value_head.safetensors")) for d in ("one", "two"))
    assert_same_weights(head_two, head_one, atol=1e-5)


@pytest.mark.slow
def test_sampled_grpo_on_two_processes_logs_and_adapts_beta_from_the_whole_batch(workdir):
    config = rl_config(
        workdir / "grpo",
        config_class=rl.GRPOConfig,
        policy=str(eos_prone_policy(workdir / "policy")),
        reward_model="rl_dist_rewards:checksum",  # no push towards or away from EOS: lengths keep varying
        lr=1e-5,  # Adam moves every weight ~lr a step: 1e-3 (5% of the tiny model's) undid the EOS row at once
        batch_size=2,
        samples_per_prompt=2,
        temperature=1.0,
        max_steps=3,
        adaptive_kl=True,  # grpo's fast path: the KL is measured in the update
        target_kl=0.045,  # near the KL of step 3 (0.047): the controller's error is not clipped there
        kl_horizon=100,
    )
    ranks = launch_two_processes("grpo", config, workdir)
    assert_ranks_agree(ranks)
    # The rollout metrics are means over both ranks' rows: recomputed here from each rank's own rows.
    for r0, r1 in zip(*ranks, strict=True):
        rows = {k: r0[k] + r1[k] for k in ("scores", "lengths", "has_eos")}
        n = len(rows["scores"])
        assert n == 2 * config.batch_size * config.samples_per_prompt
        expected = {
            M.SCORE: sum(rows["scores"]) / n,
            M.RESPONSE_LENGTH: sum(rows["lengths"]) / n,
            M.EOS_RATE: sum(rows["has_eos"]) / n,
        }
        for k, v in expected.items():
            assert r0["metrics"][k] == pytest.approx(v, rel=1e-6), f"step {r0['step']}: {k}"
    # The checks can fail: a rank's own rows give other means than the whole batch's (the KL measured in
    # grpo's update is per token, times the mean response length: that must be the whole batch's too).
    for key in ("scores", "lengths"):
        own = [sum(r[key]) / len(r[key]) for r in ranks[0]]
        every = [sum(r0[key] + r1[key]) / len(r0[key] + r1[key]) for r0, r1 in zip(*ranks)]
        assert own != pytest.approx(every, rel=1e-6), f"rank 0's {key} have the batch's means {every}"
    assert assert_beta_follows_the_global_kl(ranks[1], config, rows_per_step=8), "every step's beta error was clipped"
    logged = read_jsonl(workdir / "grpo" / "metrics.jsonl")
    assert [e[M.KL] for e in logged] == [r["metrics"][M.KL] for r in ranks[0]]
    state = json.loads((workdir / "grpo" / "rl_state.json").read_text())
    assert state["beta"] == ranks[1][-1]["beta"]


# ----------------------------------------------------------------------------- FSDP wrapping (review D5)


def test_actor_critic_names_the_policys_decoder_layers_for_fsdp_auto_wrap():
    policy = models.build_tiny()
    model = ActorCritic(policy, value="head")
    assert model._no_split_modules == set(policy._no_split_modules) == {"LlamaDecoderLayer"}
    critic = load_critic(models.TINY, vocab_size=policy.config.vocab_size)
    with_critic = ActorCritic(policy, value="critic", critic=critic)
    assert with_critic._no_split_modules == set(policy._no_split_modules) | set(critic._no_split_modules)

    # accelerate's transformer auto-wrap (what `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` does in `prepare`)
    # reads the attribute off the model it prepares: each decoder layer becomes its own FSDP unit.
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    wraps = [
        name
        for name, module in model.named_modules()
        if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)
    ]
    assert wraps == [f"policy.model.layers.{i}" for i in range(policy.config.num_hidden_layers)]
