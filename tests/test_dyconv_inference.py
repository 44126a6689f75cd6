"""Inference form of PAD models: folded kernels, no mask or static bank, the trained model's logits."""
import pytest
import torch

import pad
from pad.mixing import weight_banks
from pad.partition import select_dynamic
from dyconv.inference import InferenceWeights, load_inference, to_inference
from dyconv.layers import DynamicConv2d, conv_schemes, dynamic_convs
from dyconv.models import build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64")

SMALL = dict(small_input=True, in_channels=1, num_classes=5)


def trained_like_pad_model(conv, arch="resnet10", seed=0, **options):
    """A PAD model with a random mask, phi != 0, a temperature of 1 and BatchNorm statistics of real batches."""
    torch.manual_seed(seed)
    model = build_model(arch, conv, pad=True, temperature=1.0, **SMALL, **options)
    banks = dict(weight_banks(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        select_dynamic(banks, {n: torch.rand(b.mask.shape, generator=generator) for n, b in banks.items()},
                           0.3, "global")
        for i, bank in enumerate(banks.values()):
            bank.scale.phi.fill_(0.1 * (i % 5) - 0.2)
        model.train()
        model(torch.randn(3, 1, 12, 12, generator=generator))
    return model.eval()


@pytest.mark.parametrize("conv, arch", [("dyconv", "resnet10"), ("condconv", "resnet10"), ("odconv", "resnet10"),
                                        ("dyconv", "mobilenetv2_050")])
def test_inference_form_gives_the_trained_models_logits(conv, arch):
    """ODConv here with no attention on the static part, held apart; its other placements: the next test."""
    model = trained_like_pad_model(conv, arch, **({"odconv_static_attention": "none"} if conv == "odconv" else {}))
    inference = to_inference(model)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(inference(x[:1]), model(x[:1]), rtol=1e-10, atol=1e-10)
    state = inference.state_dict()
    assert not any(k.endswith((".mask", ".static_weight", ".phi")) for k in state)
    assert not list(weight_banks(inference)) and not inference.training
    assert not any(p.requires_grad for p in inference.parameters())
    assert conv_schemes(inference) == conv_schemes(model)
    for (name, layer), (_, original) in zip(dynamic_convs(inference), dynamic_convs(model)):
        assert isinstance(layer.bank, InferenceWeights)
        bank = original.bank
        lambda_d = 2 * torch.sigmoid(bank.scale.phi)
        dynamic = lambda_d * bank.mask * bank.kernels
        static = (2 - lambda_d) * (1 - bank.mask) * bank.static_weight
        if isinstance(layer, DynamicConv2d):  # folded: W'_k = lambda_d M W_k + lambda_s (1 - M) W_s
            assert layer.bank.static is None and f"{name}.bank.static" not in state
            torch.testing.assert_close(layer.bank.kernels, dynamic + static, rtol=0, atol=1e-15)
        else:
            torch.testing.assert_close(layer.bank.kernels, dynamic, rtol=0, atol=1e-15)
            torch.testing.assert_close(layer.bank.static, static, rtol=0, atol=1e-15)
    assert len(list(weight_banks(model))) == len(list(dynamic_convs(model)))  # the trained model is untouched


@pytest.mark.parametrize("static_attention", ["channel-filter", "all"])
def test_inference_form_of_odconv_whose_attentions_scale_the_static_part(static_attention):
    """channel-filter: the 1x1 convs (no spatial attention) hold the folded W'_k alone, the 3x3 convs
    lambda_d M W_k and the static part apart; all: every conv holds W'_k; the logits are the trained model's."""
    model = trained_like_pad_model("odconv", odconv_static_attention=static_attention)
    inference = to_inference(model)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=1e-10, atol=1e-10)
    folded = {name: layer.bank.static is None for name, layer in dynamic_convs(inference)}
    assert folded == {name: static_attention == "all" or layer.kernel_size == 1 for name, layer in dynamic_convs(model)}
    assert any(folded.values()) and (static_attention == "all" or not all(folded.values()))
    assert all(layer.static_attention == static_attention for _, layer in dynamic_convs(inference))


def test_inference_form_is_eval_only():
    inference = to_inference(trained_like_pad_model("dyconv"))
    inference.train()
    with pytest.raises(RuntimeError, match="an inference-form model is eval only"):
        inference(torch.randn(2, 1, 12, 12))


def test_inference_form_from_the_compact_file(tmp_path):
    model = trained_like_pad_model("dyconv")
    path = tmp_path / "model_compact.safetensors"
    pad.save_compact(model, path)
    inference = load_inference(path, "resnet10", "dyconv", **SMALL)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=1e-10, atol=1e-10)

    with pytest.raises(ValueError, match="does not exist"):
        load_inference(tmp_path / "missing.safetensors", "resnet10", **SMALL)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_inference(garbage, "resnet10", **SMALL)
    with pytest.raises(ValueError, match="does not fit resnet18/dyconv"):
        load_inference(path, "resnet18", **SMALL)
