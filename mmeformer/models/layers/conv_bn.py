"""Conv + BatchNorm pairs that run as one conv with folded weights in inference."""
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .fast_path import fast_paths_enabled, is_compiling, is_tracing, records_grad, tensor_state
from .onednn import (apply_act, conv2d, gemm_rows, onednn_gemm, onednn_post_op,
                     packed_gemm_weight)


def folded_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
                   bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the conv / linear layer equal to ``bn(layer(x))`` in eval."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    new_bias = shift if bias is None else bias * scale + shift
    return weight * scale.view((-1, ) + (1, ) * (weight.dim() - 1)), new_bias


class FoldsBatchNorm(nn.Module):
    """Mixin running (conv, BatchNorm) pairs as one conv with folded weights in eval.

    Used when the BN is in eval mode, nothing is being traced, no gradient is wanted for the
    pair's parameters and the fast paths are on; the folded weights are cached and rebuilt when
    any parameter or buffer of the pair changes (storage, in-place version, device or dtype) or
    ``bn.eps`` does, and dropped on ``train()`` / ``eval()``, ``.to()`` and ``load_state_dict``.
    Saves a full pass over every BN output; outputs match the unfolded pair up to float
    rounding. :func:`mmeformer.models.fuse` does the same fold permanently.

    Two kinds of in-place change leave no trace that a cache could see: writes through
    ``.data`` and edits of inference tensors (a model built under ``torch.inference_mode``).
    Call ``model.eval()`` after such a change.
    """

    def _conv_bn(self, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor,
                 act: Optional[nn.Module] = None) -> torch.Tensor:
        """``act(bn(conv(x)))``, ``act`` optional (fused into the conv where possible)."""
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
                or not bn.track_running_stats or is_tracing() or not fast_paths_enabled()):
            return apply_act(bn(conv2d(conv, x)), act)
        # num_batches_tracked: a training-mode forward updates the running statistics without
        # moving their version counters, but it increments this counter in place. Read from the
        # modules' dicts: nn.Module.__getattr__ took more than half of this check's time (the
        # check runs for every conv of every forward).
        params, bn_params, bn_buffers = conv._parameters, bn._parameters, bn._buffers
        tensors = (params['weight'], params.get('bias'), bn_params.get('weight'),
                   bn_params.get('bias'), bn_buffers['running_mean'], bn_buffers['running_var'],
                   bn_buffers.get('num_batches_tracked'))
        if records_grad(*tensors):
            return apply_act(bn(conv2d(conv, x)), act)
        if is_compiling():  # folded inside the graph: the cache keys would break it
            return conv2d(conv, x, *folded_conv_bn(conv.weight, conv.bias, bn), act=act)
        key = (bn.eps, ) + tuple(tensor_state(t) for t in tensors)
        rows, post_op = gemm_rows(conv, x), onednn_post_op(act)
        if rows is not None and post_op is not None and onednn_gemm(rows, conv.weight):
            packed, bias = self._folded(conv, bn, key, packed=True)
            return torch.ops.mkldnn._linear_pointwise(rows, packed, bias,
                                                      *post_op).permute(0, 3, 1, 2)
        return conv2d(conv, x, *self._folded(conv, bn, key), act=act)

    def _folded(self, conv: nn.Conv2d, bn: nn.Module, key: tuple,
                packed: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The pair's folded (weight, bias), cached under ``key``; with ``packed`` the weight
        in oneDNN's GEMM layout, and then only that copy is kept (a plain folded copy beside it
        would be a third copy of the weight)."""
        cache = self.__dict__.setdefault('_fold_cache', {})
        entry = cache.get((id(conv), packed))
        if entry is None or entry[0] != key:
            plain = cache.get((id(conv), False))
            if plain is not None and plain[0] == key:
                weight, bias = plain[1:]
            else:
                with torch.no_grad():
                    weight, bias = folded_conv_bn(conv.weight, conv.bias, bn)
            entry = (key, packed_gemm_weight(weight) if packed else weight, bias)
            cache[(id(conv), packed)] = entry
        return entry[1], entry[2]

    def cached_fold_tensors(self) -> list:
        """The tensors the fold cache holds (plain or packed weights, biases)."""
        return [t for entry in self.__dict__.get('_fold_cache', {}).values() for t in entry[1:]]

    def train(self, mode: bool = True):
        self.__dict__['_fold_cache'] = {}
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__['_fold_cache'] = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__['_fold_cache'] = {}
        return super()._load_from_state_dict(*args, **kwargs)


class ConvNorm(FoldsBatchNorm, nn.Sequential):
    """Conv2d followed by BatchNorm, stored as ``.conv`` and ``.bn`` (folded in eval, see
    :class:`FoldsBatchNorm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bias: bool = True, bn_weight_init: float = 1.):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                           groups=groups, bias=bias),
            bn=nn.BatchNorm2d(out_channels)))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor, act: Optional[nn.Module] = None) -> torch.Tensor:
        """``act(bn(conv(x)))``; pass the activation that follows so that it can be fused."""
        return self._conv_bn(self.conv, self.bn, x, act)


class ConvActSequential(nn.Sequential):
    """``nn.Sequential`` of ConvNorms and activations that hands each activation to the ConvNorm
    before it, so that inference fuses the pair (same parameter names as the plain one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            if (isinstance(layers[i], ConvNorm) and i + 1 < len(layers)
                    and onednn_post_op(layers[i + 1]) is not None):
                x, i = layers[i](x, layers[i + 1]), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x
