"""Building and launching mmengine Runners for the detection and segmentation configs.

The logic behind ``tools/train.py`` and ``tools/test.py`` (which stay thin argument parsers):

* :func:`load_config` reads a config and applies the command-line choices (work dir, resume,
  AMP, LR auto-scaling, ``--cfg-options``, launcher).
* :func:`prepare_distributed` picks the process-group backend: NCCL with GPUs, gloo without
  (mmengine's own initialisation calls ``torch.cuda.set_device`` and wraps the model with
  ``device_ids``, both of which fail on CPU), and replaces SyncBN by BN on CPU.
* :func:`build_runner` checks the model config (:func:`mmeformer.engine.check_model_config`),
  allow-lists mmengine's checkpoint globals for ``torch.load``
  (:mod:`mmeformer.safe_globals`), makes checkpoint writing crash-safe
  (:mod:`mmeformer.engine.checkpointing`) and mid-epoch resumption exact
  (:mod:`mmeformer.engine.loops`), gives each run its own visualizer and builds the Runner;
  :func:`train` and :func:`test` run it.

Whether a config is a detector (mmdet) or a segmentor (mmseg) follows from its
``default_scope``; nothing here depends on the task.
"""
import gc
import os
import os.path as osp
import subprocess
from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import find_latest_checkpoint
from mmengine.visualization import Visualizer

from ..checkpoint.detector import conversion_meta, unconverted_backbone_family
from ..checkpoint.io import CheckpointError, check_checkpoint_path, read_checkpoint
from ..safe_globals import allow_mmengine_checkpoint_globals
from .amp import AMP_DTYPES
from .config_check import check_model_config
from .errors import LaunchError
from .workers import die_with_parent_config

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def add_runner_arguments(parser) -> None:
    """The options tools/train.py and tools/test.py share: --amp / --amp-dtype, --cfg-options,
    --launcher, --local-rank / --local_rank (also exported as LOCAL_RANK, see
    :func:`parse_runner_args`)."""
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: AmpOptimWrapper on a GPU, '
                        'mmeformer.CPUAmpOptimWrapper (CPU autocast) without one')
    parser.add_argument('--amp-dtype', choices=AMP_DTYPES, default=None,
                        help='autocast dtype of --amp (default float16; implies --amp)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_epochs=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0,
                        help='set by torch.distributed.launch (torchrun uses LOCAL_RANK)')


def parse_runner_args(parser, argv=None):
    args = parser.parse_args(argv)
    if getattr(args, 'amp_dtype', None):
        args.amp = args.amp_dtype
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def default_work_dir(config_path: str) -> str:
    """``work_dirs/<path below configs/ without .py>``, e.g.
    ``configs/detection/toy/maskrcnn_eformer_l1.py`` ->
    ``work_dirs/detection/toy/maskrcnn_eformer_l1``
    (so a toy config and its real config never share a work dir)."""
    path = osp.abspath(config_path)
    parts = path.split(os.sep)
    if 'configs' in parts:
        index = len(parts) - 1 - parts[::-1].index('configs')
        rel = osp.join(*parts[index + 1:])
    else:
        rel = osp.basename(path)
    return osp.join('work_dirs', osp.splitext(rel)[0])


def load_config(config_path: str,
                work_dir: Optional[str] = None,
                cfg_options: Optional[dict] = None,
                launcher: str = 'none',
                resume: Optional[str] = None,
                amp: Union[bool, str] = False,
                auto_scale_lr: bool = False) -> Config:
    """Read ``config_path`` and apply the command-line choices.

    ``resume``: None (start fresh), ``'auto'`` (the latest checkpoint in the work dir) or a path.
    ``amp``: False, True (float16) or the autocast dtype, ``'float16'`` or ``'bfloat16'``.
    """
    if not osp.isfile(config_path):
        raise LaunchError(f'config file {config_path!r} does not exist; configs live under '
                          f'configs/detection/ and configs/segmentation/')
    if launcher not in LAUNCHERS:
        raise LaunchError(f'unknown launcher {launcher!r}; choose one of {LAUNCHERS}')
    cfg = Config.fromfile(config_path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'default_scope' not in cfg:
        raise LaunchError(f'{config_path} sets no default_scope: inherit mmdet:: or mmseg:: '
                          f'base configs (default_runtime.py) so the task is known')
    cfg.launcher = launcher
    cfg.work_dir = work_dir or cfg.get('work_dir') or default_work_dir(config_path)

    if resume is not None:
        if resume == 'auto':
            cfg.resume, cfg.load_from = True, None
        else:
            if not osp.isfile(resume):
                raise LaunchError(f'--resume {resume!r}: no such checkpoint file; pass a file or '
                                  f'use --resume without a value for the latest in the work dir')
            cfg.resume, cfg.load_from = True, resume

    if amp:
        _enable_amp(cfg, 'float16' if amp is True else amp)

    if auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise LaunchError(f'--auto-scale-lr: {config_path} has no '
                              f'auto_scale_lr.base_batch_size (the total batch of its recipe)')
        cfg.auto_scale_lr.enable = True
    return cfg


def launcher_rank() -> int:
    """This process's rank as its launcher set it (torchrun: ``RANK``, srun: ``SLURM_PROCID``);
    0 when started alone. Readable before the process group exists and after it is closed."""
    return int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')))


def _log_once(message: str) -> None:
    """Log a launch decision from the launcher's rank 0 only: before the Runner sets up its
    logger every process logs at INFO, and each of N processes would print the line."""
    if launcher_rank() == 0:
        print_log(message, logger='current')


def _enable_amp(cfg: Config, dtype: str) -> None:
    """Switch ``cfg.optim_wrapper`` to mixed precision in ``dtype``: mmengine's
    ``AmpOptimWrapper`` with a GPU, :class:`mmeformer.engine.amp.CPUAmpOptimWrapper` without."""
    if dtype not in AMP_DTYPES:
        raise LaunchError(f'--amp-dtype {dtype!r}: choose one of {AMP_DTYPES}')
    wrapper = cfg.optim_wrapper
    wrapper_type = wrapper.get('type', 'OptimWrapper')
    if wrapper_type in ('AmpOptimWrapper', 'mmeformer.CPUAmpOptimWrapper'):
        _log_once(f'AMP is already enabled in the config ({wrapper_type}); setting its dtype '
                  f'to {dtype}')
        if torch.cuda.is_available() or wrapper_type != 'AmpOptimWrapper':
            wrapper.dtype = dtype
            return
        wrapper.pop('use_fsdp', None)
    elif wrapper_type != 'OptimWrapper':
        raise LaunchError(f'--amp works with optim_wrapper type OptimWrapper, the config '
                          f'uses {wrapper_type}')
    if torch.cuda.is_available():
        wrapper.type, wrapper.dtype = 'AmpOptimWrapper', dtype
        wrapper.setdefault('loss_scale', 'dynamic')
    else:
        if 'rpn_head' in cfg.model:
            # The RPN's proposals go through mmcv's nms inside the autocast region, and its CPU
            # kernel takes float32 only ('expected scalar type Float but found Half').
            raise LaunchError(
                '--amp on CPU cannot train a two-stage detector (RPN): mmcv\'s CPU nms kernel '
                'takes float32 only. Train it in float32 (drop --amp) or use '
                '--amp on a GPU')
        wrapper.type, wrapper.dtype = 'mmeformer.CPUAmpOptimWrapper', dtype
        if dtype == 'float16':
            wrapper.setdefault('loss_scale', 'dynamic')
        else:
            wrapper.pop('loss_scale', None)  # bfloat16 needs no loss scaling
    _log_once(f'mixed precision: {wrapper.type} with dtype {dtype}')


# -- distributed set-up -------------------------------------------------------------------------
def _replace_sync_bn(node, path: str = 'cfg') -> int:
    """Replace ``type='SyncBN'`` norm configs by ``'BN'`` in place; return how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value, path)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value, path)
    return count


def _slurm_master_addr() -> str:
    if os.environ.get('MASTER_ADDR'):
        return os.environ['MASTER_ADDR']
    node_list = os.environ.get('SLURM_NODELIST') or os.environ.get('SLURM_JOB_NODELIST')
    if not node_list:
        raise LaunchError('--launcher slurm outside a Slurm job step: SLURM_NODELIST is not '
                          'set; start through tools/slurm_train.sh (srun)')
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', node_list], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise LaunchError(f'cannot resolve the Slurm master node ({err}); set MASTER_ADDR') \
            from err
    return out.split()[0]


def _init_cpu_process_group(launcher: str) -> None:
    """Start a gloo process group from the launcher's environment (torchrun or srun)."""
    if launcher == 'slurm':
        for src, dst in (('SLURM_PROCID', 'RANK'), ('SLURM_NTASKS', 'WORLD_SIZE'),
                         ('SLURM_LOCALID', 'LOCAL_RANK')):
            if src not in os.environ:
                raise LaunchError(f'--launcher slurm: {src} is not set; start through srun')
            os.environ[dst] = os.environ[src]
        os.environ['MASTER_ADDR'] = _slurm_master_addr()
        os.environ.setdefault('MASTER_PORT', '29500')
    elif launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
                   if k not in os.environ]
        if missing:
            raise LaunchError(f'--launcher pytorch: {missing} not set; start through torchrun '
                              f'(tools/dist_train.sh CONFIG NPROC)')
    else:
        raise LaunchError(f"--launcher {launcher} is not supported without a GPU; use 'pytorch' "
                          f"(torchrun) or 'slurm'")
    os.environ.setdefault('LOCAL_RANK', '0')
    dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']))


def prepare_distributed(cfg: Config) -> str:
    """Choose the backend for ``cfg.launcher`` and adapt ``cfg``; returns the backend name
    ('none', 'nccl' or 'gloo')."""
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none':
        return 'none'
    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
    dist_cfg = env_cfg.setdefault('dist_cfg', ConfigDict())
    if torch.cuda.is_available():
        dist_cfg.backend = 'nccl'  # mmengine initialises the group itself
        return 'nccl'
    dist_cfg.backend = 'gloo'
    if not dist.is_initialized():
        _init_cpu_process_group(launcher)
    replaced = _replace_sync_bn(cfg._cfg_dict)
    if replaced:
        _log_once(f'CPU training: replaced {replaced} SyncBN norm config(s) by BN (SyncBN needs '
                  f'GPUs); the state-dict keys are the same')
    if cfg.get('model_wrapper_cfg') is None:
        # DDP over CPU modules must not get device_ids (mmengine passes [LOCAL_RANK]).
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    return 'gloo'


# -- runners -----------------------------------------------------------------------------------
CHECKPOINT_HOOK_TYPES = ('CheckpointHook', 'mmengine.CheckpointHook')


def use_atomic_checkpoints(cfg: Config) -> bool:
    """Make the config's checkpoint hook :class:`~mmeformer.engine.AtomicCheckpointHook`
    (atomic checkpoint and ``last_checkpoint`` writes) when it is mmengine's plain
    ``CheckpointHook``; returns whether it did."""
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if isinstance(hook, dict) and hook.get('type') in CHECKPOINT_HOOK_TYPES:
        hook['type'] = 'mmeformer.AtomicCheckpointHook'
        return True
    return False


def _use_resumable_loop(cfg: Config, by_epoch: bool) -> bool:
    """Swap mmengine's epoch- (``by_epoch``) or iteration-based training loop in ``cfg`` for the
    exactly resuming one of :mod:`mmeformer.engine.loops`; returns whether it did."""
    kind = 'Epoch' if by_epoch else 'Iter'
    train_cfg = cfg.get('train_cfg')
    if not isinstance(train_cfg, dict):
        return False
    loop_type, flag = train_cfg.get('type'), train_cfg.get('by_epoch')
    if loop_type in (f'{kind}BasedTrainLoop', f'mmengine.{kind}BasedTrainLoop') or (
            loop_type is None and (bool(flag) if by_epoch else flag is False)):
        train_cfg.pop('by_epoch', None)
        train_cfg['type'] = f'mmeformer.Resumable{kind}BasedTrainLoop'
        return True
    return False


def use_resumable_epoch_loop(cfg: Config) -> bool:
    """Make an epoch-based ``train_cfg`` use
    :class:`~mmeformer.engine.loops.ResumableEpochBasedTrainLoop` (exact resumption, also from
    mid-epoch checkpoints); returns whether it did."""
    return _use_resumable_loop(cfg, by_epoch=True)


def use_resumable_iter_loop(cfg: Config) -> bool:
    """Make an iteration-based ``train_cfg`` use
    :class:`~mmeformer.engine.loops.ResumableIterBasedTrainLoop` (exact resumption without
    loading the batches trained before the checkpoint); returns whether it did."""
    return _use_resumable_loop(cfg, by_epoch=False)


def restore_resume_seed(cfg: Config) -> Optional[int]:
    """For a resumed run without a fixed seed: use the random seed of the checkpoint it resumes
    from. mmengine builds the data samplers (whose shuffling follows the seed) before it
    restores the checkpoint's seed, so without this the resumed epoch is drawn in another order
    and skipping its trained batches would skip the wrong samples. Returns the seed set."""
    randomness = dict(cfg.get('randomness') or {})
    if not cfg.get('resume') or randomness.get('seed') is not None:
        return None
    path = cfg.get('load_from') or find_latest_checkpoint(cfg.work_dir)
    if not path or not osp.isfile(path):
        return None
    try:  # mmap: only the small meta dict is read
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: B902 - unreadable: Runner.resume reports it with its reason
        return None
    seed = checkpoint.get('meta', {}).get('seed') if isinstance(checkpoint, dict) else None
    if seed is not None:
        randomness['seed'] = seed
        cfg.randomness = randomness
    return seed


def use_own_visualizer(cfg: Config) -> Optional[str]:
    """Give this run a visualizer of its own; returns the new name, or None when the config's
    name is still free. mmdet and mmseg configs name theirs ``'visualizer'``, and mmengine's
    ``get_instance`` returns an existing instance of that name with its old backends: a second
    run in the same process would write its config and scalars into the first run's work dir,
    and fail once that folder is gone."""
    visualizer = cfg.get('visualizer')
    if not isinstance(visualizer, dict) or not visualizer.get('name'):
        return None  # no name: the Runner names it after the run
    base = visualizer['name']
    if not Visualizer.check_instance_created(base):
        return None
    number = 2
    while Visualizer.check_instance_created(f'{base}_{number}'):
        number += 1
    visualizer['name'] = f'{base}_{number}'
    return visualizer['name']


class MMEformerRunner(Runner):
    """mmengine's ``Runner`` whose data loaders (training, validation, test: every loop builds
    its loader through :meth:`build_dataloader`) have workers that die with the process
    (:mod:`mmeformer.engine.workers`); otherwise the same."""

    @staticmethod
    def build_dataloader(dataloader, seed: Optional[int] = None, diff_rank_seed: bool = False):
        if isinstance(dataloader, dict):
            dataloader = dict(dataloader)
            dataloader['worker_init_fn'] = die_with_parent_config(dataloader, seed)
        return Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)


def build_runner(cfg: Config):
    """Check the model config, allow-list mmengine's checkpoint globals, make checkpoint
    writing atomic and mid-epoch resumption exact (loop, seed), give the run its own
    visualizer, set up distribution and build the Runner: :class:`MMEformerRunner`, or the
    task registry's ``runner_type`` when the config sets one."""
    check_model_config(cfg)
    allow_mmengine_checkpoint_globals()
    use_atomic_checkpoints(cfg)
    use_resumable_epoch_loop(cfg)
    use_resumable_iter_loop(cfg)
    restore_resume_seed(cfg)
    use_own_visualizer(cfg)
    prepare_distributed(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return MMEformerRunner.from_cfg(cfg)


def _close_process_group() -> None:
    """Free the finished run's objects and destroy the default process group. Left to
    interpreter exit, gloo's worker threads can abort a rank with SIGABRT ('terminate called
    without an active exception') after all its work is done, failing the launch (seen on
    2-process CPU training; pytorch/pytorch#190489). Destroying the group is not enough: the
    DistributedDataParallel wrapper, whose reducer holds the group, lives on in reference
    cycles with the runner until a garbage collection, so the group itself was still freed at
    exit (a 2-process launch on a loaded 2-core machine: 1 abort in 8 launches; with the
    collection here, 0 in 16). Callers drop their runner first.
    Not called when the run raised: other ranks may still be inside a collective."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train(cfg: Config):
    """Train with ``cfg``; returns the trained model (unwrapped from DistributedDataParallel)."""
    runner = build_runner(cfg)
    model = runner.train()
    model = model.module if is_model_wrapper(model) else model
    del runner
    _close_process_group()
    return model


def check_checkpoint_bias_mode(cfg: Config, checkpoint: dict, path: str) -> None:
    """Refuse to evaluate a converted official dense checkpoint (``checkpoint``, read from
    ``path``) with a backbone in another bias mode (its weights would load with mismatched bias
    tables and give wrong metrics)."""
    meta = conversion_meta(checkpoint)
    if not meta or 'bias_mode' not in meta:
        return
    backbone = cfg.model.get('backbone', {})
    want = dict(bias_mode=meta['bias_mode'], bias_img_size=meta.get('bias_img_size'))
    have = dict(bias_mode=backbone.get('bias_mode', 'table'),
                bias_img_size=backbone.get('bias_img_size'))
    if want['bias_mode'] == 'official' and want != have:
        raise LaunchError(
            f'{path} is a released dense checkpoint that needs '
            f"bias_mode='official', bias_img_size={want['bias_img_size']}, but the config builds "
            f"bias_mode={have['bias_mode']!r}, bias_img_size={have['bias_img_size']}. Add: "
            f"--cfg-options model.backbone.bias_mode=official "
            f"model.backbone.bias_img_size={want['bias_img_size']}")


def check_checkpoint_converted(checkpoint: dict, path: str) -> None:
    """Refuse a released detector / segmentor checkpoint (``checkpoint``, read from ``path``)
    whose backbone was never converted: ``load_from`` loads non-strictly, so its backbone would
    silently stay at random init."""
    family = unconverted_backbone_family(checkpoint, path)
    if family:
        raise LaunchError(
            f'{path} is a released {family} detector / segmentor checkpoint whose backbone '
            f'keys are still in the original (mmdet 2.x / mmseg 0.x / Cream) layout; loaded as '
            f'it is, the backbone would stay at random init. Convert it first: python '
            f'tools/convert_checkpoint.py {path} CONVERTED.pth (it detects --full), then '
            f'evaluate CONVERTED.pth')


def check_checkpoint_for(cfg: Config, checkpoint: str) -> None:
    """Refuse, with the fix, a checkpoint that ``cfg``'s model cannot be evaluated with: not a
    readable local file (a pickle that would run code included), a released checkpoint whose
    backbone was never converted, or one that needs another bias mode."""
    try:
        check_checkpoint_path(checkpoint)
    except CheckpointError as err:
        raise LaunchError(str(err)) from None
    loaded = read_checkpoint(checkpoint, mmap=True)  # the checks look at keys and meta only
    check_checkpoint_converted(loaded, checkpoint)
    check_checkpoint_bias_mode(cfg, loaded, checkpoint)


def test(cfg: Config, checkpoint: str,
         backbone_runtime: Optional[Dict] = None) -> Dict[str, float]:
    """Evaluate ``checkpoint`` with ``cfg``'s test loop; returns the metrics.
    ``backbone_runtime``: the arguments of :class:`~mmeformer.engine.DeployedBackboneHook`
    (``runtime``, ``int8``, ...), to compute the backbone with a deployment runtime."""
    check_checkpoint_for(cfg, checkpoint)  # the Runner then loads it onto the model
    cfg.load_from = checkpoint
    cfg.resume = False
    if backbone_runtime:
        if cfg.get('launcher', 'none') != 'none':
            raise LaunchError('--backbone-runtime evaluates in one process: drop --launcher')
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
            dict(type='mmeformer.DeployedBackboneHook', **backbone_runtime)]
    runner = build_runner(cfg)
    metrics = runner.test()
    del runner
    _close_process_group()
    return metrics
