"""torchvision's initialisation of ResNet and MobileNetV2.

Dynamic convs initialise their kernels (and ``W_s``) themselves with the same
``kaiming_normal_(mode="fan_out")``, so they are not touched here (it would only
draw the largest tensors of the model twice).
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, linear_std: float | None) -> None:
    """Static conv weights get ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``;
    BatchNorm gets ones and zeros.  ``linear_std``: the classifier's ``normal_(0, std)``
    with zero bias (MobileNetV2), or ``None`` to keep ``nn.Linear``'s default (ResNet);
    the attention FCs inside dynamic convs keep their own initialisation.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if linear_std is not None:
        classifier = model.classifier[-1]
        nn.init.normal_(classifier.weight, 0, linear_std)
        nn.init.zeros_(classifier.bias)
