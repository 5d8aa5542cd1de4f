"""Dropping finished rows while decoding (``HFEngine.compact_every``) against keeping every row to the end, on this machine.

    python benchmarks/decode_compaction.py [--model smollm2-135m] [--every 8] [--rows 64] [--copies 1]
                                           [--batches 2] [--repeats 3] [--threads 1] [--precision auto]

What is run. One process, ``--threads`` torch threads (1: what each of the demo's two sampling workers has). The
model (``--model``: a spec or a model directory; the demo's SFT model, ``runs/demo/sft``, gives the demo's
response lengths) samples ``--rows`` completions, ``--copies`` of each of ``rows / copies`` prompts of the shipped
training set (the demo's sample stage: 2 copies, 128 rows, sharing their prompt's prefill), 64 new tokens at most,
temperature 0.7 then 1.0 (the sample stage's temperatures), ``--batches`` batches of each, with
:class:`rlhfkit.generation.rollout.HFGenerator` as ``rlhfkit sample`` and ``rlhfkit eval`` run it. Each repeat times
every batch under ``compact_every = 0`` (every row decoded until the last one ends, as plain ``generate`` does) and
under each value of ``--every``, in alternating order, seeded alike, after one untimed warm-up call.

Printed: per setting, the seconds of all batches per repeat; the ratio (time with 0) / (time with the setting) per
repeat, median and range (above 1: dropping rows is faster); the mean response length against the batch's longest
(the share of row-steps a kept-to-the-end batch spends on finished rows); and how many completions came out equal
to the ``compact_every = 0`` ones (the same random stream by construction; a difference can come only from the
matmuls' rounding on fewer rows). A design measurement: TRL's ``generate`` keeps every row, as ``compact_every = 0``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec or directory (default smollm2-135m)")
    p.add_argument("--every", default="8", help="comma-separated compact_every values to compare with 0 (default 8)")
    p.add_argument("--rows", type=int, default=64, help="prompts per batch (default 64, a sampling worker's batch)")
    p.add_argument("--copies", type=int, default=1, help="rows per prompt (default 1; the sample stage: 2)")
    p.add_argument("--batches", type=int, default=2, help="batches per temperature (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as each sampling worker)")
    p.add_argument("--precision", default="auto", help="fp32, bf16 or auto (the machine's default)")
    args = p.parse_args()

    import torch

    from rlhfkit.data.prompts import demo_data_path, load_prompts
    from rlhfkit.generation import rollout
    from rlhfkit.generation.rollout import GenerationOptions, HFGenerator
    from rlhfkit.modeling import models

    torch.set_num_threads(args.threads)
    precision = models.default_precision() if args.precision == "auto" else args.precision
    model = models.load_causal_lm(args.model).eval()
    tokenizer = models.load_tokenizer(args.model, padding_side="left")
    generator = HFGenerator(model, tokenizer, precision=precision)
    prompts = load_prompts(demo_data_path("prompts_train.jsonl"))
    n = args.rows // args.copies
    jobs = [
        ([q for q in prompts[(2 * b + t) * n : (2 * b + t + 1) * n] for _ in range(args.copies)], temperature)
        for b in range(args.batches)
        for t, temperature in enumerate((0.7, 1.0))
    ]
    settings = [0] + [int(v) for v in args.every.split(",")]

    def run(every: int) -> tuple[float, list[list[str]], list[torch.Tensor]]:
        generator.engine.compact_every = every
        texts, ids, start = [], [], time.perf_counter()
        for k, (batch, temperature) in enumerate(jobs):
            torch.manual_seed(k)
            query, mask = rollout.encode_prompts(tokenizer, batch)
            ids.append(generator.engine.generate(query, mask, GenerationOptions(max_new_tokens=64, temperature=temperature)))
            texts.append(tokenizer.batch_decode(ids[-1], skip_special_tokens=True))
        return time.perf_counter() - start, texts, ids

    print(
        f"model {args.model}, {precision}, {args.threads} thread(s), {len(jobs)} batches of {n} prompts x {args.copies}, "
        "64 tokens at most"
    )
    run(0)  # warm-up
    seconds: dict[int, list[float]] = {s: [] for s in settings}
    outputs: dict[int, list] = {}
    for r in range(args.repeats):
        for s in settings if r % 2 == 0 else settings[::-1]:
            t, texts, ids = run(s)
            seconds[s].append(t)
            outputs[s] = (texts, ids)
        print(f"repeat {r}: " + ", ".join(f"every {s}: {seconds[s][-1]:.1f} s" for s in settings), flush=True)
    eos = tokenizer.eos_token_id
    shares = []
    for ids in outputs[0][1]:
        lengths = (ids != eos).sum(-1).clamp(max=ids.shape[1] - 1) + 1  # tokens decoded per row, EOS included
        shares.append(float(lengths.float().mean() / ids.shape[1]))
    print(
        f"mean decoded length / batch's decode steps: {statistics.mean(shares):.3f} (per batch {[round(x, 3) for x in shares]})"
    )
    for s in settings[1:]:
        ratios = [a / b for a, b in zip(seconds[0], seconds[s])]
        same = sum(x == y for a, b in zip(outputs[0][0], outputs[s][0]) for x, y in zip(a, b))
        total = sum(len(a) for a in outputs[0][0])
        print(
            f"every {s}: ratio (every 0 / every {s}) median {statistics.median(ratios):.3f}, "
            f"range [{min(ratios):.3f}, {max(ratios):.3f}] over {len(ratios)} repeats; completions equal {same}/{total}"
        )


if __name__ == "__main__":
    main()
