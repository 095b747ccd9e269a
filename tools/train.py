#!/usr/bin/env python
"""Train a detector (mmdet) or segmentor (mmseg) config with mmeformer backbones.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
                                 [--compile [BACKEND]] [--cfg-options KEY=VALUE ...]
                                 [--launcher none|pytorch|slurm|mpi]

The task follows from the config. Distributed: tools/dist_train.sh (torchrun) or
tools/slurm_train.sh; without GPUs the processes use the gloo backend on CPU.

--compile sets mmengine's ``compile`` option: the runner wraps the model's train_step in
torch.compile (inductor, or the torch.compile backend named, e.g. aot_eager to check the graph
capture without generating code). The first iterations compile (many minutes on a small CPU) and
the detector's Python-heavy heads break the graph in many places; docs/benchmarks.md ("Training
speed") has what it gains, which on CPU may be nothing or a loss.
"""
import argparse
import sys

import torch
from mmengine.optim import OptimWrapper

from mmeformer.engine import (LaunchError, add_runner_arguments, load_config,
                              parse_runner_args, train)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: '
                        'work_dirs/<config path below configs/>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume from CKPT, or without a value from the latest checkpoint '
                        'in the work dir')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the LR by the actual total batch / the recipe batch')
    parser.add_argument('--compile', nargs='?', const='inductor', default=None,
                        metavar='BACKEND', help="torch.compile the training step (mmengine's "
                        'compile option; default backend inductor)')
    add_runner_arguments(parser)
    return parse_runner_args(parser, argv)


def use_compile(cfg, backend: str = 'inductor') -> None:
    """Set mmengine's ``compile`` option. mmengine compiles the model's whole train_step, the
    optimizer update inside it included, and dynamo fails on that update (AdamW's loop over
    mmengine's param groups, which are ConfigDicts): it runs eagerly instead."""
    cfg.compile = True if backend == 'inductor' else dict(backend=backend)
    if not getattr(OptimWrapper.update_params, '_torchdynamo_disable', False):
        OptimWrapper.update_params = torch.compiler.disable(OptimWrapper.update_params)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, work_dir=args.work_dir, cfg_options=args.cfg_options,
                          launcher=args.launcher, resume=args.resume, amp=args.amp,
                          auto_scale_lr=args.auto_scale_lr)
        if args.compile:
            use_compile(cfg, args.compile)
        train(cfg)
    except LaunchError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
