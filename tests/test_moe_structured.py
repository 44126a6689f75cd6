"""Unit-structured PAD-MoE: the static rows of every expert as one dense matmul per token, only the dynamic
rows through the experts, exactly the element-mask computation with the same mask (float64)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pad
from pad.mixing import weight_banks
from pad.partition import score_positions
from moe.modeling import MoELinear, check_moe_settings

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64")

DYNAMIC_ROWS = [1, 4, 5]


def build(granularity="unit", rows=DYNAMIC_ROWS, bias=True, top_k=2):
    torch.manual_seed(0)
    layer = MoELinear(6, 8, num_experts=4, top_k=top_k, moe="pad", bias=bias)
    with torch.no_grad():
        layer.experts.kernels.normal_()
        layer.experts.static_weight.normal_()
        layer.experts.scale.phi.fill_(0.5)
        for parameter in layer.gate.parameters():
            parameter.normal_()
        if bias:
            layer.bias.normal_()
        layer.experts.mask.zero_()
        layer.experts.mask[list(rows)] = 1
    layer.experts.granularity = granularity
    return layer


def outputs_and_gradients(layer, x, training):
    layer.train(training)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same gate noise in training
    out = layer(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + layer.last_aux_loss
    loss.backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("rows", [DYNAMIC_ROWS, []], ids=["some_dynamic", "none_dynamic"])
@pytest.mark.parametrize("tokens", [(1, 4), (3, 5), (5, 6)], ids=["4", "15", "30"])
def test_unit_path_equals_element_path(training, bias, top_k, rows, tokens):
    """Scale factors on the outputs (4 tokens < in = 6), on the static weight only (15 < E in = 24) or on both
    weights (30 tokens): the element path's outputs and gradients."""
    x = torch.randn(*tokens, 6, generator=torch.Generator().manual_seed(2))
    element = build("element", rows, bias, top_k)
    assert element.unit_split() is None
    expected = outputs_and_gradients(element, x, training)
    layer = build("unit", rows, bias, top_k)
    assert layer.unit_split().dynamic.tolist() == rows
    got = outputs_and_gradients(layer, x, training)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-10)
    assert got[2].keys() == expected[2].keys()
    assert {"experts.kernels", "experts.static_weight", "experts.scale.phi"} <= got[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-9, atol=1e-10, msg=name)


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.weights.append(tuple(args[-1].shape))
        return func(*args, **(kwargs or {}))


def test_static_rows_are_one_matmul_over_all_tokens():
    layer = build().eval()
    x = torch.randn(2, 5, 6)
    with _MatmulShapes() as shapes, torch.no_grad():
        layer(x)
    assert (6, 5) in shapes.weights  # x (10, 6) @ W_s[static].T (6, 5): 5 static rows, every token at once
    assert not any(shape[-1] == 8 and shape[0] == 6 for shape in shapes.weights)  # no expert computes all 8 rows


def test_fully_dynamic_layer_takes_the_element_path():
    assert build(rows=range(8)).unit_split() is None


def test_kernel_granularity_is_refused_for_moe_layers():
    with pytest.raises(ValueError, match=r"unknown partition granularity 'kernel' for MoE layers; expected one of "
                                         r"\('element', 'unit'\) \(a linear layer has no kernel slices\)"):
        check_moe_settings("pad", partition_granularity="kernel")


def test_unit_model_round_trips_through_the_compact_export(tmp_path):
    """Saved compact (one mask bit per row, granularity in the metadata and in config.moe) and reloaded:
    the same logits, computed with the unit path."""
    from moe.modeling import convert_to_moe, load_model, save_compact_model
    from test_moe_modeling import batch, tiny_bert
    model = convert_to_moe(tiny_bert(), "pad", num_experts=3, top_k=2, partition_granularity="unit")
    pad.iterative_mode_partition(model, [], None, 0.5, iterations=1, criterion="random", scope="local",
                                 generator=torch.Generator().manual_seed(0), granularity="unit")
    with torch.no_grad():
        for _, bank in weight_banks(model):
            bank.kernels.normal_()
    model.config.save_pretrained(tmp_path)
    save_compact_model(model, tmp_path)
    counts = pad.parameter_counts(model)
    assert counts["mask_entries"] == sum(b.shape[0] for _, b in weight_banks(model))
    loaded = load_model(tmp_path, model.config).to(torch.float64).eval()
    assert {b.granularity for _, b in weight_banks(loaded)} == {"unit"}
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-10, atol=1e-10)


def test_imp_scores_a_unit_structured_layer_through_its_mask():
    """While IMP scores (the mask requires grad) the layer takes the element path, so dL/dM exists; the same
    scores as the element-granularity layer with the same mask."""
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(2))
    scores = {}
    for granularity in ("unit", "element"):
        layer = build(granularity).eval()
        scores[granularity] = score_positions(layer, [x], lambda m, b: m(b).square().sum(), "taylor")["experts"]
        assert not layer.experts.mask.requires_grad
    torch.testing.assert_close(scores["unit"], scores["element"], rtol=1e-10, atol=1e-12)
    assert (scores["unit"][DYNAMIC_ROWS] > 0).all()
    assert build("unit").unit_split() is not None
