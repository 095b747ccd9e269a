"""Training and testing front-end logic: config loading, distributed set-up (NCCL / gloo),
Runner building, CPU mixed precision and safe loading of mmengine checkpoints."""
from .amp import CPUAmpOptimWrapper
from .runner import (LaunchError, add_runner_arguments, build_runner, default_work_dir,
                     load_config, parse_runner_args, prepare_distributed, test, train)
from .safe_load import allow_mmengine_checkpoint_globals, mmengine_checkpoint_globals

__all__ = [
    'CPUAmpOptimWrapper', 'LaunchError', 'add_runner_arguments',
    'allow_mmengine_checkpoint_globals', 'build_runner', 'default_work_dir', 'load_config',
    'mmengine_checkpoint_globals', 'parse_runner_args', 'prepare_distributed', 'test', 'train'
]
