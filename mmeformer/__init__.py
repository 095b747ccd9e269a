"""mmeformer: EfficientFormer, EfficientFormerV2 and EfficientViT (cascaded group attention) as
OpenMMLab 3.x backbones.

Importing this package is cheap; the models live in :mod:`mmeformer.models` (which registers them
in :data:`mmeformer.registry.MODELS`, scope ``mmeformer``).
"""
__version__ = '0.1.0'
