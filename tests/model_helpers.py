"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch
from torch import nn


def randomise_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines, PReLU slopes and biases, so no term of a decomposition is zero and every
    layer's scale and bias matter; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.4)
        elif isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 0.3 + 0.1)
    return model.eval()
