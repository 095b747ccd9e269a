"""Backbones and necks of mmeformer, registered in :data:`mmeformer.registry.MODELS` (scope
``mmeformer``); ``create_backbone`` builds a released variant by name.

Importing this package (a config's ``custom_imports=dict(imports=['mmeformer.models'])`` does)
also allow-lists the few globals mmengine writes into training checkpoints
(:mod:`mmeformer.safe_globals`), so that mmdet's / mmseg's inference APIs load mmeformer
checkpoints under ``torch.load(weights_only=True)``.
"""
from ..safe_globals import register_mmengine_checkpoint_globals
from .archs import arch_names
from .backbones import EfficientFormer, EfficientFormerV2, EfficientViT
from .factory import create_backbone
from .deploy import fuse
from .layers import fast_paths
from .necks import EfficientViTFPN

register_mmengine_checkpoint_globals()

__all__ = ['EfficientFormer', 'EfficientFormerV2', 'EfficientViT', 'EfficientViTFPN',
           'arch_names', 'create_backbone', 'fast_paths', 'fuse']
