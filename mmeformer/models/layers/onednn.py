"""CPU inference kernels: linear layers and convolutions through oneDNN's fused kernels (bias and
activation inside the GEMM / conv), on weights packed once, and pointwise convs on channels-last
maps as GEMMs on their NHWC view.

Each function computes ``act(layer(x))`` and falls back to the plain torch ops wherever the fused
kernels do not apply: autograd recording (they have no backward), tracing and torch.compile,
autocast, other devices or dtypes, and :func:`~mmeformer.models.layers.fast_paths` off. The sizes
at which each path pays were measured on 2-core CPUs; the figures are in docs/benchmarks.md.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .blocks import GELU
from .fast_path import eager_fast_path, fast_paths_enabled, is_tracing, tensor_state

# GEMMs of at least this many rows go through oneDNN, and those with a wide, large weight
# (which MKL's sgemm re-packs on every call); a oneDNN call has a fixed cost of tens of
# microseconds, so small weights with few rows stay on F.linear.
ONEDNN_MIN_LINEAR_ROWS = 1024
ONEDNN_MIN_OUT_FEATURES = 256
ONEDNN_MIN_WEIGHT_ELEMENTS = 1 << 17
# bfloat16 only where the CPU has oneDNN's bfloat16 kernels (AVX512-BW/VL/DQ or AVX-NE-CONVERT):
# elsewhere the fused ops raise instead of falling back.
ONEDNN_DTYPES = (torch.float32, ) + (
    (torch.bfloat16, ) if torch.backends.mkldnn.is_available()
    and getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)() else ())
HAS_ONEDNN_POINTWISE = (torch.backends.mkldnn.is_available()
                        and hasattr(torch.ops.mkldnn, '_linear_pointwise')
                        and hasattr(torch.ops.mkldnn, '_convolution_pointwise'))


def apply_act(x: torch.Tensor, act: Optional[nn.Module]) -> torch.Tensor:
    return x if act is None else act(x)


def onednn_post_op(act: Optional[nn.Module]) -> Optional[tuple]:
    """oneDNN post-op arguments (attr, scalars, algorithm) equal to ``act``; None if none is."""
    if act is None:
        return ('none', [], '')
    if type(act) is GELU:
        return ('gelu', [], act.approximate)
    if type(act) is nn.ReLU:
        return ('relu', [], '')
    return None


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's fused (conv / linear + bias + activation) CPU kernels: inference only (they have
    no autograd formula), eager only, and not under autocast (they do not cast)."""
    return (HAS_ONEDNN_POINTWISE and eager_fast_path() and x.device.type == 'cpu'
            and x.dtype == weight.dtype and x.dtype in ONEDNN_DTYPES
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu'))


def packed_gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in, 1, 1) or (out, in) in oneDNN's blocked GEMM layout: oneDNN
    otherwise reorders it on every call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().flatten(1), None)


# Packed copies of parameters, keyed on the parameter itself: an entry dies with its tensor and
# is rebuilt when the tensor's storage or in-place version changes; MobileBackbone.train()
# drops those of its parameters. (Folded conv + BN weights keep theirs in their fold cache.)
_packed_weights = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` packed for oneDNN (:func:`packed_gemm_weight`) once."""
    state = tensor_state(weight)
    entry = _packed_weights.get(weight)
    if entry is None or entry[0] != state:
        entry = (state, packed_gemm_weight(weight))
        _packed_weights[weight] = entry
    return entry[1]


def held_packed_weight(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The packed copy of ``param`` held now, or None."""
    entry = _packed_weights.get(param)
    return None if entry is None else entry[1]


def forget_packed_weights(module: nn.Module) -> None:
    """Drop the packed copies of ``module``'s parameters (after changes no version counter
    records: writes through ``.data``, edits of inference tensors)."""
    for param in module.parameters():
        _packed_weights.pop(param, None)


def onednn_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMM of ``x`` (rows x in) with ``weight`` goes through oneDNN."""
    wide_weight = (weight.shape[0] >= ONEDNN_MIN_OUT_FEATURES
                   and weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS)
    return ((wide_weight or x.numel() >= ONEDNN_MIN_LINEAR_ROWS * x.shape[-1])
            and onednn_applies(x, weight))


def linear(layer: nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` (``layer``'s parameters unless given; a 1x1 conv
    weight is taken as its matrix). In CPU inference one oneDNN call on a packed copy of the
    weight adds the bias and applies ``act`` inside the GEMM: torch's addmm first copies the
    bias over the whole output, and the activation is one more pass."""
    if weight is None:
        weight, bias = layer.weight, layer.bias
    post_op = onednn_post_op(act)
    if post_op is not None and onednn_gemm(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, *post_op)
    return apply_act(F.linear(x, weight.flatten(1), bias), act)


def gemm_rows(conv: nn.Conv2d, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The NHWC view of ``x`` when ``conv`` is a pointwise conv that runs on it as a GEMM (see
    :func:`conv2d`), else None. CPU only: on GPUs, where a batch-1 forward is bound by kernel
    launches, the views and reshapes around the GEMM are more ops than the conv's one."""
    if (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1 and x.dim() == 4 and x.device.type == 'cpu' and not is_tracing()
            and fast_paths_enabled() and x.is_contiguous(memory_format=torch.channels_last)):
        return x.permute(0, 2, 3, 1)
    return None


def conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(conv(x))`` (with other ``weight`` / ``bias`` when given). On CPU a pointwise conv
    on a channels-last map runs as a GEMM on its NHWC view (faster than the conv kernel on the
    small maps of the later stages); in CPU inference the activation is fused into the kernel
    (see :func:`linear`)."""
    if weight is None:
        weight, bias = conv.weight, conv.bias
    rows = gemm_rows(conv, x)
    if rows is not None:
        return linear(conv, rows, weight, bias, act).permute(0, 3, 1, 2)
    post_op = onednn_post_op(act)
    if (act is not None and post_op is not None and conv.padding_mode == 'zeros'
            and not isinstance(conv.padding, str) and onednn_applies(x, weight)):
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, *post_op)
    return apply_act(conv._conv_forward(x, weight, bias), act)
