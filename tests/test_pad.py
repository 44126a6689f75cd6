"""The shared PAD utility on a tiny routed linear layer (no convolutions, no BERT)."""
import math

import pytest
import torch
from torch import nn

import pad
from pad.mixing import ScaleFactors, UnrecordedGranularity, weight_banks
from pad.partition import CRITERIA, SCHEDULES, SCOPES, ratio_schedule, score_positions, select_dynamic
from pad.runtime import keep_freed_memory



pytestmark = pytest.mark.usefixtures("float64")


class RoutedLinear(nn.Module):
    """y_b = W(x_b) x_b with W(x) = sum_k pi_k(x) W_k (+ static part): the smallest dynamic layer."""

    def __init__(self, features=5, kernels=3, partial=True, scale_factors="both"):
        super().__init__()
        shape = (features, features)
        self.bank = (pad.PartiallyDynamicWeights(kernels, shape, scale_factors) if partial
                     else pad.DynamicWeights(kernels, shape))
        nn.init.normal_(self.bank.kernels)
        if partial:
            nn.init.normal_(self.bank.static_weight)
        self.router = nn.Linear(features, kernels)

    def weights(self, x):
        """Per-sample weights (B, out, in)."""
        dynamic, static = self.bank()
        w = self.router(x).softmax(-1) @ dynamic.flatten(1)
        if static is not None:
            w = w + static.flatten()
        return w.view(x.shape[0], *self.bank.shape)

    def forward(self, x):
        return torch.einsum("boi,bi->bo", self.weights(x), x)


def tiny_model(**kw):
    torch.manual_seed(0)
    return nn.Sequential(RoutedLinear(**kw), nn.Tanh(), RoutedLinear(features=5, kernels=3, **kw))


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def batches(n=3, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 5, generator=g), torch.randn(size, 5, generator=g)) for _ in range(n)]


# ---------------------------------------------------------------- mixing

@pytest.mark.parametrize("variant,expected", [("both", (2 / (1 + math.exp(-0.7)), 2 - 2 / (1 + math.exp(-0.7)))),
                                              ("s", (1.0, 2 / (1 + math.exp(-0.7)))),
                                              ("d", (2 / (1 + math.exp(-0.7)), 1.0)),
                                              ("none", (1.0, 1.0))])
def test_scale_factor_variants(variant, expected):
    scale = ScaleFactors(variant)
    if variant != "none":
        with torch.no_grad():
            scale.phi.fill_(0.7)
    else:
        assert list(scale.parameters()) == []
    with torch.no_grad():
        lambda_d, lambda_s = scale()
    assert float(lambda_d) == pytest.approx(expected[0])
    assert float(lambda_s) == pytest.approx(expected[1])


def test_scale_factors_start_at_one():
    with torch.no_grad():
        lambda_d, lambda_s = ScaleFactors("both")()
    assert float(lambda_d) == 1.0 and float(lambda_s) == 1.0


def test_unknown_scale_factor_variant():
    with pytest.raises(ValueError, match="unknown scale-factor variant 'x'"):
        ScaleFactors("x")


@pytest.mark.parametrize("partial", [False, True])
def test_banks_initialise_their_weights_like_convs(partial):
    """Kernel by kernel, then W_s: Kaiming normal, fan out; reset_parameters draws the same way and keeps the mask."""
    shape = (8, 4, 3, 3)
    torch.manual_seed(0)
    bank = pad.PartiallyDynamicWeights(3, shape) if partial else pad.DynamicWeights(3, shape)
    torch.manual_seed(0)
    expected = torch.empty(4 if partial else 3, *shape)
    for weight in expected:
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
    assert torch.equal(bank.kernels, expected[:3])
    if partial:
        assert torch.equal(bank.static_weight, expected[3])
        with torch.no_grad():
            bank.mask[0] = 0
    mask = bank.mask.clone() if partial else None
    bank.reset_parameters()
    assert not torch.equal(bank.kernels, expected[:3])
    torch.manual_seed(0)
    bank.reset_parameters()
    assert torch.equal(bank.kernels, expected[:3])
    if partial:
        assert torch.equal(bank.static_weight, expected[3]) and torch.equal(bank.mask, mask)


def test_bank_needs_a_static_shape_of_two_dimensions():
    with pytest.raises(ValueError, match=r"at least two dimensions \(out, in, ...\), got \(5,\)"):
        pad.DynamicWeights(2, (5,))


def test_bank_returns_masked_scaled_parts():
    bank = pad.PartiallyDynamicWeights(4, (3, 2))
    nn.init.normal_(bank.kernels), nn.init.normal_(bank.static_weight)
    with torch.no_grad():
        bank.mask.copy_((torch.rand(3, 2) > 0.5).double())
        bank.scale.phi.fill_(-0.3)
    lambda_d = 2 * torch.sigmoid(torch.tensor(-0.3))
    dynamic, static = bank()
    torch.testing.assert_close(dynamic, lambda_d * bank.mask * bank.kernels)
    torch.testing.assert_close(static, (2 - lambda_d) * (1 - bank.mask) * bank.static_weight)


def test_mixed_weight_is_pad_formula():
    """sum_k pi_k (lambda_d M W_k) + lambda_s (1-M) W_s == lambda_d M W~(x) + lambda_s (1-M) W_s."""
    layer = RoutedLinear()
    with torch.no_grad():
        layer.bank.mask.copy_((torch.rand(5, 5) > 0.4).double())
        layer.bank.scale.phi.fill_(0.4)
    x = torch.randn(6, 5)
    pi = layer.router(x).softmax(-1)
    full_dynamic = torch.einsum("bk,koi->boi", pi, layer.bank.kernels)
    lambda_d, lambda_s = layer.bank.scale()
    m = layer.bank.mask
    expected = lambda_d * m * full_dynamic + lambda_s * (1 - m) * layer.bank.static_weight
    torch.testing.assert_close(layer.weights(x), expected)


def test_all_dynamic_none_equals_fully_dynamic_and_all_static_equals_static():
    partial = RoutedLinear(scale_factors="none")
    full = RoutedLinear(partial=False)
    full.load_state_dict({k: v for k, v in partial.state_dict().items()
                          if not k.startswith("bank.static") and k not in ("bank.mask", "bank.granularity_code")})
    x = torch.randn(4, 5)
    torch.testing.assert_close(partial(x), full(x))
    with torch.no_grad():
        partial.bank.mask.zero_()
    torch.testing.assert_close(partial(x), x @ partial.bank.static_weight.T)


def test_the_state_dict_holds_the_granularity(tmp_path):
    """Loading a bank's state restores its granularity (a safetensors file too); a state without it is refused,
    strict or not, and the refusal leaves the bank as it was."""
    from safetensors.torch import load_file, save_file
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.4, iterations=2, granularity="unit")
    assert [b.granularity for _, b in weight_banks(model)] == ["unit", "unit"]
    assert model.state_dict()["0.bank.granularity_code"].dtype == torch.int64
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    for state in (model.state_dict(), load_file(tmp_path / "model.safetensors")):
        fresh = tiny_model()
        fresh.load_state_dict(state)
        assert [b.granularity for _, b in weight_banks(fresh)] == ["unit", "unit"]
        assert torch.equal(fresh[0].bank.mask, model[0].bank.mask)
        x = torch.randn(4, 5)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    older = {k: v for k, v in model.state_dict().items() if not k.endswith("granularity_code")}
    for strict in (True, False):
        fresh = tiny_model()
        with pytest.raises(UnrecordedGranularity, match="the state of PAD bank '0.bank' holds no granularity_code"):
            fresh.load_state_dict(older, strict=strict)
        assert [b.granularity for _, b in weight_banks(fresh)] == ["element", "element"]
    with pytest.raises(ValueError, match="holds granularity_code 7"):
        tiny_model().load_state_dict({**model.state_dict(), "2.bank.granularity_code": torch.tensor(7)})


def test_gradients_reach_only_used_positions():
    layer = RoutedLinear()
    with torch.no_grad():
        layer.bank.mask.copy_((torch.rand(5, 5) > 0.5).double())
    layer(torch.randn(7, 5)).pow(2).sum().backward()
    m = layer.bank.mask.bool()
    assert layer.bank.scale.phi.grad is not None and layer.bank.scale.phi.grad != 0
    assert torch.all(layer.bank.static_weight.grad[m] == 0) and torch.all(layer.bank.static_weight.grad[~m] != 0)
    assert torch.all(layer.bank.kernels.grad[:, ~m] == 0) and torch.all(layer.bank.kernels.grad[:, m] != 0)
    assert layer.bank.mask.grad is None


# ---------------------------------------------------------------- IMP

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ratio_schedule(schedule):
    ratios = ratio_schedule(0.3, 4, schedule)
    assert ratios[-1] == pytest.approx(0.3)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    if schedule == "exponential":
        assert ratios[0] == pytest.approx(0.3 ** 0.25)
    else:
        assert ratios[0] == pytest.approx(1 - 0.7 / 4)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_imp_hits_target_ratio(criterion, scope, schedule):
    model = tiny_model()
    report = pad.iterative_mode_partition(
        model, batches(), loss_fn, 0.3, iterations=3, criterion=criterion, schedule=schedule, scope=scope,
        synflow_fn=lambda m, b: m(torch.ones_like(b[0])).sum(), generator=torch.Generator().manual_seed(0))
    banks = dict(weight_banks(model))
    total = sum(b.mask.numel() for b in banks.values())
    dynamic = sum(b.mask.sum().item() for b in banks.values())
    assert abs(dynamic - 0.3 * total) <= len(banks)
    if scope == "local":
        for b in banks.values():
            assert abs(b.mask.sum().item() - 0.3 * b.mask.numel()) <= 1
    assert report.achieved == pytest.approx(pad.dynamic_ratio(model))
    assert all(a >= b for a, b in zip(report.ratio_per_iteration, report.ratio_per_iteration[1:]))
    assert set(torch.cat([b.mask.flatten() for b in banks.values()]).tolist()) <= {0.0, 1.0}


def test_dynamic_set_only_shrinks():
    model = tiny_model()
    banks = dict(weight_banks(model))
    data = batches()
    previous = {n: b.mask.clone() for n, b in banks.items()}
    for ratio in ratio_schedule(0.2, 4):
        scores = score_positions(model, data, loss_fn, "taylor")
        # make the static positions the most attractive, to prove they can't come back
        scores = {n: torch.where(banks[n].mask > 0, s, s.max() + 1) for n, s in scores.items()}
        with torch.no_grad():
            select_dynamic(banks, scores, ratio, "global")
        for n, b in banks.items():
            assert torch.all(b.mask <= previous[n])
            previous[n] = b.mask.clone()


def test_taylor_scores_equal_independent_autograd():
    """|sum_batches dL/dM| == |sum_batches sum_samples g . (lambda_d W~(x) - lambda_s W_s)|, g = dL/dOmega(x)."""
    torch.manual_seed(3)
    layer = RoutedLinear()
    with torch.no_grad():
        layer.bank.mask.copy_((torch.rand(5, 5) > 0.3).double())
        layer.bank.scale.phi.fill_(0.25)
    data = batches()
    scores = score_positions(layer, data, loss_fn, "taylor")["bank"]

    with torch.no_grad():
        lambda_d, lambda_s = (float(t) for t in layer.bank.scale())
    expected = torch.zeros(5, 5)
    for x, y in data:
        with torch.no_grad():
            pi = layer.router(x).softmax(-1)
            w_tilde = torch.einsum("bk,koi->boi", pi, layer.bank.kernels)
            m = layer.bank.mask
            omega = (lambda_d * m * w_tilde + lambda_s * (1 - m) * layer.bank.static_weight).requires_grad_(True)
        loss = nn.functional.mse_loss(torch.einsum("boi,bi->bo", omega, x), y)
        (g,) = torch.autograd.grad(loss, omega)
        expected += (g * (lambda_d * w_tilde - lambda_s * layer.bank.static_weight)).sum(0)
    torch.testing.assert_close(scores, expected.abs(), rtol=1e-10, atol=1e-12)


def test_magnitude_scores_are_mean_absolute_kernel():
    layer = RoutedLinear()
    scores = score_positions(layer, [], None, "magnitude")["bank"]
    torch.testing.assert_close(scores, layer.bank.kernels.abs().mean(0))


def test_grasp_scores_are_hessian_gradient_product():
    torch.manual_seed(4)
    layer = RoutedLinear()
    data = batches(2)
    scores = score_positions(layer, data, loss_fn, "grasp")["bank"]
    mask = layer.bank.mask

    def total_loss(m):
        saved = layer.bank.mask
        layer.bank.mask = m
        try:
            return sum(loss_fn(layer, b) for b in data)
        finally:
            layer.bank.mask = saved

    g = torch.func.grad(total_loss)(mask.clone())
    hessian = torch.autograd.functional.hessian(total_loss, mask.clone())
    expected = mask * (hessian.reshape(25, 25) @ g.flatten()).view(5, 5)
    torch.testing.assert_close(scores, expected)


def test_synflow_restores_parameters_and_is_positive():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_positions(model, batches(1), None, "synflow",
                                 synflow_fn=lambda m, b: m(torch.ones_like(b[0])).sum())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(torch.all(s >= 0) and s.sum() > 0 for s in scores.values())


def test_imp_keeps_model_mode_and_leaves_no_grads():
    model = tiny_model()
    model.train()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.5, iterations=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not b.mask.requires_grad for _, b in weight_banks(model))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dynamic_ratio=0.0), r"dynamic ratio must be in \(0, 1\], got 0.0"),
    (dict(dynamic_ratio=1.5), r"dynamic ratio must be in \(0, 1\], got 1.5"),
    (dict(iterations=0), "partition iterations must be >= 1"),
    (dict(criterion="snip"), "unknown partition criterion 'snip'"),
    (dict(schedule="cubic"), "unknown partition schedule 'cubic'"),
    (dict(scope="layer"), "unknown partition scope 'layer'"),
    (dict(criterion="synflow"), "synflow criterion needs synflow_fn"),
])
def test_imp_bad_arguments(kwargs, message):
    args = dict(dynamic_ratio=0.3, iterations=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pad.iterative_mode_partition(tiny_model(), batches(), loss_fn, **args)


def test_imp_needs_pad_layers():
    with pytest.raises(ValueError, match="no partially dynamic layers"):
        pad.iterative_mode_partition(nn.Linear(2, 2), [], loss_fn, 0.5)


def test_ratio_one_keeps_everything_dynamic():
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 1.0, iterations=2)
    assert pad.dynamic_ratio(model) == 1.0


# ---------------------------------------------------------------- statistics and compact export

def test_parameter_counts_exact():
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.4, iterations=2, scope="local")
    counts = pad.parameter_counts(model)
    w, k = 25, 3
    router = 5 * 3 + 3
    assert counts["dense"] == 2 * ((k + 1) * w + router + 1)
    kappa_n = [int(b.mask.sum()) for _, b in weight_banks(model)]
    assert counts["compact"] == sum((w - n) + n * k + router + 1 for n in kappa_n)
    assert counts["mask_entries"] == 2 * w
    assert pad.parameter_counts(nn.Linear(3, 2)) == {"dense": 8, "compact": 8, "mask_entries": 0}
    assert pad.dynamic_ratio(nn.Linear(3, 2)) is None


def test_compact_round_trip(tmp_path):
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.3, iterations=2)
    with torch.no_grad():
        for _, b in weight_banks(model):
            b.scale.phi.fill_(0.3)
    state = pad.export_compact(model)
    n_dynamic = int(model[0].bank.mask.sum())
    assert state["0.bank.kernels"].shape == (3, n_dynamic)
    assert state["0.bank.static_weight"].shape == (25 - n_dynamic,)
    assert state["0.bank.mask"].dtype == torch.uint8 and state["0.bank.mask"].numel() == math.ceil(25 / 8)
    stored = sum(v.numel() for k, v in state.items() if not k.endswith("mask"))
    assert stored == pad.parameter_counts(model)["compact"]

    path = tmp_path / "compact.safetensors"
    pad.save_compact(model, path)
    fresh = nn.Sequential(RoutedLinear(), nn.Tanh(), RoutedLinear())
    pad.load_compact_file(fresh, path)
    x = torch.randn(4, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh[2].bank.mask, model[2].bank.mask)


def test_load_compact_rejects_other_architecture():
    state = pad.export_compact(tiny_model())
    with pytest.raises(ValueError, match="does not match"):
        pad.load_compact(nn.Sequential(RoutedLinear(features=5, kernels=2), nn.Tanh(), RoutedLinear()), state)
    del state["2.bank.mask"]
    with pytest.raises(ValueError, match="lacks '2.bank.mask'"):
        pad.load_compact(tiny_model(), state)


def test_load_compact_needs_the_granularity_it_was_exported_at():
    """A unit-granularity export holds one mask bit per output unit: loaded at that granularity it reproduces the
    model; read as per-position bits it is refused by name, not mistaken for a shape mismatch."""
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.4, iterations=2, granularity="unit")
    state = pad.export_compact(model)
    fresh = tiny_model()
    pad.load_compact(fresh, state, granularity="unit")
    x = torch.randn(4, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="compact mask of '0.bank' holds 1 bytes, element granularity needs 4 "
                                         r"\(25 units\): was it exported at another granularity\?"):
        pad.load_compact(tiny_model(), state)


def test_ties_are_broken_at_random_not_by_position():
    """All-equal scores (e.g. taylor on upcycled experts) must not keep the first layer dynamic."""
    model = tiny_model()
    banks = dict(weight_banks(model))
    zeros = {n: torch.zeros_like(b.mask) for n, b in banks.items()}

    def partition(seed):
        for b in banks.values():
            b.mask.fill_(1)
        select_dynamic(banks, zeros, 0.5, "global", torch.Generator().manual_seed(seed))
        return [b.mask.clone() for b in banks.values()]

    first, again, other = partition(0), partition(0), partition(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    assert sum(int(m.sum()) for m in first) == 25
    assert all(0 < int(m.sum()) < 25 for m in first)


def test_keep_freed_memory_on_glibc():
    import platform
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_public_names_resolve_and_the_torch_free_modules_do_not_import_torch():
    """Every name of ``pad.__all__`` is documented in the package docstring and resolves to its submodule's
    object; ``pad.runtime`` and ``pad.records`` (what the table and figure scripts import) load without torch."""
    import subprocess
    import sys
    for name in pad.__all__:
        assert f"{name}`" in pad.__doc__, name
        module = __import__(f"pad.{pad._EXPORTS[name]}", fromlist=[name])
        assert getattr(pad, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="module 'pad' has no attribute 'nothing'"):
        pad.nothing
    probe = "import sys, pad.runtime, pad.records; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
