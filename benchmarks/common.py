"""Shared plumbing of the rlhfkit-vs-TRL benchmarks (sft.py, dpo.py, reward.py, online_rl.py).

Each benchmark script is both a driver and a worker:

* the driver (``python benchmarks/X.py [flags]``) resolves the model, writes the
  data, then runs every *side* (a library + settings) in a fresh subprocess via
  :func:`spawn`, always with the same environment (:data:`BENCH_ENV`: the
  Makefile's glibc malloc settings, offline hub, same torch/OpenMP thread count);
* the worker (``X.py --worker SIDE --settings FILE --result FILE``, started by
  :func:`spawn` only) reads the JSON settings, runs one side, and writes a JSON
  result; :func:`worker_main` adds the thread count, environment and peak RSS.

Timing conventions: a step ends when the library says so — TRL:
``TrainerCallback.on_step_end`` (:func:`trl_step_timer`); rlhfkit: the moment
its loop writes the step to ``metrics.jsonl`` (:func:`stamp_rlhfkit_steps`).
The first ``warmup`` steps are excluded: the measured window runs from the end
of step ``warmup`` to the end of the last step (:func:`window`, :func:`measured`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Worker-side helpers live in sides.py; re-exported so scripts use common.X throughout.
from sides import (  # noqa: F401
    SEED,
    TRL_ATTENTIONS,
    attention_of,
    check_no_checkpointing,
    dtype_name,
    instrument_generate,
    matmul_params,
    measured,
    no_checkpointing_kwargs,
    peak_rss_mb,
    rlhfkit_steps,
    rlhfkit_train_kwargs,
    rlhfkit_training_settings,
    stamp_rlhfkit_steps,
    step_durations,
    timed,
    trl_attention,
    trl_losses,
    trl_optimizer_name,
    trl_step_timer,
    trl_token_trainer,
    trl_train_kwargs,
    trl_training_settings,
    value_str,
    window,
)

# Same process environment for every side (see the Makefile): keep freed memory
# around instead of returning it to the OS every step; never touch the network.
BENCH_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
    "THP_MEM_ALLOC_ENABLE": "1",  # torch CPU allocations of >= 2 MB on transparent huge pages
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
}


LOSS_STEP = 2
"""The step whose training loss every side must agree on (:func:`check_equal_work`)."""

LOSS_RTOL = 0.02
"""Default relative tolerance of that comparison (``--loss-rtol``; dpo.py: 5%); see :func:`check_equal_work` for why."""

PROBE_N = 2048
PROBE_SECONDS = 1.5


# ---------------------------------------------------------------- model and data (driver)


def _convert_gguf_fallback() -> Path:
    """Dequantise SmolLM2's GGUF into a benchmark-private cache dir.

    Only used when ``rlhfkit.modeling.models.resolve`` itself fails (transformers 5.x keeps
    an ``hf_quantizer`` on GGUF-loaded models, which ``save_pretrained`` refuses).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.modeling import models

    gguf = models.smollm2_gguf_path()
    stat = gguf.stat()
    out = models.cache_dir() / "benchmarks" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert.", dir=out.parent))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are dequantised fp32 tensors already
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, out)


def _publish(tmp: Path, out: Path) -> Path:
    """Move a finished model directory ``tmp`` to ``out`` (another process may have published it first)."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    return out


def _tiny_model_dir() -> Path:
    """rlhfkit's ``tiny`` test model (random 2-layer Llama, SmolLM2 tokenizer) saved as a model directory.

    ``models.resolve("tiny")`` gives a tokenizer-only directory (rlhfkit builds the
    weights in memory), which TRL cannot load; this writes both into
    ``$RLHFKIT_CACHE/benchmarks/tiny-model`` once. For smoke runs of the scripts only.
    """
    from rlhfkit.modeling import models

    out = models.cache_dir() / "benchmarks" / "tiny-model"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.", dir=out.parent))
    models.build_tiny().save_pretrained(tmp)
    models.load_tokenizer(models.TINY).save_pretrained(tmp)
    return _publish(tmp, out)


def model_dir(spec: str) -> tuple[Path, str]:
    """``(transformers model directory, note)`` for an rlhfkit model spec; both sides load this directory."""
    from rlhfkit.modeling import models

    if spec == models.TINY:
        return _tiny_model_dir(), "tiny: a random 2-layer Llama (hidden 64) for smoke runs; its timings mean nothing"
    try:
        return models.resolve(spec), ""
    except Exception as e:  # noqa: BLE001 - reported, then worked around for the known spec only
        if spec != models.SMOLLM2:
            raise
        note = f"rlhfkit.modeling.models.resolve({spec!r}) failed ({type(e).__name__}: {str(e)[:120]}); used the benchmark's own GGUF conversion"
        return _convert_gguf_fallback(), note


def resolve_model(spec: str) -> Path:
    """:func:`model_dir`, printing where the spec resolved to (and why, where the fallback was used)."""
    path, note = model_dir(spec)
    print(f"model: {spec} -> {path}")
    if note:
        print(f"note: {note}")
    return path


def demo_path(name: str) -> Path:
    from rlhfkit.data.prompts import demo_data_path

    return Path(demo_data_path(name))


_CURT = [
    "Look it up yourself.",
    "Not my problem, figure it out.",
    "Whatever. Google it.",
    "That's a dumb question.",
    "No idea, stop asking.",
    "Ugh, this is obvious.",
]


def write_preference_file(path: Path, n_pairs: int = 128, seed: int = SEED) -> str:
    """Write ``n_pairs`` preference pairs built from the shipped SFT demo set, TRL conversational format.

    Each record is ``{"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}``
    (rlhfkit reads the same file: its "TRL pairs" format). Chosen is the demo
    completion; rejected is a deliberately worse reply: for even records a curt,
    rude rewrite (a rude brush-off plus the completion's first few words), for odd
    records the completion of a different prompt (off-topic). Deterministic.
    Returns a description.
    """
    rows = [json.loads(line) for line in demo_path("sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)]
    if len(rows) < 2:
        raise SystemExit("the shipped sft.jsonl demo set has too few prompt/completion records")
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), min(n_pairs, len(rows)))
    with path.open("w", encoding="utf-8") as f:
        for k, i in enumerate(picked):
            prompt, chosen = rows[i]["prompt"], rows[i]["completion"]
            if k % 2 == 0:
                words = chosen.split()
                rejected = f"{rng.choice(_CURT)} {' '.join(words[: rng.randint(4, 9)])}..."
            else:
                j = rng.choice([x for x in range(len(rows)) if rows[x]["completion"] != chosen])
                rejected = rows[j]["completion"]
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
                + "\n"
            )
    return f"{len(picked)} pairs from {demo_path('sft.jsonl').name} (chosen = demo completion; rejected = curt/rude rewrite or another prompt's completion)"


def load_pair_examples(s: dict, tokenizer, *, keep_ties: bool):
    """rlhfkit's view of a preference file: (raw JSON records, indices of the kept records, tokenized pairs).

    Tokenises one comparison at a time with rlhfkit's own ``tokenize_pairs`` so it
    is known which records survive (with ``eval_fraction=0`` rlhfkit trains on
    exactly these pairs, in this order). Every record here is a single pair.
    """
    from rlhfkit.data.pairwise import tokenize_pairs
    from rlhfkit.data.preferences import load_comparisons

    raw = [json.loads(line) for line in Path(s["data"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    kept, examples = [], []
    for i, comp in enumerate(load_comparisons(s["data"])):
        ex, _ = tokenize_pairs(tokenizer, [comp], max_length=s["max_length"], chat_template=True, keep_ties=keep_ties)
        if len(ex) > 1:
            raise SystemExit(f"record {i} expands to {len(ex)} pairs; the benchmark expects one pair per record")
        if ex:
            kept.append(i)
            examples.append(ex[0])
    return raw, kept, examples


def pair_tokens(example: dict) -> int:
    """Non-padding tokens of one tokenized pair (chosen row + rejected row)."""
    return len(example["chosen_input_ids"]) + len(example["rejected_input_ids"])


# ---------------------------------------------------------------- batch layout


def steps_per_epoch(n: int, batch_size: int) -> int:
    """rlhfkit's loop drops the last partial batch of each epoch (one process)."""
    return n // batch_size


def step_indices(n: int, steps: int, batch_size: int, seed: int = SEED) -> list[list[int]]:
    """Example indices of each optimizer step exactly as rlhfkit.training.loop.fit (and rlhfkit.rl prompts_for_step) draw them.

    ``batch_size`` is examples per optimizer step: with one process the loop's
    ``grad_accum`` micro-batches of a step are consecutive slices of the epoch
    order, so ``batch_size x grad_accum`` gives the same indices.
    """
    from rlhfkit.training.loop import epoch_order, shard_indices

    spe = steps_per_epoch(n, batch_size)
    if spe == 0:
        raise SystemExit(f"{n} examples are fewer than one batch of {batch_size}")
    out = []
    for step in range(steps):
        epoch, within = divmod(step, spe)
        out.append(shard_indices(epoch_order(n, seed, epoch), within, batch_size, 1, 0))
    return out


def epoch_layout(n: int, steps: int, batch_size: int, seed: int = SEED) -> list[int]:
    """Indices of whole epochs in rlhfkit's order (each cut to full batches), enough epochs for ``steps``.

    A TRL dataset laid out in this order and read with a sequential sampler gives
    step ``k`` exactly the examples rlhfkit's step ``k`` trains; unlike laying out
    only the trained rows, every example of the data set is in it once per epoch
    (so a reference-log-prob precompute covers the same examples as rlhfkit's).
    """
    from rlhfkit.training.loop import epoch_order

    spe = steps_per_epoch(n, batch_size)
    epochs = -(-steps // spe)
    out: list[int] = []
    for e in range(epochs):
        out += epoch_order(n, seed, e)[: spe * batch_size]
    return out


# ---------------------------------------------------------------- worker launching


def worker_main(workers: dict[str, Callable[[dict], dict]]) -> None:
    """Entry point of a worker process: ``--worker SIDE --settings FILE --result FILE``."""
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=sorted(workers))
    p.add_argument("--settings", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args()
    settings = json.loads(Path(args.settings).read_text())
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(SEED)
    result = workers[args.worker](settings)
    result["side"] = args.worker
    result["threads"] = torch.get_num_threads()
    result["env"] = {k: os.environ.get(k) for k in (*BENCH_ENV, "OMP_NUM_THREADS")}
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.result).write_text(json.dumps(result))


def spawn(script: str, side: str, settings: dict, tmp: Path, tag: str, *, verbose: bool = False) -> dict:
    """Run one side in a fresh subprocess with :data:`BENCH_ENV`; return its result dict (plus ``wall``)."""
    run_dir = tmp / f"{side}-{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "out_dir": str(run_dir / "out"), "run_dir": str(run_dir)}
    settings_file = run_dir / "settings.json"
    settings_file.write_text(json.dumps(settings))
    result = run_dir / "result.json"
    log = run_dir / "worker.log"
    cmd = [sys.executable, os.path.abspath(script), "--worker", side, "--settings", str(settings_file), "--result", str(result)]
    env = {**os.environ, **BENCH_ENV, "OMP_NUM_THREADS": str(settings["threads"])}
    t0 = time.perf_counter()
    with log.open("w") as f:
        out = None if verbose else f
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if not verbose else None)
    if proc.returncode != 0 or not result.is_file():
        if not verbose and log.exists():
            sys.stdout.write(log.read_text()[-20000:])
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}); log above")
    out_dict = json.loads(result.read_text())
    out_dict["wall"] = time.perf_counter() - t0
    return out_dict


def is_worker_invocation(argv: list[str] | None = None) -> bool:
    return "--worker" in (sys.argv if argv is None else argv)


def run_script(workers: dict[str, Callable[[dict], dict]], main: Callable[[], None]) -> None:
    """A benchmark script's ``__main__``: a worker when :func:`spawn` started it, else the driver ``main``."""
    if is_worker_invocation():
        worker_main(workers)
    else:
        main()


def make_parser(doc: str, *, steps: int, warmup: int, loss_rtol: float | None = None) -> argparse.ArgumentParser:
    """A driver's argument parser: ``doc``'s first paragraph as description, the rest as epilog, :func:`add_common_args` added."""
    first, _, rest = doc.partition("\n\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=steps, warmup=warmup, loss_rtol=LOSS_RTOL if loss_rtol is None else loss_rtol)
    return p


def add_common_args(p, *, steps: int, warmup: int, loss_rtol: float | None = None) -> None:
    import torch

    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="rlhfkit model spec, resolved to one local directory both sides load (default smollm2-135m)",
    )
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run, warm-up included (default {steps})")
    p.add_argument("--warmup-steps", type=int, default=warmup, help=f"leading steps excluded from the rate (default {warmup})")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/OpenMP threads, same for every side")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per side, alternating the side order; the median of the per-pair ratios and their range are reported",
    )
    p.add_argument(
        "--trl-attention",
        default=",".join(TRL_ATTENTIONS),
        help=f"attention kernels TRL's sides run with, comma-separated (default {','.join(TRL_ATTENTIONS)}: "
        "both, the faster one is used for the ratio)",
    )
    loss_rtol = LOSS_RTOL if loss_rtol is None else loss_rtol
    p.add_argument(
        "--loss-rtol",
        type=float,
        default=loss_rtol,
        help=f"equal-work check: largest relative difference of the step-{LOSS_STEP} losses (default {loss_rtol:g})",
    )
    p.add_argument("--verbose", action="store_true", help="show the workers' output")


def add_pair_args(p) -> None:
    """The data and batch flags of the preference-pair benchmarks (dpo.py, reward.py)."""
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + response (default 512)")
    p.add_argument("--pairs", type=int, default=128, help="preference pairs to build from the demo set (default 128)")


def parse_args(p, argv):
    """``p.parse_args(argv)``, checking the warm-up leaves steps to measure and the loss of step 2 exists.

    Sets ``args.trl_attention`` to the list of TRL attention kernels.
    """
    args = p.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")
    if args.steps < LOSS_STEP:
        p.error(f"need --steps >= {LOSS_STEP} (the equal-work check compares the step-{LOSS_STEP} losses)")
    if args.repeats < 1:
        p.error("need --repeats >= 1")
    attns = [a.strip() for a in args.trl_attention.split(",") if a.strip()]
    if not attns or any(a not in TRL_ATTENTIONS for a in attns):
        p.error(f"--trl-attention: choose from {', '.join(TRL_ATTENTIONS)}")
    args.trl_attention = list(dict.fromkeys(attns))
    return args


def trl_sides(base: str, args) -> list[str]:
    """One TRL side per ``--trl-attention`` kernel: ``trl_sides("trl", args)`` -> ``["trl-eager", "trl-sdpa"]``."""
    return [f"{base}-{attn}" for attn in args.trl_attention]


def trl_workers(base: str, worker: Callable[..., dict], **kwargs) -> dict[str, Callable[[dict], dict]]:
    """``{"BASE-eager": ..., "BASE-sdpa": ...}``: ``worker(s, attn=..., **kwargs)`` for each kernel in :data:`TRL_ATTENTIONS`."""
    return {f"{base}-{attn}": (lambda s, a=attn: worker(s, attn=a, **kwargs)) for attn in TRL_ATTENTIONS}


def start(args, what: str, **settings) -> dict:
    """The driver's set-up: resolve ``args.model`` (printed), print ``what`` is run, warn if the machine is busy,
    and measure the matmul peak (:func:`measure_peak`) and the memory bandwidth (:func:`measure_bandwidth`).

    Returns the settings every worker gets: ``settings`` plus the model
    directory, the step counts and the thread count (and ``peak_gflops``, which
    only the driver reads).
    """
    model_path = resolve_model(args.model)
    print(what)
    check_load()
    peak = measure_peak(args.threads, "before the runs")
    bandwidth = measure_bandwidth(args.threads, "before the runs")
    return {
        "model_dir": str(model_path),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
        "peak_gflops": peak,
        "bandwidth_gbs": bandwidth,
        **settings,
    }


def start_pairs(args, tmp: Path, what: str, **settings) -> dict:
    """:func:`start` for a preference-pair benchmark: writes ``args.pairs`` pairs to ``tmp``; ``what`` ends the description."""
    data = tmp / "pairs.jsonl"
    data_note = write_preference_file(data, args.pairs)
    return start(
        args,
        f"data: {data_note}; batch {args.batch_size} pairs, max_length {args.max_length}, {args.steps} steps "
        f"(first {args.warmup_steps} excluded), {what}, {args.threads} threads",
        data=str(data),
        batch_size=args.batch_size,
        max_length=args.max_length,
        **settings,
    )


def check_load() -> None:
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} before start; other processes share the CPU and will skew timings")


def side_order(sides: Sequence[str], run: int) -> list[str]:
    return list(sides) if run % 2 == 0 else list(reversed(sides))


def cpu_use(result: dict, threads: int) -> float:
    """Share of ``threads`` a run kept busy in its window; well under 1 means something else had the CPU."""
    return result["cpu_seconds"] / result["seconds"] / threads


def run_sides(
    script: str,
    sides: Sequence[str],
    settings: dict,
    tmp: Path,
    args,
    *,
    width: int,
    rates: Callable[[dict], str],
    after: Callable[[dict], str] = lambda r: "",
) -> dict[str, list[dict]]:
    """Run every side ``args.repeats`` times (:func:`spawn`, alternating the order); the results per side.

    Prints a line per run: the side (padded to ``width``), ``rates(result)``,
    the CPU use and the step times, ``after(result)``, and the run's wall time.
    """
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for run in range(args.repeats):
        for side in side_order(sides, run):
            r = spawn(script, side, settings, tmp, str(run), verbose=args.verbose)
            results[side].append(r)
            print(
                f"  run {run + 1} {side:{width}s}: {rates(r)}, "
                f"cpu use {cpu_use(r, args.threads):4.0%} of {args.threads} threads, "
                f"step times {' '.join(f'{t:.2f}' for t in r['step_times'])} s{after(r)} ({r['wall']:.0f} s wall)",
                flush=True,
            )
    return results


def pair_rates(r: dict) -> str:
    """A run's pairs/s and tokens/s, for :func:`run_sides`."""
    return f"{r['pairs'] / r['seconds']:6.2f} pairs/s, {r['tokens'] / r['seconds']:7.1f} tok/s"


def check_token_counts(results: dict[str, list[dict]]) -> None:
    """Warn where a run's token count (the library's own) disagrees with its tokenized data.

    Whether the sides trained the same tokens is :func:`check_equal_work`'s job.
    """
    for side, runs in results.items():
        for r in runs:
            if r["tokens"] != r["tokens_check"]:
                print(f"WARNING: {side} counted {r['tokens']} tokens in the window, its tokenized data says {r['tokens_check']}")


def print_table(headers: list[str], rows: list[list[Any]], *, left: int = 1) -> None:
    """A plain aligned table: the first ``left`` columns left-aligned, the rest right-aligned."""
    cells = [list(headers)] + [[c if isinstance(c, str) else f"{c}" for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_settings(sides: dict[str, dict]) -> None:
    """Print the settings each side read back from its own config, one row per setting.

    ``sides`` maps a side name to its result; ``result["settings"]`` holds values
    that must match (a row where they differ is marked ``DIFFERS``), and
    ``result["implementation"]`` free-text notes on how each library does a thing
    (printed as is, expected to differ).
    """
    names = list(sides)
    keys = list(next(iter(sides.values()))["settings"])
    rows = []
    for key in keys:
        values = [str(sides[n]["settings"].get(key, "?")) for n in names]
        rows.append([key, *values, "" if len(set(values)) == 1 else "DIFFERS"])
    headers = ["setting", *names, ""]
    if not any(row[-1] for row in rows):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    print("settings (read back from each side's config):")
    print_table(headers, rows, left=len(headers))
    impl_keys = list(next(iter(sides.values())).get("implementation", {}))
    if impl_keys:
        print("implementation (library-specific, not a setting):")
        for key in impl_keys:
            for n in names:
                print(f"  {key} [{n}]: {sides[n].get('implementation', {}).get(key, '?')}")


def median_run(runs: list[dict], value: Callable[[dict], float]) -> dict:
    """The run whose value is closest to the median over ``runs`` (for the columns that are not medians themselves)."""
    mid = statistics.median(value(r) for r in runs)
    return min(runs, key=lambda r: abs(value(r) - mid))


def print_pair_table(
    results: dict[str, list[dict]],
    args,
    peak: float,
    flops_k: Callable[[str], float],
    extra: dict[str, Callable[[dict], str]] | None = None,
) -> dict[str, float]:
    """Print the results table of a preference-pair benchmark; return each side's median pairs/s.

    Rates are medians over the runs; the other columns come from the median run.
    ``flops_k(side)`` is the FLOPs per parameter per token of that side (see
    :data:`FLOPS_NOTE`), shown as model GFLOP/s and as a share of the matmul
    ``peak``. ``extra`` adds columns: header -> value of the median run.
    """
    extra = extra or {}

    def pair_rate(r: dict) -> float:
        return r["pairs"] / r["seconds"]

    rate = {side: statistics.median(pair_rate(r) for r in runs) for side, runs in results.items()}
    rows = []
    for side, runs in results.items():
        r = median_run(runs, pair_rate)
        tok_rate = statistics.median(x["tokens"] / x["seconds"] for x in runs)
        gflops = statistics.median(model_gflops(x, flops_k(side)) for x in runs)
        rows.append(
            [
                side,
                f"{rate[side]:.2f}",
                f"{tok_rate:.1f}",
                f"{args.batch_size / rate[side]:.3f}",
                f"{cpu_use(r, args.threads):.0%}",
                f"{gflops:.1f}",
                f"{gflops / peak:.1%}",
                r.get("attention", "?"),
                f"{r['first_loss']:.4f}",
                f"{r['last_loss']:.4f}",
                f"{r['peak_rss_mb']:.0f}",
                *(column(r) for column in extra.values()),
            ]
        )
    print_table(
        [
            "side",
            "pairs/s",
            "tokens/s",
            "s/step",
            "cpu",
            "model GFLOP/s",
            "of peak",
            "attention",
            "loss@1",
            "loss@end",
            "peak RSS MB",
            *extra,
        ],
        rows,
    )
    return rate


# ---------------------------------------------------------------- matmul peak and model FLOPs


def matmul_probe(threads: int, seconds: float = PROBE_SECONDS, n: int = PROBE_N) -> dict[str, float]:
    """In this process: bf16 ``n x n`` matmuls on ``threads`` threads for about ``seconds``.

    Returns ``gflops``, the best rate of any 0.25 s stretch (``2 n^3`` FLOPs per
    matmul), after one untimed warm-up matmul; a CPU without bf16 matmul kernels
    (where one matmul takes seconds) stops after the first stretch.
    """
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, generator=g).to(torch.bfloat16)
    c = torch.empty(n, n, dtype=torch.bfloat16)
    flop = 2.0 * n**3
    torch.mm(a, b, out=c)  # warm-up: oneDNN picks and builds its kernel
    best, count, t_start = 0.0, 0, time.perf_counter()
    while True:
        k, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=c)
            k += 1
            dt = time.perf_counter() - t0
            if dt >= 0.25:
                break
        best, count = max(best, k * flop / dt), count + k
        if time.perf_counter() - t_start >= seconds:
            break
    return {"gflops": best / 1e9, "matmuls": count, "seconds": time.perf_counter() - t_start, "threads": torch.get_num_threads()}


def run_probe(kind: str, threads: int) -> dict:
    """Run this file's ``--matmul-probe`` or ``--bandwidth-probe`` (``kind``) in a fresh subprocess with the workers'
    environment; its result dict."""
    env = {**os.environ, **BENCH_ENV, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--{kind}-probe", str(threads)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {kind} probe failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_peak(threads: int, when: str) -> float:
    """Run :func:`matmul_probe` in a fresh subprocess (:func:`run_probe`); print and return its GFLOP/s."""
    r = run_probe("matmul", threads)
    print(
        f"matmul peak {when}: {r['gflops']:.0f} GFLOP/s (bf16 {PROBE_N}x{PROBE_N} matmuls, {r['threads']} threads, "
        f"best 0.25 s of {r['seconds']:.1f} s, {r['matmuls']} matmuls)",
        flush=True,
    )
    return r["gflops"]


def final_peak(settings: dict, args) -> float:
    """Probe again after the runs; the peak is the higher of the two probes (a busy spell only lowers a probe)."""
    after = measure_peak(args.threads, "after the runs")
    peak = max(settings["peak_gflops"], after)
    print(f"matmul peak used for the share-of-peak column: {peak:.0f} GFLOP/s")
    return peak


FLOPS_NOTE = (
    "model FLOP/s = k x N x tokens / s: N = parameters a token is multiplied by (common.matmul_params: all, less the\n"
    "input embedding unless it is tied to the LM head), k = 6 per trained token (forward 2 + backward 4) plus 2 per\n"
    "token of each extra no-grad forward pass; attention's length-squared FLOPs are not counted. Tokens are the\n"
    "logical non-padding tokens both sides train, so a side that skips work (rlhfkit's packed batches run a shared\n"
    "prompt once) is credited with the FLOPs a plain forward of every token would do."
)


def model_gflops(r: dict, k: float) -> float:
    """A run's model GFLOP/s: ``k`` FLOPs per parameter per token (``r["params_n"]``) over its measured window."""
    return k * r["params_n"] * r["tokens"] / r["seconds"] / 1e9


# ---------------------------------------------------------------- ratios over repeats


def median_rate(runs: list[dict], rate: Callable[[dict], float]) -> float:
    return statistics.median(rate(r) for r in runs)


def fastest_trl(
    results: dict[str, list[dict]],
    base: str,
    rate: Callable[[dict], float],
    unit: str,
    show: Callable[[float], str] = lambda x: f"{x:.3f}",
) -> str | None:
    """Print each TRL attention variant's median rate (``show(rate)`` in ``unit``); return the faster side
    (the one the ratio uses), or None if ``base`` was not run."""
    names = [f"{base}-{attn}" for attn in TRL_ATTENTIONS if f"{base}-{attn}" in results]
    if not names:
        return None
    best = max(names, key=lambda n: median_rate(results[n], rate))
    rates = ", ".join(f"{trl_attention(n)} {show(median_rate(results[n], rate))}" for n in names)
    print(f"{base} attention ({unit}, medians): {rates} -> {trl_attention(best)} used for the ratio")
    return best


def pair_ratios(results: dict[str, list[dict]], ours: str, theirs: str, rate: Callable[[dict], float]) -> list[float]:
    """``rate(ours run i) / rate(theirs run i)`` for each repeat ``i`` (the two runs of a pair ran back to back)."""
    return [rate(a) / rate(b) for a, b in zip(results[ours], results[theirs])]


def report_ratio(label: str, ratios: list[float]) -> float:
    """Print the median of the per-pair ratios and their range; return the median."""
    mid = statistics.median(ratios)
    if len(ratios) == 1:
        print(f"{label}: {mid:.2f} (one pair; --repeats N gives a median and a range)")
    else:
        print(
            f"{label}: median {mid:.2f}, range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pairs "
            f"({' '.join(f'{x:.2f}' for x in ratios)})"
        )
    return mid


# ---------------------------------------------------------------- equal work


def check_equal_work(
    results: dict[str, list[dict]],
    reference: str,
    *,
    warmup: int,
    what: str,
    rtol: float,
    compare_loss: bool = True,
    expected_tokens: list[int] | None = None,
    loss_note: str = "",
) -> None:
    """Print each side's work per measured step and the loss at step :data:`LOSS_STEP`; stop if they differ.

    Every run must carry ``step_tokens`` (the tokens of each step, warm-up
    included) and ``losses`` (the loss each step, as the library logged it).
    Tokens must match the ``reference`` side's first run exactly (or, with
    ``expected_tokens``, equal those exactly); with ``compare_loss`` the step-2
    losses must agree within ``rtol`` relative to the reference's. Why 2% by
    default (5% for DPO): step 1 is identical on both sides (for DPO and reward
    ``ln 2`` by construction: policy = reference, score head at zero), and step 2
    runs the same batch after one identical update, so the two losses differ only
    by bf16 rounding of differently ordered kernels. AdamW's first step is
    sign-like (every weight moves by about the learning rate in the direction of
    its gradient's sign), so rounding that flips the sign of tiny gradients still
    moves the next loss. Seen on SmolLM2: SFT and reward within 0.2%; DPO, whose
    loss sums log-prob differences over every response token, within 1.6% of
    rlhfkit at batch 8 (TRL's own eager and sdpa runs 3.2% apart) and up to 4% at
    batch 2. A different batch is caught exactly by the token check; a different
    learning rate, beta or loss mask moves these losses by more than the tolerance.
    Exits 1 with a message on any mismatch.
    """
    ref = results[reference][0]
    ref_tokens = expected_tokens if expected_tokens is not None else ref["step_tokens"]
    steps = len(ref_tokens)
    ref_loss = ref["losses"][LOSS_STEP - 1] if len(ref["losses"]) >= LOSS_STEP else None
    against = "the budget" if expected_tokens is not None else f"{reference}'s"
    print(
        f"equal work: {what} per step (shown: the measured steps {warmup + 1}..{steps}; compared: all {steps}), "
        f"must equal {against} exactly; loss at step {LOSS_STEP}"
        + (f" within {rtol:.1%} of {reference}'s" if compare_loss else f" (not compared{loss_note})")
    )
    failures: list[str] = []
    width = max(len(s) for s in results)
    for side, runs in results.items():
        for i, r in enumerate(runs):
            tokens, losses = r["step_tokens"], r["losses"]
            loss = losses[LOSS_STEP - 1] if len(losses) >= LOSS_STEP else None
            if i == 0:
                rel = (
                    ""
                    if (not compare_loss or loss is None or not ref_loss or side == reference)
                    else f" ({(loss - ref_loss) / abs(ref_loss):+.2%})"
                )
                loss_s = "-" if loss is None else f"{loss:.5g}"
                print(
                    f"  {side:{width}s}  loss@{LOSS_STEP} {loss_s}{rel}  tokens/step {' '.join(str(t) for t in tokens[warmup:])}"
                )
            tag = f"{side} (run {i + 1})"
            if list(tokens) != list(ref_tokens):
                bad = [k + 1 for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b] or ["count"]
                failures.append(
                    f"{tag}: {what} per step differ from {against} at step(s) {bad[:8]}: {list(tokens)} vs {list(ref_tokens)}"
                )
            if compare_loss:
                if loss is None or ref_loss is None:
                    failures.append(f"{tag}: no loss logged at step {LOSS_STEP}")
                elif abs(loss - ref_loss) > rtol * abs(ref_loss):
                    failures.append(
                        f"{tag}: loss at step {LOSS_STEP} {loss:.5f} vs {reference}'s {ref_loss:.5f} "
                        f"(relative difference {abs(loss - ref_loss) / max(abs(ref_loss), 1e-12):.2%}, "
                        f"tolerance {rtol:.1%})"
                    )
    if failures:
        print("EQUAL-WORK CHECK FAILED: the sides did not do the same work, so no ratio is reported:")
        for f in failures:
            print(f"  {f}")
        raise SystemExit("equal-work check failed: " + failures[0])
    print(f"equal work: OK ({sum(len(r) for r in results.values())} runs)")


# ---------------------------------------------------------------- memory bandwidth and the generation bound

BANDWIDTH_BYTES = 1 << 30


def bandwidth_probe(threads: int, passes: int = 8, nbytes: int = BANDWIDTH_BYTES) -> dict[str, float]:
    """In this process: the best read rate (GB/s) of ``passes`` fp32 sums over a ``nbytes`` tensor, on ``threads`` threads.

    A sum does one add per 4 bytes read, far below what the cores can add, so it
    runs at the rate memory delivers data to them; 1 GiB is far beyond any cache.
    The best pass counts (a busy spell only slows a pass). One untimed pass first
    (page faults, thread start).
    """
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return {"gbs": best / 1e9, "passes": passes, "gib": nbytes / (1 << 30), "threads": torch.get_num_threads()}


def measure_bandwidth(threads: int, when: str) -> float:
    """Run :func:`bandwidth_probe` in a fresh subprocess (:func:`run_probe`); print and return its GB/s."""
    r = run_probe("bandwidth", threads)
    print(
        f"memory bandwidth {when}: {r['gbs']:.1f} GB/s (fp32 sums over {r['gib']:.0f} GiB, {r['threads']} threads, "
        f"best of {r['passes']} passes)",
        flush=True,
    )
    return r["gbs"]


def decode_shape(model) -> dict[str, int]:
    """What a decode step reads: ``params_n`` (:func:`matmul_params`) and the KV cache's ``layers``, ``kv_heads``, ``head_dim``."""
    c = model.config
    heads = c.num_attention_heads
    return {
        "params_n": matmul_params(model),
        "layers": int(c.num_hidden_layers),
        "kv_heads": int(getattr(c, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads),
    }


def generation_bound(
    shape: dict[str, int],
    *,
    rows: int,
    prompt_tokens: int,
    new_tokens: int,
    bandwidth_gbs: float,
    peak_gflops: float,
    value_bytes: int = 2,
) -> dict[str, float]:
    """The least time a ``generate`` call of ``rows`` sequences (``prompt_tokens`` in all, ``new_tokens`` each) can take.

    With N = ``shape["params_n"]`` and ``kv = 2 x layers x kv_heads x head_dim x value_bytes``
    (the keys and values one token leaves in the cache; bf16 by default):

    * the prefill does ``2 N prompt_tokens`` FLOPs at the matmul peak (compute-bound);
    * decode step ``t`` (0-based; the rows hold ``P = prompt_tokens / rows`` prompt
      tokens and ``t`` new ones on average) must read every weight once and every
      row's cache: ``N value_bytes + rows (P + t) kv`` bytes at ``bandwidth_gbs``, and do
      ``2 N rows`` FLOPs at ``peak_gflops``.

    Returns ``memory_s`` (the decode steps' reads alone: what the memory
    bandwidth allows, the issue's bound), ``compute_s`` (prefill and decode FLOPs
    alone) and ``roofline_s`` (the prefill, plus each decode step's larger of its
    two times). Attention's own FLOPs, the sampling over the vocabulary and the
    writes are left out, so every bound is optimistic.
    """
    n = shape["params_n"]
    kv = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * value_bytes
    p = prompt_tokens / rows
    bw, peak = bandwidth_gbs * 1e9, peak_gflops * 1e9
    prefill = 2 * n * prompt_tokens / peak
    step_flop_s = 2 * n * rows / peak
    step_read_s = [(n * value_bytes + rows * (p + t) * kv) / bw for t in range(new_tokens)]
    return {
        "memory_s": sum(step_read_s),
        "compute_s": prefill + new_tokens * step_flop_s,
        "roofline_s": prefill + sum(max(r, step_flop_s) for r in step_read_s),
    }


def print_generation_bounds(
    results: dict[str, list[dict]],
    sides: Sequence[str],
    order: Callable[[dict], float],
    *,
    peak: float,
    bandwidth: float,
    seconds_header: str = "generation s",
    extra: dict[str, Callable[[dict], str]] | None = None,
) -> None:
    """Each side's generation rate beside what the machine allows (:func:`generation_bound`), one row per side.

    A side's row is its median run by ``order``: ``gen_tokens`` tokens generated by one generate call (a step's
    in online_rl.py, a call's in generation.py: the mean over the measured ones) in ``generation_s`` seconds
    (the column ``seconds_header``), by ``gen_batch`` rows of ``gen_prompt_tokens`` prompt tokens in all over
    ``decode_steps`` steps of a model of ``decode_shape``; then the ``extra`` columns, each a cell of that run.
    The bounds assume bf16 weights and cache, whatever a side reads.
    """
    extra = extra or {}
    rows = []
    for side in sides:
        r = median_run(results[side], order)
        batch, gen = r["gen_batch"], r["gen_tokens"]
        b = generation_bound(
            r["decode_shape"],
            rows=batch,
            prompt_tokens=round(r["gen_prompt_tokens"]),
            new_tokens=round(r["decode_steps"]),
            bandwidth_gbs=bandwidth,
            peak_gflops=peak,
        )
        rate = gen / r["generation_s"]
        memory, roofline = gen / b["memory_s"], gen / b["roofline_s"]
        rows.append(
            [
                side,
                str(batch),
                f"{r['generation_s']:.2f}",
                f"{rate:.0f}",
                f"{memory:.0f}",
                f"{rate / memory:.1%}",
                f"{gen / b['compute_s']:.0f}",
                f"{roofline:.0f}",
                f"{rate / roofline:.1%}",
                *(cell(r) for cell in extra.values()),
            ]
        )
    print(
        f"generation against the machine's bounds (memory {bandwidth:.1f} GB/s, matmul peak {peak:.0f} GFLOP/s; "
        "tokens/s of generated tokens):"
    )
    headers = ["side", "rows", seconds_header, "tok/s", "memory bound", "of memory", "compute bound", "roofline", "of roofline"]
    print_table([*headers, *extra], rows)
    print(
        "  memory bound: each decode step reads every bf16 weight and the rows' bf16 KV cache once (prefill free);\n"
        "  compute bound: 2 N FLOPs per prompt and generated token at the matmul peak; roofline: the prefill at the\n"
        "  peak plus, per decode step, the larger of its read and compute times (common.generation_bound)."
    )


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--matmul-probe":
    print(json.dumps(matmul_probe(int(sys.argv[2]))))
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--bandwidth-probe":
    print(json.dumps(bandwidth_probe(int(sys.argv[2]))))
