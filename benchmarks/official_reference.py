"""A plain re-implementation of the official dense EfficientFormer V1 / V2 backbones.

**Not for use in models.** This module exists for two jobs:

* the stand-in for the official code in speed comparisons at detection / segmentation sizes
  (it computes the way the official dense backbones do, including their costs), and
* an independent parity reference for mmeformer's ``bias_mode='official'``.

Papers: EfficientFormer, "Vision Transformers at MobileNet Speed", Li et al., NeurIPS 2022
(arXiv:2206.01191); EfficientFormerV2, "Rethinking Vision Transformers for MobileNet Size and
Speed", Li et al., ICCV 2023 (arXiv:2212.08059).

It was written from a written specification of the official dense backbones (the facts in
docs/checkpoints.md: module layout, bias recipe, reference grids) and the key tables of the
released dense checkpoints (tests/fixtures/checkpoints), not from the snap-research code. What it
keeps from the official dense backbones on purpose:

* module names: ``model.state_dict()`` has exactly the keys, shapes and dtypes of the
  ``backbone.*`` part of the released COCO (``bias_img_size=800``) / ADE20K (512) checkpoints,
  including the 224-size placeholders ``attention_biases`` / ``attention_bias_idxs`` (unused)
  and the ``attention_biases_seg`` tables with their ``attention_bias_idxs_seg`` index buffers;
* NCHW tensors, plain ``nn.Conv2d`` + ``nn.BatchNorm2d`` pairs, talking heads as
  ``nn.Conv2d(heads, heads, 1)`` applied to the (B, heads, Nq, Nk) attention map, ``nn.Softmax``;
* on every forward, with no cache: ``bias = attention_biases_seg[:, attention_bias_idxs_seg]``
  (the full reference matrix) followed by ``F.interpolate(bias[None], size=(Nq, Nk),
  mode='bicubic', align_corners=False)``;
* V1: token mixer ``avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x``; ``GroupNorm(1, C)``
  output norms ``norm0/2/4/6``; attention blocks on (B, N, C) tokens after a ``Flat`` placeholder;
* V2: stage-3 attention through a stride-2 depthwise conv, ``nn.Upsample(scale_factor=2,
  mode='bilinear')`` before its projection; 3->4 downsampling = conv path + attention path.

Conventions of the released weights that docs/checkpoints.md does not spell out: V1's ``qkv``
output is laid out per head as [q | k | v] (``reshape(B, N, heads, -1)`` then split); V2's q / k / v
channels are grouped head-major (``reshape(B, heads, -1, N)``); ``v_local`` is added to the
attention output at the attention's own resolution, i.e. before the x2 upsampling.

Supported inputs. V1: any size of at least 32x32. V2 keeps the official arithmetic: its map at
stride 16 has ``ceil(H / 16) x ceil(W / 16)`` cells, and the official code needs both to be even
(it reshapes to ``H16 // 2`` while its stride-2 convs produce ``ceil(H16 / 2)``; the official code
crashes there, this one raises ``ValueError``). So V2 runs for 512x512 (32x32 at stride 16),
800x1344 (50x84), 800x1333 (50x84), 800x1216, 1344x800, 224x224, 256x256 and 128x192, and refuses
e.g. 400x400 (25x25), 240x240 (15x15) or 800x1200 (50x75).

Eval only in spirit: there is no drop path and BN follows the usual ``train()`` / ``eval()``.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['build_official_reference', 'first_appearance_bias_index', 'OfficialEfficientFormer',
           'OfficialEfficientFormerV2']

# Its own arch tables, not mmeformer.models.archs: a parity reference that read mmeformer's
# tables would share any error in them (tests/test_official_reference.py checks these against
# the key tables of the released files).
V1_ARCHS = {
    'l1': dict(depths=[3, 2, 6, 4], widths=[48, 96, 224, 448], num_vit=1),
    'l3': dict(depths=[4, 4, 12, 6], widths=[64, 128, 320, 512], num_vit=4),
    'l7': dict(depths=[6, 6, 18, 8], widths=[96, 192, 384, 768], num_vit=8),
}

# V2: per-block MLP expansion ratios read off the ``mlp.fc1`` shapes of the released files.
V2_ARCHS = {
    's0': dict(depths=[2, 2, 6, 4], widths=[32, 48, 96, 176], num_vit=2,
               mlp_ratios=[[4, 4], [4, 4], [4, 3, 3, 3, 4, 4], [4, 3, 3, 4]]),
    's1': dict(depths=[3, 3, 9, 6], widths=[32, 48, 120, 224], num_vit=2,
               mlp_ratios=[[4, 4, 4], [4, 4, 4], [4, 4, 3, 3, 3, 3, 4, 4, 4],
                           [4, 4, 3, 3, 4, 4]]),
    's2': dict(depths=[4, 4, 12, 8], widths=[32, 64, 144, 288], num_vit=4,
               mlp_ratios=[[4, 4, 4, 4], [4, 4, 4, 4], [4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
                           [4, 4, 3, 3, 3, 3, 4, 4]]),
    'l': dict(depths=[5, 5, 15, 10], widths=[40, 80, 192, 384], num_vit=6,
              mlp_ratios=[[4] * 5, [4] * 5, [4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
                          [4, 4, 4, 3, 3, 3, 3, 4, 4, 4]]),
}

NUM_HEADS = 8
CLS_SIZE = 224  # the placeholder buffers have the shapes of the 224-px classification model


def first_appearance_bias_index(query_grid: int, key_grid: int, step: int = 1) -> torch.Tensor:
    """(Nq, Nk) int64 index into a bias table, square grids enumerated row-major.

    The offset between query point p1 and key point p2 is ``(|p1y * step - p2y|,
    |p1x * step - p2x|)``; offsets get consecutive ids in the order in which they first appear,
    with the query points as the outer loop and the key points as the inner loop. Returns a new
    CPU tensor (the work is cached per grid).
    """
    return _first_appearance_bias_index(query_grid, key_grid, step).clone()


@functools.lru_cache(maxsize=None)
def _first_appearance_bias_index(query_grid: int, key_grid: int, step: int) -> torch.Tensor:
    cpu = torch.device('cpu')  # also when built under ``with torch.device('meta')``
    q = torch.arange(query_grid, device=cpu)
    k = torch.arange(key_grid, device=cpu)
    qy, qx = q.repeat_interleave(query_grid), q.repeat(query_grid)  # row-major points
    ky, kx = k.repeat_interleave(key_grid), k.repeat(key_grid)
    dy = (qy[:, None] * step - ky[None, :]).abs()
    dx = (qx[:, None] * step - kx[None, :]).abs()
    code = (dy * (dx.max() + 1) + dx).reshape(-1)  # loop order: query outer, key inner
    values, inverse = torch.unique(code, return_inverse=True)
    first_seen = torch.full((values.numel(), ), code.numel(), dtype=torch.long, device=cpu)
    first_seen = first_seen.scatter_reduce(0, inverse, torch.arange(code.numel(), device=cpu),
                                           reduce='amin')
    rank = torch.empty_like(first_seen)
    rank[first_seen.argsort()] = torch.arange(values.numel(), device=cpu)
    return rank[inverse].reshape(query_grid * query_grid, key_grid * key_grid)


class DenseBias(nn.Module):
    """Base of the attention modules: the official dense bias buffers and the per-forward bias.

    Registers (in the official order) the learnable ``attention_biases_seg`` (heads, R * R)
    table of the reference grid, the unused 224-size ``attention_biases`` placeholder buffer
    (zeros) with its ``attention_bias_idxs``, and ``attention_bias_idxs_seg``.
    """

    def _register_biases(self, heads: int, cls_grid: int, seg_grid: int, step: int = 1):
        cls_query = math.ceil(cls_grid / step)
        seg_query = math.ceil(seg_grid / step)
        self.attention_biases_seg = nn.Parameter(torch.zeros(heads, seg_grid * seg_grid))
        self.register_buffer('attention_biases', torch.zeros(heads, cls_grid * cls_grid))
        self.register_buffer('attention_bias_idxs', first_appearance_bias_index(
            cls_query, cls_grid, math.ceil(cls_grid / cls_query)))
        self.register_buffer('attention_bias_idxs_seg', first_appearance_bias_index(
            seg_query, seg_grid, math.ceil(seg_grid / seg_query)))

    def dense_bias(self, n_q: int, n_k: int) -> torch.Tensor:
        """Gather the full reference matrix, then resize the matrix to (n_q, n_k)."""
        bias = self.attention_biases_seg[:, self.attention_bias_idxs_seg]
        return F.interpolate(bias[None], size=(n_q, n_k), mode='bicubic', align_corners=False)


class _DenseBackbone(nn.Module):
    """What both dense backbones share: the stem (``patch_embed``), the ``network`` list of
    stages interleaved with downsamplings, and the returned levels 0, 2, 4, 6."""

    out_indices = (0, 2, 4, 6)

    def _build(self, widths, depths, act: type, make_block, make_embedding):
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, widths[0] // 2, 3, 2, 1), nn.BatchNorm2d(widths[0] // 2), act(),
            nn.Conv2d(widths[0] // 2, widths[0], 3, 2, 1), nn.BatchNorm2d(widths[0]), act())
        network = []
        for i, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                blocks.extend(make_block(i, j))
            network.append(nn.Sequential(*blocks))
            if i < len(depths) - 1:
                network.append(make_embedding(i))
        self.network = nn.ModuleList(network)

    def _output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x) -> Tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        outs = []
        for idx, block in enumerate(self.network):
            b, c, h, w = x.shape
            x = block(x)
            if x.dim() == 3:  # tokens after V1's Flat placeholder: back to NCHW
                x = x.transpose(1, 2).reshape(b, c, h, w)
            if idx in self.out_indices:
                outs.append(self._output(idx, x))
        return tuple(outs)


# ------------------------------------------------------------------------------------------------
# EfficientFormer V1
# ------------------------------------------------------------------------------------------------
class V1Embedding(nn.Module):
    """Downsampling between stages: conv3x3 stride 2 + BN."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class V1Pooling(nn.Module):

    def forward(self, x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x


class V1ConvMlp(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        x = self.act(self.norm1(self.fc1(x)))
        return self.norm2(self.fc2(x))


class V1LinearMlp(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class V1Meta4D(nn.Module):

    def __init__(self, dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.token_mixer = V1Pooling()
        self.mlp = V1ConvMlp(dim, dim * mlp_ratio)
        self.layer_scale_1 = nn.Parameter(1e-5 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.token_mixer(x)
        return x + self.layer_scale_2[:, None, None] * self.mlp(x)


class V1Flat(nn.Module):
    """(B, C, H, W) -> (B, H * W, C); a placeholder that takes one index of the block list."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class V1Attention(DenseBias):
    """Multi-head self-attention on (B, N, C) tokens; qkv laid out per head as [q | k | v]."""

    def __init__(self, dim: int, seg_grid: int, key_dim: int = 32, num_heads: int = NUM_HEADS,
                 attn_ratio: int = 4):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.d = attn_ratio * key_dim
        self.scale = key_dim ** -0.5
        self._register_biases(num_heads, CLS_SIZE // 32, seg_grid)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.d))
        self.proj = nn.Linear(num_heads * self.d, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.dense_bias(n, n)
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.d)
        return self.proj(x)


class V1Meta3D(nn.Module):

    def __init__(self, dim: int, seg_grid: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = V1Attention(dim, seg_grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = V1LinearMlp(dim, dim * mlp_ratio)
        self.layer_scale_1 = nn.Parameter(1e-5 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2 * self.mlp(self.norm2(x))


class OfficialEfficientFormer(_DenseBackbone):
    """Dense EfficientFormer V1 backbone (``network.0..6``, output norms ``norm0/2/4/6``)."""

    def __init__(self, arch: str, bias_img_size: int):
        super().__init__()
        cfg = V1_ARCHS[arch]
        depths, widths, num_vit = cfg['depths'], cfg['widths'], cfg['num_vit']
        seg_grid = math.ceil(bias_img_size / 32)

        def make_block(i, j):
            if i < 3 or j < depths[i] - num_vit:
                return [V1Meta4D(widths[i])]
            flat = [V1Flat()] if j == depths[i] - num_vit else []
            return flat + [V1Meta3D(widths[i], seg_grid)]

        self._build(widths, depths, nn.ReLU, make_block,
                    lambda i: V1Embedding(widths[i], widths[i + 1]))
        for idx, width in zip(self.out_indices, widths):
            self.add_module(f'norm{idx}', nn.GroupNorm(1, width))

    def _output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f'norm{index}')(x)


# ------------------------------------------------------------------------------------------------
# EfficientFormer V2
# ------------------------------------------------------------------------------------------------
def _conv_bn(in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1,
             groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups),
        nn.BatchNorm2d(out_chans))


def _check_even(h: int, w: int, where: str):
    if h % 2 or w % 2:
        raise ValueError(
            f'{where}: the official dense EfficientFormerV2 needs an even stride-16 map, got '
            f'{h}x{w} (it reshapes to H // 2 while its stride-2 conv gives ceil(H / 2)); use '
            f'inputs with ceil(H / 16) and ceil(W / 16) even, e.g. 512x512 or 800x1344')


def _heads_first(t: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """(B, heads * c, H, W) -> (B, heads, N, c)."""
    return t.flatten(2).reshape(t.shape[0], heads, -1, n).permute(0, 1, 3, 2)


class V2Mlp(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.mid = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.mid_norm = nn.BatchNorm2d(hidden)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.mid_norm(self.mid(x)))
        return self.norm2(self.fc2(x))


class V2Attention4D(DenseBias):
    """4D attention with talking heads; ``stride=2`` attends at half resolution."""

    def __init__(self, dim: int, seg_grid: int, stride: int = 1, key_dim: int = 32,
                 num_heads: int = NUM_HEADS, attn_ratio: int = 4):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim ** -0.5
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        nh_kd = key_dim * num_heads
        # Placeholder at 224: the stage-3 (stride 2) attention works on 7x7, as does stage 4.
        self._register_biases(num_heads, CLS_SIZE // 32, seg_grid)
        if stride == 2:
            self.stride_conv = _conv_bn(dim, dim, 3, stride=2, groups=dim)
            self.upsample = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False)
        else:
            self.stride_conv = None
            self.upsample = None
        self.q = _conv_bn(dim, nh_kd)
        self.k = _conv_bn(dim, nh_kd)
        self.v = _conv_bn(dim, self.dh)
        self.v_local = _conv_bn(self.dh, self.dh, 3, groups=self.dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Sequential(nn.GELU(), nn.Conv2d(self.dh, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, x):
        b, _, h, w = x.shape
        if self.stride_conv is not None:
            _check_even(h, w, 'stage-3 attention')
            x = self.stride_conv(x)
            h, w = h // 2, w // 2
        n = h * w
        q = _heads_first(self.q(x), self.num_heads, n)
        k = _heads_first(self.k(x), self.num_heads, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = _heads_first(v, self.num_heads, n)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.dense_bias(n, n)
        attn = self.talking_head1(attn)
        attn = self.softmax(attn)
        attn = self.talking_head2(attn)
        out = (attn @ v).transpose(2, 3).reshape(b, self.dh, h, w) + v_local
        if self.upsample is not None:
            out = self.upsample(out)
        return self.proj(out)


class V2LGQuery(nn.Module):
    """Query of the attention downsampling: dw3x3 stride-2 conv + avgpool(1, 2), then 1x1 + BN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Sequential(nn.Conv2d(in_dim, in_dim, 3, 2, 1, groups=in_dim))
        self.proj = _conv_bn(in_dim, out_dim)

    def forward(self, x):
        return self.proj(self.local(x) + self.pool(x))


class V2Attention4DDownsample(DenseBias):
    """Attention path of the 3->4 downsampling: queries at half resolution, keys at full."""

    def __init__(self, dim: int, out_dim: int, seg_key_grid: int, key_dim: int = 16,
                 num_heads: int = NUM_HEADS, attn_ratio: int = 4):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim ** -0.5
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        nh_kd = key_dim * num_heads
        self._register_biases(num_heads, CLS_SIZE // 16, seg_key_grid, step=2)
        self.q = V2LGQuery(dim, nh_kd)
        self.k = _conv_bn(dim, nh_kd)
        self.v = _conv_bn(dim, self.dh)
        self.v_local = _conv_bn(self.dh, self.dh, 3, stride=2, groups=self.dh)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Sequential(nn.GELU(), nn.Conv2d(self.dh, out_dim, 1),
                                  nn.BatchNorm2d(out_dim))

    def forward(self, x):
        b, _, h, w = x.shape
        _check_even(h, w, 'attention downsampling')
        h2, w2 = h // 2, w // 2
        n, n2 = h * w, h2 * w2
        q = _heads_first(self.q(x), self.num_heads, n2)
        k = _heads_first(self.k(x), self.num_heads, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = _heads_first(v, self.num_heads, n)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.dense_bias(n2, n)
        attn = self.softmax(attn)
        out = (attn @ v).transpose(2, 3).reshape(b, self.dh, h2, w2) + v_local
        return self.proj(out)


class V2Embedding(nn.Module):
    """conv3x3 stride 2 + BN (``proj`` / ``norm``); with ``seg_key_grid`` the 3->4 variant
    (``attn`` + ``conv`` / ``bn``, summed)."""

    def __init__(self, in_chans: int, embed_dim: int, seg_key_grid: Optional[int] = None):
        super().__init__()
        self.asub = seg_key_grid is not None
        if self.asub:
            self.attn = V2Attention4DDownsample(in_chans, embed_dim, seg_key_grid)
            self.conv = nn.Conv2d(in_chans, embed_dim, 3, 2, 1)
            self.bn = nn.BatchNorm2d(embed_dim)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, 3, 2, 1)
            self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        if self.asub:
            return self.attn(x) + self.bn(self.conv(x))
        return self.norm(self.proj(x))


class V2FFN(nn.Module):

    def __init__(self, dim: int, mlp_ratio: int):
        super().__init__()
        self.mlp = V2Mlp(dim, dim * mlp_ratio)
        self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x + self.layer_scale_2 * self.mlp(x)


class V2AttnFFN(nn.Module):

    def __init__(self, dim: int, mlp_ratio: int, seg_grid: int, stride: int):
        super().__init__()
        self.token_mixer = V2Attention4D(dim, seg_grid, stride=stride)
        self.mlp = V2Mlp(dim, dim * mlp_ratio)
        self.layer_scale_1 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(x)
        return x + self.layer_scale_2 * self.mlp(x)


class OfficialEfficientFormerV2(_DenseBackbone):
    """Dense EfficientFormerV2 backbone (``network.0..6``, no output norms)."""

    def __init__(self, arch: str, bias_img_size: int):
        super().__init__()
        cfg = V2_ARCHS[arch]
        depths, widths, num_vit = cfg['depths'], cfg['widths'], cfg['num_vit']
        grid16 = math.ceil(bias_img_size / 16)
        seg_grids = {2: math.ceil(grid16 / 2), 3: math.ceil(bias_img_size / 32)}

        def make_block(i, j):
            ratio = cfg['mlp_ratios'][i][j]
            if i >= 2 and j >= depths[i] - num_vit:
                return [V2AttnFFN(widths[i], ratio, seg_grids[i], stride=2 if i == 2 else 1)]
            return [V2FFN(widths[i], ratio)]

        self._build(widths, depths, nn.GELU, make_block,
                    lambda i: V2Embedding(widths[i], widths[i + 1],
                                          seg_key_grid=grid16 if i == 2 else None))


def build_official_reference(family: str, arch: str, bias_img_size: int) -> nn.Module:
    """The dense backbone of ``family`` ('EfficientFormer' or 'EfficientFormerV2') and ``arch``
    with bias tables for ``bias_img_size`` (800: COCO release, 512: ADE20K release).

    ``forward(x)`` returns the four NCHW maps at strides 4, 8, 16, 32.
    """
    builders = {'EfficientFormer': (OfficialEfficientFormer, V1_ARCHS),
                'EfficientFormerV2': (OfficialEfficientFormerV2, V2_ARCHS)}
    if family not in builders:
        raise ValueError(f'family must be one of {sorted(builders)}, got {family!r}')
    cls, archs = builders[family]
    if arch not in archs:
        raise ValueError(f'unknown {family} arch {arch!r}; choose one of {sorted(archs)}')
    return cls(arch, bias_img_size)
