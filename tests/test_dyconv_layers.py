"""CondConv, DY-Conv and ODConv layers, fully and partially dynamic, against independent references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pad
from conftest import randomize_attention
from dyconv.layers import (CONV_TYPES, CondConv2d, DynamicConv2d, ODConv2d, conv_factory, get_temperature,
                           set_temperature, temperature_schedule)

torch.set_num_threads(1)

LAYERS = {"condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d}
# (in, out, kernel, stride, padding, groups, bias)
GEOMETRIES = {
    "dense": (6, 8, 3, 1, 1, 1, True),
    "depthwise_stride2": (8, 8, 3, 2, 1, 8, False),
    "grouped_1x1": (6, 4, 1, 1, 0, 2, False),
}


pytestmark = pytest.mark.usefixtures("float64")


def build(kind, geometry, pad_layer=False, scale_factors="both", kernels=3, seed=0):
    torch.manual_seed(seed)
    in_ch, out_ch, k, stride, padding, groups, bias = GEOMETRIES[geometry]
    extra = {} if kind == "condconv" else {"temperature": 2.0}
    layer = LAYERS[kind](in_ch, out_ch, k, stride, padding, groups, bias, kernels=kernels, pad=pad_layer,
                         scale_factors=scale_factors, **extra)
    with torch.no_grad():  # non-trivial attention: random BN statistics and weights of order one
        randomize_attention(layer)
    return layer.eval()


def random_input(layer, batch=3, size=7, seed=1):
    return torch.randn(batch, layer.in_channels, size, size, generator=torch.Generator().manual_seed(seed))


def conv_sample(layer, x_b, weight):
    """Plain F.conv2d of one sample (1, C, H, W) with one weight (O, I, kh, kw)."""
    return F.conv2d(x_b, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def explicit_sum(coefficients, kernels):
    """sum_k c_k W_k with a python loop."""
    total = torch.zeros_like(kernels[0])
    for c, kernel in zip(coefficients, kernels):
        total = total + c * kernel
    return total


def channel_attention_per_weight(layer, channel_b):
    """(O, I, 1, 1): the input-channel attention of the input each weight entry reads."""
    out_ch, in_per_group = layer.bank.shape[:2]
    rows = []
    for o in range(out_ch):
        group = o // (out_ch // layer.groups)
        rows.append(channel_b[group * in_per_group:(group + 1) * in_per_group])
    return torch.stack(rows).view(out_ch, in_per_group, 1, 1)


def dynamic_weight_reference(layer, attention, b):
    """W~(x_b) (O, I, kh, kw) built independently from the layer's kernels and attention."""
    kernels = layer.bank.kernels
    if isinstance(layer, ODConv2d):
        kernel_att = attention.kernel[b] if attention.kernel is not None else torch.ones(1)
        weight = explicit_sum(kernel_att, kernels) * channel_attention_per_weight(layer, attention.channel[b])
        if attention.filter is not None:
            weight = weight * attention.filter[b].view(-1, 1, 1, 1)
        if attention.spatial is not None:
            weight = weight * attention.spatial[b].view(1, 1, *weight.shape[-2:])
        return weight
    return explicit_sum(attention[b], kernels)


# ---------------------------------------------------------------- attention

def test_condconv_and_dyconv_attention_formulas():
    x = torch.randn(4, 6, 5, 5)
    cond = build("condconv", "dense")
    pooled = x.mean(dim=(2, 3))
    expected = torch.sigmoid(pooled @ cond.attention.fc.weight.T + cond.attention.fc.bias)
    torch.testing.assert_close(cond.attention(x), expected)

    dy = build("dyconv", "dense")
    a = dy.attention
    hidden = torch.clamp(pooled @ a.fc1.weight.T + a.fc1.bias, min=0)
    logits = hidden @ a.fc2.weight.T + a.fc2.bias
    expected = torch.exp(logits / a.temperature) / torch.exp(logits / a.temperature).sum(1, keepdim=True)
    torch.testing.assert_close(dy.attention(x), expected)
    assert a.fc1.out_features == max(6 // 4, 4)


def test_odconv_attention_ranges_and_skips():
    dense = build("odconv", "dense")
    att = dense.attention(random_input(dense))
    assert att.channel.shape == (3, 6) and att.filter.shape == (3, 8) and att.spatial.shape == (3, 9)
    torch.testing.assert_close(att.kernel.sum(1), torch.ones(3))
    for part in (att.channel, att.filter, att.spatial):
        assert ((part > 0) & (part < 1)).all()
    depthwise = build("odconv", "depthwise_stride2").attention(random_input(build("odconv", "depthwise_stride2")))
    assert depthwise.filter is None and depthwise.spatial is not None
    pointwise_layer = build("odconv", "grouped_1x1")
    pointwise = pointwise_layer.attention(random_input(pointwise_layer))
    assert pointwise.spatial is None and pointwise.filter is not None
    single = ODConv2d(6, 8, 3, padding=1, kernels=1).eval()
    assert single.attention(torch.randn(2, 6, 5, 5)).kernel is None


# ---------------------------------------------------------------- equivalences

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_dynamic_layer_equals_per_sample_reference(kind, geometry):
    layer = build(kind, geometry)
    x = random_input(layer)
    attention = layer.attention(x)
    expected = torch.cat([conv_sample(layer, x[b:b + 1], dynamic_weight_reference(layer, attention, b))
                          for b in range(x.shape[0])])
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", ["dense", "depthwise_stride2"])
def test_odconv_equals_authors_formulation(geometry):
    """ODConv as its authors compute it: scale the input channels, aggregate the kernels
    scaled by spatial and kernel attention, conv, scale the output filters."""
    layer = build("odconv", geometry)
    x = random_input(layer)
    att = layer.attention(x)
    outputs = []
    for b in range(x.shape[0]):
        spatial = att.spatial[b].view(1, 1, layer.kernel_size, layer.kernel_size)
        weight = sum(att.kernel[b, k] * spatial * layer.bank.kernels[k] for k in range(layer.num_kernels))
        out = F.conv2d(x[b:b + 1] * att.channel[b].view(1, -1, 1, 1), weight, None, layer.stride, layer.padding,
                       1, layer.groups)
        if att.filter is not None:
            out = out * att.filter[b].view(1, -1, 1, 1)
        outputs.append(out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(layer(x), torch.cat(outputs), rtol=1e-10, atol=1e-10)


def _pad_copy_of(dynamic_layer, kind, geometry):
    partial = build(kind, geometry, pad_layer=True, scale_factors="none", seed=5)
    with torch.no_grad():
        partial.bank.kernels.copy_(dynamic_layer.bank.kernels)
        if dynamic_layer.bias is not None:
            partial.bias.copy_(dynamic_layer.bias)
    partial.attention.load_state_dict(dynamic_layer.attention.state_dict())
    return partial


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_pad_all_dynamic_equals_dynamic_layer(kind, geometry):
    dynamic = build(kind, geometry)
    partial = _pad_copy_of(dynamic, kind, geometry)
    assert torch.equal(partial.bank.mask, torch.ones_like(partial.bank.mask))
    assert not torch.equal(partial.bank.static_weight, torch.zeros_like(partial.bank.static_weight))
    x = random_input(dynamic)
    torch.testing.assert_close(partial(x), dynamic(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_pad_all_static_equals_static_conv(kind, geometry):
    partial = build(kind, geometry, pad_layer=True, scale_factors="none")
    partial.bank.mask.zero_()
    x = random_input(partial)
    expected = F.conv2d(x, partial.bank.static_weight, partial.bias, partial.stride, partial.padding, 1,
                        partial.groups)
    torch.testing.assert_close(partial(x), expected, rtol=1e-12, atol=1e-12)


def _random_mask(layer, seed=3):
    mask = (torch.rand(layer.bank.shape, generator=torch.Generator().manual_seed(seed)) < 0.4).to(layer.bank.mask)
    assert 0 < mask.sum() < mask.numel()
    layer.bank.mask.copy_(mask)
    return mask


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_pad_random_mask_equals_formula(kind, geometry):
    layer = build(kind, geometry, pad_layer=True, scale_factors="both")
    mask = _random_mask(layer)
    with torch.no_grad():
        layer.bank.scale.phi.fill_(0.7)
    lambda_d = 2 / (1 + math.exp(-0.7))
    lambda_s = 2 - lambda_d
    x = random_input(layer)
    attention = layer.attention(x)
    outputs = []
    for b in range(x.shape[0]):
        omega = (lambda_d * mask * dynamic_weight_reference(layer, attention, b)
                 + lambda_s * (1 - mask) * layer.bank.static_weight)
        outputs.append(conv_sample(layer, x[b:b + 1], omega))
    torch.testing.assert_close(layer(x), torch.cat(outputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_each_sample_independent_of_its_batch(kind):
    layer = build(kind, "dense", pad_layer=True)
    _random_mask(layer)
    x = random_input(layer, batch=4)
    other = x.clone()
    other[1:] = torch.randn(3, *x.shape[1:]) * 5
    torch.testing.assert_close(layer(other)[0], layer(x)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[:1])[0], layer(x)[0], rtol=1e-12, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", list(LAYERS))
def test_aggregation_never_materialises_batch_times_kernels(kind):
    torch.manual_seed(0)
    batch, kernels = 8, 6
    layer = LAYERS[kind](16, 16, 3, padding=1, kernels=kernels, pad=True).eval()
    _random_mask(layer)
    x = torch.randn(batch, 16, 6, 6)
    with _LargestTensor() as tracker:
        layer(x).sum().backward()
    weight_size = layer.bank.kernels[0].numel()
    assert batch * weight_size <= tracker.largest < batch * kernels * weight_size


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_reach_used_positions_only(kind):
    layer = build(kind, "dense", pad_layer=True, scale_factors="both").train()
    mask = _random_mask(layer).bool()
    x = random_input(layer, batch=4)
    target = torch.randn_like(layer(x))
    (layer(x) * target).sum().backward()
    bank = layer.bank
    assert bank.scale.phi.grad is not None and bank.scale.phi.grad != 0
    assert (bank.static_weight.grad[mask] == 0).all() and (bank.static_weight.grad[~mask] != 0).all()
    for kernel_grad in bank.kernels.grad:
        assert (kernel_grad[~mask] == 0).all() and (kernel_grad[mask] != 0).all()
    for name, parameter in layer.attention.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", list(LAYERS))
def test_all_dynamic_mask_leaves_static_weight_without_gradient(kind):
    layer = build(kind, "dense", pad_layer=True).train()
    x = random_input(layer, batch=4)
    layer(x).pow(2).sum().backward()
    grad = layer.bank.static_weight.grad
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))
    assert layer.bank.kernels.grad.abs().sum() > 0


# ---------------------------------------------------------------- factory

@pytest.mark.parametrize("conv", list(CONV_TYPES))
@pytest.mark.parametrize("use_pad", [False, True])
def test_factory_builds_requested_layer(conv, use_pad):
    if conv == "static" and use_pad:
        with pytest.raises(ValueError, match="PAD needs a dynamic conv"):
            conv_factory(conv, pad=True)
        return
    make = conv_factory(conv, pad=use_pad, kernels=5, reduction=2, scale_factors="d", temperature=7.0)
    layer = make(8, 12, 3, stride=2, padding=1, groups=2, bias=True)
    if conv == "static":
        assert type(layer) is nn.Conv2d and layer.weight.shape == (12, 4, 3, 3) and layer.stride == (2, 2)
        return
    assert type(layer) is LAYERS[conv]
    assert isinstance(layer.bank, pad.PartiallyDynamicWeights) == use_pad
    assert layer.bank.kernels.shape == (5, 12, 4, 3, 3) and layer.bias.shape == (12,)
    if use_pad:
        assert layer.bank.scale.variant == "d"
    if conv == "dyconv":
        assert layer.attention.fc1.out_features == max(8 // 2, 4) and layer.attention.temperature == 7.0
    if conv == "odconv":
        assert layer.attention.fc.out_features == max(8 // 2, 16) and layer.attention.temperature == 7.0
    out = layer.eval()(torch.randn(2, 8, 9, 9))
    assert out.shape == (2, 12, 5, 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"conv": "deformable"}, "unknown conv 'deformable'"),
    ({"conv": "dyconv", "kernels": 0}, "number of kernels must be >= 1"),
    ({"conv": "dyconv", "scale_factors": "lambda"}, "unknown scale factors 'lambda'"),
    ({"conv": "odconv", "temperature": 0.0}, "temperature must be > 0"),
    ({"conv": "dyconv", "reduction": 0}, "reduction must be >= 1"),
    ({"conv": "odconv", "pad": True, "odconv_static_attention": "both"}, "unknown ODConv static attention 'both'"),
    ({"conv": "dyconv", "pad": True, "odconv_static_attention": "all"}, "needs PAD-ODConv"),
    ({"conv": "odconv", "odconv_static_attention": "channel-filter"}, "needs PAD-ODConv"),
])
def test_factory_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv_factory(**kwargs)


def test_odconv_layer_rejects_an_unknown_static_attention():
    with pytest.raises(ValueError, match="unknown ODConv static attention 'scaled'"):
        ODConv2d(4, 4, 3, pad=True, static_attention="scaled")


def test_pad_initialisation_is_conv_like():
    torch.manual_seed(0)
    layer = DynamicConv2d(64, 64, 3, padding=1, kernels=4, pad=True)
    std = math.sqrt(2 / (64 * 9))  # kaiming normal, fan_out = out * kh * kw, ReLU gain sqrt(2)
    for weight in (*layer.bank.kernels, layer.bank.static_weight):
        assert weight.mean().abs() < 0.05 * std and abs(weight.std() / std - 1) < 0.05
    assert not torch.equal(layer.bank.kernels[0], layer.bank.kernels[1])


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("partial", [False, True])
def test_reset_parameters_draws_what_construction_draws(name, partial):
    """The bank initialises itself (kernels, then W_s), the layer then its bias: reset_parameters at a
    seed gives the same bank and bias as a layer built at that seed."""
    torch.manual_seed(3)
    built = LAYERS[name](6, 8, 3, padding=1, bias=True, pad=partial)
    torch.manual_seed(3)
    bank = pad.PartiallyDynamicWeights(4, (8, 6, 3, 3)) if partial else pad.DynamicWeights(4, (8, 6, 3, 3))
    assert torch.equal(built.bank.kernels, bank.kernels)
    layer = LAYERS[name](6, 8, 3, padding=1, bias=True, pad=partial)
    torch.manual_seed(3)
    layer.reset_parameters()
    names = ["bank.kernels", "bias"] + (["bank.static_weight"] if partial else [])
    for key in names:
        assert torch.equal(layer.state_dict()[key], built.state_dict()[key]), key


# ---------------------------------------------------------------- temperature

def _entropy(p):
    return -(p * p.log()).sum(1)


def test_temperature_round_trip_and_flattening():
    model = nn.Sequential(conv_factory("dyconv")(6, 8, 3), conv_factory("odconv")(8, 8, 3))
    assert get_temperature(model) == 30.0
    set_temperature(model, 4.5)
    assert get_temperature(model) == 4.5
    assert model[0].attention.temperature == 4.5 and model[1].attention.temperature == 4.5
    with pytest.raises(ValueError, match="temperature must be > 0"):
        set_temperature(model, -1)
    assert get_temperature(nn.Sequential(conv_factory("condconv")(4, 4, 1), nn.Conv2d(4, 4, 1))) is None

    layer = build("dyconv", "dense")
    x = random_input(layer, batch=5)
    entropies = []
    for temperature in (0.5, 1.0, 30.0):
        set_temperature(layer, temperature)
        entropies.append(_entropy(layer.attention(x)))
    assert (entropies[0] < entropies[1]).all() and (entropies[1] < entropies[2]).all()
    assert (entropies[2] <= math.log(layer.num_kernels)).all()


def test_temperature_schedule():
    init, final, total = 30.0, 1.0, 100
    assert temperature_schedule(0, total) == init
    assert temperature_schedule(50, total) == pytest.approx(init + (final - init) * 50 / total)
    assert temperature_schedule(25, total, init=10.0, final=2.0) == pytest.approx(10.0 - 8.0 / 4)
    assert temperature_schedule(total, total) == final
    assert temperature_schedule(10 * total, total) == final
    assert temperature_schedule(3, 0) == final
    values = [temperature_schedule(s, total) for s in range(total + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="step must be >= 0"):
        temperature_schedule(-1, total)
