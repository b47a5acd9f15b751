"""Fused activations (fused.py): the same log-probs and gradients as the model's own modules, and
a saved model that is exactly what the unfused one would save."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from prefopt.data.collate import PaddedPairCollator
from prefopt.data.tokenize import TokenizedPair
from prefopt.modeling.fused import fuse_activations
from prefopt.modeling.load import load_causal_lm
from prefopt.modeling.logprobs import pair_logps
from prefopt.toy import build_tiny_model


def _batch():
    pairs = [TokenizedPair([2, 5, 6, 7], [8, 9, 3], [10, 3], None, None, 0),
             TokenizedPair([2, 11], [12, 13, 14, 3], [15, 16, 3], None, None, 1)]
    return PaddedPairCollator(pad_token_id=0)(pairs)


def _logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = pair_logps(model, batch)
    (out["chosen_logps"] - 0.5 * out["rejected_logps"]).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("activation, unfused", [("gelu_new", NewGELUActivation), ("gelu_fast", FastGELUActivation),
                                                 ("gelu_python_tanh", GELUTanh)])
def test_fused_gelu_matches_the_models_own_activation(tmp_path, activation, unfused):
    path = build_tiny_model(tmp_path / "m", arch="gpt2", activation_function=activation, n_embd=64)
    plain = load_causal_lm(str(path), fused_activations=False)
    fused = load_causal_lm(str(path))
    assert sum(isinstance(m, unfused) for m in plain.modules()) == 2  # one per layer
    assert [type(m) for m in fused.modules() if isinstance(m, (unfused, GELUTanh))] == [GELUTanh, GELUTanh]
    assert fuse_activations(fused) == 0  # already fused: nothing left to replace
    python_chain = GELUTanh._gelu_tanh_python
    assert all(getattr(m.act, "__func__", None) is not python_chain for m in fused.modules() if isinstance(m, GELUTanh))
    batch = _batch()
    want, want_grads = _logps_and_grads(plain, batch)
    got, got_grads = _logps_and_grads(fused, batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
        assert not torch.equal(got[key], torch.zeros_like(got[key]))
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5)


def test_fused_model_saves_what_the_unfused_one_saves(tmp_path):
    path = build_tiny_model(tmp_path / "m", arch="gpt2")  # gelu_new, GPT-2's own
    fused = load_causal_lm(str(path))
    assert fused.config.activation_function == "gelu_new"
    fused.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"
    plain = load_causal_lm(str(path), fused_activations=False)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    reloaded = load_causal_lm(str(tmp_path / "saved"), fused_activations=False)
    assert any(isinstance(m, NewGELUActivation) for m in reloaded.modules())


def test_an_activation_shared_by_layers_is_replaced_everywhere(tmp_path):
    path = build_tiny_model(tmp_path / "m", arch="gpt2")
    model = load_causal_lm(str(path), fused_activations=False)
    shared = model.transformer.h[0].mlp.act
    model.transformer.h[1].mlp.act = shared
    assert fuse_activations(model) == 2
    acts = [block.mlp.act for block in model.transformer.h]
    assert all(isinstance(a, GELUTanh) for a in acts) and acts[0] is acts[1]


def test_models_without_tanh_gelu_are_left_alone(tiny_llama):
    model = load_causal_lm(str(tiny_llama), fused_activations=False)
    before = [type(m) for m in model.modules()]
    assert fuse_activations(model) == 0
    assert [type(m) for m in model.modules()] == before
