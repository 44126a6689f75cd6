"""The PAD fold ``W'_k = lambda_d M W_k + lambda_s (1 - M) W_s`` as one autograd Function (:func:`pad.pad_kernels`):
same outputs and gradients as the formula in library ops, for every scale-factor variant, mask granularity,
dtype and mode; nothing of size ``K |W|`` saved for backward; traceable by torch.compile."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pad
from pad.mixing import GRANULARITIES, SCALE_FACTOR_VARIANTS, unit_grid
from dyconv.layers import CondConv2d, DynamicConv2d, ODConv2d
from pad.mixing import _PadKernels

torch.set_num_threads(1)

KERNELS, SHAPE = 3, (4, 3, 2, 2)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def structured_mask(granularity, shape=SHAPE, seed=0, dtype=None):
    """A random 0/1 mask of ``shape``, whole units of ``granularity`` at a time (full shape, as banks hold it)."""
    grid = unit_grid(shape, granularity)
    units = (torch.rand(grid, generator=torch.Generator().manual_seed(seed)) < 0.5).to(dtype or torch.float64)
    units.view(-1)[:2] = torch.tensor([0.0, 1.0])  # both modes present
    return units.reshape(*grid, *[1] * (len(shape) - len(grid))).expand(shape).contiguous()


def reference_lambdas(variant, phi):
    """``(lambda_d, lambda_s)`` of DESIGN.md's variants, from ``phi`` (a tensor or ``None``)."""
    learned = None if phi is None else 2 * torch.sigmoid(phi)
    return {"both": (learned, 2 - learned if learned is not None else None), "s": (1.0, learned),
            "d": (learned, 1.0), "none": (1.0, 1.0)}[variant]


def reference_fold(kernels, mask, lambda_d, static_weight, lambda_s):
    """The formula in library ops (what the bank computed before the Function)."""
    out = (lambda_d * mask) * kernels
    return out if static_weight is None else out + (lambda_s * (1 - mask)) * static_weight


def random_bank(variant, granularity, dtype=torch.float64):
    torch.manual_seed(0)
    bank = pad.PartiallyDynamicWeights(KERNELS, SHAPE, variant, dtype=dtype, granularity=granularity)
    with torch.no_grad():
        bank.kernels.normal_()
        bank.static_weight.normal_()
        bank.mask.copy_(structured_mask(granularity))
        if variant != "none":
            bank.scale.phi.fill_(0.4)
    return bank


# ---------------------------------------------------------------- the Function


@pytest.mark.parametrize("with_static", [True, False], ids=["fold", "masked"])
@pytest.mark.parametrize("mask_shape", ["element", "kernel", "unit", "unit_broadcast"])
@pytest.mark.parametrize("learned", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both_learned", "lambda_d_learned", "lambda_s_learned", "fixed"])
def test_gradcheck_and_gradgradcheck(learned, mask_shape, with_static):
    generator = torch.Generator().manual_seed(1)
    kernels = torch.randn(KERNELS, *SHAPE, dtype=torch.float64, generator=generator, requires_grad=True)
    static = torch.randn(SHAPE, dtype=torch.float64, generator=generator, requires_grad=True) if with_static else None
    if mask_shape == "unit_broadcast":  # one entry per output unit, broadcast over the rest
        mask = structured_mask("unit")[:, :1, :1, :1].contiguous()
    else:
        mask = structured_mask(mask_shape)
    lambda_d = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if learned[0] else 1.0
    lambda_s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True) if learned[1] else 1.0
    inputs = (kernels, mask, lambda_d, static, lambda_s)
    assert torch.autograd.gradcheck(_PadKernels.apply, inputs)
    assert torch.autograd.gradgradcheck(_PadKernels.apply, inputs)
    torch.testing.assert_close(pad.pad_kernels(kernels, mask, lambda_d, static, lambda_s),
                               reference_fold(kernels, mask, lambda_d, static, lambda_s), rtol=0, atol=0)


def test_each_gradient_only_when_needed_and_the_mask_never():
    kernels = torch.randn(KERNELS, *SHAPE, requires_grad=True)
    static = torch.randn(SHAPE)  # no gradient wanted
    lambda_d, lambda_s = torch.tensor(0.8, requires_grad=True), torch.tensor(1.2)
    out = pad.pad_kernels(kernels, structured_mask("element", dtype=torch.float32), lambda_d, static, lambda_s)
    grads = torch.autograd.grad(out.sum(), (kernels, lambda_d))
    assert grads[0].shape == kernels.shape and grads[1].shape == ()
    assert static.grad is None and lambda_s.grad is None


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("variant", SCALE_FACTOR_VARIANTS)
def test_bank_fold_and_parts_equal_the_formula_with_gradients(variant, granularity):
    """bank(fold=True) == lambda_d M W_k + lambda_s (1 - M) W_s and bank() == its two parts, with the
    gradients of W_k, W_s and phi of library-op autograd (lambda_d, lambda_s per DESIGN.md's variants)."""
    bank = random_bank(variant, granularity)
    upstream = torch.randn(KERNELS, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = [p for p in (bank.kernels, bank.static_weight, getattr(bank.scale, "phi", None)) if p is not None]

    def expected(fold):
        lambda_d, lambda_s = reference_lambdas(variant, getattr(bank.scale, "phi", None))
        if fold:
            return (reference_fold(bank.kernels, bank.mask, lambda_d, bank.static_weight, lambda_s),)
        return (reference_fold(bank.kernels, bank.mask, lambda_d, None, None),
                (lambda_s * (1 - bank.mask)) * bank.static_weight)

    for got, expected in (((bank(fold=True)[0],), expected(True)), (bank(), expected(False))):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        weights = (upstream, upstream[0])
        got_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), params, allow_unused=True)
        expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), params,
                                             allow_unused=True)
        for name, g, e in zip(("kernels", "static_weight", "phi"), got_grads, expected_grads):
            if e is None:  # W_s does not enter bank()'s dynamic part alone
                assert g is None or torch.equal(g, torch.zeros_like(g)), name
            else:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)
    assert bank(fold=True)[1] is None


def test_saves_only_its_inputs():
    """Nothing of size K |W| is kept for backward except the kernels parameter itself."""
    bank = random_bank("both", "element", dtype=torch.float32)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        folded, _ = bank(fold=True)
        masked, _ = bank()
    assert folded.requires_grad and masked.requires_grad
    big = [t for t in saved if t.numel() >= bank.kernels.numel()]
    assert big and all(t.data_ptr() == bank.kernels.data_ptr() for t in big)
    assert all(t.numel() <= math.prod(SHAPE) for t in saved if t.data_ptr() != bank.kernels.data_ptr())


def test_imp_scores_the_mask_through_the_formula():
    """A mask that requires a gradient (IMP) gets dL/dM = sum_k G_k (lambda_d W_k - lambda_s W_s)."""
    bank = random_bank("both", "element")
    bank.mask.requires_grad_(True)
    upstream = torch.randn(KERNELS, *SHAPE, dtype=torch.float64)
    (grad,) = torch.autograd.grad((bank(fold=True)[0] * upstream).sum(), bank.mask)
    with torch.no_grad():
        lambda_d, lambda_s = bank.scale()
        expected = (upstream * (lambda_d * bank.kernels - lambda_s * bank.static_weight)).sum(0)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_dtypes_and_autocast(device):
    """Low-precision banks fold in their own dtype (bfloat16 on CPU, also float16 on CUDA) exactly as the
    formula does; under autocast the fold stays in the parameters' float32; gradients keep their inputs' dtypes."""
    dtypes = [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for dtype in dtypes:
        bank = random_bank("both", "element", dtype=torch.float32).to(device=device, dtype=dtype)
        lambda_d, lambda_s = bank.scale()
        folded, _ = bank(fold=True)
        assert folded.dtype == dtype
        torch.testing.assert_close(folded, reference_fold(bank.kernels, bank.mask, lambda_d, bank.static_weight,
                                                          lambda_s), rtol=0, atol=0)
        folded.float().square().sum().backward()
        assert all(p.grad.dtype == dtype for p in bank.parameters())
    bank = random_bank("d", "kernel", dtype=torch.float32).to(device)
    autocast_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=autocast_dtype):
        folded, _ = bank(fold=True)
        weight = torch.ones(2, KERNELS, device=device) @ folded.flatten(1)  # an autocast op downstream
    assert folded.dtype == torch.float32 and weight.dtype == autocast_dtype
    lambda_d, lambda_s = bank.scale()
    torch.testing.assert_close(folded, reference_fold(bank.kernels, bank.mask, lambda_d, bank.static_weight,
                                                      lambda_s), rtol=0, atol=0)
    weight.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in bank.parameters())


# ---------------------------------------------------------------- layers

LAYERS = {"condconv": CondConv2d, "dyconv": DynamicConv2d, "odconv": ODConv2d}


def build_layer(kind, variant, granularity, seed=0):
    torch.manual_seed(seed)
    extra = {} if kind == "condconv" else {"temperature": 2.0}
    layer = LAYERS[kind](4, 6, 3, 1, 1, 1, False, kernels=KERNELS, pad=True, scale_factors=variant, **extra)
    with torch.no_grad():
        for module in layer.attention.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_()
        layer.bank.mask.copy_(structured_mask(granularity, tuple(layer.bank.shape)))
        if variant != "none":
            layer.bank.scale.phi.fill_(-0.5)
    # element path with this mask (the unit path has its own tests in test_dyconv_structured.py)
    layer.bank.granularity = "element" if granularity == "unit" else granularity
    return layer


def per_sample_reference(layer, x, variant):
    """A loop of F.conv2d per sample over Omega_b = lambda_d M W~_b + lambda_s (1 - M) W_s, every attention of the
    layer applied to W~_b explicitly (ODConv: channel, filter, spatial), the lambdas from DESIGN.md's variants."""
    attention = layer.attention(x)
    bank = layer.bank
    lambda_d, lambda_s = reference_lambdas(variant, getattr(bank.scale, "phi", None))
    outputs = []
    for b in range(x.shape[0]):
        routing = attention.kernel[b] if isinstance(layer, ODConv2d) else attention[b]
        weight = sum(r * kernel for r, kernel in zip(routing, bank.kernels))
        if isinstance(layer, ODConv2d):
            weight = weight * attention.channel[b].view(1, -1, 1, 1) * attention.filter[b].view(-1, 1, 1, 1)
            weight = weight * attention.spatial[b].view(1, 1, 3, 3)
        weight = lambda_d * bank.mask * weight + lambda_s * (1 - bank.mask) * bank.static_weight
        outputs.append(F.conv2d(x[b:b + 1], weight, None, 1, 1))
    return torch.cat(outputs)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("variant", SCALE_FACTOR_VARIANTS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_equals_per_sample_reference(kind, variant, granularity, training):
    """Outputs and the gradients of the input, W_k, W_s, phi and every attention parameter."""
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for forward in (lambda layer, inputs: layer(inputs),
                    lambda layer, inputs: per_sample_reference(layer, inputs, variant)):
        layer = build_layer(kind, variant, granularity).train(training)
        inputs = x.clone().requires_grad_(True)
        out = forward(layer, inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
        results.append((out.detach(), inputs.grad, grads))
    (out, x_grad, grads), (expected_out, expected_x_grad, expected_grads) = results
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_grad, expected_x_grad, rtol=1e-10, atol=1e-10)
    assert grads.keys() == expected_grads.keys()
    assert {"bank.kernels", "bank.static_weight"} <= grads.keys()
    assert any(name.startswith("attention.") for name in grads)
    assert ("bank.scale.phi" in grads) == (variant != "none")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_inference_bank_folds_a_static_part_it_holds():
    from dyconv.inference import InferenceWeights
    kernels, static = torch.randn(KERNELS, *SHAPE), torch.randn(SHAPE)
    bank = InferenceWeights(kernels, static).eval()
    assert torch.equal(bank()[0], kernels) and torch.equal(bank()[1], static)
    folded, none = bank(fold=True)
    assert none is None and torch.equal(folded, kernels + static)


@pytest.mark.parametrize("variant", SCALE_FACTOR_VARIANTS)
def test_compile_traces_the_fold_forward_and_backward(variant):
    """aot_eager traces the Function's backward too: one graph for three batch sizes, no graph break, the
    eager gradients."""
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    layer = DynamicConv2d(4, 6, 3, padding=1, kernels=KERNELS, pad=True, scale_factors=variant).train()
    with torch.no_grad():
        layer.bank.mask.copy_(structured_mask("element", tuple(layer.bank.shape), dtype=torch.float32))
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(batch))
        for model in (compiled, eager):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
        for (name, parameter), expected in zip(layer.named_parameters(), eager.parameters()):
            torch.testing.assert_close(parameter.grad, expected.grad, msg=name)
    assert counts["stats"]["unique_graphs"] == 1
    assert not counts["graph_break"]
