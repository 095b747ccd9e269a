#!/usr/bin/env python
"""Evaluate a checkpoint with a detector (mmdet) or segmentor (mmseg) config and print the
metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options KEY=VALUE ...]
                         [--launcher none|pytorch|slurm|mpi]
    python tools/test.py CONFIG CHECKPOINT --backbone-runtime onnxruntime|openvino|litert
                         [--int8 [--calib-images DIR] [--calib-count N]]

CHECKPOINT: a file written by tools/train.py, or a released dense checkpoint converted with
``tools/convert_checkpoint.py --full`` (V1/V2 releases need
``--cfg-options model.backbone.bias_mode=official model.backbone.bias_img_size=800``, 512 for
ADE20K; the tool says so when it is missing).

--backbone-runtime evaluates the deployed backbone inside the model: the test set runs twice,
once in PyTorch and once with the backbone exported (fused, one fixed-size file per input size,
under WORK_DIR/deployed_backbone/) and computed by that runtime while the neck and heads stay in
PyTorch; both metrics and their difference are printed. --int8 quantizes each export, calibrated
on the first N training images of the config (or on the images of --calib-images DIR) made into
backbone inputs by the test pipeline and the model's data preprocessor.
"""
import json
import os
import sys

from mmeformer.checkpoint import CheckpointError
from mmeformer.cli import doc_parser
from mmeformer.engine import (LaunchError, add_runner_arguments, launcher_rank, load_config,
                              parse_runner_args, test)
from mmeformer.engine.deployed_backbone import RUNTIME_FORMATS
from mmeformer.export import ExportError


def parse_args(argv=None):
    parser = doc_parser(__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the test logs go (default: '
                        'work_dirs/<config path below configs/>)')
    parser.add_argument('--backbone-runtime', choices=list(RUNTIME_FORMATS),
                        help='also evaluate with the backbone deployed in this runtime')
    parser.add_argument('--int8', action='store_true',
                        help='--backbone-runtime with int8 post-training quantization')
    parser.add_argument('--calib-images', metavar='DIR',
                        help='int8 calibration images (default: the config\'s training set)')
    parser.add_argument('--calib-count', type=int, default=32, metavar='N')
    add_runner_arguments(parser)
    args = parse_runner_args(parser, argv)
    if args.int8 and not args.backbone_runtime:
        parser.error('--int8 needs --backbone-runtime')
    if (args.calib_images or args.calib_count != 32) and not args.int8:
        parser.error('--calib-images / --calib-count apply to --int8 only')
    if args.calib_images and not os.path.isdir(args.calib_images):
        parser.error(f'--calib-images: {args.calib_images} is not a folder')
    return args


def main(argv=None):
    args = parse_args(argv)

    def evaluate(backbone_runtime=None):
        cfg = load_config(args.config, work_dir=args.work_dir, cfg_options=args.cfg_options,
                          launcher=args.launcher, amp=args.amp)
        return test(cfg, args.checkpoint, backbone_runtime)

    try:
        metrics = evaluate()
        if args.backbone_runtime:
            deployed = evaluate(dict(runtime=args.backbone_runtime, int8=args.int8,
                                     calib_images=args.calib_images,
                                     calib_count=args.calib_count))
    except (LaunchError, CheckpointError, ExportError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    # The launcher's rank: test() has closed the process group by now, after which every
    # process would call itself rank 0 and print the metrics too.
    if launcher_rank() != 0:
        return 0
    for key, value in metrics.items():
        print(f'{key}: {value}')
    print('metrics: ' + json.dumps(metrics, default=float))
    if args.backbone_runtime:
        name = args.backbone_runtime + (' int8' if args.int8 else '')
        print(f'\n{"metric":24s} {"PyTorch":>10s} {name:>18s} {"difference":>11s}')
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key in deployed:
                print(f'{key:24s} {value:10.4f} {deployed[key]:18.4f} '
                      f'{deployed[key] - value:+11.4f}')
        print('deployed metrics: ' + json.dumps(dict(runtime=name, metrics=deployed),
                                                default=float))
    return 0


if __name__ == '__main__':
    sys.exit(main())
