"""Deploy-time transformation of the EfficientFormer / EfficientFormerV2 / EfficientViT backbones.

:func:`fuse` folds every BatchNorm that directly follows a conv or linear layer into it, replaces
training-only paths (stochastic depth, gradient checkpointing) and, when given an input size,
freezes the attention biases of that size into buffers so that an exported graph contains no
gather or bicubic resize. Outputs equal the unfused model's up to float rounding.
"""
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import DropPath, RelativeBiasAttention, folded_conv_bn


@torch.no_grad()
def fold_batchnorm(layer: nn.Module, bn: _BatchNorm) -> None:
    """Fold ``bn`` (applied right after ``layer``) into the conv / linear ``layer`` in place."""
    if isinstance(layer, nn.ConvTranspose2d):
        raise TypeError('folding BN into a transposed conv is not supported')
    weight, bias = folded_conv_bn(layer.weight, layer.bias, bn)
    layer.weight.copy_(weight)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias)
    else:
        layer.bias.copy_(bias)


def _conv_bn_pairs(module: nn.Module) -> Iterator[Tuple[str, str]]:
    """Adjacent (conv/linear, BN) children, in registration order. Every module of mmeformer
    registers its layers in the order its forward applies them, so adjacency means that the BN
    consumes the layer's output directly; ``fuse`` checks the outputs afterwards in the tests."""
    children = list(module.named_children())
    for (name_a, a), (name_b, b) in zip(children, children[1:]):
        if (isinstance(a, (nn.Conv2d, nn.Linear)) and isinstance(b, _BatchNorm)
                and b.track_running_stats and a.weight.shape[0] == b.num_features):
            yield name_a, name_b


def fuse(model: nn.Module, input_size: Optional[Tuple[int, int]] = None) -> nn.Module:
    """Return ``model`` (modified in place, in eval mode) ready for deployment.

    Args:
        model: an mmeformer backbone (or any module containing them).
        input_size: (H, W); when given, the attention biases for this size are computed once and
            stored as buffers (other sizes still work, computing their biases as usual).
    """
    model.eval()
    for module in list(model.modules()):
        for conv_name, bn_name in list(_conv_bn_pairs(module)):
            fold_batchnorm(getattr(module, conv_name), getattr(module, bn_name))
            setattr(module, bn_name, nn.Identity())
        for name, child in list(module.named_children()):
            if isinstance(child, DropPath):
                setattr(module, name, nn.Identity())
        if hasattr(module, 'with_cp'):
            module.with_cp = False
    if input_size is not None:
        freeze_attention_biases(model, input_size)
    return model


def unfreeze_attention_biases(model: nn.Module) -> List[RelativeBiasAttention]:
    """Drop every frozen attention bias of ``model`` (each size then computes and caches its
    own again); returns the attention modules."""
    attentions = [m for m in model.modules() if isinstance(m, RelativeBiasAttention)]
    for attn in attentions:
        attn.unfreeze_bias()
    return attentions


@torch.no_grad()
def freeze_attention_biases(model: nn.Module, input_size: Tuple[int, int]) -> None:
    """Precompute every attention bias needed at ``input_size`` and keep it as a buffer."""
    attentions = unfreeze_attention_biases(model)
    for attn in attentions:
        attn.record_bias_sizes = True
    try:
        param = next(model.parameters())
        model(torch.zeros(1, getattr(model, 'in_channels', 3), *input_size, device=param.device,
                          dtype=param.dtype))
    finally:
        for attn in attentions:
            attn.record_bias_sizes = False
    for attn in attentions:
        if attn.recorded_bias_sizes is not None:
            attn.freeze_bias(*attn.recorded_bias_sizes)
