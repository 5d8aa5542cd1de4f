"""frozen_precision: frozen linears (LoRA's base, trainable_layers' bottom) stored in the compute precision.

The claims: autocast forwards and gradients are bit-identical to an fp32-stored base (autocast rounds the weights to
the same values), fp32 forwards run on the rounded weights, saves are fp32 files of the rounded weights, and the bf16
decode path packs the frozen layers like any linear.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit.generation.fast_decode import prepacked_linears
from rlhfkit.modeling import models
from tests.helpers import saved_weights


def _options(**kw):
    return models.ModelOptions(model="tiny", **kw)


def _lora_pair():
    """The tiny model with the same LoRA adapters twice: base stored in bf16 (the default) and in fp32. The B
    matrices get the same random values on both, so the adapters change the output."""
    base = models.build_tiny(seed=3)
    torch.manual_seed(0)
    low = models.prepare_for_training(copy.deepcopy(base), _options(lora_r=4, precision="bf16"))
    torch.manual_seed(0)
    full = models.prepare_for_training(copy.deepcopy(base), _options(lora_r=4, precision="bf16", frozen_precision="fp32"))
    torch.manual_seed(1)
    with torch.no_grad():
        for (name, p), (other, q) in zip(low.named_parameters(), full.named_parameters(), strict=True):
            assert name == other
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    return low, full


def _rounded(model):
    """A copy of ``model`` with its frozen linears' fp32 weights rounded to bf16 values (kept in fp32); not the
    output head, tied to the embeddings."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module is not head and not module.weight.requires_grad:
                for p in module.parameters(recurse=False):
                    p.copy_(p.to(torch.bfloat16).float())
    return model


def test_lora_base_is_stored_in_bf16_and_adapters_embeddings_stay_fp32():
    low, full = _lora_pair()
    frozen = [m for m in low.modules() if type(m) is models.FrozenLinear]
    assert len(frozen) == 7 * 2  # 7 target projections x 2 layers of the tiny model
    assert all(m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad for m in frozen)
    trainable = [(n, p) for n, p in low.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    assert low.get_input_embeddings().weight.dtype == torch.float32
    assert not any(type(m) is models.FrozenLinear for m in full.modules())  # frozen_precision=fp32 keeps fp32
    # fp32 compute leaves every weight alone.
    plain = models.prepare_for_training(models.build_tiny(seed=3), _options(lora_r=4, precision="fp32"))
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    with pytest.raises(ValueError, match="frozen_precision must be auto or fp32"):
        models.prepare_for_training(models.build_tiny(), _options(lora_r=4, frozen_precision="bf16"))


def test_autocast_forward_and_adapter_gradients_are_bit_identical_to_an_fp32_base():
    low, full = _lora_pair()
    ids = torch.randint(3, 200, (2, 9))
    outs = []
    for model in (low, full):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        (logits.float().square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        outs.append((logits.detach(), grads))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    assert all(torch.equal(outs[0][1][n], outs[1][1][n]) for n in outs[0][1])
    assert any(g.abs().sum() > 0 for g in outs[0][1].values())


def test_fp32_forward_runs_on_the_rounded_weights():
    low, full = _lora_pair()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        got = low(input_ids=ids).logits
        want = _rounded(full)(input_ids=ids).logits
        unrounded = full(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unrounded, rtol=1e-6, atol=1e-6)  # the rounding is visible: the check can fail


def _file_dtypes(directory):
    return {v.dtype for v in saved_weights(directory).values()}


def test_merged_lora_save_is_fp32_of_the_rounded_base_plus_the_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    low, full = _lora_pair()
    models.save_pretrained(low, None, tmp_path / "low")
    assert _file_dtypes(tmp_path / "low") == {torch.float32}
    assert any(type(m) is models.FrozenLinear for m in low.modules())  # the model in memory keeps its storage
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "low", dtype=torch.float32).state_dict()
    want = copy.deepcopy(_rounded(full)).merge_and_unload().state_dict()
    assert loaded.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(loaded[k], want[k], rtol=0, atol=0, msg=k)


def test_trainable_layers_store_the_frozen_bottom_in_bf16_and_save_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    model = models.prepare_for_training(models.build_tiny(seed=3), _options(trainable_layers=1, precision="bf16"))
    _, layers = models.decoder_layers(model)
    assert all(type(m) is models.FrozenLinear for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert not any(type(m) is models.FrozenLinear for m in layers[1].modules())
    assert model.get_output_embeddings().weight.dtype == torch.float32  # tied to the embeddings: left alone
    models.save_pretrained(model, None, tmp_path / "m")
    assert _file_dtypes(tmp_path / "m") == {torch.float32}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v.float()), k


@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN bf16 (prepacked_linears' path) is not available on this CPU",
)
def test_decode_packing_packs_the_frozen_layers_and_gives_the_same_logits():
    low, full = _lora_pair()
    low.eval(), full.eval()
    ids = torch.randint(3, 200, (2, 9))
    results = []
    for model in (low, full):
        frozen = [m for m in model.modules() if type(m) in (models.FrozenLinear, torch.nn.Linear)]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), prepacked_linears(model, rows=2):
            assert all("forward" in m.__dict__ for m in frozen)  # every linear packed, the frozen ones too
            results.append(model(input_ids=ids).logits)
        assert not any("forward" in m.__dict__ for m in frozen)  # the class forward is back
    assert torch.equal(results[0], results[1])


def test_lora_adapters_start_from_the_run_seed_whatever_the_global_rng():
    """Two runs with one seed start from the same adapters (the stages seed torch only after preparing the model)."""

    class Options(models.ModelOptions):
        seed: int = 0

    def adapters(seed: int, global_seed: int):
        torch.manual_seed(global_seed)
        options = Options(model="tiny", lora_r=4, precision="fp32")
        options.seed = seed
        model = models.prepare_for_training(models.build_tiny(), options)
        after = torch.rand(1)  # the global stream is left as it was
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = adapters(7, 1), adapters(7, 2), adapters(8, 1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
