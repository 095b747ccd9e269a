#!/usr/bin/env python
"""Backbone latency report: variants x sizes x runtimes x batch sizes x threads, as Markdown, CSV,
JSON (with the environment) and a PNG plot.

    python tools/benchmark.py --quick                       # about a minute
    python tools/benchmark.py --out outputs/benchmark        # all 13 at 224, 512, 800x1344
    python tools/benchmark.py --compare --sizes 800x1344 512x512 224x224   # vs timm / official

--compare adds, in the same run, timm (all 13 at 224; EfficientViT with img_size=512 at every
size) and a stand-in for the official dense code (bias_mode='official' with the bias gathered and
resized on every forward) for EfficientFormer V1/V2 at detection sizes.
"""
import argparse
import sys

import torch

from mmeformer import benchmark
from mmeformer.export import arch_names

QUICK = dict(variants=['efficientformer_l1', 'efficientformerv2_s0', 'efficientvit_m4'],
             sizes=[(224, 224), (512, 512)], runtimes=['eager', 'fused', 'onnxruntime'],
             warmup=1, repeats=5)


def size(text):
    h, _, w = text.partition('x')
    return int(h), int(w or h)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--variants', nargs='+', choices=arch_names(), metavar='ARCH')
    parser.add_argument('--sizes', nargs='+', type=size, metavar='HxW')
    parser.add_argument('--runtimes', nargs='+', choices=benchmark.RUNTIMES)
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'], default='float32')
    parser.add_argument('--warmup', type=int)
    parser.add_argument('--repeats', type=int)
    parser.add_argument('--compare', action='store_true', help='also time timm and the official '
                        'bias handling (see below)')
    parser.add_argument('--quick', action='store_true', help='3 variants, 2 sizes, ~1 minute')
    parser.add_argument('--out', default='outputs/benchmark')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available here')
    if args.device == 'cpu' and args.dtype == 'float16':
        parser.error('float16 on CPU is not a meaningful benchmark; use bfloat16 or --device cuda')
    settings = dict(QUICK) if args.quick else dict(
        variants=arch_names(), sizes=list(benchmark.DEFAULT_SIZES),
        runtimes=['eager', 'fused', 'compile', 'onnxruntime'], warmup=2, repeats=10)
    for key in ('variants', 'sizes', 'runtimes', 'warmup', 'repeats'):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.device == 'cuda' and 'onnxruntime' in settings['runtimes']:
        settings['runtimes'] = [r for r in settings['runtimes'] if r != 'onnxruntime']
    report = benchmark.run(batch_sizes=args.batch_sizes, threads=args.threads,
                           device=args.device, dtype=args.dtype, compare=args.compare,
                           progress=lambda line: print(line, flush=True), **settings)
    paths = benchmark.write(report, args.out)
    print(benchmark.to_markdown(report))
    for kind, path in paths.items():
        print(f'wrote {kind}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
