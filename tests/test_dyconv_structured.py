"""Unit-structured PAD convs: static output units by one ordinary conv, dynamic ones by the scheme, exactly
the element-mask computation with the same mask (outputs and every gradient, float64)."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pad
from dyconv.layers import CondConv2d, DynamicConv2d, ODConv2d, UnitSplit, unit_order
from dyconv.schemes import POLICIES

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64")

LAYERS = {"condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d}
# (in, out, kernel, stride, padding, groups)
GEOMETRIES = {
    "3x3_stride1": (6, 8, 3, 1, 1, 1),
    "3x3_stride2": (6, 8, 3, 2, 1, 1),
    "depthwise_stride2": (8, 8, 3, 2, 1, 8),
    "depthwise_stride1": (8, 8, 3, 1, 1, 8),
    "1x1_stride2": (6, 10, 1, 2, 0, 1),
}
DYNAMIC_UNITS = [0, 3, 4]  # of 8 or 10 output units


def build(kind, geometry, scheme="auto", dynamic_units=DYNAMIC_UNITS, granularity="unit"):
    torch.manual_seed(0)
    in_ch, out_ch, k, stride, padding, groups = GEOMETRIES[geometry]
    extra = {} if kind == "condconv" else {"temperature": 2.0}
    layer = LAYERS[kind](in_ch, out_ch, k, stride, padding, groups, True, kernels=3, pad=True, scheme=scheme,
                         **extra)
    with torch.no_grad():
        for module in layer.attention.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, nn.Linear):
                module.weight.normal_()
        layer.bank.mask.zero_()
        layer.bank.mask[list(dynamic_units)] = 1
        layer.bank.scale.phi.fill_(0.6)
    layer.bank.granularity = granularity
    return layer


def outputs_and_gradients(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-10)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_unit_path_equals_element_path(kind, geometry, batch, training):
    x = torch.randn(batch, GEOMETRIES[geometry][0], 7, 7, generator=torch.Generator().manual_seed(1))
    element = build(kind, geometry, granularity="element").train(training)
    assert element.unit_split() is None
    expected = outputs_and_gradients(element, x)
    assert {"bank.kernels", "bank.static_weight", "bank.scale.phi", "bias"} <= set(expected[2])
    for policy in POLICIES:
        layer = build(kind, geometry, policy).train(training)
        split = layer.unit_split()
        assert split.dynamic.tolist() == DYNAMIC_UNITS and split.weight.shape[0] == layer.out_channels - 3
        assert_same(outputs_and_gradients(layer, x), expected)


class _ConvShapes(TorchDispatchMode):
    """Records the weight shape of every convolution."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution):
            self.weights.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheme, dynamic_weight", [("stacked", (9, 6, 3, 3)), ("grouped", (6, 6, 3, 3))])
def test_static_units_are_one_ordinary_conv(scheme, dynamic_weight):
    """3 of 8 units dynamic: one conv with the 5 static filters, the dynamic scheme over the 3 dynamic ones only."""
    layer = build("dyconv", "3x3_stride1", scheme)
    with _ConvShapes() as shapes, torch.no_grad():
        layer(torch.randn(2, 6, 7, 7))
    assert sorted(shapes.weights) == sorted([(5, 6, 3, 3), dynamic_weight])


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_without_dynamic_units_keeps_every_parameter_in_the_graph(kind):
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    expected = outputs_and_gradients(build(kind, "3x3_stride1", dynamic_units=[], granularity="element"), x)
    layer = build(kind, "3x3_stride1", dynamic_units=[])
    got = outputs_and_gradients(layer, x)
    assert_same(got, expected)  # attention and kernels get zero gradients, not none (DDP needs them)
    assert all(float(g.abs().max()) < 1e-12 for n, g in got[2].items() if n.startswith(("attention", "bank.kernels")))


def test_fully_dynamic_and_grouped_layers_take_the_element_path():
    assert build("dyconv", "3x3_stride1", dynamic_units=range(8)).unit_split() is None
    torch.manual_seed(0)
    grouped = DynamicConv2d(6, 4, 1, groups=2, pad=True)
    with torch.no_grad():
        grouped.bank.mask[2:] = 0
    grouped.bank.granularity = "unit"
    assert grouped.unit_split() is None
    kernel = build("dyconv", "3x3_stride1", granularity="kernel")
    assert kernel.unit_split() is None


def test_unit_order_puts_outputs_back_in_channel_order():
    dynamic_units = torch.tensor([False, True, False, True, True])
    dynamic, static, order = unit_order(dynamic_units)
    assert dynamic.tolist() == [1, 3, 4] and static.tolist() == [0, 2]
    channels = torch.arange(5.0)
    assert torch.cat([channels[dynamic], channels[static]])[order].tolist() == channels.tolist()


def test_split_follows_a_changed_mask():
    layer = build("dyconv", "3x3_stride1").eval()
    with torch.no_grad():
        first = layer.unit_split()
        assert layer.unit_split() is first  # cached in eval mode without autograd
        layer.bank.mask[5] = 1
        second = layer.unit_split()
    assert isinstance(second, UnitSplit) and second.dynamic.tolist() == [0, 3, 4, 5]


def test_unstructured_mask_at_unit_granularity_is_refused():
    layer = build("dyconv", "3x3_stride1")
    with torch.no_grad():
        layer.bank.mask[1, 0, 0, 0] = 1
    with pytest.raises(ValueError, match="not structured at unit granularity"):
        layer(torch.randn(1, 6, 7, 7))


# ---------------------------------------------------------------- models: inference form, compact export, counts

def unit_pad_model(conv, seed=0, arch="resnet10"):
    """A PAD model partitioned at unit granularity (30% of the positions dynamic), phi != 0, real BN statistics."""
    from dyconv.models import build_model
    torch.manual_seed(seed)
    model = build_model(arch, conv, pad=True, temperature=1.0, small_input=True, in_channels=1, num_classes=5)
    banks = dict(pad.weight_banks(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pad.select_dynamic(banks, {n: torch.rand(b.mask.shape, generator=generator) for n, b in banks.items()},
                           0.3, "global", granularity="unit")
        for i, bank in enumerate(banks.values()):
            bank.scale.phi.fill_(0.1 * (i % 5) - 0.2)
        model.train()
        model(torch.randn(3, 1, 12, 12, generator=generator))
    return model.eval()


@pytest.mark.parametrize("conv, arch", [("dyconv", "resnet10"), ("odconv", "resnet10"), ("condconv", "resnet10"),
                                        ("dyconv", "mobilenetv2_050")])
def test_inference_form_stores_the_static_units_as_one_static_weight(conv, arch):
    from dyconv.inference import InferenceUnitWeights, to_inference
    from dyconv.layers import dynamic_convs
    model = unit_pad_model(conv, arch=arch)
    inference = to_inference(model)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(inference(x[:1]), model(x[:1]), rtol=1e-10, atol=1e-10)
    split_layers = 0
    for (_, layer), (_, original) in zip(dynamic_convs(inference), dynamic_convs(model)):
        if not isinstance(layer.bank, InferenceUnitWeights):
            continue
        split_layers += 1
        bank = original.bank
        static = (bank.mask.flatten(1)[:, 0] == 0).nonzero().squeeze(1)
        lambda_s = 2 - 2 * torch.sigmoid(bank.scale.phi)
        torch.testing.assert_close(layer.bank.weight, lambda_s * bank.static_weight[static], rtol=0, atol=1e-15)
        assert layer.bank.kernels.shape == (bank.num_kernels, bank.shape[0] - static.numel(), *bank.shape[1:])
    assert split_layers > 0


@pytest.mark.parametrize("granularity", ["unit", "kernel"])
def test_compact_export_records_the_granularity_and_stores_one_mask_bit_per_unit(granularity, tmp_path):
    from dyconv.models import build_model
    model = unit_pad_model("dyconv")
    if granularity == "kernel":
        pad.set_granularity(model, "kernel")  # a unit mask is kernel-structured as well
    counts = pad.parameter_counts(model)
    units = sum(b.shape[0] * (b.shape[1] if granularity == "kernel" else 1) for _, b in pad.weight_banks(model))
    assert counts["mask_entries"] == units
    state = pad.export_compact(model)
    assert sum(state[f"{n}.mask"].numel() for n, _ in pad.weight_banks(model)) == sum(
        -(-(b.shape[0] * (b.shape[1] if granularity == "kernel" else 1)) // 8) for _, b in pad.weight_banks(model))
    path = tmp_path / "model_compact.safetensors"
    pad.save_compact(model, path)
    fresh = build_model("resnet10", "dyconv", pad=True, temperature=1.0, small_input=True, in_channels=1,
                        num_classes=5).eval()
    assert pad.load_compact_file(fresh, path) == granularity
    assert {b.granularity for _, b in pad.weight_banks(fresh)} == {granularity}
    for (_, a), (_, b) in zip(pad.weight_banks(fresh), pad.weight_banks(model)):
        assert torch.equal(a.mask, b.mask)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-10, atol=1e-10)


def test_bench_unit_variant_has_a_unit_structured_mask_at_the_ratio():
    from dyconv import bench
    from dyconv.inference import InferenceUnitWeights
    models = bench.build_variants("resnet10", 2, 0.3, "auto", torch.device("cpu"))
    assert list(models) == ["static", "dyconv", "pad-dyconv", "pad-folded", "pad-unit", "unit-folded"]
    unit = models["pad-unit"]
    assert pad.dynamic_ratio(unit) == pytest.approx(0.3, abs=0.02)
    banks = [b for _, b in pad.weight_banks(unit)]
    assert {b.granularity for b in banks} == {"unit"}
    assert sum(int((~b.unit_mask()).sum()) for b in banks) > 0  # unit_mask() raises unless unit-structured
    assert any(isinstance(m, InferenceUnitWeights) for m in models["unit-folded"].modules())
    assert not any(isinstance(m, InferenceUnitWeights) for m in models["pad-folded"].modules())
