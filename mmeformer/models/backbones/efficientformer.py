"""EfficientFormer (V1) backbone.

Paper: "EfficientFormer: Vision Transformers at MobileNet Speed", Yanyu Li et al., NeurIPS 2022,
arXiv:2206.01191. Four stages at strides 4/8/16/32: PoolFormer-style 4D blocks, then multi-head
self-attention blocks on the tokens of the last stage.

Released weights: ImageNet-1k classifiers (L1 / L3 / L7) and the dense COCO Mask R-CNN (mmdet
2.x) and ADE20K Semantic FPN (mmseg 0.x) models of snap-research/EfficientFormer; the latter use
``bias_mode='official'``. Parameter names follow timm's layout (``stem``,
``stages.i.downsample``, ``stages.i.blocks.j``, ``ls1.gamma``), so timm weights load as they
are; the original releases are converted by :mod:`mmeformer.checkpoint`. The output norms
(``out_norms.i``) are those of the dense backbone.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...registry import MODELS
from ..archs import EFFICIENTFORMER_ARCHS
from ..layers import (GELU, FoldsBatchNorm, LayerScale, RelativeBiasAttention,
                      drop_path_or_identity, linear, records_grad, run_blocks, scaled_lerp,
                      scaled_residual, softmax_attention, stochastic_depth_rates)
from .base import MobileBackbone


class Attention(RelativeBiasAttention):
    """Multi-head self-attention on (B, N, C) tokens with a relative position bias."""

    def __init__(self, dim: int, num_heads: int, key_dim: int, attn_ratio: float,
                 table_size: int, bias_mode: str, ref_grid: Optional[int]):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self._init_bias_table(num_heads, table_size, bias_mode=bias_mode, ref_key_size=ref_grid)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        # Per head the projection is laid out as [q | k | v].
        qkv = linear(self.qkv, x).view(b, n, self.num_heads, -1).transpose(1, 2)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
        bias = self.attention_bias(hw, hw).to(q.dtype)
        x = softmax_attention(q, k, v, self.key_dim ** -0.5, bias)
        return linear(self.proj, x.transpose(1, 2).reshape(b, n, -1))


class PoolMlp(FoldsBatchNorm):
    """1x1 conv MLP with BatchNorm, on NCHW maps."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = GELU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self._conv_bn(self.fc2, self.norm2, self._conv_bn(self.fc1, self.norm1, x, self.act))


class TokenMlp(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GELU(inplace=True)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return linear(self.fc2, linear(self.fc1, x, act=self.act))


def pool3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 average over the in-bounds neighbours (stride 1, the padding not counted).

    While autograd records on a CUDA channels-last map, the pool runs on a contiguous NCHW copy:
    torch's channels-last CUDA backward of a padded ``avg_pool2d`` returns wrong input gradients
    without an error (pytorch/pytorch#188344; found by tools/device_check.py, see
    docs/benchmarks.md)."""
    if (x.device.type == 'cuda' and records_grad(x) and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        pooled = F.avg_pool2d(x.contiguous(), 3, 1, 1, count_include_pad=False)
        return pooled.contiguous(memory_format=torch.channels_last)
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class PoolBlock(nn.Module):
    """4D block: ``x + ls1 * (avgpool3x3(x) - x)``, then ``x + ls2 * mlp(x)``."""

    def __init__(self, dim: int, mlp_ratio: float, layer_scale_init: float, drop_path: float):
        super().__init__()
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.mlp = PoolMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        x = scaled_lerp(x, pool3x3(x), self.ls1, self.drop_path)
        return scaled_residual(x, self.mlp(x), self.ls2, self.drop_path)


class AttentionBlock(nn.Module):
    """3D (token) block: pre-LN attention and pre-LN MLP, each with a layer scale."""

    def __init__(self, dim: int, mlp_ratio: float, layer_scale_init: float, drop_path: float,
                 attn_cfg: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, **attn_cfg)
        self.ls1 = LayerScale(dim, layer_scale_init, channel_dim=-1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init, channel_dim=-1)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = scaled_residual(x, self.token_mixer(self.norm1(x), hw), self.ls1, self.drop_path)
        return scaled_residual(x, self.mlp(self.norm2(x)), self.ls2, self.drop_path)


class MapToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C). Sits where the original code has its ``Flat`` module, so that
    block indices (and checkpoint keys) stay those of the original and timm."""

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Downsample(FoldsBatchNorm):

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self._conv_bn(self.conv, self.norm, x)


class Stem(FoldsBatchNorm):
    """2 x [conv3x3 stride 2, BN, ReLU]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, half, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, out_channels, 3, 2, 1)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self._conv_bn(self.conv1, self.norm1, x, self.act1)
        return self._conv_bn(self.conv2, self.norm2, x, self.act2)


class EfficientFormerStage(nn.Module):

    def __init__(self, in_channels: int, dim: int, depth: int, num_vit: int, mlp_ratio: float,
                 layer_scale_init: float, drop_paths: Sequence[float], attn_cfg: dict,
                 with_cp: bool, downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_channels, dim) if downsample else nn.Identity()
        blocks = []
        for j in range(depth):
            if num_vit and j == depth - num_vit:
                blocks.append(MapToTokens())
            if j >= depth - num_vit:
                blocks.append(AttentionBlock(dim, mlp_ratio, layer_scale_init, drop_paths[j],
                                             attn_cfg))
            else:
                blocks.append(PoolBlock(dim, mlp_ratio, layer_scale_init, drop_paths[j]))
        self.blocks = nn.Sequential(*blocks)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b, c, h, w = x.shape
        x = run_blocks(self.blocks, x, self.with_cp, (h, w))
        if x.dim() == 3:  # tokens back to a (channels-last) NCHW map, without a copy
            x = x.view(b, h, w, c).permute(0, 3, 1, 2)
        return x


@MODELS.register_module()
class EfficientFormer(MobileBackbone):
    """EfficientFormer (V1) backbone: four levels at strides 4, 8, 16 and 32.

    Args:
        arch (str | dict): ``'l1'``, ``'l3'``, ``'l7'`` (see
            :data:`mmeformer.models.archs.EFFICIENTFORMER_ARCHS`) or a dict with ``depths``,
            ``widths`` and ``num_vit`` (attention blocks at the end of the last stage).
            Defaults to ``'l1'``.
        in_channels (int): Image channels. Defaults to 3.
        bias_mode (str): ``'table'`` resizes the 7x7 ImageNet bias table to the actual token
            grid (geometrically correct at every size); ``'official'`` reproduces the
            snap-research dense backbone (``*_seg`` tables of a reference grid of
            ``ceil(bias_img_size / 32)``, the bias *matrix* resized bicubically), needed only for
            the released COCO / ADE20K weights. Defaults to ``'table'``.
        bias_img_size (int, optional): Reference image size of ``'official'`` mode: 800 for the
            released COCO weights, 512 for the ADE20K ones. Defaults to None.
        out_indices (Sequence[int]): Levels to return (0..3, negative from the end).
            Defaults to ``(0, 1, 2, 3)``.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k the stem and the first k
            stages (eval mode, no gradients). Defaults to -1.
        norm_eval (bool): Keep every BatchNorm in eval mode while training. Defaults to False.
        drop_path_rate (float): Stochastic depth, increasing linearly over the blocks.
            Defaults to 0.
        layer_scale_init_value (float): Initial layer scales. Defaults to 1e-5.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        out_norm_cfg (dict, optional): Norm of each returned level; the dense release uses
            ``dict(type='GN', num_groups=1)`` (the default), None for none.
        init_cfg (dict | list, optional): e.g. ``dict(type='Pretrained', checkpoint=PATH)``;
            any supported checkpoint layout is converted and loaded strictly.
            Defaults to None.
        check_finite (bool): Raise a ``ValueError`` on a NaN / Inf input (naming the batch
            samples) and on a non-finite output level; costs a device sync per forward.
            Defaults to False.
        channels_last (bool): Compute in channels-last memory layout (the returned levels are
            contiguous NCHW): faster on CPU and for tensor cores, numerically the same.
            Defaults to True.
        cache_biases (bool): In inference, keep each attention module's bias for the recent
            input sizes (the newest always, older ones within 32 MiB per module) instead of
            computing it in every forward: faster, at the cost of the memory they hold.
            Training never caches. Defaults to True.

    Example:
        >>> import torch
        >>> from mmeformer.models import EfficientFormer
        >>> model = EfficientFormer('l1').eval()
        >>> for level in model(torch.rand(1, 3, 224, 224)):
        ...     print(tuple(level.shape))
        (1, 48, 56, 56)
        (1, 96, 28, 28)
        (1, 224, 14, 14)
        (1, 448, 7, 7)
    """
    family = 'EfficientFormer'
    arch_settings = EFFICIENTFORMER_ARCHS
    num_heads, key_dim, attn_ratio, mlp_ratio, table_size = 8, 32, 4, 4, 7
    stem_divisor = 2

    def __init__(self,
                 arch: Union[str, dict] = 'l1',
                 in_channels: int = 3,
                 bias_mode: str = 'table',
                 bias_img_size: Optional[int] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-5,
                 with_cp: bool = False,
                 out_norm_cfg: Optional[dict] = dict(type='GN', num_groups=1),
                 init_cfg: Optional[dict] = None,
                 check_finite: bool = False,
                 channels_last: bool = True,
                 cache_biases: bool = True):
        super().__init__(in_channels, out_indices, frozen_stages, norm_eval, with_cp, init_cfg,
                         check_finite, channels_last)
        self.arch = self._resolve_arch(arch)
        depths, widths = self.arch['depths'], self.arch['widths']
        self._set_bias_mode(bias_mode, bias_img_size)
        attn_cfg = dict(
            num_heads=self.num_heads, key_dim=self.key_dim, attn_ratio=self.attn_ratio,
            table_size=self.table_size, bias_mode=bias_mode,
            ref_grid=math.ceil(bias_img_size / 32) if bias_mode == 'official' else None)

        self.stem = Stem(in_channels, widths[0])
        rates = stochastic_depth_rates(drop_path_rate, depths)
        stages, prev = [], widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            num_vit = self.arch['num_vit'] if i == len(depths) - 1 else 0
            stages.append(EfficientFormerStage(prev, width, depth, num_vit, self.mlp_ratio,
                                               layer_scale_init_value, rates[i], attn_cfg,
                                               with_cp, downsample=i > 0))
            prev = width
        self.stages = nn.ModuleList(stages)
        self._init_default_weights()
        self._setup_outputs(widths, [4, 8, 16, 32], out_norm_cfg)
        self.cache_biases = cache_biases

    def _arch_problems(self, arch: dict) -> List[str]:
        problems = super()._arch_problems(arch)
        if arch['num_vit'] > arch['depths'][-1]:
            problems.append(f"num_vit={arch['num_vit']} exceeds the last stage's depth "
                            f"{arch['depths'][-1]}")
        return problems

    def _init_default_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=.02)
                nn.init.zeros_(module.bias)
