"""Registries of the ``mmeformer`` scope.

``MODELS`` is a child of mmengine's root ``MODELS``, so that mmdet and mmseg configs can say
``type='mmeformer.EfficientFormer'`` next to ``custom_imports=dict(imports=['mmeformer.models'])``.
``OPTIM_WRAPPERS`` (``mmeformer.CPUAmpOptimWrapper``) is a child of mmengine's root registry in
the same way; its module is imported on first use, so a config naming it needs no extra import.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmeformer', locations=['mmeformer.models'])
OPTIM_WRAPPERS = Registry(
    'optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmeformer',
    locations=['mmeformer.engine.amp'])
