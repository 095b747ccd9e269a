"""Numerical-check helpers for the EfficientFormer / EfficientFormerV2 / EfficientViT backbones
shared by the test suite and :mod:`benchmarks.device_check`.

Freshly initialised backbones are poor test subjects: zero-initialised residual BN scales and
bias tables switch whole branches off, so a wrong branch would still match. :func:`randomize_`
gives every tensor a value of realistic scale instead.
"""
import math

import torch
import torch.nn as nn


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every float tensor of ``module`` a random value of realistic scale: fan-in scaled
    weights, norm scales and layer scales near 1, unit-variance bias tables, random BN statistics
    (so features keep their spatial structure and attention matters). Returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.is_floating_point():
                continue
            noise = torch.randn(value.shape, generator=gen)
            if key.endswith('running_var'):
                value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
            elif key.endswith('attention_biases'):
                value.copy_(noise)
            elif value.dim() >= 2:
                value.copy_(0.5 * noise / math.sqrt(value[0].numel()))
            elif key.endswith(('gamma', '.weight')):
                value.copy_(1. + 0.1 * noise)
            else:
                value.copy_(0.1 * noise)
    return module


def gradients_as_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with every parameter's gradient in place of its value (zeros where
    none flowed). Converted like a checkpoint of ``module``'s implementation, it puts each
    gradient where another implementation keeps the same parameter: the converters only rename,
    reshape and split tensors, which maps gradients as it maps values."""
    state = module.state_dict()
    for name, param in module.named_parameters():
        state[name] = torch.zeros_like(param) if param.grad is None else param.grad.detach()
    return state
