"""IMP beyond the basics: devices, finite and tied scores, BatchNorm statistics, SynFlow in float64,
partition granularity.  Tiny linear models; banks of a 4-d static shape stand in for convs."""
import logging
import math

import pytest
import torch
from torch import nn

import pad
from pad.mixing import GRANULARITIES, set_granularity, unit_grid, unit_view, weight_banks
from pad.partition import (CRITERIA, SCHEDULES, SCOPES, Selection, check_dynamic_ratio, score_positions, select_dynamic,
                           smallest_dynamic_ratio)

pytestmark = pytest.mark.usefixtures("float64")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Routed(nn.Module):
    """y_b = W(x_b) flat(x_b), W(x) = sum_k pi_k(x) W_k + static part; the bank's static shape is
    ``shape`` (``(out, *rest)``), applied as a linear map of ``prod(rest)`` inputs to ``out`` outputs."""

    def __init__(self, shape=(5, 5), kernels=3, scale_factors="both"):
        super().__init__()
        self.bank = pad.PartiallyDynamicWeights(kernels, shape, scale_factors)
        nn.init.normal_(self.bank.kernels)
        nn.init.normal_(self.bank.static_weight)
        self.inputs = math.prod(shape[1:])
        self.router = nn.Linear(self.inputs, kernels)

    def forward(self, x):
        dynamic, static = self.bank()
        w = (self.router(x).softmax(-1) @ dynamic.flatten(1) + static.flatten()).view(x.shape[0], -1, self.inputs)
        return torch.einsum("boi,bi->bo", w, x)


def conv_shaped_model():
    """Two banks of conv shapes (4, 3, 2, 2) (48 positions, units of 12) and (6, 1, 2, 2)
    (24 positions, units of 4): different unit sizes across layers."""
    torch.manual_seed(0)
    return nn.Sequential(Routed((4, 3, 2, 2)), nn.Tanh(), Routed((6, 1, 2, 2)))


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(Routed(), nn.Tanh(), Routed())


def batches(inputs, outputs, n=2, size=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, inputs, generator=g), torch.randn(size, outputs, generator=g)) for _ in range(n)]


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def synflow(model, batch):
    return model(torch.ones_like(batch[0])).sum()


def unit_size(bank, granularity):
    return bank.mask.numel() // math.prod(unit_grid(bank.shape, granularity))


def masks(model):
    return [b.mask.clone() for _, b in weight_banks(model)]


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_imp_never_relies_on_the_default_device(criterion, granularity):
    """With the default device set to 'meta', any tensor IMP created without an explicit device
    would be a meta tensor and the CPU selection would fail or differ (the CUDA bug: CPU randperm
    indexed by CUDA sort indices).  IMP must give the same partition as with the usual default."""
    def run(default_device):
        model, data, generator = conv_shaped_model(), batches(12, 6), torch.Generator().manual_seed(0)
        with torch.device(default_device):
            pad.iterative_mode_partition(model, data, mse, 0.3, iterations=2, criterion=criterion,
                                         synflow_fn=synflow, granularity=granularity, generator=generator)
        return masks(model)

    expected, got = run("cpu"), run("meta")
    assert all(g.device.type == "cpu" and torch.equal(g, e) for g, e in zip(got, expected))


@cuda
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scope", SCOPES)
def test_imp_on_cuda(criterion, granularity, scope):
    data = batches(12, 6)
    cpu = conv_shaped_model()
    report = pad.iterative_mode_partition(cpu, data, mse, 0.3, iterations=2, criterion=criterion, scope=scope,
                                          synflow_fn=synflow, granularity=granularity,
                                          generator=torch.Generator().manual_seed(0))
    gpu = conv_shaped_model().cuda()
    gpu_data = [(x.cuda(), y.cuda()) for x, y in data]
    scores = score_positions(gpu, gpu_data, mse, criterion, synflow, torch.Generator().manual_seed(0))
    assert all(s.device.type == "cuda" for s in scores.values())
    gpu_report = pad.iterative_mode_partition(gpu, gpu_data, mse, 0.3, iterations=2, criterion=criterion,
                                              scope=scope, synflow_fn=synflow, granularity=granularity,
                                              generator=torch.Generator().manual_seed(0))
    assert all(m.device.type == "cuda" for m in masks(gpu))
    assert gpu_report.achieved == pytest.approx(report.achieved)
    if criterion == "random":  # scores and tie-breaks drawn from the same CPU generator: the same partition
        assert all(torch.equal(g.cpu(), c) for g, c in zip(masks(gpu), masks(cpu)))


@cuda
def test_cuda_scoring_restores_batchnorm_and_synflow_dtypes():
    model = nn.Sequential(Routed((4, 3)), nn.BatchNorm1d(4), nn.ReLU(), Routed((2, 4))).cuda().float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(8, 3, device="cuda", dtype=torch.float32),
             torch.randn(8, 2, device="cuda", dtype=torch.float32))]
    score_positions(model, data, mse, "taylor")
    score_positions(model, data, None, "synflow", synflow)
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and v.device.type == "cuda" and torch.equal(v, before[k])


# ---------------------------------------------------------------- finite and tied scores

def test_non_finite_scores_are_an_error():
    model = linear_model()
    with pytest.raises(ValueError, match=r"^IMP round 1: the taylor scores are not finite at 50 of 50 still-dynamic "
                                         r"positions \(first in '0.bank'\); the partition would be arbitrary$"):
        pad.iterative_mode_partition(model, batches(5, 5), lambda m, b: mse(m, b) * float("nan"), 0.3)


def test_non_finite_scores_at_static_positions_do_not_matter():
    model = linear_model()
    banks = dict(weight_banks(model))
    with torch.no_grad():
        banks["0.bank"].mask[0].zero_()
    scores = {n: torch.arange(25.0).view(5, 5) for n in banks}
    scores["0.bank"][0, 0] = float("nan")
    with torch.no_grad():
        select_dynamic(banks, scores, 0.2, "global")
    scores["0.bank"][4, 4] = float("inf")  # kept dynamic by the first selection
    with pytest.raises(ValueError, match=r"^partition scores are not finite at 1 of 10 still-dynamic"):
        select_dynamic(banks, scores, 0.1, "global")


def test_selection_counts_the_decisions_taken_at_random():
    """Scores 9, 8, 7, 7, 7, 7, 1, 0, 0, 0; keep 4: 9 and 8 by score, two of the four 7s at random."""
    bank = pad.PartiallyDynamicWeights(2, (2, 5))
    tied = torch.tensor([9.0, 8, 7, 7, 7, 7, 1, 0, 0, 0]).view(2, 5)
    with torch.no_grad():
        selection = select_dynamic({"b": bank}, {"b": tied}, 0.4)
    assert selection == Selection(made_static=6, tie_broken=2)
    assert selection.tie_share == pytest.approx(1 / 3)
    assert bank.mask.flatten()[:2].tolist() == [1, 1] and bank.mask.flatten()[2:6].sum() == 2
    assert pad.partition.decided_by("taylor", selection) == "taylor (33.3% tie-broken at random)"
    # a tie group entirely on one side of the boundary is decided by the scores
    bank.mask.fill_(1)
    with torch.no_grad():
        selection = select_dynamic({"b": bank}, {"b": tied}, 0.6)
    assert selection == Selection(made_static=4, tie_broken=0)
    assert pad.partition.decided_by("taylor", selection) == "taylor"


def test_discriminating_scores_are_reported_as_the_criterion():
    model = linear_model()
    report = pad.iterative_mode_partition(model, batches(5, 5), mse, 0.3, iterations=3)
    assert report.decided_by == "taylor" and report.tie_broken_per_iteration == [0.0, 0.0, 0.0]
    assert "decided by taylor\n" in report.format()


def saturating_model():
    """PAD layers followed by ReLU6: with SynFlow's absolute weights and all-ones input every unit
    saturates at 6 and every gradient is exactly zero (the MobileNetV2 case)."""
    torch.manual_seed(0)
    model = nn.Sequential(Routed((8, 5)), nn.ReLU6(), Routed((8, 8)), nn.ReLU6(), Routed((3, 8)))
    with torch.no_grad():
        for _, bank in weight_banks(model):
            bank.kernels.add_(3.0), bank.static_weight.add_(3.0)
    return model


def test_saturated_synflow_is_reported_as_random(caplog):
    model = saturating_model()
    scores = score_positions(model, batches(5, 3), None, "synflow", synflow)
    assert all(torch.all(s[:-1] == 0) for s in list(scores.values())[:2])
    with caplog.at_level(logging.WARNING, logger="pad.partition"):
        report = pad.iterative_mode_partition(model, batches(5, 3), None, 0.5, iterations=2, criterion="synflow",
                                              scope="local", synflow_fn=synflow,
                                              generator=torch.Generator().manual_seed(0))
    # the first two layers score all zero; the last one (no ReLU6 after it) is ranked by its scores
    zero_positions, dropped = 40 + 64, 40 + 64 + 24
    assert sum(report.tie_broken_per_iteration) > 0
    assert report.decided_by.startswith("synflow (") and report.decided_by.endswith("% tie-broken at random)")
    share = float(report.decided_by.split("(")[1].split("%")[0]) / 100
    assert share == pytest.approx(0.5 * zero_positions / (0.5 * dropped), abs=0.02)
    assert "cannot rank the positions" in caplog.text and "IMP round 1/2: the synflow scores" in caplog.text


def test_all_equal_scores_report_every_decision_random():
    model = linear_model()
    report = pad.iterative_mode_partition(model, batches(5, 5), lambda m, b: 0 * mse(m, b), 0.5, iterations=2,
                                          generator=torch.Generator().manual_seed(0))
    assert report.tie_broken_per_iteration == [1.0, 1.0]
    assert report.decided_by == "taylor (100% tie-broken at random)"


def test_identical_kernels_are_reported_and_warned_about(caplog):
    """Upcycled kernels (copies of W_s) make the taylor scores rounding noise, which no tie reveals."""
    model = linear_model()
    with torch.no_grad():
        first = model[0].bank
        first.kernels.copy_(first.static_weight.expand_as(first.kernels))
    with caplog.at_level(logging.WARNING, logger="pad.partition"):
        report = pad.iterative_mode_partition(model, batches(5, 5), mse, 0.5, iterations=1)
    assert report.identical_kernels == ["0.bank"]
    assert "IMP: 1 of 2 PAD layers have identical kernels" in caplog.text
    assert "1 of 2 layers had identical kernels (upcycled, untrained?)" in report.format()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pad.partition"):
        report = pad.iterative_mode_partition(model, batches(5, 5), None, 0.5, iterations=1, criterion="magnitude")
    assert report.identical_kernels == ["0.bank"] and caplog.text == ""  # magnitude does not compare W~ with W_s
    assert pad.iterative_mode_partition(linear_model(), batches(5, 5), mse, 0.5, iterations=1).identical_kernels == []


def test_synflow_in_float64_where_float32_overflows():
    """A deep chain whose SynFlow objective overflows float32 (the ResNet-50 case)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Routed((8, 8)) for _ in range(24)]).float()
    with torch.no_grad():
        for _, bank in weight_banks(model):
            bank.kernels.mul_(20), bank.static_weight.mul_(20)
    data = [(torch.ones(2, 8, dtype=torch.float32),)]
    with torch.no_grad():
        absolute = nn.Sequential(*[Routed((8, 8)) for _ in range(24)]).float()
        absolute.load_state_dict({k: v.abs() for k, v in model.state_dict().items()})
        assert not torch.isfinite(synflow(absolute, data[0]))  # what float32 scoring would meet
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    params = list(model.parameters())
    scores = score_positions(model, data, None, "synflow", synflow)
    assert all(torch.isfinite(s).all() and (s > 0).all() and s.dtype == torch.float64 for s in scores.values())
    for k, v in model.state_dict().items():
        dtype = torch.int64 if k.endswith("granularity_code") else torch.float32  # (the partition's granularity)
        assert v.dtype == dtype and torch.equal(v, before[k][0]) and v.data_ptr() == before[k][1]
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------- BatchNorm statistics

def batchnorm_model():
    """PAD linear -> BatchNorm1d -> ReLU -> PAD linear; channel 1 is dead under its running statistics
    (running mean far above every pre-activation), alive under batch statistics.  Dropout inside."""
    torch.manual_seed(0)
    model = nn.Sequential(Routed((4, 3)), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), Routed((2, 4)))
    with torch.no_grad():
        model[1].running_mean[1] = 1e3
        model[1].num_batches_tracked.fill_(7)
    return model


def test_batch_statistics_revive_channels_dead_under_running_statistics():
    model = batchnorm_model()
    data = batches(3, 2, n=2, size=8)
    running = score_positions(model, data, mse, "taylor", batchnorm="running")["0.bank"]
    batch = score_positions(model, data, mse, "taylor", batchnorm="batch")["0.bank"]
    assert torch.all(running[1] == 0) and torch.all(running[[0, 2, 3]] > 0)
    assert torch.all(batch > 0)
    assert torch.equal(score_positions(model, data, mse, "taylor")["0.bank"], batch)  # default, no dropout


def test_batch_statistics_scores_equal_train_mode_batchnorm_without_dropout():
    model = batchnorm_model()
    data = batches(3, 2, n=2, size=8)
    scores = score_positions(model, data, mse, "taylor", batchnorm="batch")["0.bank"]
    reference = batchnorm_model()
    reference.eval()
    reference[1].train()
    reference[1].track_running_stats = False  # batch statistics, nothing updated
    reference[1].running_mean = reference[1].running_var = None
    mask = reference[0].bank.mask.requires_grad_(True)
    expected = sum(torch.autograd.grad(mse(reference, b), mask)[0] for b in data).abs()
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("criterion", ["taylor", "grasp"])
def test_scoring_restores_batchnorm_buffers_and_modes_exactly(criterion):
    model = batchnorm_model()
    model.train()
    model[3].eval()  # a module whose own mode differs from its parent's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pad.iterative_mode_partition(model, batches(3, 2, n=2, size=8), mse, 0.5, iterations=2, criterion=criterion)
    for k, v in model.state_dict().items():
        if not k.endswith("mask"):
            assert v.dtype == before[k].dtype, k
            assert torch.equal(v.reshape(-1).view(torch.uint8), before[k].reshape(-1).view(torch.uint8)), k
    assert [m.training for m in model] == [True, True, True, False, True]


def test_unknown_batchnorm_mode():
    with pytest.raises(ValueError, match=r"unknown batchnorm mode 'eval'; expected one of \('batch', 'running'\)"):
        pad.iterative_mode_partition(linear_model(), batches(5, 5), mse, 0.5, batchnorm="eval")


def test_report_records_the_batchnorm_statistics_used():
    kw = dict(iterations=1, synflow_fn=synflow)
    assert pad.iterative_mode_partition(batchnorm_model(), batches(3, 2), mse, 0.5, **kw).batchnorm == "batch"
    assert pad.iterative_mode_partition(batchnorm_model(), batches(3, 2), mse, 0.5, batchnorm="running",
                                        **kw).batchnorm == "running"
    assert pad.iterative_mode_partition(batchnorm_model(), batches(3, 2), mse, 0.5, criterion="synflow",
                                        **kw).batchnorm == "running"
    assert pad.iterative_mode_partition(batchnorm_model(), batches(3, 2), mse, 0.5, criterion="magnitude",
                                        **kw).batchnorm is None


# ---------------------------------------------------------------- granularity

def assert_structured(bank, granularity):
    units = unit_view(bank.mask, granularity)
    assert torch.equal(units, units[:, :1].expand_as(units))
    assert torch.equal(bank.unit_mask().flatten(), units[:, 0] > 0)
    assert torch.equal(bank.dynamic_units(), (units[:, 0] > 0).nonzero().squeeze(1))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_granularity_structure_ratio_and_counts(granularity, scope, schedule, tmp_path):
    model = conv_shaped_model()
    report = pad.iterative_mode_partition(model, batches(12, 6), mse, 0.3, iterations=3, schedule=schedule,
                                          scope=scope, granularity=granularity)
    banks = dict(weight_banks(model))
    total = sum(b.mask.numel() for b in banks.values())
    dynamic = sum(int(b.mask.sum()) for b in banks.values())
    units = [unit_size(b, granularity) for b in banks.values()]
    assert abs(dynamic - 0.3 * total) <= (max(units) if scope == "global" else sum(units)) / 2
    for bank in banks.values():
        assert bank.granularity == granularity
        assert_structured(bank, granularity)
        if scope == "local":
            assert abs(bank.mask.sum() - 0.3 * bank.mask.numel()) <= unit_size(bank, granularity) / 2
    assert report.granularity == granularity and report.achieved == pytest.approx(dynamic / total)
    assert report.decided_by == "taylor"
    # stored parameters and compact export keep their meaning: (1 - M)|W_s| + M K |W| per layer
    counts = pad.parameter_counts(model)
    others = sum(p.numel() for n, p in model.named_parameters() if "bank" not in n or "phi" in n)
    assert counts["compact"] == others + sum((b.mask.numel() - int(b.mask.sum())) + 3 * int(b.mask.sum())
                                             for b in banks.values())
    # all scores tied: every unit made static is chosen at random, and the report says so
    tied = conv_shaped_model()
    report = pad.iterative_mode_partition(tied, batches(12, 6), lambda m, b: 0 * mse(m, b), 0.3, iterations=3,
                                          schedule=schedule, scope=scope, granularity=granularity,
                                          generator=torch.Generator().manual_seed(0))
    assert set(report.tie_broken_per_iteration) <= {0.0, 1.0} and 1.0 in report.tie_broken_per_iteration
    assert report.decided_by == "taylor (100% tie-broken at random)"
    for bank in (b for _, b in weight_banks(tied)):
        assert_structured(bank, granularity)
    assert abs(pad.dynamic_ratio(tied) - 0.3) * total <= (max(units) if scope == "global" else sum(units)) / 2

    pad.save_compact(model, tmp_path / "c.safetensors")
    fresh = conv_shaped_model()
    torch.manual_seed(5)
    for p in fresh.parameters():
        nn.init.normal_(p)
    pad.load_compact_file(fresh, tmp_path / "c.safetensors")
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("granularity", ["kernel", "unit"])
def test_granularity_for_every_criterion(criterion, granularity):
    model = conv_shaped_model()
    pad.iterative_mode_partition(model, batches(12, 6), mse, 0.4, iterations=2, criterion=criterion,
                                 synflow_fn=synflow, granularity=granularity,
                                 generator=torch.Generator().manual_seed(0))
    banks = [b for _, b in weight_banks(model)]
    total = sum(b.mask.numel() for b in banks)
    assert abs(sum(b.mask.sum() for b in banks) - 0.4 * total) <= max(unit_size(b, granularity) for b in banks) / 2
    for bank in banks:
        assert_structured(bank, granularity)


def test_units_are_scored_by_their_score_sums():
    bank = pad.PartiallyDynamicWeights(2, (4, 3, 2, 2))
    scores = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    scores[2] += 1.0  # best unit
    with torch.no_grad():
        select_dynamic({"b": bank}, {"b": scores}, 0.5, "local", granularity="unit")
    expected = scores.flatten(1).sum(1).topk(2).indices.sort().values
    assert torch.equal(bank.dynamic_units(), expected) and 2 in expected.tolist()
    kernel_bank = pad.PartiallyDynamicWeights(2, (4, 3, 2, 2))
    with torch.no_grad():
        select_dynamic({"b": kernel_bank}, {"b": scores}, 0.25, "local", granularity="kernel")
    assert torch.equal(kernel_bank.dynamic_units(), scores.flatten(2).sum(2).flatten().topk(3).indices.sort().values)


def test_global_scope_ranks_units_of_different_sizes_by_score_per_position():
    """Units of 12 positions (layer a) and of 4 (layer b): a unit of b with a smaller sum but a larger
    score per position is kept before a unit of a."""
    a, b = pad.PartiallyDynamicWeights(2, (4, 3, 2, 2)), pad.PartiallyDynamicWeights(2, (6, 1, 2, 2))
    score_a = torch.zeros(4, 3, 2, 2)
    score_a[0] = 1.0  # sum 12, 1 per position
    score_a[1] = 0.5  # sum 6, 0.5 per position
    score_b = torch.zeros(6, 1, 2, 2)
    score_b[3] = 2.0  # sum 8, 2 per position
    score_b[4] = 0.75  # sum 3, 0.75 per position
    with torch.no_grad():  # 72 positions, keep 28: b3 (4) + a0 (12) + b4 (4) = 20, + a1 (12) = 32 -> closest is 32
        selection = select_dynamic({"a": a, "b": b}, {"a": score_a, "b": score_b}, 28 / 72, granularity="unit")
    assert a.dynamic_units().tolist() == [0, 1] and b.dynamic_units().tolist() == [3, 4]
    assert selection == Selection(made_static=72 - 32, tie_broken=0)


def test_unit_granularity_ties_are_random_and_seeded():
    def partition(seed):
        model = conv_shaped_model()
        report = pad.iterative_mode_partition(model, batches(12, 6), lambda m, b: 0 * mse(m, b), 0.5, iterations=1,
                                              granularity="unit", generator=torch.Generator().manual_seed(seed))
        return masks(model), report

    (first, report), (again, _), (other, _) = partition(0), partition(0), partition(1)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert any(not torch.equal(x, y) for x, y in zip(first, other))
    assert report.tie_broken_per_iteration == [1.0]
    assert report.decided_by == "taylor (100% tie-broken at random)"


def test_kernel_granularity_needs_conv_shaped_banks():
    with pytest.raises(ValueError, match=r"^PAD layer '0.bank': kernel granularity needs a static shape "
                                         r"\(out, in, \*kernel\), got \(5, 5\)$"):
        pad.iterative_mode_partition(linear_model(), batches(5, 5), mse, 0.5, granularity="kernel")


def test_unknown_granularity():
    with pytest.raises(ValueError, match=r"unknown partition granularity 'row'; expected one of "
                                         r"\('element', 'kernel', 'unit'\)"):
        pad.iterative_mode_partition(linear_model(), batches(5, 5), mse, 0.5, granularity="row")
    with pytest.raises(ValueError, match="unknown partition granularity 'row'"):
        pad.PartiallyDynamicWeights(2, (3, 3), granularity="row")


def test_unit_mask_and_set_granularity_check_the_structure():
    model = linear_model()
    pad.iterative_mode_partition(model, batches(5, 5), mse, 0.4, iterations=1)  # element mask
    bank = model[0].bank
    with pytest.raises(ValueError, match="not structured at unit granularity"):
        bank.dynamic_units("unit")
    with pytest.raises(ValueError, match=r"^PAD layer '0.bank': the mask is not structured at unit granularity"):
        set_granularity(model, "unit")
    assert bank.granularity == "element"
    pad.iterative_mode_partition(model, batches(5, 5), mse, 0.4, iterations=1, granularity="unit")
    set_granularity(model, "element")
    assert bank.granularity == "element" and bank.dynamic_units().numel() == int(bank.mask.sum())
    set_granularity(model, "unit")
    rows = bank.dynamic_units()
    assert torch.equal(bank.mask[rows], torch.ones(len(rows), 5)) and int(bank.mask.sum()) == 5 * len(rows)


def test_batch_statistics_of_single_values_are_a_clear_error():
    model = batchnorm_model()
    one = [(torch.randn(1, 3), torch.randn(1, 2))]
    with pytest.raises(ValueError, match=r"^scoring with BatchNorm batch statistics needs more than one value per "
                                         r"channel \(.*\); use larger partition batches or batchnorm='running'$"):
        score_positions(model, one, mse, "taylor")
    assert score_positions(model, one, mse, "taylor", batchnorm="running")["0.bank"].shape == (4, 3)



def test_selection_counts_positions_exactly_beyond_float32_integers():
    """Units of 2**25 + 1, 1 and 1 positions (float32 cannot tell 2**25 + 1 from 2**25 + 2): keeping
    2**25 + 2 positions must keep exactly the first two units."""
    density = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    sizes = torch.tensor([2 ** 25 + 1, 1, 1])
    torch.set_default_dtype(torch.float32)  # as in real runs (the fixture restores it)
    kept, selection = pad.partition._select_units(density, sizes, torch.ones(3, dtype=torch.bool), 2.0 ** 25 + 2, None)
    assert kept.tolist() == [True, True, False] and selection == Selection(made_static=1, tie_broken=0)


# ---------------------------------------------------------------- ratios that keep no dynamic position

@pytest.mark.parametrize("scope, granularity, smallest", [
    ("global", "element", 1 / 72), ("global", "kernel", 4 / 72), ("global", "unit", 12 / 72),
    ("local", "element", 1 / 24), ("local", "kernel", 1 / 6), ("local", "unit", 1 / 4)])
def test_a_ratio_that_keeps_no_dynamic_position_is_refused_before_scoring(scope, granularity, smallest):
    """conv_shaped_model: 48 + 24 positions; kernels of 4 positions (12 and 6 of them), units of 12 and 4.
    Global scope needs one unit of the largest size in the model, local scope one unit in every layer."""
    model = conv_shaped_model()
    assert smallest_dynamic_ratio(model, scope, granularity) == pytest.approx(smallest)
    before = masks(model)
    scored = []
    with pytest.raises(ValueError, match=rf"--ratio-flag 1e-09 would leave no dynamic position in .*smallest ratio "
                                         rf"that keeps one dynamic {granularity} per .* is "):
        check_dynamic_ratio(1e-9, model, scope, granularity, name="--ratio-flag")
    with pytest.raises(ValueError, match="dynamic ratio 1e-09 would leave no dynamic position"):
        pad.iterative_mode_partition(model, batches(12, 6), lambda m, b: scored.append(1) or mse(m, b), 1e-9,
                                     scope=scope, granularity=granularity)
    assert not scored and all(torch.equal(a, b) for a, b in zip(before, masks(model)))
    # the printed smallest ratio passes, and IMP then keeps at least one dynamic position
    printed = float(str(pad.partition._ceil_significant(smallest_dynamic_ratio(model, scope, granularity))))
    check_dynamic_ratio(printed, model, scope, granularity)
    pad.iterative_mode_partition(model, batches(12, 6), mse, printed, iterations=2, scope=scope,
                                 granularity=granularity)
    kept = [int(b.mask.sum()) for _, b in weight_banks(model)]
    assert sum(kept) >= 1 and (scope == "global" or min(kept) >= 1), kept


def test_ratio_check_without_a_model_is_the_range_check():
    check_dynamic_ratio(1e-9)
    with pytest.raises(ValueError, match=r"^dynamic ratio must be in \(0, 1\], got 0$"):
        check_dynamic_ratio(0)
    with pytest.raises(ValueError, match="no partially dynamic layers"):
        smallest_dynamic_ratio(nn.Linear(2, 2))
