"""trainable_layers: only the top N decoder layers, the final norm and untied heads train."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.modeling import models
from rlhfkit.modeling.reward_model import load_reward_backbone


def _options(**kw):
    return models.ModelOptions(model="tiny", precision="fp32", **kw)


def test_reward_model_trains_its_top_layer_norm_and_score_head_only():
    tok = models.load_tokenizer("tiny")
    model = models.prepare_for_training(load_reward_backbone("tiny", pad_token_id=tok.pad_token_id), _options(trainable_layers=1))
    _, layers = models.decoder_layers(model)
    assert len(layers) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.", "score.")) for n in trainable)
    assert any(n.startswith("score.") for n in trainable) and any(n.startswith("model.layers.1.") for n in trainable)
    ids = torch.randint(3, 100, (2, 7))
    model(input_ids=ids).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_tied_lm_head_stays_frozen_with_the_embeddings():
    model = models.load_causal_lm("tiny")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model = models.prepare_for_training(model, _options(trainable_layers=0))
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad == (not tied)
    assert all(not p.requires_grad for p in models.decoder_layers(model)[1].parameters())


def test_all_layers_and_bad_values():
    model = models.prepare_for_training(models.load_causal_lm("tiny"), _options(trainable_layers=2))
    assert all(p.requires_grad for p in models.decoder_layers(model)[1].parameters())
    with pytest.raises(ValueError, match="trainable_layers must be in 0..2"):
        models.prepare_for_training(models.load_causal_lm("tiny"), _options(trainable_layers=3))
    with pytest.raises(ValueError, match="use one"):
        models.prepare_for_training(models.load_causal_lm("tiny"), _options(trainable_layers=1, lora_r=4))
