"""Packed attention on a GPU: rlhfkit's segment kernel against FlexAttention over the same layout, and sdpa on padded rows.

One forward + backward of SmolLM2-135M's shape (random weights, bf16 autocast, loss on the decoder's last hidden
state, so the LM head does not dominate) over a packed batch of ``groups`` prompts with ``k`` responses each:

* ``segments``: :func:`rlhfkit.modeling.attention.packed_attention`'s gather + baddbmm + softmax + bmm, which
  materialises (heads x sequences, Q, M) scores per layer (what CUDA ran before FlexAttention);
* ``flex``: :func:`rlhfkit.modeling.attention.flex_packed_attention`, compiled FlexAttention with the layout's
  mask per token pair (opt-in on CUDA, ``RLHFKIT_FLEX_ATTENTION=1``);
* ``sdpa-padded``: transformers' sdpa on the same sequences as a padded batch (every response repeats its
  prompt; the lengths are equal, so no mask and sdpa may take its flash kernel): not the same work, a reference.

It prints milliseconds per step (median of ``--repeats`` after ``--warmup``), peak GPU memory, the largest
difference of the packed kernels' hidden states from each other and, with a backward, the relative difference of
two attention projections' gradients (flex's gradients failed a test on an H200; this shows by how much). On CPU (``--device cpu``) it runs the forward
only (torch's FlexAttention has no CPU backward) at the small size, as a dry run.

    python benchmarks/packed_attention.py                  # on a GPU
    python benchmarks/packed_attention.py --device cpu --sizes 4x2x32x32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import SMOLLM2_SHAPE  # noqa: E402

from rlhfkit.data import packing  # noqa: E402
from rlhfkit.modeling import attention, models  # noqa: E402

SIZES = ("16x2x64x64", "8x4x256x512", "16x4x256x1024")  # groups x responses x prompt tokens x response tokens


def parse_size(text: str) -> tuple[int, int, int, int]:
    groups, k, prompt, response = (int(x) for x in text.split("x"))
    return groups, k, prompt, response


def make_groups(size: tuple[int, int, int, int], vocab: int, seed: int = 0) -> list[list[list[int]]]:
    groups, k, prompt, response = size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(groups):
        p = torch.randint(10, vocab, (prompt,), generator=g).tolist()
        out.append([p + torch.randint(10, vocab, (response,), generator=g).tolist() for _ in range(k)])
    return out


def timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms per call, peak GiB) of ``fn``."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def bench_size(text: str, model, padded_model, device: torch.device, backward: bool, args) -> None:
    """One size: a row of the table for each kernel."""
    decoder, padded_decoder = model.get_decoder(), padded_model.get_decoder()
    size = parse_size(text)
    groups = make_groups(size, model.config.vocab_size)
    batch = {k: v.to(device) for k, v in packing.pack(groups).items()}
    length = batch["input_ids"].shape[1]
    states: dict = {}
    grads: dict = {}
    last = model.config.num_hidden_layers - 1
    watched = {"model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.self_attn.o_proj.weight"}

    def packed_step(kernel: str):
        def step():
            attention.use_flex = lambda q, layout, dropout: kernel == "flex" and dropout == 0.0  # type: ignore[assignment]
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(backward):
                h = decoder(**packing.model_inputs(batch)).last_hidden_state
                loss = h.float().pow(2).mean()
            if backward:
                loss.backward()
                # The gradients of the first and last attention projections: where flex's backward would go wrong.
                grads[kernel] = {n: p.grad.float().clone() for n, p in model.named_parameters() if n in watched}
            states[kernel] = h.detach().float()

        return step

    rows = torch.tensor([s for g in groups for s in g], device=device)

    def padded_step():
        padded_model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(backward):
            loss = padded_decoder(input_ids=rows).last_hidden_state.float().pow(2).mean()
        if backward:
            loss.backward()

    original = attention.use_flex
    try:
        for kernel, step in (("segments", packed_step("segments")), ("flex", packed_step("flex")), ("sdpa-padded", padded_step)):
            note = ""
            try:
                ms, peak = timed(step, device, args.warmup, args.repeats)
            except torch.OutOfMemoryError:
                ms, peak, note = float("nan"), float("nan"), "out of memory"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if kernel == "flex" and "segments" in states and "flex" in states:
                diff = (states["segments"] - states["flex"]).abs().max().item()
                note = f"hidden states: max abs difference from segments {diff:.3g}"
                if "segments" in grads and "flex" in grads:
                    for name, want in grads["segments"].items():
                        rel = (grads["flex"][name] - want).norm() / want.norm().clamp_min(1e-30)
                        note += f"; grad {name.removeprefix('model.')} relative difference {rel.item():.3g}"
            tokens = f"{length:,}" if kernel != "sdpa-padded" else f"{rows.numel():,} (padded)"
            print(f"| {text} | {tokens} | {kernel} | {ms:,.1f} | {peak:.2f} | {note} |", flush=True)
    finally:
        attention.use_flex = original  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated GROUPSxKxPROMPTxRESPONSE")
    p.add_argument("--layers", type=int, default=SMOLLM2_SHAPE["num_hidden_layers"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(args.device)
    backward = device.type == "cuda"
    config = LlamaConfig(**{**SMOLLM2_SHAPE, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    models.set_attention(model)
    # A copy of the config: from_config(attn_implementation=...) sets it on the config it is given, which would
    # switch the packed model to sdpa too.
    padded_config = copy.deepcopy(config)
    padded_model = AutoModelForCausalLM.from_config(padded_config, dtype=torch.float32, attn_implementation="sdpa").to(device)
    assert attention.uses_kernel(model) and not attention.uses_kernel(padded_model)
    padded_model.load_state_dict(model.state_dict())
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    print(f"model: SmolLM2-135M shape, {args.layers} layers, random weights, bf16 autocast; backward: {backward}")
    print("| size (groups x k x prompt x response) | tokens (packed row) | kernel | ms per step | peak GiB | note |")
    print("|---|---|---|---|---|---|")
    for text in args.sizes.split(","):
        bench_size(text, model, padded_model, device, backward, args)


if __name__ == "__main__":
    main()
