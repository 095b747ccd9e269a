"""Training and testing front-end logic: config loading and checking, distributed set-up
(NCCL / gloo), Runner building, crash-safe checkpoint writing, exact resumption (recorded random
states, position-seeded augmentation, trained batches skipped without loading), CPU mixed
precision, safe loading of mmengine checkpoints, and inference on images through mmdet's /
mmseg's own inferencers."""
from .amp import CPUAmpOptimWrapper
from .checkpointing import AtomicCheckpointHook, AtomicLocalBackend, atomic_write
from ..safe_globals import allow_mmengine_checkpoint_globals, mmengine_checkpoint_globals
from .config_check import backbone_out_channels, check_model_config
from .errors import ConfigError, LaunchError
from .loops import ResumableEpochBasedTrainLoop, ResumableIterBasedTrainLoop
from .inference import infer, list_images
from .runner import (MMEformerRunner, add_runner_arguments, build_runner, check_checkpoint_for,
                     default_work_dir, launcher_rank, load_config, parse_runner_args,
                     prepare_distributed, restore_resume_seed, test, train, use_atomic_checkpoints,
                     use_own_visualizer, use_resumable_epoch_loop, use_resumable_iter_loop)

__all__ = [
    'AtomicCheckpointHook', 'AtomicLocalBackend', 'CPUAmpOptimWrapper', 'ConfigError',
    'LaunchError', 'MMEformerRunner', 'ResumableEpochBasedTrainLoop',
    'ResumableIterBasedTrainLoop', 'add_runner_arguments', 'allow_mmengine_checkpoint_globals',
    'atomic_write', 'backbone_out_channels', 'build_runner', 'check_checkpoint_for',
    'check_model_config', 'default_work_dir', 'infer', 'launcher_rank', 'list_images',
    'load_config', 'mmengine_checkpoint_globals', 'parse_runner_args', 'prepare_distributed',
    'restore_resume_seed', 'test', 'train', 'use_atomic_checkpoints', 'use_own_visualizer',
    'use_resumable_epoch_loop', 'use_resumable_iter_loop'
]
