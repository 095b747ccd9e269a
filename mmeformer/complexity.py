"""Parameters and multiply-accumulates of the EfficientFormer / EfficientFormerV2 / EfficientViT
backbones, or of a whole detector / segmentor config, at any input size.

MACs come from torch's FLOP counter (``torch.utils.flop_counter``: convolutions, linear layers and
matrix products, attention matmuls included) divided by two. EfficientViT is counted with the
downstream semantics (7x7 windows in every stage), which costs 4-9% more than the published
classification figures at 224.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch.utils.flop_counter import FlopCounterMode

from .builder import build_model
from .models import fast_paths


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, shape: Tuple[int, int], forward=None) -> int:
    """MACs of one forward pass on a (1, 3, H, W) input."""
    model.eval()
    x = torch.zeros(1, 3, *shape)
    # The plain ops: the fused oneDNN kernels do the same MACs but are invisible to the counter.
    with fast_paths(False), FlopCounterMode(display=False) as counter:
        (forward or model)(x)
    return counter.get_total_flops() // 2


def _full_model_forward(model: nn.Module, shape: Tuple[int, int]):
    """A tensor-mode forward of an mmdet detector or mmseg segmentor (heads included)."""
    h, w = shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1., 1.))
    # mmdet / mmseg are optional extras: imported for the task at hand only.
    if hasattr(model, 'rpn_head') or hasattr(model, 'bbox_head'):
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=meta)]
    else:
        from mmseg.structures import SegDataSample
        samples = [SegDataSample(metainfo=meta)]
    return lambda x: model(x, samples, mode='tensor')


def complexity(name_or_config: str, shape: Tuple[int, int]) -> Dict[str, int]:
    """``{'params': ..., 'macs': ...}`` of a backbone name or of a full config's model."""
    if name_or_config.endswith('.py'):
        cfg = Config.fromfile(name_or_config)
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        cfg.model.backbone.pop('init_cfg', None)
        model = MODELS.build(cfg.model).eval()
        forward = _full_model_forward(model, shape)
    else:
        model, forward = build_model(name_or_config), None
    return dict(params=count_params(model), macs=count_macs(model, shape, forward))
