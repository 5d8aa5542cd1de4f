"""Sampling in 2 worker processes against 1 process (``workers``, rlhfkit.generation.workers), on this machine.

    python benchmarks/sampling_workers.py [--stage sample|eval|both] [--repeats 2] [--prompts 128]

What is run. Each run is a fresh subprocess (the Makefile's environment, this machine's threads), alternating
``workers=1`` and ``workers=2``, ``--repeats`` pairs:

* ``sample``: :func:`rlhfkit.sample.run` as the demo's sample stage runs it (SmolLM2-135M-Instruct standing in
  for the SFT model, temperatures [0.7, 1.0, 0.7, 1.0], 64 new tokens, batches of 64 prompts) on the first
  ``--prompts`` training prompts;
* ``eval``: :func:`rlhfkit.evaluate.run` with the demo eval's settings scaled down (the model as baseline, and as
  policy a copy with every weight perturbed by Gaussian noise of 2% of that tensor's std, so its KL is measured, gold ``demo``, 2 samples per prompt on ``--prompts // 2`` prompts in chunks of 32, KL on the first,
  best-of-16 on ``--prompts // 8`` prompts; with workers the KL is measured there too).

Timed: the whole call, model loads included (each worker loads its own copy). Every ``workers=2`` output is
checked to equal the ``workers=1`` output (the samples file's bytes; eval.json). Printed: each run's seconds,
and the ratio 1-process / 2-process time per pair, median and range (above 1: the workers are faster).
Not a comparison with TRL, which has no multi-process CPU sampling: a design measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def perturbed_copy(out: Path) -> str:
    """SmolLM2 with every weight moved by N(0, (0.02 std)^2) (seeded): a policy whose KL to the model is not 0."""
    import torch

    from rlhfkit.modeling import models

    torch.manual_seed(0)
    model, tokenizer = models.load_causal_lm(models.SMOLLM2), models.load_tokenizer(models.SMOLLM2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.std())
    models.save_pretrained(model, tokenizer, out)
    return str(out)


def child(stage: str, workers: int, prompts: int, out: Path, policy: str) -> None:
    from rlhfkit import evaluate, sample
    from rlhfkit.modeling import models

    precision = models.default_precision()
    common = dict(max_new_tokens=64, precision=precision, workers=workers, progress=False, output=str(out))
    t0 = time.perf_counter()
    if stage == "sample":
        sample.run(
            sample.SampleConfig(
                model=models.SMOLLM2, temperatures=[0.7, 1.0, 0.7, 1.0], batch_size=64, max_prompts=prompts, **common
            )
        )
    else:
        evaluate.run(
            evaluate.EvalConfig(
                policy=policy,
                baseline=models.SMOLLM2,
                gold="demo",
                max_prompts=prompts // 2,
                samples_per_prompt=2,
                kl_samples_per_prompt=1,
                best_of_n=16,
                best_of_n_prompts=prompts // 8,
                batch_size=64,
                generation_precision=precision,
                **common,
            )
        )
    print(json.dumps({"seconds": time.perf_counter() - t0, "precision": precision}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["sample", "eval", "both"], default="both")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--child", nargs=4, metavar=("STAGE", "WORKERS", "OUT", "POLICY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        stage, workers, out, policy = args.child
        return child(stage, int(workers), args.prompts, Path(out), policy)
    import torch

    print(f"torch threads {torch.get_num_threads()}, cpu_count {os.cpu_count()}")
    for stage in ["sample", "eval"] if args.stage == "both" else [args.stage]:
        seconds: dict[int, list[float]] = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            policy = perturbed_copy(Path(tmp) / "policy") if stage == "eval" else "-"
            for r in range(args.repeats):
                outputs = {}
                for workers in (1, 2) if r % 2 == 0 else (2, 1):
                    out = Path(tmp) / f"{stage}_{r}_{workers}.json{'l' if stage == 'sample' else ''}"
                    cmd = [
                        sys.executable,
                        __file__,
                        "--prompts",
                        str(args.prompts),
                        "--child",
                        stage,
                        str(workers),
                        str(out),
                        policy,
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        sys.exit(f"{stage} workers={workers} failed:\n{done.stderr[-3000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    seconds[workers].append(result["seconds"])
                    outputs[workers] = out.read_bytes()
                    print(f"{stage} run {r} workers={workers}: {result['seconds']:.1f} s ({result['precision']})", flush=True)
                if outputs[1] != outputs[2]:
                    sys.exit(f"{stage}: workers=2 wrote other results than workers=1 (run {r})")
        ratios = [a / b for a, b in zip(seconds[1], seconds[2])]
        print(
            f"{stage}: 1 process {statistics.median(seconds[1]):.1f} s, 2 workers {statistics.median(seconds[2]):.1f} s "
            f"(medians of {args.repeats}); ratio {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}, {max(ratios):.3f}] (min, max over pairs); same outputs"
        )


if __name__ == "__main__":
    main()
