"""Backbones and necks of mmeformer, registered in :data:`mmeformer.registry.MODELS`."""
from .backbones import EfficientFormer, EfficientFormerV2, EfficientViT
from .necks import EfficientViTFPN

__all__ = ['EfficientFormer', 'EfficientFormerV2', 'EfficientViT', 'EfficientViTFPN']
