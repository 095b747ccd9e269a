"""EfficientViT backbone (Microsoft, cascaded group attention; arch m0 - m5).

Paper: "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention",
Xinyu Liu et al., CVPR 2023, arXiv:2305.07027. Not MIT-HAN's EfficientViT (B/L series).

Released weights: ImageNet-1k classifiers M0-M5 and the COCO Mask R-CNN and RetinaNet models with
EfficientViT-M4 (mmdet 2.x) of microsoft/Cream.

Three stages at strides 16/32/64 of "sandwich" blocks (dw conv, FFN, local window cascaded
group attention, dw conv, FFN). Follows the official downstream semantics: 7x7 windows in every
stage, the feature map zero-padded to a multiple of the window (also when it is smaller than one
window, where the reference code crashes), padded tokens not masked.

Parameter names follow timm's layout (``patch_embed.conv1``, ``stages.i.downsample``,
``stages.i.blocks.j.mixer.m.attn``); the original releases are converted by
:mod:`mmeformer.checkpoint`.
"""
from collections import OrderedDict
from functools import partial
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...registry import MODELS
from ..archs import EFFICIENTVIT_ARCHS
from ..layers import (ConvActSequential, ConvNorm, RelativeBiasAttention, Stage,
                      drop_path_or_identity, softmax_last, stochastic_depth_rates)
from .base import MobileBackbone


class Residual(nn.Module):
    """``x + drop_path(m(x))``."""

    def __init__(self, module: nn.Module, drop_path: float = 0.):
        super().__init__()
        self.m = module
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.m(x))


class FFN(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pw2 = ConvNorm(hidden, dim, bias=False, bn_weight_init=0.)

    def forward(self, x):
        return self.pw2(self.pw1(x, self.act))


def dw_conv(dim: int) -> ConvNorm:
    return ConvNorm(dim, dim, 3, groups=dim, bias=False)


def _tokens_as_map(tokens: torch.Tensor, window_size: int) -> torch.Tensor:
    """(windows, ws * ws, C) tokens -> (windows, C, ws, ws) map; a view, channels-last when
    the tokens are contiguous."""
    return tokens.view(tokens.shape[0], window_size, window_size, -1).permute(0, 3, 1, 2)


def _map_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(windows, C, ws, ws) map -> (windows, ws * ws, C) tokens; a view of a channels-last map."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class CascadedGroupAttention(RelativeBiasAttention):
    """Each head attends on its own channel chunk plus the previous head's output.

    Works on window tokens (windows, ws * ws, C): q, k and v are column slices of one GEMM's
    output that the batched matmuls read in place, and a head's output is the next head's input
    without a layout change; the convs run on channels-last views of the tokens (NCHW windows
    would need a layout copy per head).
    """

    def __init__(self, dim: int, num_heads: int, key_dim: int, window_size: int,
                 kernels: Sequence[int]):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.val_dim = dim // num_heads
        self.window_size = window_size
        self.qkvs = nn.ModuleList(
            ConvNorm(dim // num_heads, 2 * key_dim + self.val_dim, bias=False)
            for _ in range(num_heads))
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[i], groups=key_dim, bias=False)
            for i in range(num_heads))
        self.proj = nn.Sequential(
            nn.ReLU(inplace=True),
            ConvNorm(self.val_dim * num_heads, dim, bias=False, bn_weight_init=0.))
        self._init_bias_table(num_heads, window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(windows, ws * ws, C) tokens -> tokens of the same shape."""
        ws = self.window_size
        bias = self.attention_bias((ws, ws), (ws, ws)).to(x.dtype)
        chunks = x.chunk(self.num_heads, dim=-1)
        outs, feat = [], chunks[0].contiguous()
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]
            qkv_tokens = _map_as_tokens(qkv(_tokens_as_map(feat, ws)))
            q, k, v = qkv_tokens.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
            q = _map_as_tokens(dw(_tokens_as_map(q.contiguous(), ws)))
            # softmax(q k^T * scale + bias) v; the scale and the bias in the same GEMM.
            attn = torch.baddbmm(bias[i], q, k.transpose(-2, -1), alpha=self.key_dim ** -0.5)
            feat = torch.bmm(softmax_last(attn).to(v.dtype), v)
            outs.append(feat)
        return _map_as_tokens(self.proj(_tokens_as_map(torch.cat(outs, dim=-1), ws)))


class LocalWindowAttention(nn.Module):
    """Cascaded group attention inside non-overlapping windows of a zero-padded map."""

    def __init__(self, dim: int, num_heads: int, key_dim: int, window_size: int,
                 kernels: Sequence[int]):
        super().__init__()
        self.attn = CascadedGroupAttention(dim, num_heads, key_dim, window_size, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.attn.window_size  # one source: the attention views its tokens with it
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        # A TorchScript trace (ONNX, OpenVINO) serves every size, so it always pads; torch.export
        # (LiteRT, CoreML) records one size, where an empty pad and a whole-map slice would be
        # aliases that coremltools cannot convert.
        padded = torch.jit.is_tracing() or bool(pad_b or pad_r)
        x = x.permute(0, 2, 3, 1)  # NHWC: a view of a channels-last map
        if padded:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        windows = self.attn(windows).view(b, nh, nw, ws, ws, c)
        # Back as a channels-last view, the layout of the residual it is added to.
        x = windows.transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        if padded:
            x = x[:, :h, :w]
        return x.permute(0, 3, 1, 2)


class EfficientViTBlock(nn.Module):

    def __init__(self, dim: int, num_heads: int, key_dim: int, window_size: int,
                 kernels: Sequence[int], mlp_ratio: int, drop_path: float):
        super().__init__()
        self.dw0 = Residual(dw_conv(dim), drop_path)
        self.ffn0 = Residual(FFN(dim, dim * mlp_ratio), drop_path)
        self.mixer = Residual(
            LocalWindowAttention(dim, num_heads, key_dim, window_size, kernels), drop_path)
        self.dw1 = Residual(dw_conv(dim), drop_path)
        self.ffn1 = Residual(FFN(dim, dim * mlp_ratio), drop_path)

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class SqueezeExcite(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class PatchMerging(nn.Module):

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = dim * 4
        self.conv1 = ConvNorm(dim, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = ConvNorm(hidden, hidden, 3, stride=2, groups=hidden, bias=False)
        self.se = SqueezeExcite(hidden, hidden // 4)
        self.conv3 = ConvNorm(hidden, out_dim, bias=False)

    def forward(self, x):
        return self.conv3(self.se(self.conv2(self.conv1(x, self.act), self.act)))


class EfficientViTDownsample(nn.Module):
    """[residual dw, residual FFN] -> patch merging -> [residual dw, residual FFN]."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.res1 = nn.Sequential(Residual(dw_conv(dim), drop_path),
                                  Residual(FFN(dim, dim * mlp_ratio), drop_path))
        self.patchmerge = PatchMerging(dim, out_dim)
        self.res2 = nn.Sequential(Residual(dw_conv(out_dim), drop_path),
                                  Residual(FFN(out_dim, out_dim * mlp_ratio), drop_path))

    def forward(self, x):
        return self.res2(self.patchmerge(self.res1(x)))


@MODELS.register_module()
class EfficientViT(MobileBackbone):
    """EfficientViT (Microsoft, cascaded group attention) backbone: three levels at strides
    16, 32 and 64.

    Args:
        arch (str | dict): ``'m0'`` ... ``'m5'`` (see
            :data:`mmeformer.models.archs.EFFICIENTVIT_ARCHS`) or a dict with ``widths``,
            ``depths``, ``num_heads`` (per stage) and ``kernels`` (q depthwise kernel per head
            index). Defaults to ``'m4'``.
        in_channels (int): Image channels. Defaults to 3.
        window_size (int): Attention window, in every stage (the downstream setting).
            Defaults to 7.
        out_indices (Sequence[int]): Levels to return (0..2). Defaults to ``(0, 1, 2)``.
        frozen_stages (int): -1 none, 0 the patch embedding, k it and the first k stages.
            Defaults to -1.
        norm_eval (bool): Keep every BatchNorm in eval mode while training (Cream's
            detectors do). Defaults to False.
        drop_path_rate (float): Stochastic depth, increasing linearly over the blocks.
            Defaults to 0.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        out_norm_cfg (dict, optional): Norm of each returned level. Defaults to None.
        init_cfg (dict | list, optional): e.g. ``dict(type='Pretrained', checkpoint=PATH)``.
            Defaults to None.
        check_finite (bool): See :class:`~mmeformer.models.EfficientFormer`. Defaults to False.
        channels_last (bool): See :class:`~mmeformer.models.EfficientFormer`. Defaults to True.
        cache_biases (bool): See :class:`~mmeformer.models.EfficientFormer`. Defaults to True.

    Example:
        >>> import torch
        >>> from mmeformer.models import EfficientViT
        >>> model = EfficientViT('m4').eval()
        >>> for level in model(torch.rand(1, 3, 224, 224)):
        ...     print(tuple(level.shape))
        (1, 128, 14, 14)
        (1, 256, 7, 7)
        (1, 384, 4, 4)
    """
    family = 'EfficientViT'
    arch_settings = EFFICIENTVIT_ARCHS
    key_dim, mlp_ratio = 16, 2
    stem_divisor = 8

    def __init__(self,
                 arch: Union[str, dict] = 'm4',
                 in_channels: int = 3,
                 window_size: int = 7,
                 out_indices: Sequence[int] = (0, 1, 2),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.,
                 with_cp: bool = False,
                 out_norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 check_finite: bool = False,
                 channels_last: bool = True,
                 cache_biases: bool = True):
        super().__init__(in_channels, out_indices, frozen_stages, norm_eval, with_cp, init_cfg,
                         check_finite, channels_last)
        self.arch = self._resolve_arch(arch)
        widths, depths = self.arch['widths'], self.arch['depths']
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f'window_size must be a positive int, got {window_size!r}')
        self.window_size = window_size
        w0 = widths[0]
        relu = partial(nn.ReLU, inplace=True)
        self.patch_embed = ConvActSequential(OrderedDict(
            conv1=ConvNorm(in_channels, w0 // 8, 3, stride=2, bias=False), act1=relu(),
            conv2=ConvNorm(w0 // 8, w0 // 4, 3, stride=2, bias=False), act2=relu(),
            conv3=ConvNorm(w0 // 4, w0 // 2, 3, stride=2, bias=False), act3=relu(),
            conv4=ConvNorm(w0 // 2, w0, 3, stride=2, bias=False)))
        rates = stochastic_depth_rates(drop_path_rate, depths)
        stages = []
        for i, (width, depth, heads) in enumerate(zip(widths, depths, self.arch['num_heads'])):
            downsample = None
            if i > 0:
                downsample = EfficientViTDownsample(widths[i - 1], width, self.mlp_ratio,
                                                    rates[i][0])
            blocks = [
                EfficientViTBlock(width, heads, self.key_dim, window_size, self.arch['kernels'],
                                  self.mlp_ratio, rates[i][j]) for j in range(depth)
            ]
            stages.append(Stage(downsample, blocks, with_cp))
        self.stages = nn.ModuleList(stages)
        self._setup_outputs(widths, [16, 32, 64], out_norm_cfg)
        self.cache_biases = cache_biases

    def _arch_problems(self, arch: dict) -> List[str]:
        problems = super()._arch_problems(arch)
        for width, heads in zip(arch['widths'], arch['num_heads']):
            if width % heads:
                problems.append(f'width {width} is not divisible by its {heads} heads')
        if len(arch['kernels']) < max(arch['num_heads']):
            problems.append(f"kernels gives {len(arch['kernels'])} q kernels (one per head "
                            f"index) for up to {max(arch['num_heads'])} heads")
        if any(k % 2 == 0 for k in arch['kernels']):
            problems.append(f"kernels must be odd (same-size depthwise convs), got "
                            f"{arch['kernels']}")
        return problems

    @property
    def stem(self) -> nn.Module:
        return self.patch_embed
