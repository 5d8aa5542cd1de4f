"""Sampling throughput (evaluation and `rlhfkit sample`): rlhfkit's generator vs transformers' ``generate`` as TRL calls it.

    python benchmarks/generation.py [--batch-size 128] [--max-new-tokens 64] [--steps 4] [--warmup-steps 1]
                                    [--temperature 0.7] [--model smollm2-135m] [--trl-attention eager,sdpa] [--repeats 1]

What is run. Each side loads SmolLM2-135M-Instruct (one local directory, fp32
weights) and samples one completion for each of ``--batch-size`` (128, the
demo eval's batch) prompts of the shipped evaluation set
(``src/rlhfkit/assets/demo/prompts_eval.jsonl``, one user turn rendered with the
chat template, left padding), ``--steps`` times (4: 1 warm-up + 3 measured),
batch ``k`` being prompts ``[k B, (k + 1) B)`` of the set (wrapping round), the
same on every side. Temperature 0.7, top-p 1, no top-k, exactly
``--max-new-tokens`` (64) new tokens per completion (``min_new_tokens`` forced
into ``generate`` on every side, so EOS never ends a row early and every side
decodes the same number of tokens, asserted).

Sides (each a fresh subprocess, same environment; common.py):

* ``rlhfkit``: :class:`rlhfkit.generation.rollout.HFGenerator` with
  ``precision="bf16"``, what ``rlhfkit eval`` and ``rlhfkit sample`` run on CPU
  (prepacked bf16 weights, its lean decode step and KV cache, the inverse-CDF
  sampler; repeated prompts prefilled once, which this benchmark's distinct
  prompts do not use). Timed: the whole ``generate`` call, tokenisation to text.
* ``hf-eager`` / ``hf-sdpa``: ``model.generate(do_sample=True, ...)`` under
  ``torch.autocast("cpu", bfloat16)``, the model loaded with that attention
  kernel: what TRL's trainers do to sample (``unwrap_model_for_generation``,
  then ``generate`` under the accelerator's autocast). Timed the same way
  (tokenisation, ``generate``, decoding to text). The faster kernel is used for
  the ratio (``--trl-attention`` picks a subset).

Printed: each side's generated tokens/s over the measured calls, and beside it
what this machine allows at this batch size (``common.generation_bound``: the
memory-bandwidth bound of the decode steps, the compute bound, and the roofline
of the two), with the bandwidth and matmul peak measured before and after the
runs. The last line is ``ratio: R`` = rlhfkit tokens/s / the faster
transformers side's, the median over ``--repeats`` pairs (above 1: rlhfkit is
faster).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common

HF_BASE = "hf"


def load_batches(s: dict) -> list[list]:
    from rlhfkit.data.prompts import load_prompts

    prompts = load_prompts(s["prompts"])
    b = s["batch_size"]
    return [[prompts[(k * b + i) % len(prompts)] for i in range(b)] for k in range(s["steps"])]


def run_calls(s: dict, generate_batch) -> dict:
    """Time ``generate_batch(prompts)`` on every batch; the measured window's totals and the per-call generate records."""
    gens: list[dict] = []
    common.instrument_generate(gens, force_length=True)
    times, cpu_times = [], []
    texts = []
    for batch in load_batches(s):
        texts = generate_batch(batch)
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
    if len(gens) != s["steps"]:
        raise SystemExit(f"expected {s['steps']} generate calls, got {len(gens)}")
    w, n = s["warmup_steps"], s["steps"]
    call_seconds = common.step_durations(times)[w - 1 :]
    return {
        **common.measured(w, times, cpu_times),
        "call_seconds": call_seconds,
        "losses": [],
        "tokens": sum(g["generated_tokens"] for g in gens[w:]),
        # a measured call's generated tokens and seconds (their means), as common.print_generation_bounds reads them
        "gen_tokens": statistics.fmean(g["generated_tokens"] for g in gens[w:n]),
        "generation_s": statistics.fmean(call_seconds),
        "step_tokens": [g["generated_tokens"] for g in gens],
        "gen_prompt_tokens": statistics.fmean(g["prompt_tokens"] for g in gens[w:n]),
        "decode_steps": statistics.fmean(g["decode_steps"] for g in gens[w:n]),
        "gen_batch": gens[-1]["batch"],
        "gen_autocast": sorted({g["autocast"] for g in gens}),
        "sample_text": texts[0][:80] if texts else "",
    }


def worker_rlhfkit(s: dict) -> dict:
    from rlhfkit.generation.rollout import GenerationOptions, HFGenerator
    from rlhfkit.modeling import models

    model = models.load_causal_lm(s["model_dir"])
    tok = models.load_tokenizer(s["model_dir"], padding_side="left")
    generator = HFGenerator(model, tok, precision="bf16")
    # Lengths are forced (no row ends early, nothing to drop): one generate call per batch, as run_calls counts.
    generator.engine.compact_every = 0
    options = GenerationOptions(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0)
    out = run_calls(s, lambda batch: generator.generate(batch, options))
    out.update(
        params_n=common.matmul_params(model),
        decode_shape=common.decode_shape(model),
        attention=common.attention_of(model),
        version="rlhfkit HFGenerator(precision='bf16')",
    )
    return out


def worker_hf(s: dict, attn: str) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from rlhfkit.modeling import models

    tok = models.load_tokenizer(s["model_dir"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32, attn_implementation=attn)
    model.eval()

    def generate_batch(batch: list) -> list[str]:
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in batch]
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=s["temperature"],
                top_p=1.0,
                top_k=0,
                max_new_tokens=s["max_new_tokens"],
                pad_token_id=tok.pad_token_id,
            )
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    out = run_calls(s, generate_batch)
    out.update(
        params_n=common.matmul_params(model),
        decode_shape=common.decode_shape(model),
        attention=common.attention_of(model),
        version=f"transformers {transformers.__version__} generate(do_sample=True) under bf16 autocast",
    )
    return out


WORKERS = {**common.trl_workers(HF_BASE, worker_hf), "rlhfkit": worker_rlhfkit}


def main(argv=None) -> None:
    p = common.make_parser(__doc__, steps=4, warmup=1)
    p.add_argument("--batch-size", type=int, default=128, help="prompts per generate call (default 128, the demo eval's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per completion, forced (default 64)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7, the demo eval's)")
    args = common.parse_args(p, argv)
    sides = ["rlhfkit", *common.trl_sides(HF_BASE, args)]
    prompts = common.demo_path("prompts_eval.jsonl")
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-gen-") as tmp_name:
        settings = common.start(
            args,
            f"prompts: {prompts}; {args.batch_size} prompts per call, exactly {args.max_new_tokens} new tokens, "
            f"temperature {args.temperature}, {args.steps} calls (first {args.warmup_steps} excluded), {args.threads} threads",
            prompts=str(prompts),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
        results = common.run_sides(
            __file__,
            sides,
            settings,
            Path(tmp_name),
            args,
            width=max(len(x) for x in sides),
            rates=lambda r: f"{r['tokens'] / r['seconds']:7.1f} generated tok/s",
        )
        peak = common.final_peak(settings, args)
        bandwidth = max(settings["bandwidth_gbs"], common.measure_bandwidth(args.threads, "after the runs"))

    def rate(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    print()
    common.print_generation_bounds(
        results,
        sides,
        rate,
        peak=peak,
        bandwidth=bandwidth,
        seconds_header="s/call",
        extra={
            "cpu": lambda r: f"{common.cpu_use(r, args.threads):.0%}",
            "attention": lambda r: r["attention"],
            "autocast": lambda r: "/".join(r["gen_autocast"]),
            "peak RSS MB": lambda r: f"{r['peak_rss_mb']:.0f}",
        },
    )
    for side in sides:
        print(f"  {side}: {results[side][0]['version']}; first completion: {results[side][0]['sample_text']!r}")
    budget = args.batch_size * args.max_new_tokens
    common.check_equal_work(
        results,
        "rlhfkit",
        warmup=args.warmup_steps,
        rtol=args.loss_rtol,
        compare_loss=False,
        what="generated tokens (forced to max_new_tokens)",
        expected_tokens=[budget] * args.steps,
        loss_note=": sampling has no loss",
    )
    print()
    hf = common.fastest_trl(results, HF_BASE, rate, unit="tok/s", show=lambda x: f"{x:.0f}")
    ratio = common.report_ratio(
        f"rlhfkit HFGenerator / transformers generate ({common.trl_attention(hf)} attention) generated tokens per second",
        common.pair_ratios(results, "rlhfkit", hf, rate),
    )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    common.run_script(WORKERS, main)
