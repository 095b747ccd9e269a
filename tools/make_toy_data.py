#!/usr/bin/env python
"""Write the toy COCO and ADE20K datasets that the configs under configs/*/toy/ train on.

    python tools/make_toy_data.py [--out data/toy] [--num-train 48] [--num-val 12] [--seed 0]

Output: data/toy/coco/ (COCO 2017 layout) and data/toy/ade/ADEChallengeData2016/ (ADE20K
layout). The same arguments always give the same files.
"""
import argparse
import sys

from mmeformer.datasets import make_toy_data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/toy', help='output root (default: data/toy)')
    parser.add_argument('--num-train', type=int, default=48, help='training images per dataset')
    parser.add_argument('--num-val', type=int, default=12, help='validation images per dataset')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--only', choices=['coco', 'ade'], default=None,
                        help='write only one of the two datasets')
    args = parser.parse_args(argv)
    tasks = (args.only,) if args.only else ('coco', 'ade')
    try:
        roots = make_toy_data(args.out, args.num_train, args.num_val, args.seed, tasks)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for name, root in roots.items():
        print(f'{name}: {args.num_train} training and {args.num_val} validation images in {root}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
