"""Architectures outside the registry, as a researcher's own package would define them: the
command line and the deployments reach them as ``tests.user_models:<callable>``."""

from __future__ import annotations

import torch
from torch import nn

from polysemantic_disentangle.tasks.data.assets import cifar_resnet_checkpoint
from polysemantic_disentangle.tasks.data.classes import CIFAR10_CLASSES, CIFAR10_WNIDS
from polysemantic_disentangle.tasks.models.cifar_resnet import cifar_resnet
from polysemantic_disentangle.tasks.models.registry import read_state_dict
from polysemantic_disentangle.tasks.models.spec import ModelSpec


class MyNet(nn.Module):
    """ResNet-20 inside a wrapper of the user's own, so that its layers are named
    ``backbone.layer3.2.conv2`` and its class is in no registry."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = cifar_resnet(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def bare_net() -> nn.Module:
    """A bare module: the weights come from --weights, the class names from --classes."""
    return MyNet()


def trained_spec() -> ModelSpec:
    """A spec that brings its own trained weights, class names and WordNet ids."""
    net = MyNet()
    net.backbone.load_state_dict(read_state_dict(cifar_resnet_checkpoint(20)))
    return ModelSpec(net, list(CIFAR10_CLASSES), trained=True, wnids=list(CIFAR10_WNIDS))
