"""Backbones and necks of mmeformer, registered in :data:`mmeformer.registry.MODELS` (scope
``mmeformer``); ``create_backbone`` builds a released variant by name."""
from .archs import arch_names
from .backbones import EfficientFormer, EfficientFormerV2, EfficientViT
from .factory import create_backbone
from .deploy import fuse
from .layers import fast_paths
from .necks import EfficientViTFPN

__all__ = ['EfficientFormer', 'EfficientFormerV2', 'EfficientViT', 'EfficientViTFPN',
           'arch_names', 'create_backbone', 'fast_paths', 'fuse']
