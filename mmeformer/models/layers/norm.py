"""Norm layers from mmcv-style configs, built with torch alone (the backbones need only torch and
mmengine)."""
from typing import Optional

import torch.nn as nn

NORM_LAYERS = {
    'BN': nn.BatchNorm2d,
    'BN2d': nn.BatchNorm2d,
    'SyncBN': nn.SyncBatchNorm,
    'GN': nn.GroupNorm,
}


def build_norm(cfg: Optional[dict], num_channels: int) -> nn.Module:
    """A channels-first norm from ``dict(type='BN' | 'SyncBN' | 'GN', ...)``; None gives
    ``nn.Identity``. ``requires_grad=False`` freezes its affine parameters."""
    if cfg is None:
        return nn.Identity()
    cfg = dict(cfg)
    norm_type = cfg.pop('type', None)
    if norm_type not in NORM_LAYERS:
        raise ValueError(f'norm type {norm_type!r} is not supported; use one of '
                         f'{sorted(NORM_LAYERS)} (or None for no norm)')
    requires_grad = cfg.pop('requires_grad', True)
    if norm_type == 'GN':
        if 'num_groups' not in cfg:
            raise ValueError("a 'GN' norm config needs num_groups, e.g. "
                             "dict(type='GN', num_groups=1)")
        layer = nn.GroupNorm(num_channels=num_channels, **cfg)
    else:
        layer = NORM_LAYERS[norm_type](num_channels, **cfg)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer
