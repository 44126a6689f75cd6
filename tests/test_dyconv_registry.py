"""dyconv.layers.CONV_TYPES: a conv type registered with register_conv is built by the factory and the models,
trains, and is offered by the CLI, without any other change."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pad
from dyconv.layers import CONV_TYPES, RoutedConv2d, dynamic_convs, register_conv
from dyconv.main import build_parser, parse_args
from dyconv.models import build_model

torch.set_num_threads(1)


class UniformRouting(nn.Module):
    """Every kernel weighted ``1 / K``, whatever the input: ``(B, C, H, W) -> (B, K)``."""

    def __init__(self, kernels: int):
        super().__init__()
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((x.shape[0], self.kernels), 1.0 / self.kernels)


@pytest.fixture
def toy_conv():
    """Registers ``toy``, a trivially routed conv (one class, one registry entry), for the test's duration."""
    @register_conv("toy")
    class ToyConv2d(RoutedConv2d):
        routing_sums_to_one = True

        def __init__(self, in_channels, out_channels, kernel_size, **kwargs):
            super().__init__(in_channels, out_channels, kernel_size, **kwargs)
            self.attention = UniformRouting(self.num_kernels)

    yield ToyConv2d
    del CONV_TYPES["toy"]


def test_a_name_is_registered_once(toy_conv):
    with pytest.raises(ValueError, match="conv 'toy' is registered already"):
        register_conv("toy")(toy_conv)


@pytest.mark.parametrize("use_pad", [False, True])
def test_a_registered_conv_builds_and_trains_a_resnet(toy_conv, use_pad):
    torch.manual_seed(0)
    model = build_model("resnet10", "toy", pad=use_pad, num_classes=3, small_input=True, in_channels=1,
                        resnet_width=8)
    layers = dict(dynamic_convs(model))
    assert len(layers) == 11 and all(type(layer) is toy_conv for layer in layers.values())
    assert all(isinstance(layer.bank, pad.PartiallyDynamicWeights) == use_pad for layer in layers.values())
    before = {name: layer.bank.kernels.detach().clone() for name, layer in layers.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 12, 12, generator=generator), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(layer.bank.kernels, before[name]) for name, layer in layers.items())
    assert all(layer.chooser.schemes for layer in layers.values())  # run by the schemes like every routed conv


def test_the_cli_offers_a_registered_conv(toy_conv):
    conv = next(action for action in build_parser()._actions if action.dest == "conv")
    assert "toy" in conv.choices
    args = parse_args(["--conv", "toy", "--pad", "--dynamic-ratio", "0.3"])
    assert (args.conv, args.pad, args.odconv_static_attention) == ("toy", True, "none")
