#!/usr/bin/env python
"""Draw a detector's or segmentor's predictions on images and write them as JSON.

    python tools/infer.py CONFIG CHECKPOINT IMAGE_OR_DIR [--out DIR] [--score-thr T]
                          [--device cpu|cuda:0] [--cfg-options KEY=VALUE ...]

A thin front-end over mmdet's DetInferencer / mmseg's MMSegInferencer (the task follows from
the config); CHECKPOINT is a file written by tools/train.py or converted with
tools/convert_checkpoint.py --full. For each image NAME.EXT it writes DIR/vis/NAME.EXT (the drawn
predictions) and DIR/preds/NAME.json (the raw predictions; a segmentor also writes the label map
DIR/preds/NAME.png). Details: mmeformer/engine/inference.py.
"""
import argparse
import sys

from mmengine.config import DictAction

from mmeformer.checkpoint import CheckpointError
from mmeformer.engine import LaunchError, infer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='detector (mmdet) or segmentor (mmseg) config')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', metavar='IMAGE_OR_DIR', help='an image or a folder of images')
    parser.add_argument('--out', default='outputs/infer', help='output folder (default: '
                        'outputs/infer)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='lowest score of a drawn detection; the JSON keeps all (default: '
                        '0.3)')
    parser.add_argument('--device', help='cpu, cuda:0, ... (default: the first GPU, else cpu)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config overrides, e.g. model.backbone.bias_mode=official '
                        'model.backbone.bias_img_size=800 for a converted V1/V2 release')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        results = infer(args.config, args.checkpoint, args.inputs, args.out,
                        score_thr=args.score_thr, device=args.device,
                        cfg_options=args.cfg_options)
    except (LaunchError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for result in results:
        print(f'{result["image"]} -> {result["vis"]}, {result["pred"]}')
    print(f'{len(results)} image(s): drawn in {args.out}/vis, predictions in {args.out}/preds')
    return 0


if __name__ == '__main__':
    sys.exit(main())
