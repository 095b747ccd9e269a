"""Training and testing front-end logic: config loading, distributed set-up (NCCL / gloo),
Runner building and safe loading of mmengine checkpoints."""
from .runner import (LaunchError, build_runner, default_work_dir, load_config,
                     prepare_distributed, test, train)
from .safe_load import allow_mmengine_checkpoint_globals, mmengine_checkpoint_globals

__all__ = [
    'LaunchError', 'allow_mmengine_checkpoint_globals', 'build_runner', 'default_work_dir',
    'load_config', 'mmengine_checkpoint_globals', 'prepare_distributed', 'test', 'train'
]
