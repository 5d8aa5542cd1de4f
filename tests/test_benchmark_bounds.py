"""benchmarks/common.py's generation bound and probes, on values worked out by hand.

The benchmarks themselves are not tests (they time things); what they divide by must still be right.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402

SHAPE = {"params_n": 100, "layers": 2, "kv_heads": 1, "head_dim": 4}


def test_generation_bound_by_hand():
    # kv = 2 (k, v) x 2 layers x 1 head x 4 dims x 2 bytes = 32 bytes a token. 2 rows, 6 prompt tokens (3 a row),
    # 2 new tokens; 1000 bytes/s and 1000 FLOP/s.
    # prefill 2 x 100 x 6 / 1000 = 1.2 s; a decode step's FLOPs 2 x 100 x 2 / 1000 = 0.4 s;
    # step 0 reads 100 x 2 + 2 x 3 x 32 = 392 bytes (0.392 s), step 1 100 x 2 + 2 x 4 x 32 = 456 (0.456 s).
    b = common.generation_bound(SHAPE, rows=2, prompt_tokens=6, new_tokens=2, bandwidth_gbs=1e-6, peak_gflops=1e-6)
    assert b["memory_s"] == pytest.approx(0.392 + 0.456)
    assert b["compute_s"] == pytest.approx(1.2 + 2 * 0.4)
    assert b["roofline_s"] == pytest.approx(1.2 + 0.4 + 0.456)  # step 0 compute-bound, step 1 memory-bound


def test_generation_bound_fp32_values_read_twice_the_bytes():
    b2 = common.generation_bound(SHAPE, rows=2, prompt_tokens=6, new_tokens=2, bandwidth_gbs=1e-6, peak_gflops=1e-6)
    b4 = common.generation_bound(
        SHAPE, rows=2, prompt_tokens=6, new_tokens=2, bandwidth_gbs=1e-6, peak_gflops=1e-6, value_bytes=4
    )
    assert b4["memory_s"] == pytest.approx(2 * b2["memory_s"])
    assert b4["compute_s"] == pytest.approx(b2["compute_s"])


def test_decode_shape_of_a_grouped_query_model():
    from rlhfkit.modeling import models

    model = models.build_tiny()
    c = model.config
    shape = common.decode_shape(model)
    assert shape["layers"] == c.num_hidden_layers
    assert shape["kv_heads"] == c.num_key_value_heads
    assert shape["head_dim"] * c.num_attention_heads == c.hidden_size
    assert shape["params_n"] == common.matmul_params(model)


def test_bandwidth_probe_reads_something():
    r = common.bandwidth_probe(1, passes=2, nbytes=1 << 24)
    assert r["gbs"] > 0.1 and r["threads"] == 1


def test_profile_categories():
    import profile_step as ps

    assert ps.category("aten::_fused_adamw_", ["Optimizer.step#AdamW.step"]) == "optimizer"
    assert ps.category("aten::bmm", ["rlhfkit::attention"]) == "attention"
    assert ps.category("aten::softmax", ["rlhfkit::attention"]) == "attention"
    backward = "autograd::engine::evaluate_function: BmmBackward0"
    assert ps.category("aten::bmm", [backward]) == "attention"
    assert ps.category("aten::mm", ["autograd::engine::evaluate_function: MmBackward0"]) == "matmul"
    assert ps.category("mkldnn::_linear_pointwise", []) == "matmul"
    assert ps.category("aten::addmm", []) == "matmul"
    assert ps.category("aten::mul", ["autograd::engine::evaluate_function: MulBackward0"]) == "elementwise"
    assert ps.category("aten::bmm", []) == "matmul"  # a bmm outside attention
    assert ps.category("Optimizer.step#AdamW.step", []) is None  # a scope, not an operator
    assert ps.category(backward, []) is None


class _Event:
    def __init__(self, name, self_us, parent=None):
        self.name, self.self_cpu_time_total, self.cpu_parent = name, self_us, parent


def test_profile_split_adds_up_to_the_wall_time():
    import profile_step as ps

    opt = _Event("Optimizer.step#AdamW.step", 10)
    attn = _Event("rlhfkit::attention", 5)
    events = [
        opt,
        _Event("aten::_fused_adamw_", 200_000, opt),
        attn,
        _Event("aten::bmm", 100_000, attn),
        _Event("aten::mm", 300_000),
        _Event("aten::add", 50_000),
    ]
    out = ps.split(events, 1.0)
    assert out["optimizer"] == pytest.approx(0.2)
    assert out["attention"] == pytest.approx(0.1)
    assert out["matmul"] == pytest.approx(0.3)
    assert out["elementwise"] == pytest.approx(0.05)
    assert out["python/other"] == pytest.approx(1.0 - 0.65)
