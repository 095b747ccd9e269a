"""EfficientFormerV2 backbone.

Paper: "Rethinking Vision Transformers for MobileNet Size and Speed", Yanyu Li et al., ICCV 2023,
arXiv:2212.08059. Four stages at strides 4/8/16/32 of conv FFN blocks; the last blocks of
stages 3 and 4 add 4D multi-head attention with talking heads (stage 3 attends at 1/32 through a
strided depthwise conv and upsamples back), and the 3->4 downsampling adds an attention path.

Released weights: ImageNet-1k classifiers (S0 / S1 / S2 / L) and the dense COCO Mask R-CNN and
ADE20K Semantic FPN models of snap-research/EfficientFormer (``bias_mode='official'``).
Parameter names follow timm's layout (``stem.conv1.conv``, ``stages.i.blocks.j.token_mixer``,
``stages.3.downsample.attn``) so timm weights load as they are; the original releases are
converted by :mod:`mmeformer.checkpoint`.
"""
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...registry import MODELS
from ..archs import EFFICIENTFORMERV2_ARCHS
from ..layers import (GELU, ConvActSequential, ConvNorm, LayerScale, RelativeBiasAttention,
                      Stage, drop_path_or_identity, fast_paths_enabled, query_chunks, query_rows,
                      scaled_residual, softmax_attention, softmax_last,
                      stochastic_depth_rates)
from .base import MobileBackbone


def _heads_first(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, heads * c, H, W) -> (B, heads, H * W, c); a view for channels-last maps."""
    b = t.shape[0]
    return t.flatten(2).view(b, num_heads, -1, t.shape[-2] * t.shape[-1]).transpose(-2, -1)


def _heads_to_map(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, heads, H * W, c) -> (B, heads * c, H, W), laid out channels-last (one copy)."""
    b = t.shape[0]
    return t.transpose(1, 2).reshape(b, size[0], size[1], -1).permute(0, 3, 1, 2)


def _mix_heads(weight: torch.Tensor, maps: torch.Tensor,
               add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 1x1 conv's (heads x heads) ``weight`` applied over the head dim of (B, heads, Nq, Nk)
    maps as one matmul (a 1x1 conv with 8 channels on such maps is several times slower), plus
    ``add`` (broadcastable to (heads, Nq, Nk)) in the same pass when given."""
    b, heads = maps.shape[:2]
    # bmm, not matmul: matmul would fold the batch by copying a transpose of the maps.
    weight = weight.view(1, heads, heads).to(maps.dtype).expand(b, heads, heads)
    if add is None:
        return torch.bmm(weight, maps.flatten(2)).view(maps.shape)
    return torch.baddbmm(add.reshape(1, heads, -1), weight, maps.flatten(2)).view(maps.shape)


class Attention4D(RelativeBiasAttention):
    """Attention on NCHW maps with talking heads; optionally attends at half resolution.

    Both talking heads are linear over heads, which allows two rewrites (same outputs):
    before the softmax, ``th1(s * q k^T + B) = (s * W1) q k^T + (W1 B + b1)``, so in eval the
    bias is cached after talking head 1; after it, ``(W2 P + b2) v = (W2 P) v + b2 * sum_n v``,
    so the bias of talking head 2 never touches the (Nq, Nk) map.
    """

    def __init__(self, dim: int, stride: int, bias_mode: str, ref_grid: Optional[int],
                 num_heads: int = 8, key_dim: int = 32, attn_ratio: int = 4, table_size: int = 7):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim ** -0.5
        self.val_dim = attn_ratio * key_dim
        inner = self.val_dim * num_heads
        self.stride_conv = (ConvNorm(dim, dim, 3, stride=2, groups=dim) if stride == 2 else None)
        self.q = ConvNorm(dim, key_dim * num_heads)
        self.k = ConvNorm(dim, key_dim * num_heads)
        self.v = ConvNorm(dim, inner)
        self.v_local = ConvNorm(inner, inner, 3, groups=inner)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = GELU(inplace=True)
        self.proj = ConvNorm(inner, dim)
        self._init_bias_table(num_heads, table_size, bias_mode=bias_mode, ref_key_size=ref_grid)

    def _bias_inputs(self):
        return (self.attention_biases, self.talking_head1.weight, self.talking_head1.bias)

    def _compute_bias(self, query_size, key_size) -> torch.Tensor:
        """The bias after talking head 1: ``W1 B + b1`` (applied to the table, before its
        expansion)."""
        return self._relative_bias(query_size, key_size, self._talking_head1)

    def _talking_head1(self, per_head: torch.Tensor) -> torch.Tensor:
        """Talking head 1 on a (heads, ...) tensor."""
        mixed = _mix_heads(self.talking_head1.weight, per_head[None])[0]
        return mixed + self.talking_head1.bias.view((-1, ) + (1, ) * (per_head.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full_size = x.shape[-2:]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2:]
        # Contiguous per-head operands: bmm on strided head views is slower than the copies
        # (see softmax_attention).
        q = _heads_first(self.q(x), self.num_heads).contiguous()
        k = _heads_first(self.k(x), self.num_heads).contiguous()
        v = self.v(x)
        v_local = self.v_local(v)
        v = _heads_first(v, self.num_heads).contiguous()
        folded = self.bias_is_constant() and fast_paths_enabled()
        if folded:  # eval: talking head 1 and the scale already applied to the cached bias
            bias, w1 = self.attention_bias((h, w), (h, w)), self.talking_head1.weight * self.scale
        else:  # training: one saved (B, heads, N, N) map for talking head 1's gradient
            bias, w1 = self.relative_bias((h, w), (h, w)), self.talking_head1.weight
        bias = bias.to(q.dtype)
        kt, outs = k.transpose(-2, -1), []
        for rows in query_chunks(q.shape[-2], self.num_heads, k.shape[-2], q.device.type):
            logits = torch.matmul(query_rows(q, rows), kt)
            if folded:
                attn = _mix_heads(w1, logits, add=query_rows(bias, rows))
            else:
                attn = _mix_heads(w1, logits.mul_(self.scale).add_(query_rows(bias, rows)),
                                  add=self.talking_head1.bias.view(-1, 1, 1).to(logits.dtype))
            attn = softmax_last(attn).to(v.dtype)
            outs.append(torch.matmul(_mix_heads(self.talking_head2.weight, attn), v))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        out = out + self.talking_head2.bias.view(1, -1, 1, 1).to(v.dtype) * v.sum(2, keepdim=True)
        out = _heads_to_map(out, (h, w)) + v_local
        if self.stride_conv is not None:
            # Back to the exact input size (the dense reference crashes on odd sizes here).
            out = F.interpolate(out, size=full_size, mode='bilinear', align_corners=False)
        return self.proj(self.act(out))


class LocalGlobalQuery(nn.Module):
    """Query of the attention downsample: dw3x3 stride-2 conv + stride-2 subsampling, 1x1 conv."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.local = nn.Conv2d(in_dim, in_dim, 3, 2, 1, groups=in_dim)
        self.proj = ConvNorm(in_dim, out_dim)

    def forward(self, x):
        # avg_pool2d(kernel 1, stride 2) is plain subsampling: x[..., ::2, ::2].
        return self.proj(self.local(x) + x[..., ::2, ::2])


class AttentionDownsample(RelativeBiasAttention):
    """Attention path of the 3->4 downsampling: queries at 1/2 resolution, keys at full."""

    def __init__(self, dim: int, out_dim: int, bias_mode: str, ref_grid: Optional[int],
                 num_heads: int = 8, key_dim: int = 16, attn_ratio: int = 4,
                 table_size: int = 14):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.val_dim = attn_ratio * key_dim
        inner = self.val_dim * num_heads
        self.q = LocalGlobalQuery(dim, key_dim * num_heads)
        self.k = ConvNorm(dim, key_dim * num_heads)
        self.v = ConvNorm(dim, inner)
        self.v_local = ConvNorm(inner, inner, 3, stride=2, groups=inner)
        self.act = GELU(inplace=True)
        self.proj = ConvNorm(inner, out_dim)
        self._init_bias_table(num_heads, table_size, query_step=2, bias_mode=bias_mode,
                              ref_key_size=ref_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        query_size = q.shape[-2:]
        v = self.v(x)
        v_local = self.v_local(v)
        bias = self.attention_bias(tuple(query_size), tuple(x.shape[-2:])).to(q.dtype)
        out = softmax_attention(
            _heads_first(q, self.num_heads), _heads_first(self.k(x), self.num_heads),
            _heads_first(v, self.num_heads), self.key_dim ** -0.5, bias)
        return self.proj(self.act(_heads_to_map(out, query_size) + v_local))


class Downsample(nn.Module):
    """conv3x3 stride 2 + BN, plus an attention path into the last stage."""

    def __init__(self, in_channels: int, out_channels: int, attn_cfg: Optional[dict]):
        super().__init__()
        self.conv = ConvNorm(in_channels, out_channels, 3, stride=2)
        self.attn = (AttentionDownsample(in_channels, out_channels, **attn_cfg)
                     if attn_cfg is not None else None)

    def forward(self, x):
        out = self.conv(x)
        return out + self.attn(x) if self.attn is not None else out


class ConvMlp(nn.Module):
    """1x1 conv -> GELU -> dw3x3 -> GELU -> 1x1 conv, each conv with BN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden)
        self.mid = ConvNorm(hidden, hidden, 3, groups=hidden)
        self.fc2 = ConvNorm(hidden, dim)
        self.act = GELU(inplace=True)

    def forward(self, x):
        return self.fc2(self.mid(self.fc1(x, self.act), self.act))


class EfficientFormerV2Block(nn.Module):

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, layer_scale_init: float,
                 attn_cfg: Optional[dict]):
        super().__init__()
        self.token_mixer = Attention4D(dim, **attn_cfg) if attn_cfg is not None else None
        self.ls1 = LayerScale(dim, layer_scale_init) if attn_cfg is not None else None
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        if self.token_mixer is not None:
            x = scaled_residual(x, self.token_mixer(x), self.ls1, self.drop_path)
        return scaled_residual(x, self.mlp(x), self.ls2, self.drop_path)


@MODELS.register_module()
class EfficientFormerV2(MobileBackbone):
    """EfficientFormerV2 backbone: four levels at strides 4, 8, 16 and 32.

    Args:
        arch (str | dict): ``'s0'``, ``'s1'``, ``'s2'``, ``'l'`` (see
            :data:`mmeformer.models.archs.EFFICIENTFORMERV2_ARCHS`) or a dict with ``depths``,
            ``widths``, ``num_vit`` (attention blocks at the end of stages 3 and 4) and
            ``mlp_ratios`` (one list per stage, one ratio per block). Defaults to ``'s0'``.
        in_channels (int): Image channels. Defaults to 3.
        bias_mode (str): ``'table'`` or ``'official'`` (the snap-research dense backbone, with
            reference grids derived from ``bias_img_size``), as in
            :class:`~mmeformer.models.EfficientFormer`. Defaults to ``'table'``.
        bias_img_size (int, optional): 800 for the released COCO weights, 512 for the ADE20K
            ones (``'official'`` mode only). Defaults to None.
        out_indices (Sequence[int]): Levels to return (0..3). Defaults to ``(0, 1, 2, 3)``.
        frozen_stages (int): -1 none, 0 the stem, k the stem and the first k stages.
            Defaults to -1.
        norm_eval (bool): Keep every BatchNorm in eval mode while training. Defaults to False.
        drop_path_rate (float): Stochastic depth, increasing linearly over the blocks.
            Defaults to 0.
        layer_scale_init_value (float): Initial layer scales. Defaults to 1e-5.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        out_norm_cfg (dict, optional): Norm of each returned level (the release has none).
            Defaults to None.
        init_cfg (dict | list, optional): e.g. ``dict(type='Pretrained', checkpoint=PATH)``.
            Defaults to None.
        check_finite (bool): See :class:`~mmeformer.models.EfficientFormer`. Defaults to False.
        channels_last (bool): See :class:`~mmeformer.models.EfficientFormer`. Defaults to True.
        cache_biases (bool): See :class:`~mmeformer.models.EfficientFormer`. Defaults to True.

    Example:
        >>> import torch
        >>> from mmeformer.models import EfficientFormerV2
        >>> model = EfficientFormerV2('s0').eval()
        >>> for level in model(torch.rand(1, 3, 224, 224)):
        ...     print(tuple(level.shape))
        (1, 32, 56, 56)
        (1, 48, 28, 28)
        (1, 96, 14, 14)
        (1, 176, 7, 7)
    """
    family = 'EfficientFormerV2'
    stem_divisor = 2
    arch_settings = EFFICIENTFORMERV2_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 's0',
                 in_channels: int = 3,
                 bias_mode: str = 'table',
                 bias_img_size: Optional[int] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-5,
                 with_cp: bool = False,
                 out_norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 check_finite: bool = False,
                 channels_last: bool = True,
                 cache_biases: bool = True):
        super().__init__(in_channels, out_indices, frozen_stages, norm_eval, with_cp, init_cfg,
                         check_finite, channels_last)
        self.arch = self._resolve_arch(arch)
        depths, widths = self.arch['depths'], self.arch['widths']
        num_vit = self.arch['num_vit']
        self._set_bias_mode(bias_mode, bias_img_size)

        def ref_grid(stride):
            if bias_mode != 'official':
                return None
            return math.ceil(bias_img_size / stride)

        # Reference grids of the dense release: stage-3 attention works after its stride-2
        # conv, i.e. on ceil(ceil(img / 16) / 2); the downsample keys live at 1/16.
        stage_attn = {
            2: dict(stride=2, bias_mode=bias_mode,
                    ref_grid=None if bias_mode != 'official' else math.ceil(ref_grid(16) / 2)),
            3: dict(stride=1, bias_mode=bias_mode, ref_grid=ref_grid(32)),
        }
        down_attn = dict(bias_mode=bias_mode, ref_grid=ref_grid(16))

        self.stem = ConvActSequential(OrderedDict(
            conv1=ConvNorm(in_channels, widths[0] // 2, 3, stride=2), act1=GELU(inplace=True),
            conv2=ConvNorm(widths[0] // 2, widths[0], 3, stride=2), act2=GELU(inplace=True)))
        rates = stochastic_depth_rates(drop_path_rate, depths)
        stages, last = [], len(depths) - 1
        for i, depth in enumerate(depths):
            downsample = None
            if i > 0:
                downsample = Downsample(widths[i - 1], widths[i],
                                        down_attn if i == last and num_vit else None)
            blocks = [
                EfficientFormerV2Block(
                    widths[i], self.arch['mlp_ratios'][i][j], rates[i][j], layer_scale_init_value,
                    stage_attn.get(i) if i >= 2 and j >= depth - num_vit else None)
                for j in range(depth)
            ]
            stages.append(Stage(downsample, blocks, with_cp))
        self.stages = nn.ModuleList(stages)
        self._setup_outputs(widths, [4, 8, 16, 32], out_norm_cfg)
        self.cache_biases = cache_biases

    def _arch_problems(self, arch: dict) -> List[str]:
        depths, problems = arch['depths'], super()._arch_problems(arch)
        for i, (depth, ratios) in enumerate(zip(depths, arch['mlp_ratios'])):
            if (not isinstance(ratios, (list, tuple)) or len(ratios) != depth
                    or not all(isinstance(r, (int, float)) and r > 0 for r in ratios)):
                problems.append(f'mlp_ratios[{i}] must give one positive ratio per block '
                                f'({depth}), got {ratios!r}')
        # Attention blocks end stages 3 and 4.
        if arch['num_vit'] > min(depths[2:]):
            problems.append(f"num_vit={arch['num_vit']} exceeds the depth of stage 3 or 4 "
                            f'{depths[2:]}')
        return problems
