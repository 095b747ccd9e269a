"""EfficientViTFPN: the FPN of the official EfficientViT (cascaded group attention) detectors.

Paper: "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention",
Xinyu Liu et al., CVPR 2023, arXiv:2305.07027; the neck of microsoft/Cream's COCO detectors.

A standard FPN over the backbone's strides 16/32/64 plus ``num_extra_trans_convs`` chained 2x2
stride-2 transposed convs starting from lateral 0, each followed by a 3x3 conv, which create the
finer levels (stride 8, then 4). Mask R-CNN: 2 extra -> strides 4..64; RetinaNet: 1 extra plus
``add_extra_convs='on_input'`` -> strides 8..128. Outputs are ordered fine to coarse. Parameter
names are those of the released checkpoints (``lateral_convs.i.conv``,
``extra_trans_convs.i.conv``).
"""
from typing import List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule

from ...registry import MODELS


class _ConvLayer(nn.Module):
    """A single conv stored as ``.conv`` (the key layout of mmcv's ConvModule)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


@MODELS.register_module()
class EfficientViTFPN(BaseModule):
    """FPN with extra transposed-conv levels for EfficientViT.

    Args:
        in_channels (Sequence[int]): Channels of each backbone level.
        out_channels (int): Channels of every output level.
        num_outs (int): Number of outputs, transposed-conv levels included.
        num_extra_trans_convs (int): Finer levels made by chained transposed convs from
            lateral 0; the i-th 3x3 conv of ``extra_fpn_convs`` refines the i-th finest of
            them, as in the release. Defaults to 0.
        start_level (int): First backbone level used. Defaults to 0.
        end_level (int): Backbone level after the last one used; -1 for all. Defaults to -1.
        add_extra_convs (bool | str): False max-pools the extra coarse levels; ``'on_input'``
            (or True), ``'on_lateral'``, ``'on_output'`` make them with stride-2 3x3 convs on
            that source. Defaults to False.
        relu_before_extra_convs (bool): ReLU before the second and later extra convs.
            Defaults to False.
        upsample_cfg (dict): ``F.interpolate`` arguments of the top-down path.
            Defaults to ``dict(mode='nearest')``.
        init_cfg (dict, optional): mmengine initialisation config. Defaults to None.

    Example:
        >>> import torch
        >>> from mmeformer.models import EfficientViTFPN
        >>> neck = EfficientViTFPN([128, 256, 384], 256, num_outs=5, num_extra_trans_convs=2)
        >>> levels = [torch.rand(1, c, 64 // s, 64 // s) for c, s in ((128, 1), (256, 2), (384, 4))]
        >>> for out in neck(levels):
        ...     print(tuple(out.shape))
        (1, 256, 256, 256)
        (1, 256, 128, 128)
        (1, 256, 64, 64)
        (1, 256, 32, 32)
        (1, 256, 16, 16)
    """

    def __init__(self,
                 in_channels: Sequence[int],
                 out_channels: int,
                 num_outs: int,
                 num_extra_trans_convs: int = 0,
                 start_level: int = 0,
                 end_level: int = -1,
                 add_extra_convs: Union[bool, str] = False,
                 relu_before_extra_convs: bool = False,
                 upsample_cfg: dict = dict(mode='nearest'),
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.num_extra_trans_convs = num_extra_trans_convs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.upsample_cfg = dict(upsample_cfg)
        self.start_level = start_level
        self.end_level = len(self.in_channels) if end_level == -1 else end_level
        if not 0 <= start_level < self.end_level <= len(self.in_channels):
            raise ValueError(f'invalid start_level={start_level} / end_level={end_level} for '
                             f'{len(self.in_channels)} inputs')
        if add_extra_convs is True:
            add_extra_convs = 'on_input'
        if add_extra_convs not in (False, 'on_input', 'on_lateral', 'on_output'):
            raise ValueError("add_extra_convs must be False, True, 'on_input', 'on_lateral' or "
                             f"'on_output', got {add_extra_convs!r}")
        self.add_extra_convs = add_extra_convs
        num_levels = self.end_level - start_level
        extra_levels = num_outs - num_levels - num_extra_trans_convs
        if extra_levels < 0:
            raise ValueError(f'num_outs={num_outs} is smaller than the {num_levels} backbone '
                             f'levels plus num_extra_trans_convs={num_extra_trans_convs}')

        self.lateral_convs = nn.ModuleList(
            _ConvLayer(nn.Conv2d(self.in_channels[i], out_channels, 1))
            for i in range(start_level, self.end_level))
        self.fpn_convs = nn.ModuleList(
            _ConvLayer(nn.Conv2d(out_channels, out_channels, 3, padding=1))
            for _ in range(num_levels))
        if add_extra_convs:
            for i in range(extra_levels):
                channels = (self.in_channels[self.end_level - 1]
                            if i == 0 and add_extra_convs == 'on_input' else out_channels)
                self.fpn_convs.append(
                    _ConvLayer(nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)))
        self.extra_trans_convs = nn.ModuleList(
            _ConvLayer(nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2))
            for _ in range(num_extra_trans_convs))
        self.extra_fpn_convs = nn.ModuleList(
            _ConvLayer(nn.Conv2d(out_channels, out_channels, 3, padding=1))
            for _ in range(num_extra_trans_convs))
        self._init_default_weights()

    def _init_default_weights(self):
        # As the release: xavier-uniform convs, kaiming (fan_out) transposed convs.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(module.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'EfficientViTFPN got {len(inputs)} inputs, expected '
                             f'{len(self.in_channels)} (in_channels={self.in_channels})')
        laterals = [conv(inputs[i + self.start_level])
                    for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            if 'scale_factor' in self.upsample_cfg:
                up = F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                   **self.upsample_cfg)
            laterals[i - 1] = laterals[i - 1] + up

        # Finer levels: chained transposed convs from lateral 0, finest first.
        finer: List[torch.Tensor] = []
        prev = laterals[0]
        for trans in self.extra_trans_convs:
            prev = trans(prev)
            finer.insert(0, prev)

        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]
        num_coarse = self.num_outs - len(finer) - len(laterals)
        if num_coarse > 0:
            if not self.add_extra_convs:
                for _ in range(num_coarse):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                source = {'on_input': inputs[self.end_level - 1], 'on_lateral': laterals[-1],
                          'on_output': outs[-1]}[self.add_extra_convs]
                outs.append(self.fpn_convs[len(laterals)](source))
                for i in range(len(laterals) + 1, len(laterals) + num_coarse):
                    x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](x))
        finer_outs = [conv(f) for conv, f in zip(self.extra_fpn_convs, finer)]
        return tuple(finer_outs + outs)
