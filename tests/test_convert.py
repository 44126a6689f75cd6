"""convert_to_dynamic: torchvision CNNs become dynamic / PAD models that compute what they computed (upcycling),
train, partition, export compactly and run in inference form; which convs it converts; its errors."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pad
from pad.mixing import weight_banks
from dyconv.convert import convert_to_dynamic, default_selection
from dyconv.inference import to_inference
from dyconv.layers import CondConv2d, DynamicConv2d, ODConv2d, dynamic_convs

torch.set_num_threads(1)

LAYER_TYPES = {"condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d}
NUM_CLASSES = 5


def calibrated(arch, seed=0):
    """A torchvision model (no pretrained weights) whose BatchNorm running statistics are those of one
    batch, so that eval-mode activations and logits are of order one (at their initial statistics they
    shrink or grow with depth and make a relative comparison meaningless), in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # the running statistics become the batch's
    with torch.no_grad():
        model.train()(images(seed=1))
    return model.eval()


def images(batch=2, size=64, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_same_logits(actual, expected, rtol=1e-4):
    """Equal up to float32 rounding, relative to the logits' magnitude."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def train_step(model, x, y, lr=0.05):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model.eval()


CASES = ([("dyconv", arch) for arch in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
                                         "efficientnet_b0", "convnext_tiny")]
         + [(conv, arch) for conv in ("condconv", "odconv") for arch in ("resnet18", "mobilenet_v2")])


@pytest.mark.parametrize("use_pad", [False, True], ids=["dynamic", "pad"])
@pytest.mark.parametrize("conv, arch", CASES)
def test_upcycled_model_computes_the_original_trains_partitions_exports_and_infers(conv, arch, use_pad):
    original = calibrated(arch)
    model = convert_to_dynamic(copy.deepcopy(original), conv, pad=use_pad)
    layers = dict(dynamic_convs(model))
    assert layers and all(type(layer) is LAYER_TYPES[conv] for layer in layers.values())
    assert all(isinstance(layer.bank, pad.PartiallyDynamicWeights) == use_pad for layer in layers.values())
    x, y = images(), torch.tensor([1, 3])
    with torch.no_grad():
        assert_same_logits(model(x), original(x))

    # also the partition warm-up (upcycled kernels all equal W_s before it); two steps, since stochastic depth
    # (EfficientNet) may drop a block for the whole batch in one
    for _ in range(2):
        train_step(model, x, y)
    assert any(not torch.equal(layer.bank.kernels[0], layer.bank.kernels[-1]) for layer in layers.values())
    if use_pad:
        report = pad.iterative_mode_partition(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), 0.3,
                                              iterations=2, generator=torch.Generator().manual_seed(0))
        masks = [bank.mask for _, bank in weight_banks(model)]
        positions = sum(mask.numel() for mask in masks)
        assert abs(sum(int(mask.sum()) for mask in masks) - 0.3 * positions) <= len(masks)
        assert report.achieved == pytest.approx(0.3, abs=len(masks) / positions)
        assert report.identical_kernels == [] and report.tie_broken_per_iteration[-1] < 0.5

        rebuilt = convert_to_dynamic(getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES),
                                     conv, pad=True, init="fresh").eval()
        pad.load_compact(rebuilt, pad.export_compact(model))
        with torch.no_grad():
            assert_same_logits(rebuilt(x), model(x))

    with torch.no_grad():
        expected = model(x)
        assert_same_logits(to_inference(model)(x), expected)


def test_imp_on_an_unwarmed_upcycled_model_warns_and_reports_identical_kernels(caplog):
    """Every upcycled kernel equals W_s: the taylor scores are rounding noise; IMP warns and its report says so."""
    model = convert_to_dynamic(calibrated("mobilenet_v2"), "dyconv", pad=True)
    x, y = images(), torch.tensor([0, 1])
    with caplog.at_level(logging.WARNING, logger="pad.partition"):
        report = pad.iterative_mode_partition(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), 0.3,
                                              iterations=1, generator=torch.Generator().manual_seed(0))
    assert report.identical_kernels == [f"{name}.bank" for name, _ in dynamic_convs(model)]
    assert "have identical kernels (an upcycled model before training?)" in caplog.text


# ---------------------------------------------------------------- geometry and layer options

class Geometries(nn.Sequential):
    """A stem, convs of every geometry the layers compute, one they cannot (1x3), and a 1x1 conv classifier."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1),                                            # stem
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, padding_mode="reflect", bias=False),  # depthwise
            nn.Conv2d(8, 12, 3, padding=2, dilation=2, padding_mode="replicate"),
            nn.Conv2d(12, 12, 2, padding="same", groups=3, padding_mode="circular"),  # asymmetric "same"
            nn.Conv2d(12, 12, 3, padding="valid", groups=4, bias=False),
            nn.Conv2d(12, 12, (1, 3), padding=(0, 1)),                                # non-square: stays static
            nn.ReLU(),
            nn.Conv2d(12, 8, 1, stride=2, padding=1, padding_mode="reflect"),
            nn.Conv2d(8, NUM_CLASSES, 1),                                             # classifier
            nn.AdaptiveAvgPool2d(1), nn.Flatten())


CONVERTED = ["1", "2", "3", "4", "7"]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("options", [dict(conv="dyconv"), dict(conv="dyconv", pad=True, kernels=1),
                                     dict(conv="condconv", kernels=3), dict(conv="condconv", pad=True),
                                     dict(conv="odconv", kernels=1), dict(conv="odconv", pad=True),
                                     dict(conv="odconv", pad=True, odconv_static_attention="none", kernels=3),
                                     dict(conv="odconv", pad=True, odconv_static_attention="all")],
                         ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_every_geometry_is_upcycled_exactly(options, training):
    torch.manual_seed(0)
    original = Geometries().train(training)
    model = convert_to_dynamic(copy.deepcopy(original), **options)
    assert [name for name, _ in dynamic_convs(model)] == CONVERTED
    for name in CONVERTED:
        layer, conv = model.get_submodule(name), original.get_submodule(name)
        assert (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode) == (
            conv.stride[0], conv.padding if isinstance(conv.padding, str) else conv.padding[0], conv.dilation[0],
            conv.groups, conv.padding_mode)
        assert (layer.bias is None) == (conv.bias is None) and layer.training == training
        assert layer.bank.kernels.dtype == torch.float64
    x = images(batch=3, size=9, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-10, atol=1e-12)


def test_condconv_upcycled_routing_sums_to_half_the_kernels_for_every_input():
    original = Geometries()
    model = convert_to_dynamic(copy.deepcopy(original), "condconv", kernels=5)  # two pairs and a zero row
    layer, weight = model.get_submodule("2"), original.get_submodule("2").weight
    routing = layer.attention(torch.randn(7, 8, 5, 5))
    torch.testing.assert_close(routing.sum(1), torch.full((7,), 2.5))
    assert routing[:, :4].std(0).min() > 0  # it depends on the input, so the kernels' gradients differ
    assert torch.equal(layer.bank.kernels, (0.4 * weight).expand_as(layer.bank.kernels))


@pytest.mark.parametrize("static_attention, static_scale", [("none", 1), ("channel-filter", 4), ("all", 8)])
def test_odconv_upcycled_kernels_and_static_weight_are_scaled_by_the_halved_attentions(static_attention,
                                                                                       static_scale):
    original = Geometries()
    model = convert_to_dynamic(copy.deepcopy(original), "odconv", pad=True, odconv_static_attention=static_attention)
    layer, weight = model.get_submodule("2"), original.get_submodule("2").weight  # channel, filter and spatial
    assert torch.equal(layer.bank.kernels, (8 * weight).expand_as(layer.bank.kernels))
    assert torch.equal(layer.bank.static_weight, static_scale * weight)


def test_fresh_keeps_the_layers_own_initialisation_on_the_convs_device_and_dtype():
    original = Geometries().double()
    model = convert_to_dynamic(copy.deepcopy(original), "dyconv", pad=True, init="fresh", kernels=2)
    layer, weight = model.get_submodule("2"), original.get_submodule("2").weight
    assert layer.bank.kernels.dtype == layer.bank.static_weight.dtype == torch.float64
    assert not torch.equal(layer.bank.kernels[0], weight) and not torch.equal(layer.bank.kernels[0],
                                                                                layer.bank.kernels[1])


# ---------------------------------------------------------------- which convs

def test_default_keeps_the_stem_and_the_classifier_static():
    model = convert_to_dynamic(torchvision.models.resnet18(weights=None), "dyconv")
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer1[0].conv1, DynamicConv2d) and isinstance(model.layer2[0].downsample[0],
                                                                           DynamicConv2d)
    assert len(list(dynamic_convs(model))) == 19  # every conv of the 8 blocks, the 3 shortcuts included

    squeezenet = torchvision.models.squeezenet1_0(weights=None)  # a 1x1 conv classifier, no nn.Linear
    names = default_selection(squeezenet)
    convert_to_dynamic(squeezenet, "dyconv")
    assert type(squeezenet.features[0]) is nn.Conv2d and type(squeezenet.classifier[1]) is nn.Conv2d
    assert [name for name, _ in dynamic_convs(squeezenet)] == names and "features.3.squeeze" in names


def test_include_by_callable_and_by_names():
    model = convert_to_dynamic(torchvision.models.mobilenet_v2(weights=None), "odconv",
                               include=lambda name, conv: conv.groups == conv.in_channels > 1)  # depthwise only
    assert all(layer.depthwise for _, layer in dynamic_convs(model)) and len(list(dynamic_convs(model))) == 17

    model = convert_to_dynamic(torchvision.models.resnet18(weights=None), "condconv", include=["conv1", "layer4.1.conv2"])
    assert [name for name, _ in dynamic_convs(model)] == ["conv1", "layer4.1.conv2"]  # the stem, asked for


class SameConv(nn.Conv2d):
    """A subclass of nn.Conv2d with its own forward."""


@pytest.mark.parametrize("kwargs, message", [
    (dict(conv="static"), "unknown dynamic conv 'static'"),
    (dict(init="pretrained"), "unknown initialisation 'pretrained'"),
    (dict(kernels=0), "number of kernels must be >= 1"),
    (dict(odconv_static_attention="channel-filter"), "needs PAD-ODConv"),
    (dict(include="1"), "include must be a callable include(name, conv) -> bool or a collection of module names"),
    (dict(include=["1", "9", "fc"]), "include names ['9', 'fc'] that are not nn.Conv2d modules of Geometries"),
    (dict(include=["5"]), "cannot convert '5': non-square kernel size (1, 3)"),
    (dict(include=lambda name, conv: False), "Geometries has no conv to convert"),
])
def test_bad_arguments_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ValueError) as error:
        convert_to_dynamic(Geometries(), **kwargs)
    assert message in str(error.value)


def test_unconvertible_models_are_refused_with_a_message():
    with pytest.raises(ValueError, match="Geometries already has dynamic convs; convert a static model"):
        convert_to_dynamic(convert_to_dynamic(Geometries()))
    one_conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"no conv to convert \(the default keeps the stem and a conv classifier"):
        convert_to_dynamic(one_conv)
    subclassed = nn.Sequential(nn.Conv2d(3, 4, 3), SameConv(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert default_selection(subclassed) == ["2"]
    with pytest.raises(ValueError, match="cannot convert '1': SameConv is a subclass of nn.Conv2d"):
        convert_to_dynamic(subclassed, include=["1"])
