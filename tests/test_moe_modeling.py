"""BERT Mixture-of-Experts modeling: gating, MoE/PAD-MoE layers, model conversion, save/load."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertForSequenceClassification

import pad
from pad.mixing import weight_banks
from conftest import tiny_bert_config
from moe.gating import NoisyTopKGate
from moe.modeling import (MOE_LAYERS, MOE_TYPES, MoELinear, aux_loss, convert_to_moe, expert_load,
                          ffn_parameter_counts, load_model, moe_layers)

torch.set_num_threads(1)

F64 = torch.float64


def tiny_bert(seed=0, dropout=0.0, dtype=F64):
    torch.manual_seed(seed)
    config = tiny_bert_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config).to(dtype).eval()


def batch(seed=1, size=3, length=10):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 90, (size, length), generator=g),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=g)}


def randomize_(tensor, scale=0.5):
    with torch.no_grad():
        tensor.add_(scale * torch.randn_like(tensor))


def reference_moe(layer, x, gates):
    """sum over the experts of gate_e * (x Omega_e^T + b_e), looping token by token: (T, out)."""
    weights = layer.expert_weights()
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype)
    for t in range(x.shape[0]):
        for e in range(layer.num_experts):
            if gates[t, e] != 0:
                out[t] += gates[t, e] * (weights[e] @ x[t] + layer.bias[e])
    return out


# ---------------------------------------------------------------- conversion of an untrained model

@pytest.mark.parametrize("moe", ["moe", "pad"])
@pytest.mark.parametrize("which", MOE_LAYERS)
def test_untrained_conversion_equals_dense_in_eval(moe, which):
    dense = tiny_bert()
    inputs = batch()
    expected = dense(**inputs).logits
    model = convert_to_moe(copy.deepcopy(dense), moe, num_experts=4, top_k=2, moe_layers=which)
    layers = moe_layers(model)
    parts = ("intermediate", "output") if which == "both" else (which,)
    assert len(layers) == 2 * len(parts)
    assert all(name.endswith(tuple(f"{p}.dense" for p in parts)) for name in layers)
    assert all(not layer.training for layer in layers.values())  # inherits the eval mode
    torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
    # untrained gate, tied logits: every token goes to the same k experts, gate 1/k each
    tokens = inputs["input_ids"].numel()
    for layer in layers.values():
        counts = layer.last_expert_counts
        assert int((counts > 0).sum()) == 2 and set(counts[counts > 0].tolist()) == {tokens}


@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_untrained_conversion_equals_dense_in_training_without_dropout(moe):
    """In training the noise std is softplus(0) = log 2, so routing is random, but every expert
    is the dense layer and the gates of a token sum to 1: the output is still the dense one."""
    dense = tiny_bert(dropout=0.0)
    inputs = batch()
    expected = dense(**inputs).logits
    model = convert_to_moe(copy.deepcopy(dense), moe, num_experts=4, top_k=2).train()
    torch.manual_seed(3)
    torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
    counts = next(iter(moe_layers(model).values())).last_expert_counts
    assert int((counts > 0).sum()) > 2  # noisy routing spreads the tokens beyond the tied top-k


def test_convert_records_settings_and_none_is_identity():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_to_moe(model, "none") is model
    assert getattr(model.config, "moe", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == model.state_dict().keys()
    convert_to_moe(model, "pad", num_experts=3, top_k=1, moe_layers="output", aux_loss_coef=0.1, scale_factors="s")
    assert model.config.moe == {"moe": "pad", "num_experts": 3, "top_k": 1, "moe_layers": "output",
                                "aux_loss_coef": 0.1, "scale_factors": "s", "partition_granularity": "element"}
    assert model.config.to_dict()["moe"] == model.config.moe


@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_upcycling_copies_the_dense_layer_and_draws_no_random_numbers(moe):
    dense = nn.Linear(6, 5, dtype=F64)
    before = torch.random.get_rng_state()
    layer = MoELinear.from_dense(dense, num_experts=3, moe=moe)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(layer.experts.kernels, dense.weight.expand(3, 5, 6))
    if moe == "pad":
        assert torch.equal(layer.experts.static_weight, dense.weight)
    assert not layer.gate.w_gate.any() and torch.equal(layer.bias, dense.bias.expand(3, 5))


@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_a_new_moe_layer_has_initialised_experts(moe):
    torch.manual_seed(0)
    layer = MoELinear(6, 5, num_experts=3, moe=moe)
    torch.manual_seed(0)
    bank = pad.DynamicWeights(3, (5, 6)) if moe == "moe" else pad.PartiallyDynamicWeights(3, (5, 6))
    assert torch.equal(layer.experts.kernels, bank.kernels) and layer.experts.kernels.std() > 0


# ---------------------------------------------------------------- PAD-MoE against its two limits

def make_layer(moe, scale_factors="both", num_experts=4, top_k=2, seed=0, in_features=6, out_features=5):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, dtype=F64)
    return MoELinear.from_dense(dense, num_experts=num_experts, top_k=top_k, moe=moe, scale_factors=scale_factors)


def test_pad_with_full_mask_and_fixed_scales_equals_moe():
    moe_layer = make_layer("moe")
    for p in (moe_layer.experts.kernels, moe_layer.bias, moe_layer.gate.w_gate, moe_layer.gate.w_noise):
        randomize_(p)
    pad_layer = make_layer("pad", scale_factors="none")
    with torch.no_grad():
        pad_layer.experts.kernels.copy_(moe_layer.experts.kernels)
        pad_layer.experts.static_weight.normal_()  # must not matter where M = 1
        pad_layer.bias.copy_(moe_layer.bias)
        pad_layer.gate.w_gate.copy_(moe_layer.gate.w_gate)
        pad_layer.gate.w_noise.copy_(moe_layer.gate.w_noise)
    assert torch.all(pad_layer.experts.mask == 1)
    x = torch.randn(2, 7, 6, dtype=F64)
    for training in (False, True):
        moe_layer.train(training), pad_layer.train(training)
        torch.manual_seed(5)
        expected = moe_layer(x)
        torch.manual_seed(5)
        torch.testing.assert_close(pad_layer(x), expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(pad_layer.last_aux_loss, moe_layer.last_aux_loss, atol=1e-12, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_pad_with_empty_mask_and_fixed_scales_equals_static_layer(training):
    layer = make_layer("pad", scale_factors="none").train(training)
    for p in (layer.experts.kernels, layer.experts.static_weight, layer.gate.w_gate, layer.gate.w_noise):
        randomize_(p)
    with torch.no_grad():
        layer.experts.mask.zero_()
        layer.bias.copy_(torch.randn(5, dtype=F64).expand(4, 5))  # the same bias for every expert
    x = torch.randn(3, 4, 6, dtype=F64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.experts.static_weight, layer.bias[0]), atol=1e-12, rtol=0)
    # per-expert biases: the static weight plus the routed mixture of biases
    randomize_(layer.bias)
    flat = x.reshape(-1, 6)
    torch.manual_seed(2)
    gates = layer.gate(flat).gates
    torch.manual_seed(2)
    out = layer(x).reshape(-1, 5)
    torch.testing.assert_close(out, flat @ layer.experts.static_weight.T + gates @ layer.bias, atol=1e-12, rtol=0)


@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_moe_linear_matches_token_by_token_reference(moe):
    layer = make_layer(moe, num_experts=5, top_k=3)
    for p in layer.parameters():
        randomize_(p)
    if moe == "pad":
        with torch.no_grad():
            layer.experts.mask.copy_((torch.rand(5, 6) < 0.5).to(F64))
    x = torch.randn(9, 6, dtype=F64)
    for training in (False, True):
        layer.train(training)
        torch.manual_seed(4)
        gates = layer.gate(x).gates
        torch.manual_seed(4)
        torch.testing.assert_close(layer(x), reference_moe(layer, x, gates), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- gating

def gate_with_random_weights(num_experts=6, top_k=2, in_features=8, seed=0):
    torch.manual_seed(seed)
    gate = NoisyTopKGate(in_features, num_experts, top_k, aux_loss_coef=0.01, dtype=F64)
    assert torch.all(gate.w_gate == 0) and torch.all(gate.w_noise == 0)
    randomize_(gate.w_gate, 1.0)
    randomize_(gate.w_noise, 0.3)
    return gate


def cv2(values):
    values = np.asarray(values, dtype=np.float64)
    return values.var(ddof=1) / (values.mean() ** 2 + 1e-10)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gates_have_exactly_top_k_nonzeros_summing_to_one(training, top_k):
    gate = gate_with_random_weights(top_k=top_k).train(training)
    x = torch.randn(40, 8, dtype=F64)
    routing = gate(x)
    assert routing.gates.shape == (40, 6)
    assert torch.all((routing.gates != 0).sum(1) == top_k)
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(40, dtype=F64), atol=1e-12, rtol=0)
    chosen = torch.zeros(40, 6, dtype=torch.bool).scatter(1, routing.top_indices, True)
    assert torch.equal(chosen, routing.gates != 0)
    torch.testing.assert_close(routing.gates.gather(1, routing.top_indices), routing.top_gates)


def test_eval_routing_has_no_noise_and_training_routing_does():
    gate = gate_with_random_weights()
    x = torch.randn(40, 8, dtype=F64)
    gate.eval()
    first, second = gate(x), gate(x)
    assert torch.equal(first.gates, second.gates)
    assert torch.equal(first.top_indices, (x @ gate.w_gate).topk(2, dim=1).indices)
    gate.train()
    assert not torch.equal(gate(x).gates, gate(x).gates)


def test_eval_aux_loss_matches_independent_importance_and_counts():
    gate = gate_with_random_weights().eval()
    x = torch.randn(50, 8, dtype=F64)
    routing = gate(x)
    logits = (x @ gate.w_gate).detach().numpy()
    gates = np.zeros_like(logits)
    counts = np.zeros(6)
    for t, row in enumerate(logits):
        top = np.argsort(-row)[:2]
        gates[t, top] = np.exp(row[top]) / np.exp(row[top]).sum()
        counts[top] += 1
    np.testing.assert_allclose(routing.gates.detach().numpy(), gates, atol=1e-12)
    np.testing.assert_array_equal(routing.expert_counts.numpy(), counts)
    expected = 0.01 * (cv2(gates.sum(0)) + cv2(counts))
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_training_aux_loss_uses_the_smooth_load_estimate():
    """load_e = sum over tokens of P(clean_e + std_e z > k-th largest noisy logit of the OTHER experts)."""
    gate = gate_with_random_weights(top_k=2).train()
    x = torch.randn(30, 8, dtype=F64)
    torch.manual_seed(11)
    routing = gate(x)
    torch.manual_seed(11)
    noise = torch.randn(30, 6, dtype=F64).numpy()
    clean = (x @ gate.w_gate).detach().numpy()
    std = F.softplus(x @ gate.w_noise).detach().numpy()
    noisy = clean + noise * std
    load = np.zeros(6)
    for t in range(30):
        for e in range(6):
            others = np.delete(noisy[t], e)
            kth_other = np.sort(others)[::-1][1]
            load[e] += norm.cdf((clean[t, e] - kth_other) / std[t, e])
    gates = np.zeros_like(noisy)
    for t, row in enumerate(noisy):
        top = np.argsort(-row)[:2]
        gates[t, top] = np.exp(row[top]) / np.exp(row[top]).sum()
    np.testing.assert_allclose(routing.gates.detach().numpy(), gates, atol=1e-12)
    expected = 0.01 * (cv2(gates.sum(0)) + cv2(load))
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_aux_loss_finite_and_non_negative_when_an_expert_gets_no_token(training):
    gate = gate_with_random_weights().train(training)
    with torch.no_grad():
        gate.w_gate[:, 0] = -1e4  # inputs are positive: expert 0 never wins
    x = torch.rand(30, 8, dtype=F64) + 0.1
    routing = gate(x)
    assert routing.expert_counts[0] == 0 and torch.all(routing.gates[:, 0] == 0)
    assert torch.isfinite(routing.aux_loss) and routing.aux_loss >= 0
    routing.aux_loss.backward()
    assert torch.isfinite(gate.w_gate.grad).all()
    if training:
        assert torch.isfinite(gate.w_noise.grad).all()


def test_gate_routes_in_float32_under_autocast():
    model = convert_to_moe(tiny_bert(dtype=torch.float32), "pad", num_experts=4, top_k=2).train()
    layer = next(iter(moe_layers(model).values()))
    randomize_(layer.gate.w_gate)
    x = torch.randn(12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.gate(x)
        out = model(**batch())
    assert routing.gates.dtype == torch.float32
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(12), atol=1e-6, rtol=0)
    assert out.logits.dtype == torch.bfloat16
    (out.loss + aux_loss(model)).backward()
    assert layer.gate.w_gate.grad.abs().sum() > 0


# ---------------------------------------------------------------- once per forward, gradients

@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_expert_weights_are_computed_once_per_forward(moe):
    model = convert_to_moe(tiny_bert(), moe, num_experts=4, top_k=2)
    calls = {}
    for name, layer in moe_layers(model).items():
        layer.experts.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(**batch(size=4, length=12))
    assert calls == {name: 1 for name in moe_layers(model)}


def test_gradients_reach_gate_scales_and_used_positions_only():
    layer = make_layer("pad", num_experts=4, top_k=2, in_features=6, out_features=5).train()
    for p in (layer.experts.kernels, layer.gate.w_gate, layer.bias):
        randomize_(p)
    with torch.no_grad():
        layer.gate.w_gate[:, 3] = -1e4  # expert 3 never used
        layer.experts.mask.copy_((torch.rand(5, 6) < 0.5).to(F64))
    x = torch.rand(64, 6, dtype=F64) + 0.1
    (layer(x).pow(2).sum() + layer.last_aux_loss).backward()
    mask = layer.experts.mask.bool()
    assert layer.gate.w_gate.grad.abs().sum() > 0 and layer.gate.w_noise.grad.abs().sum() > 0
    assert layer.experts.scale.phi.grad != 0
    static_grad, kernel_grad = layer.experts.static_weight.grad, layer.experts.kernels.grad
    assert torch.all(static_grad[mask] == 0) and torch.all(static_grad[~mask] != 0)
    assert torch.all(kernel_grad[:, ~mask] == 0)
    assert torch.all(kernel_grad[:3][:, mask] != 0) and torch.all(kernel_grad[3] == 0)
    assert torch.all(layer.bias.grad[:3] != 0) and torch.all(layer.bias.grad[3] == 0)
    assert layer.experts.mask.grad is None


def test_eval_gradients_skip_the_noise_weights():
    layer = make_layer("moe").eval()
    randomize_(layer.gate.w_gate)
    layer(torch.randn(10, 6, dtype=F64)).sum().backward()
    assert layer.gate.w_gate.grad.abs().sum() > 0
    assert layer.gate.w_noise.grad is None


# ---------------------------------------------------------------- IMP on an MoE model

@pytest.mark.parametrize("scope", ["global", "local"])
def test_imp_hits_the_ratio_with_one_mask_per_layer_shared_by_experts(scope):
    model = convert_to_moe(tiny_bert(), "pad", num_experts=4, top_k=2)
    for layer in moe_layers(model).values():
        randomize_(layer.experts.kernels, 0.05)  # upcycled experts equal W_s: all taylor scores would be 0
    batches = [batch(seed=s, size=4, length=8) for s in range(2)]
    report = pad.iterative_mode_partition(model, batches, loss_fn=lambda m, b: m(**b).loss, dynamic_ratio=0.5,
                                          iterations=2, scope=scope)
    layers = moe_layers(model)
    names = [name for name, _ in weight_banks(model)]
    assert names == [f"{name}.experts" for name in layers]  # exactly one bank (one mask) per MoE layer
    total = 0
    for layer in layers.values():
        mask = layer.experts.mask
        assert mask.shape == (layer.out_features, layer.in_features)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        total += mask.numel()
        if scope == "local":
            assert abs(mask.sum().item() - 0.5 * mask.numel()) <= 1
        # static positions hold the same shared lambda_s * W_s in every expert
        weights = layer.expert_weights().detach()
        static = ~mask.bool()
        assert torch.equal(weights[:, static], weights[:1, static].expand(layer.num_experts, -1))
    dynamic = sum(layer.experts.mask.sum().item() for layer in layers.values())
    assert abs(dynamic - 0.5 * total) <= len(layers)
    assert report.achieved == pytest.approx(pad.dynamic_ratio(model))
    assert abs(pad.dynamic_ratio(model) - 0.5) <= len(layers) / total


# ---------------------------------------------------------------- save / load

def set_random_masks(model, ratio, seed=0):
    """Exactly round(ratio * N) dynamic positions per PAD layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bank in weight_banks(model):
            n = bank.mask.numel()
            flat = torch.zeros(n, dtype=bank.mask.dtype)
            flat[torch.randperm(n, generator=g)[:round(ratio * n)]] = 1
            bank.mask.copy_(flat.view_as(bank.mask))


@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_save_and_load_round_trip(moe, tiny_bert_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    convert_to_moe(model, moe, num_experts=3, top_k=2, moe_layers="both")
    for layer in moe_layers(model).values():
        for p in (layer.experts.kernels, layer.gate.w_gate, layer.bias):
            randomize_(p, 0.1)
        if moe == "pad":
            with torch.no_grad():
                layer.experts.scale.phi.fill_(0.3)
    if moe == "pad":
        set_random_masks(model, 0.5)
    model.eval()
    inputs = batch()
    inputs.pop("labels")
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert config.moe == model.config.moe
    loaded = load_model(tmp_path, config).eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded(**inputs).logits, expected)
    for (name, a), (_, b) in zip(moe_layers(model).items(), moe_layers(loaded).items()):
        if moe == "pad":
            assert torch.equal(a.experts.mask, b.experts.mask) and a.experts.mask.sum() < a.experts.mask.numel()
            assert torch.equal(a.experts.scale.phi, b.experts.scale.phi)
    if moe == "pad":
        assert pad.dynamic_ratio(loaded) == pytest.approx(0.5, abs=1e-3)


def test_load_model_of_a_dense_directory_is_from_pretrained(tiny_bert_dir):
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    inputs = batch()
    inputs.pop("labels")
    expected = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()(**inputs).logits
    loaded = load_model(tiny_bert_dir, config).eval()
    assert not moe_layers(loaded)
    assert torch.equal(loaded(**inputs).logits, expected)


def test_load_model_rejects_weights_of_another_moe_structure(tiny_bert_dir, tmp_path):
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), "moe", 3, 2)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    config.moe = dict(config.moe, moe="pad")
    with pytest.raises(ValueError, match="does not match its MoE config"):
        load_model(tmp_path, config)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        load_model(tmp_path, AutoConfig.from_pretrained(tmp_path))


# ---------------------------------------------------------------- statistics helpers

def test_aux_loss_and_expert_load_helpers():
    model = tiny_bert()
    assert aux_loss(model).shape == () and aux_loss(model).item() == 0.0 and expert_load(model) == {}
    convert_to_moe(model, "moe", num_experts=4, top_k=2).train()
    for layer in moe_layers(model).values():
        randomize_(layer.gate.w_gate)
    inputs = batch()
    model(**inputs)
    layers = moe_layers(model)
    total = aux_loss(model)
    assert total.shape == () and total.requires_grad
    torch.testing.assert_close(total, sum(layer.last_aux_loss for layer in layers.values()).float())
    loads = expert_load(model)
    assert loads.keys() == layers.keys()
    tokens = inputs["input_ids"].numel()
    for name, load in loads.items():
        torch.testing.assert_close(load, layers[name].last_expert_counts / (2 * tokens))
        assert load.sum().item() == pytest.approx(1.0)


def test_ffn_parameter_counts_dense_moe_and_pad():
    model = tiny_bert()
    hidden, inner, num_layers, experts, kappa = 32, 64, 2, 4, 0.5
    weight = hidden * inner
    dense_ffn = num_layers * (2 * weight + inner + hidden)
    assert ffn_parameter_counts(model)["dense"] == dense_ffn == ffn_parameter_counts(model)["compact"]

    moe_model = convert_to_moe(copy.deepcopy(model), "moe", num_experts=experts, top_k=2)
    gates = num_layers * (2 * hidden * experts + 2 * inner * experts)  # w_gate + w_noise of both layers
    moe_count = num_layers * experts * (2 * weight + inner + hidden) + gates
    assert ffn_parameter_counts(moe_model) == {"dense": moe_count, "compact": moe_count, "mask_entries": 0}

    pad_model = convert_to_moe(copy.deepcopy(model), "pad", num_experts=experts, top_k=2)
    set_random_masks(pad_model, kappa)
    rest = num_layers * experts * (inner + hidden) + gates + 2 * num_layers  # biases, gates, one phi per layer
    counts = ffn_parameter_counts(pad_model)
    assert counts["dense"] == 2 * num_layers * (experts + 1) * weight + rest
    assert counts["compact"] == 2 * num_layers * round((1 - kappa) * weight + kappa * experts * weight) + rest
    assert counts["mask_entries"] == 2 * num_layers * weight
    assert counts["compact"] == sum(v.numel() for k, v in pad.export_compact(pad_model).items()
                                    if "encoder" in k and ("dense" in k) and "attention" not in k
                                    and not k.endswith("mask"))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=9, num_experts=8), r"top_k must be between 1 and num_experts \(8\), got 9"),
    (dict(top_k=0), r"top_k must be between 1 and num_experts \(8\), got 0"),
    (dict(num_experts=0, top_k=1), "num_experts must be an integer >= 1, got 0"),
    (dict(moe="dense"), r"unknown moe type 'dense'; expected one of \('none', 'moe', 'pad'\)"),
    (dict(moe_layers="attention"), "unknown moe_layers 'attention'"),
    (dict(scale_factors="x"), "unknown scale_factors 'x'"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef must be >= 0"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    model = tiny_bert()
    with pytest.raises(ValueError, match=message):
        convert_to_moe(model, **{"moe": "pad", **kwargs})
    assert not moe_layers(model) and getattr(model.config, "moe", None) is None


def test_model_without_feed_forward_layers_is_rejected():
    with pytest.raises(ValueError, match=r"Sequential has no BERT-style feed-forward layers \(intermediate.dense/output.dense\)"):
        convert_to_moe(nn.Sequential(nn.Linear(4, 4)), "pad")
    with pytest.raises(ValueError, match="no BERT-style feed-forward layers"):
        ffn_parameter_counts(nn.Sequential(nn.Linear(4, 4)))
    model = convert_to_moe(tiny_bert(), "moe", 4, 2)
    with pytest.raises(ValueError, match="already has MoE layers"):
        convert_to_moe(model, "pad", 4, 2)


def test_public_constants():
    assert MOE_TYPES == ("none", "moe", "pad") and MOE_LAYERS == ("intermediate", "output", "both")


# ---------------------------------------------------------------- benchmark CLI (no timing assertions)

def test_bench_cli_measures_the_four_models_with_the_given_settings(tiny_bert_dir, tmp_path, capsys):
    from moe import bench
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", str(tiny_bert_dir), "--batch-size", "2", "--seq-length", "8", "--num-experts", "3",
                     "--top-k", "2", "--dynamic-ratio", "0.25", "--min-run-time", "0.01", "--rounds", "2", "--device", "cpu",
                     "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"] == dict(batch_size=2, seq_length=8, num_experts=3, top_k=2, dynamic_ratio=0.25,
                                      min_run_time=0.01, rounds=2, device="cpu", threads=torch.get_num_threads())
    rows = result["models"]
    assert list(rows) == ["dense", "moe", "pad", "pad-unit"] and "pad-unit" in capsys.readouterr().out
    for row in rows.values():
        for key in ("forward_s", "forward_backward_s"):
            assert len(row[f"{key}_rounds"]) == 2 and row[key] == pytest.approx(np.median(row[f"{key}_rounds"]))
        for key in ("forward_s", "forward_backward_s", "forward_flops"):
            assert row[f"{key}_relative"] == pytest.approx(row[key] / rows["dense"][key])
            assert row[f"{key}_relative_to_moe"] == pytest.approx(row[key] / rows["moe"][key])
    hidden, inner, layers, tokens, experts, k = 32, 64, 2, 16, 3, 2
    ffn_flops = layers * 2 * tokens * 2 * hidden * inner
    gate_flops = layers * 2 * tokens * experts * (hidden + inner)
    assert rows["moe"]["forward_flops"] - rows["dense"]["forward_flops"] == (k - 1) * ffn_flops + gate_flops
    assert rows["pad"]["forward_flops"] == rows["moe"]["forward_flops"]
    # unit rows: the 75% static rows once per token instead of once per routed expert, plus gates @ bias
    static_rows_flops = layers * 2 * tokens * (hidden * 0.75 * inner + inner * 0.75 * hidden)
    bias_flops = layers * 2 * tokens * experts * (inner + hidden)
    assert rows["pad-unit"]["forward_flops"] == rows["moe"]["forward_flops"] - (k - 1) * static_rows_flops + bias_flops
    assert rows["pad-unit"]["dynamic_ratio"] == 0.25
    assert rows["pad-unit"]["ffn_params_compact"] == rows["pad"]["ffn_params_compact"]
    assert rows["pad"]["dynamic_ratio"] == 0.25 and rows["dense"]["dynamic_ratio"] is None
    weight = hidden * inner
    rest = layers * experts * (hidden + inner) + layers * 2 * experts * (hidden + inner) + 2 * layers
    assert rows["pad"]["ffn_params_compact"] == 2 * layers * round(0.75 * weight + 0.25 * experts * weight) + rest
    assert rows["dense"]["ffn_params_dense"] == layers * (2 * weight + hidden + inner)


def test_bench_times_with_the_threads_it_reports():
    from moe import bench
    seen = []

    def record(model, inputs):
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bench.time_once(None, record, None, min_run_time=0.001)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_bench_mini_defaults_and_explicit_flags():
    from moe import bench
    args = bench.parse_args(["--mini"])
    assert (args.batch_size, args.seq_length, args.min_run_time) == (8, 64, 0.2)
    assert (bench.parse_args([]).batch_size, bench.parse_args([]).seq_length) == (32, 128)
    assert bench.parse_args(["--mini", "--batch-size", "4"]).batch_size == 4


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "9"], "error: top_k must be between 1 and num_experts (8), got 9"),
    (["--dynamic-ratio", "1.5"], "error: dynamic ratio must be in (0, 1], got 1.5"),
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--rounds", "0"], "error: --rounds must be >= 1, got 0"),
    (["--model", "/nonexistent/model"], "error: /nonexistent/model is not a model directory (no config.json)"),
])
def test_bench_bad_input_gives_one_line_and_exit_2(argv, message, capsys):
    from moe import bench
    assert bench.main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_bench_bad_input_from_the_command_line_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "moe.bench", "--top-k", "0"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: top_k must be between 1 and num_experts (8), got 0"
