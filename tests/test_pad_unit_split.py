"""PartiallyDynamicWeights.unit_split: a mask structured by output units cut into its dynamic and static units."""
import pytest
import torch

from pad import PartiallyDynamicWeights
from pad.mixing import unit_order


def bank_with_rows(rows, shape=(5, 4)):
    torch.manual_seed(0)
    bank = PartiallyDynamicWeights(3, shape)
    with torch.no_grad():
        bank.kernels.normal_()
        bank.static_weight.normal_()
        bank.scale.phi.fill_(0.4)
        bank.mask.zero_()
        bank.mask[list(rows)] = 1
    return bank


def test_split_holds_the_scaled_parts_of_each_side():
    bank = bank_with_rows([1, 3])
    split = bank.unit_split()
    lambda_d = 2 * torch.sigmoid(torch.tensor(0.4))
    assert split.dynamic.tolist() == [1, 3] and split.static.tolist() == [0, 2, 4]
    torch.testing.assert_close(split.kernels, lambda_d * bank.kernels[:, [1, 3]])
    torch.testing.assert_close(split.weight, (2 - lambda_d) * bank.static_weight[[0, 2, 4]])
    # the two sides rebuild every kernel's Omega_k = lambda_d M W_k + lambda_s (1 - M) W_s
    dynamic, static = bank()
    rebuilt = torch.cat([split.kernels, split.weight.expand(3, -1, -1)], 1).index_select(1, split.order)
    torch.testing.assert_close(rebuilt, dynamic + static)


def test_split_gradients_reach_only_the_used_rows():
    bank = bank_with_rows([0, 4])
    split = bank.unit_split()
    (split.kernels.sum() + split.weight.sum()).backward()
    assert bank.kernels.grad[:, [1, 2, 3]].abs().sum() == 0 and bank.kernels.grad[:, [0, 4]].abs().min() > 0
    assert bank.static_weight.grad[[0, 4]].abs().sum() == 0 and bank.static_weight.grad[[1, 2, 3]].abs().min() > 0
    assert bank.scale.phi.grad is not None


def test_indices_follow_the_mask_and_unstructured_masks_are_refused():
    bank = bank_with_rows([1])
    first = bank.unit_indices()
    assert bank.unit_indices() is first  # cached while the mask is unchanged
    with torch.no_grad():
        bank.mask[2] = 1
    assert bank.unit_split().dynamic.tolist() == [1, 2]
    with torch.no_grad():
        bank.mask[0, 0] = 1
    with pytest.raises(ValueError, match="not structured at unit granularity: 1 units are partly dynamic"):
        bank.unit_split()


def test_unit_order_inverts_the_concatenation():
    dynamic, static, order = unit_order(torch.tensor([True, False, False, True]))
    values = torch.tensor([10.0, 11.0, 12.0, 13.0])
    assert torch.cat([values[dynamic], values[static]])[order].tolist() == values.tolist()
