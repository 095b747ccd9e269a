"""``create_backbone('efficientformerv2_s0', ...)``: a backbone by its variant name."""
from typing import Optional

from ..registry import MODELS
from .archs import arch_names, split_variant
from .backbones.base import MobileBackbone

__all__ = ['arch_names', 'create_backbone']


def create_backbone(name: str, pretrained: Optional[str] = None, **kwargs) -> MobileBackbone:
    """Build the backbone of a released variant (see :func:`arch_names`).

    Args:
        name: ``efficientformer_{l1,l3,l7}``, ``efficientformerv2_{s0,s1,s2,l}`` or
            ``efficientvit_m{0..5}``.
        pretrained: optional checkpoint file in any supported layout (original release, dense
            mmdet / mmseg file, timm, mmeformer), loaded strictly through the converter.
        **kwargs: constructor arguments of the family's class (``out_indices``,
            ``bias_mode``, ...), checked by it.

    Example:
        >>> import torch
        >>> from mmeformer.models import create_backbone
        >>> model = create_backbone('efficientvit_m0').eval()
        >>> [tuple(f.shape) for f in model(torch.zeros(1, 3, 224, 224))]
        [(1, 64, 14, 14), (1, 128, 7, 7), (1, 192, 4, 4)]
    """
    family, arch = split_variant(name)
    if pretrained is not None:
        if kwargs.get('init_cfg') is not None:
            raise ValueError('give either pretrained or init_cfg, not both')
        kwargs['init_cfg'] = dict(type='Pretrained', checkpoint=pretrained)
    model = MODELS.get(family)(arch=arch, **kwargs)
    if pretrained is not None:
        model.init_weights()
    return model
