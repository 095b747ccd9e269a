"""Registries of the ``mmeformer`` scope.

``MODELS`` is a child of mmengine's root ``MODELS``, so that mmdet and mmseg configs can say
``type='mmeformer.EfficientFormer'`` next to ``custom_imports=dict(imports=['mmeformer.models'])``.
``HOOKS`` (``mmeformer.AtomicCheckpointHook``, ``mmeformer.DeployedBackboneHook``), ``LOOPS``
(``mmeformer.ResumableEpochBasedTrainLoop``) and ``OPTIM_WRAPPERS``
(``mmeformer.CPUAmpOptimWrapper``) are children of mmengine's root registries in the same way;
their modules are imported on first use, so a config naming them needs no extra import.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmeformer', locations=['mmeformer.models'])
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='mmeformer',
    locations=['mmeformer.engine.checkpointing', 'mmeformer.engine.deployed_backbone'])
LOOPS = Registry(
    'loop', parent=MMENGINE_LOOPS, scope='mmeformer', locations=['mmeformer.engine.loops'])
OPTIM_WRAPPERS = Registry(
    'optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmeformer',
    locations=['mmeformer.engine.amp'])
