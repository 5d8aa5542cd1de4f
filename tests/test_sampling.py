"""Rollout decoding: the sampler draws tokens with the probabilities it is given (checked by counting);
shared-prompt prefill and pre-packed bf16 weights change speed, not results."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.generation import fast_decode, rollout
from rlhfkit.generation.rollout import GenerationOptions, HFEngine, InverseCDFSampler, encode_prompts
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import position_ids_from_mask


def _draw(sampler: InverseCDFSampler, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Token drawn in each of ``n`` rows of the same logits; the processor must leave exactly one finite logit."""
    out = sampler(None, logits.expand(n, -1).clone())
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == 1).all() and (out[finite] == 0).all()
    return out.argmax(-1)


def test_frequencies_match_softmax_with_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0, 0.5]])
    n = 200_000
    counts = torch.bincount(_draw(InverseCDFSampler(0.7), logits, n), minlength=6).double()
    want = torch.softmax(logits[0].double() / 0.7, -1)
    # Each count is Binomial(n, p): within 5 standard deviations.
    sd = (n * want * (1 - want)).sqrt()
    assert ((counts - n * want).abs() <= 5 * sd + 1).all(), (counts / n, want)
    assert counts[4] == 0  # p ~ 1e-19


def test_zero_probability_tokens_are_never_drawn():
    torch.manual_seed(1)
    logits = torch.full((1, 50), float("-inf"))
    logits[0, 0] = float("-inf")  # first entry impossible: a draw of u = 0 must not pick it
    logits[0, [3, 17, 49]] = torch.tensor([0.0, 1.0, -1.0])
    drawn = _draw(InverseCDFSampler(1.0), logits, 20_000)
    assert set(drawn.unique().tolist()) == {3, 17, 49}


@pytest.mark.parametrize("vocab,block", [(1000, 256), (49152, 256), (7, 4), (5, 8)])
def test_two_level_draw_picks_the_token_of_one_long_cumulative_sum(vocab, block):
    torch.manual_seed(vocab)
    probs = torch.softmax(torch.randn(300, vocab) * 3, -1)
    probs[:, 1 : vocab // 3] = 0  # a run of impossible tokens, crossing block boundaries
    probs[:, -1] = 0
    u = torch.rand(300, 1, dtype=torch.float64)
    u[:3] = torch.tensor([[0.0], [1 - 2**-53], [0.5]])
    cdf = probs.double().cumsum(-1)
    want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    got = rollout.inverse_cdf_draw(probs, u, block=block)
    assert got.shape == (300, 1) and (probs.gather(1, got) > 0).all()
    # u close to 1: rounding puts u * cdf_V at the total, past the last index; the last possible token is drawn.
    assert want[1] == vocab and got[1] == int(probs[1].nonzero().max())
    assert torch.equal(got[2:], want[2:]) and got[0] == want[0] == 0


def test_top_p_keeps_the_smallest_likely_set():
    torch.manual_seed(2)
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])  # sorted: 0.5, 0.3 | 0.15, 0.05
    logits = probs.log().unsqueeze(0)
    n = 100_000
    counts = torch.bincount(_draw(InverseCDFSampler(1.0, top_p=0.75), logits, n), minlength=4).double()
    assert counts[0] == 0 and counts[3] == 0  # outside the nucleus (0.5 + 0.3 >= 0.75)
    assert abs(counts[1] / n - 0.5 / 0.8) < 0.01 and abs(counts[2] / n - 0.3 / 0.8) < 0.01


def test_temperature_zero_is_an_error():
    with pytest.raises(ValueError, match="temperature > 0"):
        InverseCDFSampler(0.0)


def _tiny_engine(tokenizer, precision="fp32"):
    model = models.build_tiny(seed=5)
    models.set_attention(model)
    return HFEngine(model, tokenizer, precision=precision)


def _left_tokenizer():
    return models.load_tokenizer(models.TINY, padding_side="left")


def test_repeated_prompts_share_one_prefill_and_sample_the_same_tokens(monkeypatch):
    tok = _left_tokenizer()
    engine = _tiny_engine(tok)
    prompts = [p for p in ["Hello there, how are you?", "Write a poem", "x"] for _ in range(3)]
    ids, mask = encode_prompts(tok, prompts)
    cache = fast_decode.shared_prefix_cache(engine.model, ids, mask)
    # Computed for the 3 distinct prompts, copied out to all 9 rows, last query token left for generate.
    assert cache.layers[0].keys.shape[0] == 9 and cache.get_seq_length() == ids.shape[1] - 1
    assert fast_decode.shared_prefix_cache(engine.model, ids[::3], mask[::3]) is None  # nothing repeated
    options = GenerationOptions(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(0)
    shared = engine.generate(ids, mask, options)
    monkeypatch.setattr(rollout, "shared_prefix_cache", lambda *a: None)
    torch.manual_seed(0)
    plain = engine.generate(ids, mask, options)
    # The random tiny model's near-uniform logits make sampling sensitive to any change in them.
    assert len(set(map(tuple, plain.tolist()))) > 3
    assert torch.equal(shared, plain)


def test_common_start_first_moves_the_padding_after_the_shared_start():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8], [5, 6, 7, 9, 9, 9], [pad, 5, 6, 8, 8, 8]])
    mask = (ids != pad).long()
    got_ids, got_mask, n = fast_decode.common_start_first(ids, mask)
    assert n == 2  # [5, 6]; 7 is not in the third row
    assert got_ids.tolist() == [[5, 6, pad, pad, 7, 8], [5, 6, 7, 9, 9, 9], [5, 6, pad, 8, 8, 8]]
    assert got_mask.tolist() == [[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]]
    # Positions count real tokens only, so every token keeps its position.
    for b in range(3):
        assert position_ids_from_mask(got_mask)[b][got_mask[b].bool()].tolist() == list(range(int(mask[b].sum())))
    assert fast_decode.common_start_first(ids[:1], mask[:1])[2] == 0


def test_a_start_shared_by_all_prompts_runs_once_and_samples_the_same_tokens(monkeypatch):
    tok = _left_tokenizer()
    engine = _tiny_engine(tok)
    prompts = [p for p in ["Hello there, how are you?", "Write a poem", "x"] for _ in range(2)]
    ids, mask = encode_prompts(tok, prompts)
    ids2, mask2, start = fast_decode.common_start_first(ids, mask.long())
    assert start > 10  # the chat template's system prompt
    seen = []
    model = engine.model
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    cache = fast_decode.shared_prefix_cache(model, ids2, mask2, None, start)
    hook.remove()
    assert seen == [(1, start), (3, ids.shape[1] - 1 - start)]  # the start once, then each distinct prompt's rest
    assert cache.layers[0].keys.shape[0] == 6 and cache.get_seq_length() == ids.shape[1] - 1
    options = GenerationOptions(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(0)
    shared = engine.generate(ids, mask, options)
    monkeypatch.setattr(rollout, "common_start_first", lambda i, m: (i, m, 0))
    monkeypatch.setattr(rollout, "shared_prefix_cache", lambda *a: None)
    torch.manual_seed(0)
    plain = engine.generate(ids, mask, options)  # the left-padded queries, every token run for every row
    assert len(set(map(tuple, plain.tolist()))) > 2
    assert torch.equal(shared, plain)


def test_decoding_cache_layers_hold_what_concatenation_would_in_reserved_room():
    from transformers.cache_utils import DynamicLayer

    model = models.build_tiny(seed=5)
    cache = fast_decode.decoding_cache(model, torch.bfloat16, reserve=3)
    reference = DynamicLayer()
    layer = cache.layers[0]
    torch.manual_seed(0)
    steps = [torch.randn(2, 1, n, 4) for n in (5, 1, 1, 1, 1, 2)]
    for i, k in enumerate(steps):
        keys, values = layer.update(k, -k)
        ref_keys, ref_values = reference.update(k.bfloat16(), -k.bfloat16())
        assert keys.dtype == torch.bfloat16 and torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
        assert layer.get_seq_length() == reference.get_seq_length()
        if i == 1:
            storage = keys.untyped_storage().data_ptr()
        if i in (2, 3):  # within the reserve: written in place, no new buffer
            assert keys.untyped_storage().data_ptr() == storage
        if i == 3:
            order = torch.tensor([1, 0])
            layer.reorder_cache(order)  # replaces keys: the next update starts a new buffer from them
            reference.reorder_cache(order)
    assert layer.get_seq_length() == 11


def _eos_prone_engine(tokenizer, precision="fp32", compact_every=rollout.COMPACT_EVERY):
    """The tiny engine with EOS's logit raised by 8 (about 1 in 16 per token sampled at temperature 1 from the near-uniform rest), so rows
    end at different steps."""
    engine = _tiny_engine(tokenizer, precision)
    bias = torch.zeros(engine.model.lm_head.out_features)
    bias[tokenizer.eos_token_id] = 8.0
    engine.model.lm_head.bias = torch.nn.Parameter(bias)
    engine.compact_every = compact_every
    return engine


def _record_batch_sizes(monkeypatch, model) -> list[int]:
    sizes: list[int] = []
    real = model.generate
    monkeypatch.setattr(
        model, "generate", lambda input_ids, **k: sizes.append(input_ids.shape[0]) or real(input_ids=input_ids, **k)
    )
    return sizes


@pytest.mark.parametrize("precision,top_p", [("fp32", 1.0), ("fp32", 0.9), ("bf16", 1.0)])
def test_finished_rows_leave_the_batch_and_every_row_keeps_its_tokens(monkeypatch, precision, top_p):
    tok = _left_tokenizer()
    engine = _eos_prone_engine(tok, precision, compact_every=3)
    prompts = [p for p in ["Hello there, how are you?", "Write a poem", "x", "Tell me a joke"] for _ in range(4)]
    ids, mask = encode_prompts(tok, prompts)
    options = GenerationOptions(max_new_tokens=24, temperature=0.9, top_p=top_p)
    sizes = _record_batch_sizes(monkeypatch, engine.model)
    torch.manual_seed(0)
    compacted = engine.generate(ids, mask, options)
    engine.compact_every = 0
    torch.manual_seed(0)
    whole = engine.generate(ids, mask, options)
    lengths = (compacted != tok.eos_token_id).sum(-1)  # tokens before EOS (pad is EOS here)
    assert len(set(lengths.tolist())) > 5 and int(lengths.min()) < 6 and int(lengths.max()) > 12
    # Chunks of 3 tokens, each on the rows with no EOS yet; then one call for the whole batch.
    want = [int((lengths >= 3 * c).sum()) for c in range(-(-compacted.shape[1] // 3))]
    assert sizes == want + [16] and want[-1] < 16
    if precision == "fp32":
        assert compacted.shape == whole.shape and torch.equal(compacted, whole)
    else:  # oneDNN's bf16 products (prepacked_linears) may round a row differently in a smaller batch
        same = sum(a == b for a, b in zip(compacted.tolist(), whole.tolist()))
        assert same >= 12, same


def test_greedy_decoding_drops_finished_rows_with_the_same_tokens(monkeypatch):
    tok = _left_tokenizer()
    engine = _eos_prone_engine(tok, compact_every=2)
    engine.model.lm_head.bias.data[tok.eos_token_id] = 1.05  # greedy: EOS wins only where its plain logit is near the top
    ids, mask = encode_prompts(tok, ["Hello there, how are you?", "Write a poem", "x", "Tell me a joke", "Why?", "Name a bird"])
    options = GenerationOptions(max_new_tokens=16, temperature=0.0)
    sizes = _record_batch_sizes(monkeypatch, engine.model)
    compacted = engine.generate(ids, mask, options)
    engine.compact_every = 0
    whole = engine.generate(ids, mask, options)
    lengths = (whole != tok.eos_token_id).sum(-1)
    assert int(lengths.min()) < int(lengths.max()) and min(sizes) < 6
    assert torch.equal(compacted, whole)


def test_a_minimum_length_in_the_generation_config_keeps_every_row(monkeypatch):
    tok = _left_tokenizer()
    engine = _eos_prone_engine(tok, compact_every=2)
    engine.model.generation_config.min_new_tokens = 4  # generate would apply it to every 2-token call anew
    ids, mask = encode_prompts(tok, ["Hello there, how are you?", "Write a poem", "x", "Tell me a joke"] * 2)
    sizes = _record_batch_sizes(monkeypatch, engine.model)
    torch.manual_seed(0)
    out = engine.generate(ids, mask, GenerationOptions(max_new_tokens=16, temperature=0.9))
    lengths = (out != tok.eos_token_id).sum(-1)
    assert sizes == [8] and int(lengths.min()) >= 4 and int(lengths.min()) < 16


def test_decoding_cache_keeps_selected_rows_in_one_copy_with_room_to_grow():
    from transformers.cache_utils import DynamicLayer

    model = models.build_tiny(seed=5)
    layer = fast_decode.decoding_cache(model, torch.float32, reserve=4).layers[0]
    reference = DynamicLayer()
    torch.manual_seed(0)
    for k in (torch.randn(3, 1, 5, 4), torch.randn(3, 1, 1, 4)):
        layer.update(k, -k)
        reference.update(k, -k)
    keep = torch.tensor([0, 2])
    layer.batch_select_indices(keep)
    reference.batch_select_indices(keep)
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    storage = layer.keys.untyped_storage().data_ptr()
    k = torch.randn(2, 1, 1, 4)
    keys, values = layer.update(k, -k)
    ref_keys, ref_values = reference.update(k, -k)
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values) and layer.get_seq_length() == 7
    assert keys.untyped_storage().data_ptr() == storage  # written into the selected buffer's reserve


def test_decoding_cache_samples_the_same_tokens_as_transformers_cache(monkeypatch):
    from transformers.cache_utils import DynamicCache

    tok = _left_tokenizer()
    engine = _tiny_engine(tok, precision="bf16")
    prompts = [p for p in ["Hello there, how are you?", "Write a poem", "x"] for _ in range(2)]
    ids, mask = encode_prompts(tok, prompts)
    options = GenerationOptions(max_new_tokens=12, temperature=1.0)
    made = []
    real = rollout.decoding_cache
    monkeypatch.setattr(rollout, "decoding_cache", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    torch.manual_seed(0)
    reserved = engine.generate(ids, mask, options)
    assert made and type(made[0].layers[0]).__name__ == "ReservedDynamicLayer"
    monkeypatch.setattr(rollout, "decoding_cache", lambda model, *a, **k: DynamicCache(config=model.config))
    torch.manual_seed(0)
    plain = engine.generate(ids, mask, options)
    assert len(set(map(tuple, plain.tolist()))) > 3
    assert torch.equal(reserved, plain)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_prepacked_linears_compute_the_bf16_linear_and_restore_the_layers():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    model = torch.nn.Sequential(layer)
    x = torch.randn(5, 3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x).float()
    with fast_decode.prepacked_linears(model, rows=5):
        assert "forward" in layer.__dict__
        got = layer(x).float()
    assert "forward" not in layer.__dict__
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    # Same bf16 products, perhaps summed in another order: within a few bf16 ulps of the outputs.
    assert got.shape == want.shape and (got - want).abs().max() <= 0.02 * want.abs().max()
    with pytest.raises(RuntimeError):
        with fast_decode.prepacked_linears(model, rows=5):
            raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_prepacked_siblings_share_one_matmul_and_fall_back_on_another_input(monkeypatch):
    torch.manual_seed(0)
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = torch.nn.Linear(64, 48), torch.nn.Linear(64, 16), torch.nn.Linear(64, 16)
    x, other = torch.randn(4, 1, 64), torch.randn(4, 1, 64)
    with fast_decode.prepacked_linears(attn, rows=4, fuse=False):
        want = {n: (getattr(attn, n)(x), getattr(attn, n)(other)) for n in ("q_proj", "k_proj", "v_proj")}
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    with fast_decode.prepacked_linears(attn, rows=4):
        # In order on one input: one matmul on the concatenated weights (64 -> 80) serves all three.
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        assert len(calls) == 1
        # On another input, or out of order, a sibling multiplies by its own weights.
        assert torch.equal(attn.k_proj(other), want["k_proj"][1]) and len(calls) == 2
        q_other = attn.q_proj(other)  # computes q, k and v of `other`, keeps k and v
        assert torch.equal(attn.v_proj(x), want["v_proj"][0]) and len(calls) == 4
        assert torch.equal(attn.v_proj(other), want["v_proj"][1]) and len(calls) == 4
    for (name, (w, _)), g in zip(want.items(), got):
        assert torch.equal(g, w), name  # bf16 products per output column: the same bits fused or not
    assert torch.equal(q_other, want["q_proj"][1])
    assert all("forward" not in m.__dict__ for m in (attn.q_proj, attn.k_proj, attn.v_proj))


def _greedy_logits(model, ids, mask, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tokens, each step's logits and each decode step's last hidden state (fp32 residual stream)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        max_new_tokens=steps,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        output_logits=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
        pad_token_id=2,
        eos_token_id=-1,
    )
    states = torch.cat([step[-1] for step in out.hidden_states[1:]], dim=1)  # (B, steps - 1, hidden)
    return out.sequences, torch.stack(out.logits, dim=1).float(), states.float()


def _count_lean_steps(monkeypatch) -> list[int]:
    """Counts one-token steps that reach the lean forward (it falls back to the full layer otherwise)."""
    calls = [0]
    real = fast_decode._lean_decode_forward

    def counting(layer, full_forward, step):
        lean = real(layer, full_forward, step)

        def forward(hidden_states, *args, **kwargs):
            calls[0] += hidden_states.shape[1] == 1
            return lean(hidden_states, *args, **kwargs)

        return forward

    monkeypatch.setattr(fast_decode, "_lean_decode_forward", counting)
    return calls


def test_lean_decode_steps_compute_the_layer_and_restore_it(monkeypatch):
    tok = _left_tokenizer()
    model = models.build_tiny().eval()
    models.set_attention(model)
    ids, mask = encode_prompts(tok, ["Hello there, how are you?", "Write a poem", "x"])
    with torch.no_grad():
        want_ids, want, _ = _greedy_logits(model, ids, mask, steps=6)
        calls = _count_lean_steps(monkeypatch)
        with fast_decode.lean_decode_steps(model):
            assert all("forward" in layer.__dict__ for layer in model.model.layers)
            got_ids, got, _ = _greedy_logits(model, ids, mask, steps=6)
    assert calls[0] == 5 * len(model.model.layers)  # 5 decode steps after the prefill, every layer
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    models.set_attention(model, "sdpa")  # its masks are not the additive kind the lean step takes: left alone
    with fast_decode.lean_decode_steps(model):
        assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got_ids, want_ids)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_lean_decode_steps_on_prepacked_bf16_linears(monkeypatch):
    tok = _left_tokenizer()
    model = models.build_tiny().eval()
    models.set_attention(model)
    ids, mask = encode_prompts(tok, ["Hello there, how are you?", "Write a poem", "x"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), fast_decode.prepacked_linears(model, rows=3):
        assert model.model.layers[0].self_attn.q_proj.packed_siblings is not None
        _, _, want = _greedy_logits(model, ids, mask, steps=4)
        calls = _count_lean_steps(monkeypatch)
        with fast_decode.lean_decode_steps(model):
            _, _, got = _greedy_logits(model, ids, mask, steps=4)
    assert calls[0] == 3 * len(model.model.layers)
    assert "packed_siblings" not in model.model.layers[0].self_attn.q_proj.__dict__
    # The same bf16 products; the fused norm and rotation may round differently (here they did not).
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
