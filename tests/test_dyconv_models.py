"""ResNet / MobileNetV2 over the conv factory: builds, layer types, parameter and FLOP counts, IMP on a model."""
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pad
from pad.mixing import weight_banks
from pad.partition import SCHEDULES, SCOPES, ratio_schedule, score_positions, select_dynamic
from dyconv import bench
from dyconv.layers import CondConv2d, DynamicConv2d, ODConv2d, dynamic_conv_names, dynamic_convs
from dyconv.models import ARCHS, build_model, count_flops, count_parameters, set_random_mask

torch.set_num_threads(1)

LAYERS = {"static": nn.Conv2d, "condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d}
VARIANTS = [("static", False)] + [(conv, use_pad) for conv in dynamic_conv_names() for use_pad in (False, True)]
RESNET_BLOCKS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3),
                 "resnet50": (3, 4, 6, 3)}


def stem_of(model):
    return model.conv1 if hasattr(model, "conv1") else model.features[0][0]


def classifier_of(model):
    return model.fc if hasattr(model, "fc") else model.classifier[-1]


def block_convs(model):
    """Every conv module except the stem, in order."""
    stem = stem_of(model)
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, CondConv2d, DynamicConv2d, ODConv2d)) and m is not stem]


def expected_block_conv_count(arch):
    """Counted from the papers' tables, not from the code."""
    if arch in RESNET_BLOCKS:
        blocks = RESNET_BLOCKS[arch]
        per_block = 3 if arch == "resnet50" else 2
        shortcuts = 4 if arch == "resnet50" else 3  # resnet50's first stage widens 64 -> 256
        return sum(blocks) * per_block + shortcuts
    blocks = 1 + 2 + 3 + 4 + 3 + 3 + 1  # MobileNetV2 inverted residuals; the first has no expansion conv
    return 2 + 3 * (blocks - 1) + 1  # + the last 1x1 conv


# ---------------------------------------------------------------- builds

@pytest.mark.parametrize("conv, use_pad", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_and_conv_builds_and_runs(arch, conv, use_pad):
    torch.manual_seed(0)
    for kwargs, x in (({}, torch.randn(1, 3, 224, 224)),
                      ({"small_input": True, "in_channels": 1, "num_classes": 10}, torch.randn(2, 1, 28, 28))):
        model = build_model(arch, conv, use_pad, **kwargs)
        assert type(stem_of(model)) is nn.Conv2d and type(classifier_of(model)) is nn.Linear
        convs = block_convs(model)
        assert len(convs) == expected_block_conv_count(arch)
        assert all(type(m) is LAYERS[conv] for m in convs)
        if conv != "static":
            assert all(isinstance(m.bank, pad.PartiallyDynamicWeights) == use_pad for m in convs)
        # the 224 px pass in eval mode at batch 1, the 28 px pass in training mode (BatchNorm statistics)
        model.train(bool(kwargs))
        with torch.no_grad():
            logits = model(x)
        assert logits.shape == (x.shape[0], kwargs.get("num_classes", 1000))
        assert torch.isfinite(logits).all()
        del model


@pytest.mark.parametrize("arch", ["resnet10", "resnet50", "mobilenetv2_075"])
def test_stems_set_the_final_feature_size(arch):
    model = build_model(arch).eval()
    trunk = model.layer4 if hasattr(model, "layer4") else model.features
    sizes = []
    trunk.register_forward_hook(lambda module, inputs, output: sizes.append(output.shape[-1]))
    model(torch.randn(1, 3, 224, 224))
    small = build_model(arch, small_input=True, in_channels=1, num_classes=10).eval()
    trunk = small.layer4 if hasattr(small, "layer4") else small.features
    trunk.register_forward_hook(lambda module, inputs, output: sizes.append(output.shape[-1]))
    small(torch.randn(1, 1, 28, 28))
    assert sizes == [224 // 32, math.ceil(28 / 8)]
    assert stem_of(small).stride == (1, 1) and stem_of(small).kernel_size == (3, 3)


def test_unknown_arch_and_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown arch 'vgg16'; expected one of \('resnet10'"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="unknown conv"):
        build_model("resnet10", conv="involution")
    with pytest.raises(ValueError, match="PAD needs a dynamic conv"):
        build_model("resnet10", pad=True)
    with pytest.raises(ValueError, match="number of kernels"):
        build_model("resnet10", conv="dyconv", kernels=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet10", num_classes=0)


# ---------------------------------------------------------------- parameters

@pytest.mark.parametrize("arch, reference", [
    ("resnet18", lambda: torchvision.models.resnet18(weights=None)),
    ("resnet50", lambda: torchvision.models.resnet50(weights=None)),
    ("mobilenetv2_100", lambda: torchvision.models.mobilenet_v2(weights=None)),
    ("mobilenetv2_050", lambda: torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)),
])
def test_static_models_match_torchvision(arch, reference):
    ours, theirs = build_model(arch), reference()
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def dyconv_attention_parameters(in_channels, kernels, reduction=4, min_hidden=4):
    hidden = max(in_channels // reduction, min_hidden)
    return in_channels * hidden + hidden + hidden * kernels + kernels


def test_pad_dyconv_parameter_counts_dense_and_compact():
    kernels, ratio = 4, 0.3
    static = build_model("resnet10", small_input=True, num_classes=10)
    partial = build_model("resnet10", "dyconv", pad=True, small_input=True, num_classes=10, kernels=kernels)

    one = partial.layer2[0].conv1  # 64 -> 128, 3x3
    weight_size = 128 * 64 * 9
    per_layer_extra = kernels * weight_size + dyconv_attention_parameters(64, kernels) + 1  # + phi
    assert count_parameters(one) == weight_size + per_layer_extra

    extra = sum(kernels * math.prod(m.weight.shape) + dyconv_attention_parameters(m.in_channels, kernels) + 1
                for m in block_convs(static))
    assert count_parameters(partial) == count_parameters(static) + extra

    banks = dict(weight_banks(partial))
    scores = {name: torch.rand(bank.mask.shape, generator=torch.Generator().manual_seed(i))
              for i, (name, bank) in enumerate(banks.items())}
    with torch.no_grad():
        select_dynamic(banks, scores, ratio, "global")
    assert abs(pad.dynamic_ratio(partial) - ratio) * sum(b.mask.numel() for b in banks.values()) <= len(banks)
    for layer in block_convs(partial):
        dynamic = int(layer.bank.mask.sum())
        size = layer.bank.mask.numel()
        kappa = dynamic / size
        compact_kernel_weights = (1 - kappa) * size + kappa * kernels * size
        assert compact_kernel_weights == pytest.approx((size - dynamic) + kernels * dynamic, abs=1e-6)
        others = dyconv_attention_parameters(layer.in_channels, kernels) + 1
        assert pad.parameter_counts(layer)["compact"] == round(compact_kernel_weights) + others
    counts = pad.parameter_counts(partial)
    assert counts["dense"] == count_parameters(partial)
    assert counts["compact"] == count_parameters(partial) - sum(
        int(b.mask.sum()) + (b.mask.numel() - int(b.mask.sum())) * kernels for b in banks.values())


# ---------------------------------------------------------------- FLOPs

def test_count_flops():
    resnet18 = build_model("resnet18")
    flops = count_flops(resnet18, (3, 224, 224))
    assert isinstance(flops, int)
    assert abs(flops - 2 * 1.814e9) / (2 * 1.814e9) < 0.05  # torchvision: 1.814 G multiply-accumulates
    assert count_flops(resnet18, (1, 3, 224, 224)) == flops
    assert resnet18.training  # mode restored

    small = build_model("resnet10", small_input=True, in_channels=1, num_classes=10)
    dynamic = build_model("resnet10", "dyconv", pad=True, small_input=True, in_channels=1, num_classes=10)
    static_flops, dynamic_flops = count_flops(small, (1, 28, 28)), count_flops(dynamic, (1, 28, 28))
    assert 0 < static_flops < dynamic_flops < 1.1 * static_flops  # aggregation and attention are cheap
    # the first conv alone: 2 * out_pixels * out_ch * in_ch * k * k
    assert count_flops(nn.Sequential(small.conv1), (1, 28, 28)) == 2 * 28 * 28 * 64 * 1 * 9
    with pytest.raises(ValueError, match="input_size must be"):
        count_flops(small, (28, 28))


# ---------------------------------------------------------------- IMP on a model

def random_batches(count=2, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 28, 28, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
            for _ in range(count)]


def cross_entropy(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


@pytest.fixture(scope="module")
def tiny_pad_resnet():
    torch.manual_seed(0)
    return build_model("resnet10", "dyconv", pad=True, small_input=True, in_channels=1, num_classes=10)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_imp_hits_ratio_and_only_shrinks(tiny_pad_resnet, scope, schedule):
    model, ratio, iterations = tiny_pad_resnet, 0.3, 2
    batches = random_batches(count=1, batch=3)
    banks = dict(weight_banks(model))

    # the first round by hand, from all-dynamic masks
    with torch.no_grad():
        for bank in banks.values():
            bank.mask.fill_(1)
    scores = score_positions(model, batches, cross_entropy, "taylor")
    with torch.no_grad():
        select_dynamic(banks, scores, ratio_schedule(ratio, iterations, schedule)[0], scope)
    first = {name: bank.mask.clone() for name, bank in banks.items()}

    report = pad.iterative_mode_partition(model, batches, cross_entropy, ratio, iterations=iterations,
                                          schedule=schedule, scope=scope)
    total = sum(b.mask.numel() for b in banks.values())
    assert abs(pad.dynamic_ratio(model) - ratio) * total <= len(banks)
    assert report.achieved == pytest.approx(pad.dynamic_ratio(model))
    if scope == "local":
        for bank in banks.values():
            assert abs(bank.mask.sum().item() - ratio * bank.mask.numel()) <= 1
    assert len(report.ratio_per_iteration) == iterations
    assert all(a > b for a, b in zip([1.0] + report.ratio_per_iteration, report.ratio_per_iteration))
    # the dynamic set only shrinks: the final masks lie inside the first round's
    for name, bank in banks.items():
        assert (bank.mask <= first[name]).all()
    assert sum(b.mask.sum() for b in banks.values()) < sum(m.sum() for m in first.values())


@pytest.mark.parametrize("layer_cls", [DynamicConv2d, CondConv2d])
def test_taylor_scores_equal_independent_autograd(layer_cls):
    """S = |sum_batches sum_samples g ⊙ (lambda_d W~(x) - lambda_s W_s)| with g = dL/dOmega,
    Omega built per sample as a leaf tensor and convolved by hand."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        layer = layer_cls(3, 4, 3, stride=1, padding=1, kernels=3, pad=True)
        model = nn.Sequential(layer).eval()
        with torch.no_grad():
            layer.bank.mask.copy_((torch.rand(layer.bank.shape) < 0.5).double())
            layer.bank.scale.phi.fill_(-0.4)
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(3, 3, 6, 6, generator=generator), torch.randn(3, 4, 6, 6, generator=generator))
                   for _ in range(2)]

        def loss_fn(m, batch):
            return ((m(batch[0]) - batch[1]) ** 2).mean()

        scores = score_positions(model, batches, loss_fn, "taylor")["0.bank"]

        lambda_d = 2 * torch.sigmoid(torch.tensor(-0.4))
        lambda_s = 2 - lambda_d
        mask, static, kernels = layer.bank.mask, layer.bank.static_weight.detach(), layer.bank.kernels.detach()
        total = torch.zeros_like(mask)
        for x, y in batches:
            with torch.no_grad():
                routing = layer.attention(x)
            full = [sum(routing[b, k] * kernels[k] for k in range(3)) for b in range(x.shape[0])]  # W~(x_b)
            omegas = [(lambda_d * mask * w + lambda_s * (1 - mask) * static).requires_grad_(True) for w in full]
            out = torch.cat([F.conv2d(x[b:b + 1], omegas[b], padding=1) for b in range(x.shape[0])])
            grads = torch.autograd.grad(((out - y) ** 2).mean(), omegas)
            for g, w in zip(grads, full):
                total += g * (lambda_d * w - lambda_s * static)
        torch.testing.assert_close(scores, total.abs(), rtol=1e-8, atol=1e-14)
        assert scores.abs().sum() > 0
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------- benchmark CLI

REPO = Path(__file__).resolve().parents[1]


def run_bench(capsys, *argv):
    code = bench.main(["--threads", "1", "--repeats", "1", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out, first_column):
    return [line.split() for line in out.splitlines() if line.split() and line.split()[0] == first_column]


def test_bench_flags_change_what_is_measured(capsys):
    code, out, _ = run_bench(capsys, "--batch-size", "2", "--sizes", "40", "64", "--archs", "resnet10",
                             "--param-archs", "resnet10", "--dynamic-ratio", "0.5", "--kernels", "2")
    assert code == 0
    assert ("resnet10, batch 2, 1 repeats, device cpu (cpu, 1 threads), K=2, PAD dynamic ratio 0.5, scheme auto, "
            "default allocator") in out
    timing = table_rows(out, "resnet10")[:12]
    assert [r[2] for r in timing] == 2 * ["static", "dyconv", "pad-dyconv", "pad-folded", "pad-unit", "unit-folded"]
    for index, row in enumerate(timing):
        assert row[1] == ("40" if index < 6 else "64")
        cells = row[3:]
        folded = row[2].endswith("-folded")
        if folded:  # inference form: no training columns
            assert cells[:2] == ["-", "-"] and cells[6:8] == ["-", "-"]
        values = [float(v) for v in cells if v != "-"]
        assert len(values) == (6 if folded else 10) and all(v > 0 for v in values)
        if row[2] == "static":
            assert values[1::2] == [1.0] * 5
    # the scheme table names every dynamic conv with the scheme it chose and pad-unit's path, per size
    # (ImageNet stem: layer1 at 10x10 of 40 px, 16x16 of 64 px; layer4 at 2x2); K = 2: stacked costs 3 static convs
    listing = out.split("execution scheme per layer")[1].split("stored parameters")[0]
    at_40, at_64 = listing.split("resnet10 64 px:")
    assert "resnet10 40 px: bmm 3, grouped 2, stacked 6; pad-unit paths: element 3, unit 8" in at_40
    assert at_64.startswith(" bmm 3, grouped 3, stacked 5; pad-unit paths: element 5, unit 6")  # 128 ch onto 8x8: stacked

    def layer_line(part, name):
        (line,) = [line.split() for line in part.splitlines() if line.split()[:1] == [name]]
        return line

    assert layer_line(at_40, "layer4.0.conv2")[2:] == ["512->512", "in", "2x2", "stacked", "/", "grouped",
                                                       "path", "unit", "/", "unit"]
    # layer1: 64 channels, (C/g) k^2 = 576 >= 2.5 H'W' = 250 at 10x10, not at 16x16 (640)
    # (at batch 1 by the same rule: the per-sample weight still mixes the K kernels)
    assert layer_line(at_40, "layer1.0.conv1")[4:] == ["10x10", "grouped", "/", "grouped", "path", "unit", "/",
                                                       "unit"]
    assert layer_line(at_64, "layer1.0.conv1")[4:] == ["16x16", "grouped", "/", "grouped", "path", "element", "/",
                                                       "element"]
    assert layer_line(at_64, "layer2.0.downsample.0")[6:] == ["bmm", "/", "grouped", "path", "element", "/",
                                                              "element"]  # 1 + 0.2 * 64 / 64 < 1.5
    # 1x1 at batch 1: grouped with 128 input channels on 4x4 outputs, 1 + 0.2 * 128 / 16 >= 1.5
    assert layer_line(at_64, "layer3.0.downsample.0")[6:] == ["bmm", "/", "grouped", "path", "element", "/", "unit"]
    (params,) = [r for r in table_rows(out, "resnet10") if r[1].replace(",", "").isdigit() and "," in r[1]]
    static, dyconv, dense, compact = (int(v.replace(",", "")) for v in params[1:5])
    static_model = build_model("resnet10")
    convs = block_convs(static_model)
    weights = sum(math.prod(m.weight.shape) for m in convs)
    attention = sum(dyconv_attention_parameters(m.in_channels, 2) for m in convs)
    assert static == count_parameters(static_model)
    assert dyconv == static + weights + attention  # K = 2 kernels replace each static weight
    assert dense == dyconv + weights + len(convs)  # + W_s and phi per layer
    # kappa = 0.5 and K = 2: of the 3 |W| kernel weights stored, (1 - kappa)|W| + kappa K |W| = 1.5 |W| are kept
    assert abs((dense - compact) - 1.5 * weights) <= len(convs)
    assert float(params[-1]) == pytest.approx(0.5, abs=1e-4)


def test_bench_forced_scheme_and_allocator_flags(capsys):
    code, out, _ = run_bench(capsys, "--batch-size", "2", "--sizes", "40", "--archs", "mobilenetv2_050",
                             "--param-archs", "resnet10", "--scheme", "stacked", "--keep-freed-memory", "--amp",
                             "--passes", "infer1")
    assert code == 0
    assert "scheme stacked, pad.runtime.keep_freed_memory(), amp" in out
    # stacked is forced wherever it is exact (every MobileNetV2 conv), grouped at batch 1 stays forced too
    (summary,) = [line for line in out.splitlines() if line.startswith("mobilenetv2_050 40 px:")]
    layers = expected_block_conv_count("mobilenetv2_050")
    assert summary == f"mobilenetv2_050 40 px: stacked {layers}; pad-unit paths: unit {layers}"  # K + 1: unit
    timing = table_rows(out, "mobilenetv2_050")[:6]
    assert [r[2] for r in timing] == ["static", "dyconv", "pad-dyconv", "pad-folded", "pad-unit", "unit-folded"]
    for row in timing:  # --passes infer1: only batch-1 inference timed (memory is of train and infer)
        assert row[3:7] == ["-"] * 4 and float(row[7]) > 0 and row[9:] == ["-"] * 4


def test_bench_layers_times_every_dynamic_conv_under_each_exact_scheme(capsys):
    code, out, _ = run_bench(capsys, "--layers", "--batch-size", "2", "--sizes", "40", "--archs", "resnet10",
                             "--kernels", "2")
    assert code == 0
    assert "scheme auto" in out and "execution scheme per layer" not in out  # no model tables
    names = [name for name, _ in dynamic_convs(build_model("resnet10", "dyconv"))]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in names}
    assert list(rows) == names  # one line per dynamic conv, in model order
    header = out.splitlines()[out.splitlines().index("resnet10 40 px") + 1].split()
    assert header[-6:] == ["grouped", "stacked", "bmm", "auto", "chose", "dyconv"]
    for name, row in rows.items():
        inputs, static_ms, share, grouped, stacked, bmm, auto, chose, dyconv = row[-9:]
        assert (bmm != "-") == ("1x1" in row)  # bmm only where it is exact
        assert all(float(c.rstrip("x")) > 0 for c in (grouped, stacked, auto, dyconv, static_ms))
        # auto ran the choice the scheme table reports: bmm for 1x1, stacked at 2x2 (layer4, K = 2 at 40 px)
        if "1x1" in row:
            assert chose == "bmm"
        elif name.startswith("layer4"):
            assert chose == "stacked"
    assert rows["layer1.0.conv1"][-9] == "10x10" and rows["layer4.0.conv2"][-9] == "2x2"
    statics = [float(row[-8]) for row in rows.values()]
    shares = [float(row[-7].rstrip("%")) for row in rows.values()]
    assert sum(shares) == pytest.approx(100, abs=0.1 * len(shares))  # shares of the summed static time
    assert shares.index(max(shares)) == statics.index(max(statics))
    (total,) = [line for line in out.splitlines() if line.startswith("sum over the")]
    assert total.startswith(f"sum over the {len(names)} dynamic convs: static ")
    assert float(total.split("static ")[1].split(" ms")[0]) == pytest.approx(sum(statics), abs=0.01 * len(statics))


def test_bench_mini_measures_112_px_at_batch_8_with_two_repeats():
    args = bench.parse_args(["--mini"])
    assert (args.sizes, args.repeats, args.batch_size, args.archs) == ([112], 2, 8, ["resnet18", "mobilenetv2_100"])
    assert bench.parse_args(["--mini", "--batch-size", "4"]).batch_size == 4
    full = bench.parse_args([])
    assert (full.sizes, full.repeats, full.batch_size, full.scheme, full.keep_freed_memory) == (
        [112, 224], 10, 32, "auto", False)
    assert (full.compile, full.variants, full.passes, full.static_shapes) == (
        None, None, ["train", "infer", "infer1"], False)
    assert bench.parse_args(["--compile"]).compile == "inductor"
    assert bench.parse_args(["--compile", "aot_eager", "--variants", "dyconv", "pad-folded"]).compile == "aot_eager"
    assert bench.parse_args(["--variants", "dyconv", "pad-folded"]).variants == ["dyconv", "pad-folded"]


def test_bench_compiled_times_the_chosen_variants_with_one_graph_per_pass(capsys):
    code, out, _ = run_bench(capsys, "--batch-size", "2", "--sizes", "40", "--archs", "resnet10",
                             "--param-archs", "resnet10", "--variants", "pad-folded", "--compile", "eager")
    assert code == 0
    assert "scheme auto, default allocator, torch.compile backend eager dynamic=True\n" in out
    assert "(not measured when compiled" in out
    timing, compiled = [rows for rows in (table_rows(out, "resnet10")[:2], table_rows(out, "resnet10")[2:4])]
    assert [r[2] for r in timing] == ["static", "pad-folded"]
    for row in timing:  # times measured; memory "-" on CPU when compiled
        assert row[-4:] == ["-"] * 4 and all(float(v) > 0 for v in row[5:9] if v != "-")
    assert "graphs compiled during the timed rounds: 0" in out
    # static: train, infer (eval, no_grad) and batch-1 infer are one graph each; the inference form has no
    # training pass; no graph break
    assert [(r[2], r[-2], r[-1]) for r in compiled] == [("static", "3", "0"), ("pad-folded", "2", "0")]
    assert compiled[1][3] == "-" and all(float(v) > 0 for v in compiled[0][3:6] + compiled[1][4:6])
    assert "graph break x" not in out
    # the scheme table still lists the PAD model's layers (called once uncompiled)
    (summary,) = [line for line in out.splitlines() if line.startswith("resnet10 40 px:")]
    schemes, paths = summary.split(":", 1)[1].split("; pad-unit paths:")
    assert sum(int(part.split()[-1]) for part in schemes.split(",")) == expected_block_conv_count("resnet10")
    assert sum(int(part.split()[-1]) for part in paths.split(",")) == expected_block_conv_count("resnet10")


def test_bench_static_shapes_compiles_with_dynamic_false(capsys, monkeypatch):
    compiled_with = []
    real_compile = torch.compile

    def recording_compile(model, **options):
        compiled_with.append(options)
        return real_compile(model, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    code, out, _ = run_bench(capsys, "--batch-size", "2", "--sizes", "40", "--archs", "resnet10", "--param-archs",
                             "resnet10", "--variants", "pad-folded", "--passes", "infer", "--compile", "eager",
                             "--static-shapes")
    assert code == 0
    assert compiled_with == [{"backend": "eager", "dynamic": False}] * 2  # static and pad-folded
    assert out.splitlines()[0].endswith(", torch.compile backend eager dynamic=False")
    assert "torch.compile(model, backend='eager', dynamic=False)" in out
    assert [r[-2:] for r in table_rows(out, "resnet10")[2:4]] == [["1", "0"], ["1", "0"]]


def test_compiled_warm_up_counts_graphs_and_graph_breaks():
    class Halves(nn.Module):  # a graph break between two linear layers: two graphs per compiled call
        def __init__(self, graph_break):
            super().__init__()
            self.first, self.second, self.graph_break = nn.Linear(4, 4), nn.Linear(4, 2), graph_break

        def forward(self, x):
            y = self.first(x)
            if self.graph_break:
                torch._dynamo.graph_break()
            return self.second(y)

    torch._dynamo.reset()
    x = torch.randn(3, 4)
    models = {name: torch.compile(Halves(name == "broken"), backend="eager")
              for name in ("whole", "broken")}
    stats = bench.compiled_warm_up(bench.pass_runs(models, x, amp=False), torch.device("cpu"))
    assert stats["whole"]["graphs"] == 3 and stats["whole"]["breaks"] == {}
    assert stats["broken"]["graphs"] == 6
    ((reason, count),) = stats["broken"]["breaks"].items()
    assert count == 3 and "graph_break" in reason
    assert all(stats[name][f"{p}_compile_s"] > 0 for name in models for p in bench.PASSES)
    rows = [{"arch": "toy", "size": 4, "model": name, "timed_graphs": 0, **stats[name]} for name in models]
    report = bench.format_compile(rows, "eager")
    assert [line.split()[-2:] for line in report.splitlines()[3:5]] == [["3", "0"], ["6", "3"]]
    assert report.splitlines()[-1] == f"  graph break x3, broken: {reason}"


def test_compiled_warm_up_reports_a_failed_compile_and_goes_on():
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no kernel for this graph")

    torch._dynamo.reset()
    x = torch.randn(3, 4)
    models = {"fails": torch.compile(nn.Linear(4, 2), backend=failing_backend),
              "works": torch.compile(nn.Linear(4, 2), backend="eager")}
    stats = bench.compiled_warm_up(bench.pass_runs(models, x, amp=False), torch.device("cpu"))
    assert [stats["fails"][f"{p}_compile_s"] for p in bench.PASSES] == [None] * 3
    assert set(stats["fails"]["failures"]) == set(bench.PASSES)
    assert set(stats["fails"]["failures"].values()) == {"RuntimeError: no kernel for this graph"}
    assert stats["works"]["failures"] == {} and all(stats["works"][f"{p}_compile_s"] > 0 for p in bench.PASSES)
    rows = [{"arch": "toy", "size": 4, "model": name, "timed_graphs": 0, **stats[name]} for name in models]
    report = bench.format_compile(rows, "custom").splitlines()
    assert report[3].split()[3:6] == ["failed"] * 3
    assert report[-1] == "  compile failed, fails infer1: RuntimeError: no kernel for this graph"


@pytest.mark.parametrize("argv, message", [
    (["--dynamic-ratio", "0"], "dynamic ratio must be in (0, 1], got 0.0"),
    (["--sizes", "16"], "image sizes must be >= 32"),
    (["--param-archs", "vgg"], "invalid choice: 'vgg'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--kernels", "0"], "--kernels must be >= 1"),
    (["--scheme", "fft"], "invalid choice: 'fft'"),
    (["--compile", "tvm"], "invalid choice: 'tvm'"),
    (["--passes", "eval"], "invalid choice: 'eval'"),
    (["--static-shapes"], "--static-shapes needs --compile"),
    (["--variants", "static"], "invalid choice: 'static'"),
    (["--archs", "vgg"], "invalid choice: 'vgg'"),
    (["--layers", "--compile"], "--layers times every scheme"),
    (["--layers", "--scheme", "stacked"], "takes none of --compile, --amp, --variants, --scheme, --passes"),
    (["--layers", "--passes", "train"], "--layers times every scheme"),
])
def test_bench_bad_input_is_one_line(capsys, argv, message):
    assert bench.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert message in err
    assert err.startswith("error: ") and message in err


def test_bench_script_exit_code_and_message():
    result = subprocess.run(["bash", str(REPO / "scripts" / "bench_dyconv.sh"), "--batch-size", "x"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: argument --batch-size: invalid int value: 'x'"]
    assert "Traceback" not in result.stderr


def test_bench_cuda_unavailable(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda but CUDA is not available"


def test_peak_memory_reading_of_nothing_is_taken_again(monkeypatch):
    """A CPU pass always allocates: a profiled peak of 0 bytes (a dropped trace) is measured again, at most
    three times; a real reading is kept at once."""
    from dyconv import bench
    profiled = bench._profiled_peak_bytes
    x = torch.randn(64, 64)
    assert profiled(lambda: (x @ x).relu()) >= 64 * 64 * 4  # the real profiler path
    readings = iter([0, 0, 4096, 8192])
    calls = []
    monkeypatch.setattr(bench, "_profiled_peak_bytes", lambda run: calls.append(run) or next(readings))
    nothing = bench.ModelPass(prepare=lambda: None, body=lambda: None)
    assert bench.peak_bytes(nothing, torch.device("cpu")) == 4096 and len(calls) == 3
    monkeypatch.setattr(bench, "_profiled_peak_bytes", lambda run: calls.append(run) or 0)
    assert bench.peak_bytes(nothing, torch.device("cpu")) == 0 and len(calls) == 6


def test_training_peak_does_not_depend_on_the_pass_before():
    """A PAD model's training-step peak is the same whether an inference pass (which leaves the fold cached,
    freed by train()) or a training pass (whose gradients the next step's zero_grad frees) came before: the
    pass's prepare() runs before the baseline is taken. The peak includes the step's new gradients."""
    from dyconv import bench
    torch.manual_seed(0)
    model = build_model("resnet10", "dyconv", True, num_classes=10, small_input=True, in_channels=1,
                        resnet_width=8)
    set_random_mask(model, 0.3)
    x = torch.randn(4, 1, 16, 16)
    train, infer = bench.training_pass(model, x), bench.forward_pass(model, x)
    cpu = torch.device("cpu")
    infer()
    after_inference = bench.peak_bytes(train, cpu)
    train()
    after_training = bench.peak_bytes(train, cpu)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.grad is not None)
    assert after_inference == after_training
    assert after_training >= gradients
