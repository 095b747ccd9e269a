"""Registries of the ``mmeformer`` scope.

``MODELS`` is a child of mmengine's root ``MODELS``, so that mmdet and mmseg configs can say
``type='mmeformer.EfficientFormer'`` next to ``custom_imports=dict(imports=['mmeformer.models'])``.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmeformer', locations=['mmeformer.models'])
