#!/usr/bin/env python
"""Learning check: train the toy Mask R-CNN with EfficientFormer-L1 on CPU and print the bbox /
segm AP after every epoch; it passes when both rise clearly above their first evaluation.

    python tools/toy_convergence.py [--epochs 8] [--work-dir work_dirs/toy_convergence]

Generates the toy COCO data under WORK_DIR/data/toy/coco (once), runs from WORK_DIR so the toy
config's relative data root resolves there, and evaluates after every epoch. Takes about
2-4 minutes per epoch on a 2-core CPU. Exit status 0 when the final bbox and segm AP both exceed
the first ones by --min-gain, 1 otherwise.
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys

from mmeformer.datasets import make_toy_coco
from mmeformer.engine import load_config, train

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'detection', 'toy', 'maskrcnn_eformer_l1.py')


def read_ap_curve(work_dir: str):
    """(epoch, bbox AP, segm AP) for every evaluation logged in the latest run of ``work_dir``."""
    runs = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not runs:
        raise FileNotFoundError(f'no scalars.json under {work_dir}')
    curve = []
    with open(runs[-1]) as f:
        for line in f:
            record = json.loads(line)
            if 'coco/bbox_mAP' in record:
                curve.append((len(curve) + 1, record['coco/bbox_mAP'], record['coco/segm_mAP']))
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--lr', type=float, default=4e-4,
                        help='AdamW LR (the recipe has 2e-4 for batch 16 from ImageNet weights; '
                        'the toy run starts from random weights with batch 2)')
    parser.add_argument('--num-train', type=int, default=48)
    parser.add_argument('--num-val', type=int, default=12)
    parser.add_argument('--min-gain', type=float, default=0.05,
                        help='required rise of bbox and segm AP over the first evaluation')
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'toy_convergence'))
    args = parser.parse_args(argv)

    work_dir = osp.abspath(args.work_dir)
    data_root = osp.join(work_dir, 'data', 'toy', 'coco')
    if not osp.isfile(osp.join(data_root, 'annotations', 'instances_val2017.json')):
        make_toy_coco(data_root, num_train=args.num_train, num_val=args.num_val)
    os.chdir(work_dir)
    epochs = args.epochs
    cfg = load_config(CONFIG, work_dir=work_dir, cfg_options={
        'train_cfg.max_epochs': epochs,
        'train_cfg.val_interval': 1,
        'optim_wrapper.optimizer.lr': args.lr,
        'param_scheduler': [
            dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
            dict(type='MultiStepLR', begin=0, end=epochs, by_epoch=True,
                 milestones=[max(1, epochs - 2)], gamma=0.1)
        ],
        'default_hooks.checkpoint.interval': epochs,
    })
    train(cfg)

    curve = read_ap_curve(work_dir)
    print('\nepoch  bbox_AP  segm_AP')
    for epoch, bbox, segm in curve:
        print(f'{epoch:5d}  {bbox:7.3f}  {segm:7.3f}')
    (_, bbox0, segm0), (_, bbox1, segm1) = curve[0], curve[-1]
    ok = bbox1 - bbox0 >= args.min_gain and segm1 - segm0 >= args.min_gain
    print(f'bbox AP {bbox0:.3f} -> {bbox1:.3f}, segm AP {segm0:.3f} -> {segm1:.3f}: '
          + ('LEARNS' if ok else f'did not rise by {args.min_gain}'))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
