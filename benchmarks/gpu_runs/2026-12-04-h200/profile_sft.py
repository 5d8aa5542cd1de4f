"""The one-off GPU profile behind prof.log: rlhfkit SFT (SmolLM2-135M's shape, random weights, bf16) under
torch.profiler, 8 steps of batch N (argv[1], default 16), max length 512, on the demo SFT set.

    python3 benchmarks/gpu_runs/2026-12-04-h200/profile_sft.py 16   # from the repository root, on a GPU machine

Prints the whole ``sft.train`` call's wall time (model load and final save included), the GPU kernel time, the
number of kernels, and the top operators by GPU and by CPU time. Run on 2026-12-04 (commit 1f5c9ec) as a plain
script without this docstring and main(); the logic is the same.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "src")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import gpu_check as g
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rlhfkit import sft
    from rlhfkit.data.prompts import demo_data_path

    args = g.parse_args(["--steps", "8", "--batch-size", sys.argv[1] if len(sys.argv) > 1 else "16"])
    args.precision = "bf16"
    sizes = g.Sizes(**g.FULL.__dict__)
    sizes.steps, sizes.batch_size = 8, args.batch_size
    work = Path(tempfile.mkdtemp())
    model, _, config = g.prepare_model("smollm2-135m", False, work, random_weights=True)
    env = g.Env(args, sizes, *g.model_params(config))
    cfg = sft.SFTConfig(
        **env.common(work / "sft"),
        model=model,
        data=str(demo_data_path("sft.jsonl")),
        eval_fraction=0.0,
        max_steps=8,
        batch_size=sizes.batch_size,
        max_length=512,
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        sft.train(cfg)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    gpu_s = sum(e.self_device_time_total for e in ev) / 1e6
    kernels = sum(e.count for e in ev if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA)
    print(
        f"batch {sizes.batch_size}: wall {wall:.2f} s (whole train call, 8 steps, incl. load/save), "
        f"GPU kernel time {gpu_s:.2f} s, kernels {kernels}"
    )
    print(ev.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
