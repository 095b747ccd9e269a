#!/usr/bin/env python
"""Evaluate a checkpoint with a detector (mmdet) or segmentor (mmseg) config and print the
metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options KEY=VALUE ...]
                         [--launcher none|pytorch|slurm|mpi]

CHECKPOINT: a file written by tools/train.py, or a released dense checkpoint converted with
``tools/convert_checkpoint.py --full`` (V1/V2 releases need
``--cfg-options model.backbone.bias_mode=official model.backbone.bias_img_size=800``, 512 for
ADE20K; the tool says so when it is missing).
"""
import argparse
import json
import os
import sys

from mmeformer.checkpoint import CheckpointError
from mmeformer.engine import (LaunchError, add_runner_arguments, load_config,
                              parse_runner_args, test)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the test logs go (default: '
                        'work_dirs/<config path below configs/>)')
    add_runner_arguments(parser)
    return parse_runner_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, work_dir=args.work_dir, cfg_options=args.cfg_options,
                          launcher=args.launcher, amp=args.amp)
        metrics = test(cfg, args.checkpoint)
    except (LaunchError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    # The launcher's rank: test() has closed the process group by now, after which every
    # process would call itself rank 0 and print the metrics too.
    if int(os.environ.get('RANK', '0')) == 0:
        for key, value in metrics.items():
            print(f'{key}: {value}')
        print('metrics: ' + json.dumps(metrics, default=float))
    return 0


if __name__ == '__main__':
    sys.exit(main())
