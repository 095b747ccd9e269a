"""One entry point for the tools: a backbone from a variant name or from a detection /
segmentation config (optionally with its neck), in eval mode, optionally loaded from a
checkpoint."""
import os
from typing import Optional

import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from .checkpoint import load_pretrained
from .engine.config_check import check_model_config
from .models import create_backbone
from .models.archs import split_variant


class BackboneWithNeck(nn.Module):
    """Backbone followed by its neck, returning the neck's levels."""

    def __init__(self, backbone: nn.Module, neck: nn.Module):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.in_channels = getattr(backbone, 'in_channels', 3)

    def forward(self, x):
        return tuple(self.neck(self.backbone(x)))


def build_model(name_or_config: str, checkpoint: Optional[str] = None,
                with_neck: bool = False, bias_mode: Optional[str] = None,
                bias_img_size: Optional[int] = None) -> nn.Module:
    """A backbone from a variant name (``efficientformerv2_s0``, see
    :func:`mmeformer.models.arch_names`) or from the backbone (and, with ``with_neck``, the
    neck) of a detection / segmentation config, in eval mode. ``bias_mode`` and
    ``bias_img_size`` (EfficientFormer V1 / V2 names) choose the attention-bias handling instead
    of the default ``'table'``; ``checkpoint`` is loaded into the backbone through the
    converter."""
    if name_or_config.endswith('.py'):
        if bias_mode is not None or bias_img_size is not None:
            raise ValueError('with a config, set bias_mode / bias_img_size in its backbone')
        if not os.path.isfile(name_or_config):
            raise FileNotFoundError(f'config {name_or_config!r} not found')
        cfg = Config.fromfile(name_or_config)
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        if with_neck:  # a neck whose in_channels do not fit the backbone: say which, now
            check_model_config(cfg)
        backbone_cfg = dict(cfg.model.backbone)
        backbone_cfg.pop('init_cfg', None)
        backbone = MODELS.build(backbone_cfg)
        neck = MODELS.build(cfg.model.neck) if with_neck else None
    else:
        try:
            family, _ = split_variant(name_or_config)
        except ValueError as err:
            raise ValueError(f'{err} or pass a config file') from None
        if with_neck:
            raise ValueError('--with-neck needs a detection or segmentation config')
        bias_args = {k: v for k, v in dict(bias_mode=bias_mode, bias_img_size=bias_img_size)
                     .items() if v is not None}
        if bias_args and family == 'EfficientViT':
            raise ValueError(f'{name_or_config} has no bias_mode / bias_img_size (its windows '
                             f'keep the bias table size)')
        backbone = create_backbone(name_or_config, **bias_args)
        neck = None
    if checkpoint:
        load_pretrained(backbone, checkpoint)
    model = BackboneWithNeck(backbone, neck) if neck is not None else backbone
    return model.eval()
