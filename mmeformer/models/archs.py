"""The families, their released variants and the variants' architectures: the one table that
the backbones, the checkpoint converter and :func:`mmeformer.models.create_backbone` read.

A variant is named ``<prefix><arch>`` as in timm (``efficientformer_l1``, ``efficientformerv2_s0``,
``efficientvit_m4``).
"""
from typing import Dict, List, Tuple

# EfficientFormer (V1): depths and widths per stage; ``num_vit`` attention blocks end stage 4.
EFFICIENTFORMER_ARCHS = {
    'l1': dict(depths=[3, 2, 6, 4], widths=[48, 96, 224, 448], num_vit=1),
    'l3': dict(depths=[4, 4, 12, 6], widths=[64, 128, 320, 512], num_vit=4),
    'l7': dict(depths=[6, 6, 18, 8], widths=[96, 192, 384, 768], num_vit=8),
}

# EfficientFormerV2: ``num_vit`` attention blocks end stages 3 and 4; per-block MLP expansion
# ratios as in the released weights.
EFFICIENTFORMERV2_ARCHS = {
    's0': dict(depths=[2, 2, 6, 4], widths=[32, 48, 96, 176], num_vit=2,
               mlp_ratios=[[4] * 2, [4] * 2, [4, 3, 3, 3, 4, 4], [4, 3, 3, 4]]),
    's1': dict(depths=[3, 3, 9, 6], widths=[32, 48, 120, 224], num_vit=2,
               mlp_ratios=[[4] * 3, [4] * 3, [4, 4, 3, 3, 3, 3, 4, 4, 4],
                           [4, 4, 3, 3, 4, 4]]),
    's2': dict(depths=[4, 4, 12, 8], widths=[32, 64, 144, 288], num_vit=4,
               mlp_ratios=[[4] * 4, [4] * 4, [4, 4] + [3] * 6 + [4] * 4,
                           [4, 4, 3, 3, 3, 3, 4, 4]]),
    'l': dict(depths=[5, 5, 15, 10], widths=[40, 80, 192, 384], num_vit=6,
              mlp_ratios=[[4] * 5, [4] * 5, [4] * 4 + [3] * 7 + [4] * 4,
                          [4, 4, 4, 3, 3, 3, 3, 4, 4, 4]]),
}

# EfficientViT (Microsoft, cascaded group attention): widths, depths and heads per stage;
# ``kernels``: the q depthwise kernel of each head index.
EFFICIENTVIT_ARCHS = {
    'm0': dict(widths=[64, 128, 192], depths=[1, 2, 3], num_heads=[4, 4, 4],
               kernels=[5, 5, 5, 5]),
    'm1': dict(widths=[128, 144, 192], depths=[1, 2, 3], num_heads=[2, 3, 3],
               kernels=[7, 5, 3, 3]),
    'm2': dict(widths=[128, 192, 224], depths=[1, 2, 3], num_heads=[4, 3, 2],
               kernels=[7, 5, 3, 3]),
    'm3': dict(widths=[128, 240, 320], depths=[1, 2, 3], num_heads=[4, 3, 4],
               kernels=[5, 5, 5, 5]),
    'm4': dict(widths=[128, 256, 384], depths=[1, 2, 3], num_heads=[4, 4, 4],
               kernels=[7, 5, 3, 3]),
    'm5': dict(widths=[192, 288, 384], depths=[1, 3, 4], num_heads=[3, 3, 4],
               kernels=[7, 5, 3, 3]),
}

# family (the registered class name) -> (variant name prefix, arch table)
FAMILIES: Dict[str, Tuple[str, Dict[str, dict]]] = {
    'EfficientFormer': ('efficientformer_', EFFICIENTFORMER_ARCHS),
    'EfficientFormerV2': ('efficientformerv2_', EFFICIENTFORMERV2_ARCHS),
    'EfficientViT': ('efficientvit_', EFFICIENTVIT_ARCHS),
}


def arch_names() -> List[str]:
    """Every released variant, e.g. ``['efficientformer_l1', ..., 'efficientvit_m5']``."""
    return [prefix + arch for prefix, archs in FAMILIES.values() for arch in archs]


def variant_name(family: str, arch: str) -> str:
    """``('EfficientFormerV2', 's0')`` -> ``'efficientformerv2_s0'``."""
    return FAMILIES[family][0] + arch


def split_variant(name: str) -> Tuple[str, str]:
    """``'efficientformerv2_s0'`` -> ``('EfficientFormerV2', 's0')``; a ValueError naming the
    variants for an unknown name."""
    for family, (prefix, archs) in FAMILIES.items():
        if name.startswith(prefix) and name[len(prefix):] in archs:
            return family, name[len(prefix):]
    raise ValueError(f'unknown backbone {name!r}; choose one of {arch_names()}')
