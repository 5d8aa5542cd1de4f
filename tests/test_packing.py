"""Packed batches: the layout by hand, and every packed forward against each sequence run alone."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.data import packing
from rlhfkit.data.pairwise import chosen_rejected, collate_pairs, tokenize_response
from rlhfkit.data.sft import IGNORE_INDEX, collate_sft
from rlhfkit.modeling import attention, models
from rlhfkit.modeling.forward import sequence_logps, sft_loss_sum
from rlhfkit.modeling.reward_model import load_reward_backbone, sequence_scores
from tests.helpers import ON_CUDA


def _use_kernel(monkeypatch, kernel: str) -> str:
    monkeypatch.setattr(attention, "use_flex", lambda query, layout, dropout: kernel == "flex" and dropout == 0.0)
    return kernel


@pytest.fixture(params=["segments", "flex"])
def packed_kernel(request, monkeypatch):
    """Run a test with each packed-attention kernel: the segment kernel, and FlexAttention over the row ids
    (compiled on CUDA, where it is opt-in; flex's eager reference on CPU)."""
    return _use_kernel(monkeypatch, request.param)


@pytest.fixture(params=["segments", "flex"] if ON_CUDA else ["segments"])
def packed_kernel_with_grad(request, monkeypatch):
    """:func:`packed_kernel` for tests that backpropagate: torch's FlexAttention has no CPU backward
    ("FlexAttention does not support backward on CPU"), so its gradients are tested on CUDA only."""
    return _use_kernel(monkeypatch, request.param)


def test_layout_by_hand():
    # Group 0: two sequences sharing [1, 2]; group 1: one sequence.
    b = packing.pack([[[1, 2, 3, 4], [1, 2, 5]], [[7, 8]]])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert b["row_group"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert b["row_seq"].tolist() == [-1, -1, 0, 0, 1, 2, 2]  # the prefix [1, 2] is no one sequence's
    assert b["seq_len"].tolist() == [4, 3, 2]
    assert b["seq_index"].tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 0, 0]]
    assert packing.last_positions(b).tolist() == [3, 4, 6]
    # One segment per sequence. Keys: the prefix and the sequence's own tokens. Queries: its own
    # tokens, and the prefix in the group's first sequence only.
    assert b["seg_index"].tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 0, 0]]
    assert b["query_index"].tolist() == [[0, 1, 2, 3], [4, 0, 0, 0], [5, 6, 0, 0]]
    assert b["unpack"].tolist() == [0, 1, 2, 3, 4, 8, 9]  # segment * 4 + query slot
    T, F = True, False
    causal = [[T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]
    seq1 = [
        [T, T, T, F],  # its own token (position 2): the prefix and itself, not sequence 0's tokens
        [T, F, F, F],  # unused query slots see key slot 0 (no empty softmax row)
        [T, F, F, F],
        [T, F, F, F],
    ]
    group1 = [
        [T, F, F, F],
        [T, T, F, F],
        [T, F, F, F],  # unused query slots
        [T, F, F, F],
    ]
    assert b["seg_mask"][:, 0].tolist() == [causal, seq1, group1]


def test_layout_by_hand_with_a_start_shared_by_every_group():
    # Every sequence starts with [1]: that row is laid out once, is key slot 0 of every segment,
    # and a query of the first group only.
    b = packing.pack([[[1, 2, 3, 4], [1, 2, 5]], [[1, 7, 8]]])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 1, 2]]
    assert b["row_group"].tolist() == [-1, 0, 0, 0, 0, 1, 1]  # the start [1] belongs to every group
    assert b["row_seq"].tolist() == [-1, -1, 0, 0, 1, 2, 2]
    assert b["seq_index"].tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [0, 5, 6, 0]]
    assert b["seg_index"].tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [0, 5, 6, 0]]
    assert b["query_index"].tolist() == [[0, 1, 2, 3], [4, 0, 0, 0], [5, 6, 0, 0]]
    assert b["unpack"].tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert packing.last_positions(b).tolist() == [3, 4, 6]
    T, F = True, False
    assert b["seg_mask"][2, 0].tolist() == [
        [T, T, F, F],  # own tokens of group 1's one sequence, at positions 1 and 2: the start and causally their own
        [T, T, T, F],
        [T, F, F, F],  # unused query slots
        [T, F, F, F],
    ]


def _mask_from_row_ids(batch) -> torch.Tensor:
    """(L, L) visibility from the row ids, by a plain loop over pairs (FlexAttention's mask_mod, spelled out)."""
    group, seq, pos = batch["row_group"].tolist(), batch["row_seq"].tolist(), batch["position_ids"][0].tolist()
    n = len(pos)
    return torch.tensor(
        [[pos[k] <= pos[q] and group[k] in (-1, group[q]) and seq[k] in (-1, seq[q]) for k in range(n)] for q in range(n)]
    )


def _mask_from_segments(batch) -> torch.Tensor:
    """(L, L) visibility from the segment layout: query row i, in slot q of segment s, sees the key rows of s allowed to q."""
    n = batch["input_ids"].shape[1]
    width = batch["query_index"].shape[1]
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        s, q = divmod(int(batch["unpack"][i]), width)
        for m, allowed in enumerate(batch["seg_mask"][s, 0, q].tolist()):
            if allowed:
                out[i, int(batch["seg_index"][s, m])] = True
    return out


@pytest.mark.parametrize("start", [[], [11, 12, 13]])
def test_row_ids_give_the_segment_layouts_mask(start):
    groups = [[start + s for s in group] for group in _random_groups(3)] + [[start + [5, 6]]]
    batch = packing.pack(groups)
    want = _mask_from_segments(batch)
    assert torch.equal(_mask_from_row_ids(batch), want)
    if start:
        assert int((batch["row_group"] == -1).sum()) == len(start)
    # The padded ids flex's mask_mod reads: the same mask on the real rows, and no real row sees a padded one.
    n = want.shape[0]
    group, seq, pos = attention.flex_row_ids(batch["row_group"], batch["row_seq"], batch["position_ids"][0])
    assert group.shape[0] % attention.FLEX_BLOCK == 0 and group.shape[0] >= n + attention.FLEX_BLOCK
    padded = _mask_from_row_ids({"row_group": group, "row_seq": seq, "position_ids": pos[None]})
    assert torch.equal(padded[:n, :n], want) and not padded[:n, n:].any()


def test_flex_attention_is_opt_in_on_cuda_only(monkeypatch):
    from types import SimpleNamespace

    layout = packing.model_inputs(packing.pack(_random_groups(0)))["rlhfkit_layout"]
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    monkeypatch.delenv(attention.FLEX_ENV, raising=False)
    assert not attention.use_flex(cuda, layout, 0.0)
    monkeypatch.setenv(attention.FLEX_ENV, "1")
    assert attention.use_flex(cuda, layout, 0.0)
    assert not attention.use_flex(cpu, layout, 0.0)  # no compiled flex (nor any backward) on CPU
    assert not attention.use_flex(cuda, layout, 0.1)  # flex has no dropout
    assert not attention.use_flex(cuda, layout._replace(row_group=None), 0.0)  # a layout without row ids


def test_a_packed_forward_builds_no_full_length_mask(monkeypatch):
    # transformers would build an (L, L) mask for the packed row (gigabytes at real lengths); the layout is the mask.
    from transformers.masking_utils import AttentionMaskInterface

    calls = []
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, packing.ATTENTION, lambda *a, **k: calls.append(k))
    model = models.build_tiny(seed=2).eval()
    models.set_attention(model)
    with torch.no_grad():
        model(**packing.model_inputs(packing.pack(_random_groups(0))))
        assert calls == []
        model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert len(calls) == 1  # a padded forward still asks for one


def test_padded_batches_get_sdpas_boolean_mask_on_cuda_and_eagers_additive_mask_elsewhere(monkeypatch):
    import transformers.masking_utils as mu

    kwargs = dict(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]).bool())
    cpu = attention.attention_mask(**kwargs, dtype=torch.float32, device=torch.device("cpu"))
    assert cpu.dtype == torch.float32 and torch.equal(cpu, mu.eager_mask(**kwargs, dtype=torch.float32, device="cpu"))
    seen = {}

    def fake_sdpa_mask(**k):
        seen.update(k)
        return "sdpa"

    with monkeypatch.context() as patch:
        patch.setattr(mu, "sdpa_mask", fake_sdpa_mask)
        assert attention.attention_mask(**kwargs, dtype=torch.float32, device="cuda", allow_is_causal_skip=True) == "sdpa"
    assert "dtype" not in seen and seen["allow_is_causal_skip"] is True
    # sdpa's own mask, where it can be built here: boolean, True where attention is allowed, None with nothing padded.
    boolean = mu.sdpa_mask(**kwargs, allow_is_causal_skip=True, device="cpu")
    assert boolean.dtype == torch.bool and torch.equal(boolean, cpu == 0)
    assert mu.sdpa_mask(**{**kwargs, "attention_mask": None}, allow_is_causal_skip=True, device="cpu") is None


def test_packed_logits_and_gradients_with_a_start_shared_by_all_groups_equal_each_sequence_alone(packed_kernel_with_grad):
    model = models.build_tiny(seed=2)
    alone = models.build_tiny(seed=2)
    models.set_attention(model)
    start = [11, 12, 13, 14]
    groups = [[start + s for s in group] for group in _random_groups(1)]
    batch = packing.pack(groups)
    total = sum(len(s) for group in groups for s in group)
    assert batch["input_ids"].shape[1] < total - (len(groups) - 1) * len(start) + 1
    weights = torch.randn(batch["input_ids"].shape[1], model.config.vocab_size, generator=torch.Generator().manual_seed(5))
    logits = model(**packing.model_inputs(batch)).logits[0]
    (logits * weights).sum().backward()  # every row once, so the shared start's gradient comes from all groups
    want_loss = 0.0
    for n, seq in enumerate(s for group in groups for s in group):
        rows = batch["seq_index"][n, : len(seq)]
        want = alone(input_ids=torch.tensor([seq])).logits[0]
        assert torch.allclose(logits[rows], want, atol=1e-5), (n, (logits[rows] - want).abs().max())
    # The same objective, computed sequence by sequence: each row's logits weighted once.
    owner = {}
    for n, seq in enumerate(s for group in groups for s in group):
        for t, r in enumerate(batch["seq_index"][n, : len(seq)].tolist()):
            owner.setdefault(r, (n, t))
    seqs = [s for group in groups for s in group]
    for n, seq in enumerate(seqs):
        out = alone(input_ids=torch.tensor([seq])).logits[0]
        for t in range(len(seq)):
            r = int(batch["seq_index"][n, t])
            if owner[r] == (n, t):
                want_loss = want_loss + (out[t] * weights[r]).sum()
    want_loss.backward()
    for (name, p), q in zip(model.named_parameters(), alone.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name


def test_shared_prefix_leaves_every_sequence_a_token():
    assert packing.shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert packing.shared_prefix_len([[1, 2, 3], [1, 2]]) == 1
    assert packing.shared_prefix_len([[4, 2], [1, 2]]) == 0
    assert packing.shared_prefix_len([[1, 2, 3]]) == 0
    with pytest.raises(ValueError, match="non-empty"):
        packing.pack([[[1, 2], []]])


def _random_groups(seed: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, 1000, (n,), generator=g).tolist()

    prompt = tokens(7)
    return [[prompt + tokens(5), prompt + tokens(9)], [tokens(11)], [tokens(3) + [9, 9], tokens(3)]]


def test_packed_logits_equal_each_sequence_alone(packed_kernel):
    model = models.build_tiny(seed=2).eval()
    alone = models.build_tiny(seed=2).eval()  # transformers' default kernel
    models.set_attention(model)
    groups = _random_groups(0)
    batch = packing.pack(groups)
    with torch.no_grad():
        logits = model(**packing.model_inputs(batch)).logits[0]
        for n, seq in enumerate(s for group in groups for s in group):
            want = alone(input_ids=torch.tensor([seq])).logits[0]
            got = logits[batch["seq_index"][n, : len(seq)]]
            assert torch.allclose(got, want, atol=1e-5), (n, (got - want).abs().max())


def test_packed_logits_under_bf16_autocast_match_each_sequence_alone(packed_kernel):
    # The bf16 path: the mask as a bf16 additive bias shared by all layers, the softmax in bf16 out.
    model = models.build_tiny(seed=2).eval()
    alone = models.build_tiny(seed=2).eval()
    models.set_attention(model)
    groups = _random_groups(0)
    batch = packing.pack(groups)
    inputs = packing.model_inputs(batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**inputs).logits[0].float()
        # made once, for every layer
        assert list(inputs["rlhfkit_layout"].cache) == (["block_mask"] if packed_kernel == "flex" else [(4, torch.bfloat16)])
        for n, seq in enumerate(s for group in groups for s in group):
            want = alone(input_ids=torch.tensor([seq])).logits[0].float()
            got = logits[batch["seq_index"][n, : len(seq)]]
            assert torch.allclose(got, want, atol=0.02), (n, (got - want).abs().max())


def test_kernel_on_padded_batches_equals_sdpa():
    # Generation and padded eval go through the same kernel without a layout.
    model = models.build_tiny(seed=2).eval()
    sdpa = models.build_tiny(seed=2).eval()
    models.set_attention(model)
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        got, want = model(input_ids=ids, attention_mask=mask).logits, sdpa(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[0, :6], want[0, :6], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_decode_attention_equals_a_loop_over_rows_and_heads(autocast):
    torch.manual_seed(0)
    B, H, H_kv, L, D = 3, 6, 2, 7, 8
    query = torch.randn(B, H, 1, D)
    room = torch.randn(2, B, H_kv, L + 4, D)  # keys/values as views of reserved room, like the decoding cache's
    key, value = room[0][:, :, :L], room[1][:, :, :L]
    mask = torch.zeros(B, 1, 1, L + 2)  # longer than the keys: only the first L columns count
    mask[1, ..., :3] = torch.finfo(torch.float32).min  # row 1: three padding positions
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = attention.decode_attention(query, key, value, mask, scaling=0.3).float()
    if autocast:  # the inputs as the bf16 matmuls see them
        query, key, value = (x.bfloat16().float() for x in (query, key, value))
    want = torch.empty(B, 1, H, D)
    for b in range(B):
        for h in range(H):
            kv = h // (H // H_kv)  # query heads 0-2 read kv head 0, 3-5 kv head 1
            scores = [0.3 * float(query[b, h, 0] @ key[b, kv, j]) + float(mask[b, 0, 0, j]) for j in range(L)]
            top = max(scores)
            weights = torch.tensor([math.exp(x - top) for x in scores])
            want[b, 0, h] = (weights / weights.sum()) @ value[b, kv]
    assert got.shape == (B, 1, H, D)
    assert torch.allclose(got, want, atol=0.03 if autocast else 1e-5), (got - want).abs().max()


def _pairs(tokenizer) -> list[dict]:
    out = []
    for prompt, chosen, rejected in [
        ("Name a colour.", "Blue.", "I would rather not say anything about colours at all."),
        ("What is two plus two? Answer briefly please.", "Four.", "Five, I think."),
        ("Hi.", "Hello! How can I help you today?", "Go away."),
    ]:
        (c_ids, c_lab), (r_ids, r_lab) = (tokenize_response(tokenizer, prompt, x) for x in (chosen, rejected))
        out.append(
            {
                "chosen_input_ids": c_ids,
                "chosen_labels": c_lab,
                "rejected_input_ids": r_ids,
                "rejected_labels": r_lab,
                "target": 1.0,
                "margin": 0.0,
            }
        )
    return out


def test_pair_batch_shares_the_prompt_and_counts_every_token(tokenizer):
    pairs = _pairs(tokenizer)
    padded, packed = collate_pairs(pairs, tokenizer.pad_token_id), collate_pairs(pairs, tokenizer.pad_token_id, packed=True)
    real = int(padded["attention_mask"].sum())
    assert packing.num_tokens(packed) == real
    prompt_tokens = sum(packing.shared_prefix_len([p["chosen_input_ids"], p["rejected_input_ids"]]) for p in pairs)
    assert prompt_tokens > 20  # the chat template's prompt part
    # And the start all pairs share (the template's system prompt) is laid out once, not once per pair.
    root = packing.shared_prefix_len([p[k] for p in pairs for k in ("chosen_input_ids", "rejected_input_ids")])
    assert root > 10
    assert packed["input_ids"].shape == (1, real - prompt_tokens - (len(pairs) - 1) * root)


def test_packed_pair_logps_and_scores_equal_padded(tokenizer):
    pairs = _pairs(tokenizer)
    padded, packed = collate_pairs(pairs, tokenizer.pad_token_id), collate_pairs(pairs, tokenizer.pad_token_id, packed=True)
    policy = models.build_tiny(seed=4).eval()
    models.set_attention(policy)
    rm = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal", seed=1).eval()
    models.set_attention(rm)
    with torch.no_grad():
        for fn in (
            lambda b: sequence_logps(policy, b)[0],
            lambda b: sequence_logps(policy, b)[1].float(),
            lambda b: sequence_scores(rm, b),
        ):
            want, got = chosen_rejected(padded, fn(padded)), chosen_rejected(packed, fn(packed))
            for w, g in zip(want, got):
                assert w.shape == (3,) and torch.allclose(g, w, atol=1e-4), (g, w)


def test_packed_sft_loss_and_gradients_equal_padded(tokenizer, packed_kernel_with_grad):
    seqs = []
    for prompt, response in [
        ("Hi.", "Hello!"),
        ("Tell me about dragons in one sentence.", "Dragons are large, winged, fire-breathing reptiles of legend."),
    ]:
        ids, labels = tokenize_response(tokenizer, prompt, response)
        seqs.append({"input_ids": ids, "labels": labels})
    padded, packed = collate_sft(seqs, tokenizer.pad_token_id), collate_sft(seqs, tokenizer.pad_token_id, packed=True)
    assert (padded["attention_mask"] == 0).any()
    root = packing.shared_prefix_len([e["input_ids"] for e in seqs])  # the template's start, laid out once
    assert root > 10 and packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()) - (len(seqs) - 1) * root)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
    grads = []
    for batch in (padded, packed):
        model = models.build_tiny(seed=5)
        models.set_attention(model)
        loss = sft_loss_sum(model, batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-4)
    for name in grad_a:
        assert torch.allclose(grad_a[name], grad_b[name], atol=1e-5, rtol=1e-4), name


def test_packing_needs_the_rlhfkit_kernel():
    from rlhfkit.sft import SFTConfig

    config = SFTConfig(model=models.TINY, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="packing=true needs attn_implementation=auto"):
        models.prepare_for_training(models.build_tiny(), config)
    config.packing = False
    model = models.prepare_for_training(models.build_tiny(), config)
    assert model.config._attn_implementation == "sdpa"


def test_packed_batch_through_another_kernel_is_an_error(tokenizer):
    # sdpa would build its mask from the position ids, cutting the rejected response off its prompt.
    pairs = _pairs(tokenizer)
    packed = collate_pairs(pairs, tokenizer.pad_token_id, packed=True)
    with pytest.raises(ValueError, match="packed batch needs attn_implementation='rlhfkit'"):
        sequence_logps(models.build_tiny(), packed)
    rm = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="packed batch needs"):
        sequence_scores(rm, packed)
