#!/usr/bin/env python
"""Parameters and MACs of a backbone, or of a whole detector / segmentor config, at any size.

    python tools/get_flops.py efficientformer_l1 --shape 224 224
    python tools/get_flops.py configs/detection/maskrcnn_eformer_l1.py --shape 800 1344 --json

MACs count convolutions, linear layers and matrix products (attention matmuls included) through
torch's FLOP counter. EfficientViT uses the downstream 7x7 windows in every stage.
"""
import argparse
import json

from mmeformer.complexity import complexity


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('arch', help='arch name (e.g. efficientvit_m4) or config file')
    parser.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    parser.add_argument('--json', action='store_true', help='print {"params": ..., "macs": ...}')
    args = parser.parse_args(argv)
    result = complexity(args.arch, tuple(args.shape))
    if args.json:
        print(json.dumps(result))
    else:
        print(f'{args.arch} at {args.shape[0]}x{args.shape[1]}: '
              f'params {result["params"] / 1e6:.3f} M, MACs {result["macs"] / 1e9:.4f} G')


if __name__ == '__main__':
    main()
