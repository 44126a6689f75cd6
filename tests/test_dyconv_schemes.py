"""Execution schemes of dynamic convs: every scheme equals a per-sample reference loop in outputs and gradients."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pad
from conftest import randomize_attention
from pad.partition import score_positions
from dyconv.layers import (CondConv2d, DynamicConv2d, ODConv2d, conv_factory, conv_schemes, restore_conv_schemes,
                           scheme_key, set_conv_scheme)
from dyconv.models import build_model
from dyconv.schemes import POLICIES, SCHEMES, applicable_schemes, choose_scheme, modelled_cost

torch.set_num_threads(1)

LAYERS = {"condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d,
          # PAD-ODConv as the authors' release computes it: the channel and filter attentions scale the static part too
          "odconv-cf": functools.partial(ODConv2d, static_attention="channel-filter"),
          # ODConv over the folded kernels: every attention scales the static part too
          "odconv-all": functools.partial(ODConv2d, static_attention="all")}
# (in, out, kernel, stride, padding, groups, dilation, padding mode)
GEOMETRIES = {
    "3x3_stride1": (6, 8, 3, 1, 1, 1, 1, "zeros"),
    "3x3_stride2": (6, 8, 3, 2, 1, 1, 1, "zeros"),
    "depthwise_stride2": (8, 8, 3, 2, 1, 8, 1, "zeros"),  # MobileNetV2's depthwise conv
    "1x1_stride1": (6, 10, 1, 1, 0, 1, 1, "zeros"),
    "1x1_stride2_grouped": (6, 4, 1, 2, 0, 2, 1, "zeros"),
    # padding the conv does not do itself (another mode, an asymmetric "same"), dilation, general groups
    "3x3_dilation2_reflect": (6, 8, 3, 1, 2, 1, 2, "reflect"),
    "2x2_same_circular_grouped": (6, 4, 2, 1, "same", 2, 1, "circular"),
    "depthwise_stride2_replicate": (8, 8, 3, 2, 1, 8, 1, "replicate"),
    "1x1_stride2_padded_reflect": (6, 4, 1, 2, 1, 1, 1, "reflect"),
}


def build(kind, geometry, use_pad, scheme, seed=0):
    torch.manual_seed(seed)
    in_ch, out_ch, k, stride, padding, groups, dilation, padding_mode = GEOMETRIES[geometry]
    extra = {} if kind == "condconv" else {"temperature": 2.0}
    layer = LAYERS[kind](in_ch, out_ch, k, stride, padding, groups, True, kernels=3, pad=use_pad, scheme=scheme,
                         dilation=dilation, padding_mode=padding_mode, **extra)
    with torch.no_grad():  # order-one attention weights, random BN statistics, a random mask and phi
        randomize_attention(layer)
        if use_pad:
            layer.bank.mask.copy_((torch.rand(layer.bank.shape) < 0.4).to(layer.bank.mask))
            layer.bank.scale.phi.fill_(0.6)
    return layer


def reference_forward(layer, x):
    """A python loop of F.conv2d per sample, with Omega_b mixed explicitly from the layer's parameters.
    ODConv: the channel, filter and spatial attentions scale W~ alone (static_attention "none"); with
    "channel-filter" the channel and filter ones scale the PAD mixture as a whole, with "all" every one."""
    attention = layer.attention(x)
    bank = layer.bank
    outputs = []
    for b in range(x.shape[0]):
        if isinstance(layer, ODConv2d):
            coefficients = attention.kernel[b] if attention.kernel is not None else torch.ones(1)
        else:
            coefficients = attention[b]
        weight = sum(c * kernel for c, kernel in zip(coefficients, bank.kernels))
        dynamic_only, whole = 1.0, 1.0  # attention factors of the dynamic part alone and of the whole mixture
        if isinstance(layer, ODConv2d):
            out_ch, in_per_group = bank.shape[:2]
            channel = torch.stack([attention.channel[b][(o // (out_ch // layer.groups)) * in_per_group:
                                                        (o // (out_ch // layer.groups) + 1) * in_per_group]
                                   for o in range(out_ch)])
            channel_filter = channel[:, :, None, None]
            if attention.filter is not None:
                channel_filter = channel_filter * attention.filter[b].view(-1, 1, 1, 1)
            spatial = 1.0
            if attention.spatial is not None:
                spatial = attention.spatial[b].view(1, 1, layer.kernel_size, layer.kernel_size)
            dynamic_only, whole = {"none": (channel_filter * spatial, 1.0), "channel-filter": (spatial, channel_filter),
                                   "all": (1.0, channel_filter * spatial)}[layer.static_attention]
        weight = weight * dynamic_only
        if isinstance(bank, pad.PartiallyDynamicWeights):
            lambda_d = 2 * torch.sigmoid(bank.scale.phi)
            weight = lambda_d * bank.mask * weight + (2 - lambda_d) * (1 - bank.mask) * bank.static_weight
        weight = weight * whole
        outputs.append(torch_conv(layer)._conv_forward(x[b:b + 1], weight, layer.bias))
    return torch.cat(outputs)


def torch_conv(layer):
    """An ``nn.Conv2d`` of the layer's geometry: its ``_conv_forward`` is torch's own padding and conv."""
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, padding_mode=layer.padding_mode)


def outputs_and_gradients(layer, x, forward):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = forward(layer, x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def expected_scheme(policy, layer, batch):
    has_spatial = isinstance(layer, ODConv2d) and layer.attention.spatial_fc is not None
    applicable = applicable_schemes(layer.kernel_size, has_spatial)
    if policy == "auto":
        return "grouped" if batch == 1 else ("bmm" if "bmm" in applicable else None)
    return policy if policy in applicable else "grouped"


# Every layer kind, fully dynamic and PAD; the static attentions of PAD-ODConv only with PAD (without PAD
# there is no static part for an attention to scale).
KINDS_AND_PAD = [pytest.param(kind, use_pad, id=f"{kind}-{'pad' if use_pad else 'full'}")
                 for kind in LAYERS for use_pad in (False, True)
                 if use_pad or kind not in ("odconv-cf", "odconv-all")]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind, use_pad", KINDS_AND_PAD)
def test_every_scheme_equals_per_sample_reference(kind, use_pad, geometry, batch, training):
    x = torch.randn(batch, GEOMETRIES[geometry][0], 7, 7, generator=torch.Generator().manual_seed(1))
    reference_layer = build(kind, geometry, use_pad, "grouped").train(training)
    expected = outputs_and_gradients(reference_layer, x, reference_forward)
    assert set(expected[2]) >= {"bank.kernels", "bias"} | ({"bank.static_weight", "bank.scale.phi"} if use_pad else set())
    for policy in POLICIES:
        layer = build(kind, geometry, use_pad, policy).train(training)
        out, x_grad, grads = outputs_and_gradients(layer, x, lambda m, inputs: m(inputs))
        torch.testing.assert_close(out, expected[0], rtol=1e-10, atol=1e-10, msg=policy)
        torch.testing.assert_close(x_grad, expected[1], rtol=1e-10, atol=1e-10, msg=policy)
        assert grads.keys() == expected[2].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[2][name], rtol=1e-9, atol=1e-10, msg=f"{policy} {name}")
        assert list(layer.chooser.schemes) == [scheme_key(x)]  # keyed by the input, not the padded input
        (chosen,) = layer.chooser.schemes.values()
        wanted = expected_scheme(policy, layer, batch)
        assert chosen == wanted or (wanted is None and chosen in ("grouped", "stacked"))


@pytest.mark.parametrize("geometry", ["3x3_stride2", "depthwise_stride2", "1x1_stride2_grouped"])
@pytest.mark.parametrize("kind", ["dyconv", "odconv-cf"])
def test_every_scheme_takes_a_channels_last_input(kind, geometry):
    """A permuted input (ConvNeXt's convs read one) computes what its contiguous copy does."""
    x = torch.randn(2, GEOMETRIES[geometry][0], 7, 7, generator=torch.Generator().manual_seed(1))
    permuted = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for policy in POLICIES:
        layer = build(kind, geometry, True, policy)
        torch.testing.assert_close(layer(permuted), layer(x), msg=policy)


class _OpCounter(TorchDispatchMode):
    """Counts convolutions and records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.convolutions = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution):
            self.convolutions += 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind, scheme, convolutions", [
    ("dyconv", "stacked", 1), ("condconv", "stacked", 1), ("odconv", "stacked", 2), ("odconv-cf", "stacked", 1),
    ("odconv-all", "stacked", 1),
    ("dyconv", "bmm", 0), ("condconv", "bmm", 0), ("odconv", "bmm", 1), ("odconv-cf", "bmm", 0), ("odconv-all", "bmm", 0),
    ("dyconv", "grouped", 1), ("odconv", "grouped", 1), ("odconv-cf", "grouped", 1), ("odconv-all", "grouped", 1),
])
def test_pad_static_part_costs_no_extra_pass_where_exact(kind, scheme, convolutions):
    """DY-Conv folds W'_k and CondConv adds W_s as one more kernel: one conv (none for bmm);
    ODConv's unscaled static part is one static conv outside the grouped scheme; with the
    channel-filter static attention a 1x1 ODConv folds W'_k like DY-Conv."""
    torch.manual_seed(0)
    layer = LAYERS[kind](8, 8, 1, kernels=4, pad=True, scheme=scheme).eval()
    with _OpCounter() as counter, torch.no_grad():
        layer(torch.randn(4, 8, 5, 5))
    assert counter.convolutions == convolutions


@pytest.mark.parametrize("scheme", ["stacked", "grouped"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_no_batch_times_kernels_tensor_and_stacked_builds_no_per_sample_weights(kind, scheme):
    torch.manual_seed(0)
    batch, kernels = 8, 4
    layer = LAYERS[kind](32, 32, 3, padding=1, kernels=kernels, pad=True, scheme=scheme).train()
    x = torch.randn(batch, 32, 3, 3)
    with _OpCounter() as counter:
        layer(x).sum().backward()
    weight_size = layer.bank.shape.numel()
    assert counter.largest < batch * kernels * weight_size
    used = layer.chooser.schemes["batch@3x3"]
    if used == "stacked":  # ODConv 3x3 has a spatial attention: grouped
        assert counter.largest < batch * weight_size
    else:
        assert counter.largest >= batch * weight_size
    assert used == ("grouped" if kind.startswith("odconv") else scheme)


def test_cost_model_choices():
    # ResNet-18's 3x3 convs at 224 px (K = 4): grouped up to the 256-channel stage, stacked at 512 ch / 7 px
    for channels, pixels, expected in ((64, 56 * 56, "grouped"), (128, 28 * 28, "grouped"),
                                       (256, 14 * 14, "grouped"), (512, 7 * 7, "stacked")):
        assert choose_scheme("auto", ("grouped", "stacked"), 32, 4, channels, 3, pixels) == expected
    assert modelled_cost("stacked", 4, 512, 3, 49) == 5.0
    # at 112 px: stacked from layer3 on (128 -> 256 channels onto 7x7 outputs: 1 + 0.2 * 1152 / 49 > 5)
    assert choose_scheme("auto", ("grouped", "stacked"), 32, 4, 128, 3, 7 * 7) == "stacked"
    assert choose_scheme("auto", ("grouped", "stacked"), 32, 4, 128, 3, 14 * 14) == "grouped"
    # the --mini ResNet-10 at width 16, 28 px: layer4.0.conv1 (64 channels onto 4x4) stacked, layer3's grouped
    assert choose_scheme("auto", ("grouped", "stacked"), 64, 4, 64, 3, 4 * 4) == "stacked"
    assert choose_scheme("auto", ("grouped", "stacked"), 64, 4, 64, 3, 7 * 7) == "grouped"
    assert modelled_cost("grouped", 4, 512, 3, 49) == pytest.approx(1 + 0.2 * 512 * 9 / 49)
    assert choose_scheme("auto", ("grouped", "stacked"), 1, 4, 512, 3, 49) == "grouped"
    assert choose_scheme("auto", ("grouped", "stacked", "bmm"), 32, 4, 512, 1, 49) == "bmm"
    assert choose_scheme("stacked", ("grouped",), 32, 4, 512, 3, 49) == "grouped"
    assert choose_scheme("bmm", ("grouped", "stacked", "bmm"), 1, 4, 8, 1, 49) == "bmm"
    with pytest.raises(ValueError, match="unknown conv scheme 'fft'"):
        choose_scheme("fft", ("grouped",), 2, 4, 8, 3, 9)
    with pytest.raises(ValueError, match="unknown conv scheme 'fft'"):
        conv_factory("dyconv", scheme="fft")


def test_schemes_recorded_and_restored():
    torch.manual_seed(0)
    model = build_model("resnet10", "dyconv", pad=True, small_input=True, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
        model(torch.randn(1, 1, 28, 28))
    recorded = conv_schemes(model)
    assert recorded["layer4.0.conv2"] == {"policy": "auto", "chosen": {"batch@4x4": "stacked", "single@4x4": "grouped"},
                                          "paths": {}}  # element masks: no unit/element choice
    assert recorded["layer1.0.conv1"]["chosen"] == {"batch@28x28": "grouped", "single@28x28": "grouped"}
    assert recorded["layer2.0.downsample.0"]["chosen"]["batch@28x28"] == "bmm"
    fresh = build_model("resnet10", "dyconv", pad=True, small_input=True, in_channels=1, num_classes=10,
                        conv_scheme="grouped")
    fresh.load_state_dict(model.state_dict())
    restore_conv_schemes(fresh, recorded)
    assert conv_schemes(fresh) == recorded
    restore_conv_schemes(fresh, None)  # a checkpoint from before schemes were recorded: keep the model's own
    assert conv_schemes(fresh) == recorded
    with pytest.raises(ValueError, match="recorded conv scheme 'fft' of layer 'layer1.0.conv1' is unknown"):
        restore_conv_schemes(fresh, {**recorded, "layer1.0.conv1": {"policy": "auto", "chosen": {"batch@2x2": "fft"}}})
    with pytest.raises(ValueError, match="name other layers"):
        restore_conv_schemes(fresh, {"layer1.0.conv1": recorded["layer1.0.conv1"]})
    set_conv_scheme(fresh, "stacked")
    assert all(e == {"policy": "stacked", "chosen": {}, "paths": {}} for e in conv_schemes(fresh).values())


@pytest.mark.usefixtures("float64")
def test_taylor_scores_do_not_depend_on_the_scheme():
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 1, 12, 12, generator=generator), torch.randint(0, 4, (3,), generator=generator))
               for _ in range(2)]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    scores = {}
    for scheme in POLICIES:
        torch.manual_seed(0)
        model = build_model("resnet10", "dyconv", pad=True, small_input=True, in_channels=1, num_classes=4,
                            conv_scheme=scheme, temperature=2.0)
        scores[scheme] = score_positions(model, batches, loss_fn, "taylor")
        assert {s for e in conv_schemes(model).values() for s in e["chosen"].values()} >= (
            {scheme} if scheme != "auto" else {"grouped", "stacked", "bmm"})
    for scheme in SCHEMES:
        for name, value in scores["auto"].items():
            torch.testing.assert_close(scores[scheme][name], value, rtol=1e-8, atol=1e-14)
    assert sum(float(s.sum()) for s in scores["auto"].values()) > 0


def test_odconv_trains_on_a_batch_of_one_with_running_statistics():
    torch.manual_seed(0)
    layer = ODConv2d(4, 6, 3, padding=1, kernels=2).train()
    bn = layer.attention.bn
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.randn(1, 4, 5, 5)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and layer.bank.kernels.grad.abs().sum() > 0
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    expected = layer.eval()(x)  # eval mode normalises with the same running statistics
    torch.testing.assert_close(out, expected)
    model = build_model("mobilenetv2_050", "odconv", pad=True, small_input=True, in_channels=1, num_classes=3).train()
    model(torch.randn(1, 1, 28, 28)).sum().backward()


def test_bfloat16_autocast_forward_every_scheme():
    torch.manual_seed(0)
    for scheme in POLICIES:
        model = build_model("resnet10", "dyconv", pad=True, small_input=True, in_channels=1, num_classes=4,
                            conv_scheme=scheme).train()
        x = torch.randn(2, 1, 16, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
        logits.float().sum().backward()
        reference = model(x)
        assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1


@pytest.mark.parametrize("scheme", POLICIES)
def test_compile_without_graph_breaks_or_a_graph_per_batch_size(scheme):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = nn.Sequential(DynamicConv2d(8, 8, 3, padding=1, kernels=2, pad=True, scheme=scheme),
                           DynamicConv2d(8, 8, 1, kernels=2, pad=True, scheme=scheme),
                           ODConv2d(8, 8, 3, stride=2, padding=1, kernels=2, pad=True, scheme=scheme),
                           CondConv2d(8, 8, 1, kernels=2, pad=True, scheme=scheme)).train()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(layers, backend="eager", dynamic=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 8, 6, 6, generator=torch.Generator().manual_seed(batch))
        compiled(x).sum().backward()
    assert counts["stats"]["unique_graphs"] == 1
    layers.eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():  # the compiled model computes what the eager one does (eval: no fold cache when compiled)
        torch.testing.assert_close(torch.compile(layers, backend="eager", dynamic=True)(x), layers(x))
    assert not counts["graph_break"]


def test_eval_fold_is_cached_until_a_bank_tensor_changes():
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, kernels=3, pad=True).eval()
    calls = []
    layer.bank.register_forward_hook(lambda module, inputs, output: calls.append(1))
    x = torch.randn(2, 4, 5, 5)

    def uncached_output():  # with autograd on, nothing is cached
        with torch.enable_grad():
            return layer(x).detach()

    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(layer(x), first)
        assert len(calls) == 1  # folded once for two batches
        for change in (lambda: layer.bank.kernels.mul_(1.5), lambda: layer.bank.mask[0].zero_(),
                       lambda: layer.bank.scale.phi.fill_(0.3), lambda: layer.bank.static_weight.add_(1.0)):
            change()
            out = layer(x)  # a new fold ...
            assert not torch.equal(out, first)
            torch.testing.assert_close(out, uncached_output(), rtol=0, atol=0)  # ... equal to an uncached one
            first = out
    assert len(calls) == 1 + 4 * 2
    layer.train()
    assert len(layer.cache) == 0
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(calls) == 1 + 4 * 2 + 2  # training mode folds every pass


@pytest.mark.parametrize("kind, scheme", [("condconv", "grouped"), ("condconv", "stacked"), ("dyconv", "grouped"),
                                          ("dyconv", "stacked"), ("odconv", "grouped")])
def test_compiled_layer_traces_once_for_every_batch_size(kind, scheme):
    """torch.compile(dynamic=True) traces a PAD layer once: batch sizes 3, 5 and 4 reuse the graph (no
    recompile, no graph break), and the compiled layer's outputs and gradients equal the eager layer's."""
    layer = build(kind, "3x3_stride1", True, scheme).train()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=counting_backend, dynamic=True, fullgraph=True)
    for batch in (3, 5, 4):
        x = torch.randn(batch, 6, 7, 7)
        layer.zero_grad()
        expected = layer(x)
        expected.square().sum().backward()
        eager_grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad()
        out = compiled(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, expected)
        for got, want in zip([p.grad for p in layer.parameters() if p.grad is not None], eager_grads):
            torch.testing.assert_close(got, want)
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_check_schemes_script_refuses_a_missing_device_in_one_line():
    """scripts/check_schemes.py (the whole-model check a GPU session runs) on a machine without CUDA."""
    import subprocess
    import sys
    from pathlib import Path
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_schemes.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: --device cuda but CUDA is not available\n"
