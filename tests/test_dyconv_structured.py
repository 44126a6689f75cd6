"""Unit-structured PAD convs: static output units by one ordinary conv, dynamic ones by the scheme, exactly
the element-mask computation with the same mask (outputs and every gradient, float64); which of the two paths
a layer takes (dyconv.schemes.prefers_unit_path), recorded and restored."""
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pad
from conftest import randomize_attention
from pad.mixing import set_granularity, unit_order, weight_banks
from pad.partition import score_positions, select_dynamic
from dyconv.layers import (CondConv2d, DynamicConv2d, ODConv2d, UnitSplit, conv_schemes, dynamic_convs,
                           restore_conv_schemes, scheme_key, set_conv_scheme)
from dyconv.schemes import POLICIES, UNIT_PATH_MIN_COST, prefers_unit_path

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64")

LAYERS = {"condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d,
          "odconv-cf": functools.partial(ODConv2d, static_attention="channel-filter")}
# (in, out, kernel, stride, padding, groups[, dilation, padding mode])
GEOMETRIES = {
    "3x3_stride1": (6, 8, 3, 1, 1, 1),
    "3x3_stride2": (6, 8, 3, 2, 1, 1),
    "depthwise_stride2": (8, 8, 3, 2, 1, 8),
    "depthwise_stride1": (8, 8, 3, 1, 1, 8),
    "1x1_stride2": (6, 10, 1, 2, 0, 1),
    "3x3_dilation2_reflect": (6, 8, 3, 1, 2, 1, 2, "reflect"),
    "depthwise_2x2_same_circular": (8, 8, 2, 1, "same", 8, 1, "circular"),
}
DYNAMIC_UNITS = [0, 3, 4]  # of 8 or 10 output units


def build(kind, geometry, scheme="auto", dynamic_units=DYNAMIC_UNITS, granularity="unit"):
    torch.manual_seed(0)
    in_ch, out_ch, k, stride, padding, groups, dilation, padding_mode = (*GEOMETRIES[geometry], 1, "zeros")[:8]
    extra = {} if kind == "condconv" else {"temperature": 2.0}
    layer = LAYERS[kind](in_ch, out_ch, k, stride, padding, groups, True, kernels=3, pad=True, scheme=scheme,
                         dilation=dilation, padding_mode=padding_mode, **extra)
    with torch.no_grad():
        randomize_attention(layer)
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


def on_path(layer, x=None, path=None):
    """Records ``path`` as the layer's choice for its input ``x`` (unless ``None``) and counts the unit
    path's calls (``layer.unit_calls``), so a test can check which path ran."""
    if path is not None:
        layer.chooser.paths[scheme_key(x)] = path
    layer.unit_calls = 0
    unit_conv = layer._unit_conv

    def counted(*args):
        layer.unit_calls += 1
        return unit_conv(*args)

    layer._unit_conv = counted
    return layer


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
    """Whichever path a unit-structured layer takes, under every scheme: the element mask's outputs and gradients."""
    x = torch.randn(batch, GEOMETRIES[geometry][0], 7, 7, generator=torch.Generator().manual_seed(1))
    element = build(kind, geometry, granularity="element").train(training)
    assert element.unit_split() is None
    expected = outputs_and_gradients(element, x)
    assert {"bank.kernels", "bank.static_weight", "bank.scale.phi", "bias"} <= set(expected[2])
    for policy in POLICIES:
        for path in ("unit", "element"):
            layer = on_path(build(kind, geometry, policy).train(training), x, path)
            split = layer.unit_split()
            assert split.dynamic.tolist() == DYNAMIC_UNITS and split.weight.shape[0] == layer.out_channels - 3
            assert_same(outputs_and_gradients(layer, x), expected)
            assert layer.unit_calls == (path == "unit") and layer.chooser.paths == {scheme_key(x): path}


@pytest.mark.parametrize("geometry", ["3x3_stride1", "depthwise_stride1", "1x1_stride2"])
def test_odconv_with_every_attention_on_the_static_part_splits_only_without_a_spatial_attention(geometry):
    """static_attention="all": a spatial attention scales the static filters per sample, so they are no
    ordinary conv and the layer takes the element path; a 1x1 conv (no spatial attention) still splits.
    Either way the outputs and gradients are the element mask's."""
    x = torch.randn(3, GEOMETRIES[geometry][0], 7, 7, generator=torch.Generator().manual_seed(1))
    kind = functools.partial(ODConv2d, static_attention="all")
    LAYERS["odconv-all"] = kind
    try:
        element = build("odconv-all", geometry, granularity="element").train()
        layer = on_path(build("odconv-all", geometry).train())
    finally:
        del LAYERS["odconv-all"]
    expected = outputs_and_gradients(element, x)
    assert_same(outputs_and_gradients(layer, x), expected)
    has_spatial = layer.attention.spatial_fc is not None
    assert (layer.unit_split() is None) == has_spatial
    if has_spatial:
        assert layer.unit_calls == 0
    else:
        assert layer.unit_split().dynamic.tolist() == DYNAMIC_UNITS


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
    x = torch.randn(2, 6, 7, 7)
    layer = on_path(build("dyconv", "3x3_stride1", scheme), x, "unit")
    with _ConvShapes() as shapes, torch.no_grad():
        layer(x)
    assert sorted(shapes.weights) == sorted([(5, 6, 3, 3), dynamic_weight])
    layer = on_path(build("dyconv", "3x3_stride1", scheme), x, "element")
    with _ConvShapes() as shapes, torch.no_grad():
        layer(x)
    assert shapes.weights == [(24, 6, 3, 3) if scheme == "stacked" else (16, 6, 3, 3)]  # all 8 filters, folded


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_without_dynamic_units_keeps_every_parameter_in_the_graph(kind):
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    expected = outputs_and_gradients(build(kind, "3x3_stride1", dynamic_units=[], granularity="element"), x)
    layer = build(kind, "3x3_stride1", dynamic_units=[])
    got = outputs_and_gradients(layer, x)
    assert_same(got, expected)  # attention and kernels get zero gradients, not none (DDP needs them)
    # (with the channel-filter static attention the static filters are scaled by the attention: it learns)
    unused = ("bank.kernels", "attention.kernel_fc", "attention.spatial_fc") if kind == "odconv-cf" else ("attention", "bank.kernels")
    assert all(float(g.abs().max()) < 1e-12 for n, g in got[2].items() if n.startswith(unused))
    if kind == "odconv-cf":
        assert float(got[2]["attention.channel_fc.weight"].abs().max()) > 1e-6


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
    generator = random_unit_mask(model, seed, "global")
    with torch.no_grad():
        model.train()
        model(torch.randn(3, 1, 12, 12, generator=generator))
    return model.eval()


@torch.no_grad()
def random_unit_mask(model, seed, scope) -> torch.Generator:
    """Masks ``model`` at unit granularity from random scores (30% of positions dynamic, ``scope``) and sets
    phi != 0 per bank; returns the generator, seeded with ``seed``, for the caller's further draws."""
    banks = dict(weight_banks(model))
    generator = torch.Generator().manual_seed(seed)
    select_dynamic(banks, {n: torch.rand(b.mask.shape, generator=generator) for n, b in banks.items()},
                       0.3, scope, granularity="unit")
    for i, bank in enumerate(banks.values()):
        bank.scale.phi.fill_(0.1 * (i % 5) - 0.2)
    return generator


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
        set_granularity(model, "kernel")  # a unit mask is kernel-structured as well
    counts = pad.parameter_counts(model)
    units = sum(b.shape[0] * (b.shape[1] if granularity == "kernel" else 1) for _, b in weight_banks(model))
    assert counts["mask_entries"] == units
    state = pad.export_compact(model)
    assert sum(state[f"{n}.mask"].numel() for n, _ in weight_banks(model)) == sum(
        -(-(b.shape[0] * (b.shape[1] if granularity == "kernel" else 1)) // 8) for _, b in weight_banks(model))
    path = tmp_path / "model_compact.safetensors"
    pad.save_compact(model, path)
    fresh = build_model("resnet10", "dyconv", pad=True, temperature=1.0, small_input=True, in_channels=1,
                        num_classes=5).eval()
    assert pad.load_compact_file(fresh, path) == granularity
    assert {b.granularity for _, b in weight_banks(fresh)} == {granularity}
    for (_, a), (_, b) in zip(weight_banks(fresh), weight_banks(model)):
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
    banks = [b for _, b in weight_banks(unit)]
    assert {b.granularity for b in banks} == {"unit"}
    assert sum(int((~b.unit_mask()).sum()) for b in banks) > 0  # unit_mask() raises unless unit-structured
    assert any(isinstance(m, InferenceUnitWeights) for m in models["unit-folded"].modules())
    assert not any(isinstance(m, InferenceUnitWeights) for m in models["pad-folded"].modules())


# ---------------------------------------------------------------- which path: the rule, models, records

@pytest.mark.parametrize("scheme, in_per_group, kernel_size, out_pixels, unit", [
    ("bmm", 512, 1, 49, False),          # 1x1 as a batched matmul: costs a static conv
    ("grouped", 1, 3, 49, False),        # depthwise 3x3 (MobileNetV2), even at 7x7
    ("grouped", 1, 3, 4, False),         # ... and at 2x2: 1 + 1.8 / 4 < 1.5
    ("grouped", 64, 3, 56 * 56, False),  # shallow 3x3 (ResNet layer1 at 224 px): ~1.02
    ("grouped", 128, 3, 28 * 28, False), # ResNet layer2 at 224 px: ~1.29
    ("grouped", 256, 3, 14 * 14, True),  # deep 3x3 (ResNet layer3 at 224 px): ~3.4
    ("grouped", 128, 3, 14 * 14, True),  # (C/g) k^2 = 1152 >= 2.5 H'W' = 490
    ("grouped", 64, 3, 14 * 14, True),   # 576 >= 490
    ("grouped", 64, 3, 16 * 16, False),  # 576 < 640
    ("grouped", 512, 3, 49, True),       # also at batch 1 (the rule has no batch): the weight mixes K kernels
    ("stacked", 512, 3, 49, True),       # K + 1 = 5
    ("stacked", 6, 1, 49, True),         # ... also on 1x1 convs
])
def test_unit_path_only_where_the_scheme_costs_clearly_more_than_a_static_conv(scheme, in_per_group, kernel_size,
                                                                               out_pixels, unit):
    assert prefers_unit_path(scheme, 4, in_per_group, kernel_size, out_pixels) is unit
    assert UNIT_PATH_MIN_COST == 1.5


def unit_model(arch, scheme="auto", seed=0):
    """``arch`` (small-input stem, 1 channel) with a random unit mask: 30% of positions dynamic, some static
    filters in every layer."""
    from dyconv.models import build_model
    torch.manual_seed(seed)
    model = build_model(arch, "dyconv", pad=True, small_input=True, in_channels=1, num_classes=5, conv_scheme=scheme,
                        temperature=2.0)
    random_unit_mask(model, seed, "local")
    return model.eval()


def recorded_paths(model):
    return {name: entry["paths"] for name, entry in conv_schemes(model).items()}


def test_models_take_the_unit_path_where_the_rule_says():
    resnet = unit_model("resnet10")
    with torch.no_grad():
        resnet(torch.randn(2, 1, 28, 28))
        resnet(torch.randn(1, 1, 28, 28))
    paths = recorded_paths(resnet)
    # 3x3 convs with (C/g) k^2 >= 2.5 H'W': 64+ input channels onto 14x14 outputs or less (ResNet-10: one block)
    unit_layers = {"layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer3.0.conv1",
                   "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2"}
    unit_layers = {n for n in unit_layers if n in paths}
    assert unit_layers == {"layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1",
                           "layer4.0.conv2"}
    for name, chosen in paths.items():
        assert set(chosen) == {"batch@" + chosen_key(name, resnet), "single@" + chosen_key(name, resnet)}
        assert chosen["batch@" + chosen_key(name, resnet)] == ("unit" if name in unit_layers else "element"), name
        # 3x3 layers: batch 1 decides as batch > 1 (grouped there: one plain conv, but its weight still mixes K
        # kernels); 1x1 layers run bmm at batch > 1 but grouped at batch 1, whose cost the rule weighs on its own
        layer = dict(resnet.named_modules())[name]
        if layer.kernel_size > 1:
            assert chosen["single@" + chosen_key(name, resnet)] == chosen["batch@" + chosen_key(name, resnet)], name
        assert chosen["single@" + chosen_key(name, resnet)] == batch1_path(layer, chosen_key(name, resnet)), name
    mobilenet = unit_model("mobilenetv2_050")
    with torch.no_grad():
        mobilenet(torch.randn(2, 1, 28, 28))
        mobilenet(torch.randn(1, 1, 28, 28))
    paths = recorded_paths(mobilenet)
    assert len(paths) == len(list(dynamic_convs(mobilenet))) and all(paths.values())
    modules = dict(mobilenet.named_modules())
    for name, chosen in paths.items():  # 1x1 bmm and depthwise layers at batch > 1; depthwise also at batch 1
        assert chosen["batch@" + chosen_key(name, mobilenet)] == "element", name
        if modules[name].depthwise:
            assert chosen["single@" + chosen_key(name, mobilenet)] == "element", name
        assert chosen["single@" + chosen_key(name, mobilenet)] == batch1_path(modules[name], chosen_key(name, mobilenet))


def batch1_path(layer, size):
    """The path the rule gives ``layer`` at batch 1 (``grouped``) for input size ``"HxW"``."""
    height, width = map(int, size.split("x"))
    out_pixels = layer._out_pixels(torch.empty(1, 1, height, width))
    unit = prefers_unit_path("grouped", layer.num_kernels, layer.in_channels // layer.groups, layer.kernel_size,
                             out_pixels)
    return "unit" if unit else "element"


def chosen_key(name, model):
    """The input size a layer recorded its scheme under (``"HxW"``)."""
    (key,) = {k.split("@")[1] for k in conv_schemes(model)[name]["chosen"]}
    return key


def test_forced_schemes_keep_working_and_decide_the_path():
    stacked = unit_model("resnet10", scheme="stacked")
    with torch.no_grad():
        stacked(torch.randn(1, 1, 28, 28))
    entries = conv_schemes(stacked)
    assert {s for e in entries.values() for s in e["chosen"].values()} == {"stacked"}
    assert {p for e in entries.values() for p in e["paths"].values()} == {"unit"}  # K + 1, also at batch 1
    set_conv_scheme(stacked, "grouped")
    assert all(e["chosen"] == {} and e["paths"] == {} for e in conv_schemes(stacked).values())
    with torch.no_grad():
        stacked(torch.randn(2, 1, 28, 28))
    paths = recorded_paths(stacked)
    assert paths["layer4.0.conv2"] == {"batch@4x4": "unit"}  # grouped, 512 ch at 4x4 out: ~30 static convs
    assert paths["layer1.0.conv1"] == {"batch@28x28": "element"}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_outputs_and_gradients_do_not_depend_on_the_paths(training):
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    results = {}
    for path in ("unit", "element", None):  # every layer forced to one path, or the rule's choice
        model = unit_model("resnet10").train(training)
        if path is not None:
            with torch.no_grad():
                model(x)  # records the keys
            for _, layer in dynamic_convs(model):
                layer.chooser.paths = {key: path for key in layer.chooser.paths}
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[path] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        if path is not None:
            assert {p for chosen in recorded_paths(model).values() for p in chosen.values()} == {path}
    for path in ("unit", None):
        torch.testing.assert_close(results[path][0], results["element"][0], rtol=1e-10, atol=1e-10)
        assert results[path][1].keys() == results["element"][1].keys()
        for name, grad in results["element"][1].items():
            torch.testing.assert_close(results[path][1][name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_inference_form_follows_the_recorded_paths():
    from dyconv.inference import InferenceUnitWeights, to_inference
    model = unit_model("resnet10")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
        expected_single = model(x[:1])
    inference = to_inference(model)
    assert conv_schemes(inference) == conv_schemes(model)
    layers = dict(dynamic_convs(inference))
    assert all(isinstance(layer.bank, InferenceUnitWeights) for layer in layers.values())
    for layer in layers.values():
        on_path(layer)  # a call counter; the recorded paths unchanged
    with torch.no_grad():
        torch.testing.assert_close(inference(x), expected, rtol=1e-10, atol=1e-10)
        assert {n for n, layer in layers.items() if layer.unit_calls} == {
            n for n, chosen in recorded_paths(model).items() if chosen["batch@" + chosen_key(n, model)] == "unit"}
        torch.testing.assert_close(inference(x[:1]), expected_single, rtol=1e-10, atol=1e-10)
        for layer in layers.values():  # the other path of every layer: same logits from the same buffers
            layer.chooser.paths = {k: "element" if p == "unit" else "unit" for k, p in layer.chooser.paths.items()}
        torch.testing.assert_close(inference(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(inference(x[:1]), expected_single, rtol=1e-10, atol=1e-10)


def test_paths_are_recorded_and_restored():
    model = unit_model("resnet10")
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    recorded = conv_schemes(model)
    assert recorded["layer4.0.conv2"]["paths"] == {"batch@4x4": "unit"}
    fresh = unit_model("resnet10", scheme="grouped")
    restore_conv_schemes(fresh, recorded)
    assert conv_schemes(fresh) == recorded
    old = {name: {k: v for k, v in entry.items() if k != "paths"} for name, entry in recorded.items()}
    restore_conv_schemes(fresh, old)  # recorded before paths were chosen: chosen afresh
    assert all(entry["paths"] == {} for entry in conv_schemes(fresh).values())
    with pytest.raises(ValueError, match="recorded conv path 'split' of layer 'layer1.0.conv1' is unknown"):
        restore_conv_schemes(fresh, {**recorded, "layer1.0.conv1": {"policy": "auto", "chosen": {},
                                                                    "paths": {"batch@2x2": "split"}}})


def test_imp_scores_a_unit_structured_model_through_its_mask():
    """While IMP scores (the mask requires grad) a unit-structured layer takes the element path: dL/dM exists."""
    import torch.nn.functional as F
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 1, 12, 12, generator=generator), torch.randint(0, 5, (3,), generator=generator))]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    unit = unit_model("resnet10").train()
    element = unit_model("resnet10").train()
    set_granularity(element, "element")
    scores = score_positions(unit, batches, loss_fn, "taylor")
    for name, value in score_positions(element, batches, loss_fn, "taylor").items():
        torch.testing.assert_close(scores[name], value, rtol=1e-8, atol=1e-14)
    dynamic = [s[b.mask > 0] for (n, b) in weight_banks(unit) for s in (scores[n],)]
    assert all(float(d.abs().sum()) > 0 for d in dynamic)
    assert not any(b.mask.requires_grad for _, b in weight_banks(unit))
    assert all(layer.unit_split() is not None for _, layer in dynamic_convs(unit))  # after scoring: split again
