#!/usr/bin/env python
"""Device check: do the backbones compute on this device, dtype and runtime what they compute in
float32 eager on CPU? Inference (twice: the second forward reads the caches) and a training step
(outputs and gradients), on randomized weights; exit status 1 if any check is above tolerance.

    python tools/device_check.py --device cuda                   # all 13, float32/16, bfloat16
    python tools/device_check.py --device cpu --variants efficientvit_m4 --sizes 224x224

Defaults: every variant at 800x1344 (detection size, chunked attention) and 250x330 (odd size,
padded windows), EfficientFormer V1 / V2 also with bias_mode='official'; dtypes float32,
float16 and bfloat16 on CUDA, bfloat16 on CPU (float32 eager on CPU is the reference itself).
See benchmarks/device_check.py for what differs between devices and the tolerances.
"""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lab, not installed

from benchmarks import device_check  # noqa: E402
from benchmarks.timing import environment  # noqa: E402
from mmeformer.cli import doc_parser, image_size  # noqa: E402
from mmeformer.models import arch_names  # noqa: E402


def main(argv=None):
    parser = doc_parser(__doc__)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cuda')
    parser.add_argument('--variants', nargs='+', choices=arch_names(), metavar='ARCH')
    parser.add_argument('--sizes', nargs='+', type=image_size, metavar='HxW',
                        default=[(800, 1344), (250, 330)])
    parser.add_argument('--dtypes', nargs='+', choices=sorted(device_check.TOLERANCES))
    parser.add_argument('--runtimes', nargs='+', choices=device_check.RUNTIMES,
                        default=list(device_check.RUNTIMES))
    parser.add_argument('--no-official-bias', action='store_true',
                        help="skip bias_mode='official' (EfficientFormer V1 / V2)")
    parser.add_argument('--no-training', action='store_true', help='inference checks only')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(),
                        help='CPU threads (the reference runs on CPU)')
    parser.add_argument('--out', default='outputs/device_check')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available here')
    dtypes = args.dtypes or (['float32', 'float16', 'bfloat16'] if args.device == 'cuda'
                             else ['bfloat16'])
    reason = device_check.nothing_to_check(args.device, dtypes, args.runtimes)
    if reason:
        parser.error(reason)
    torch.set_num_threads(args.threads)
    results = device_check.run(args.variants or arch_names(), args.sizes, args.device, dtypes,
                               args.runtimes, official_bias=not args.no_official_bias,
                               training=not args.no_training,
                               progress=lambda line: print(line, flush=True))
    env = environment(args.device, args.threads)
    text = device_check.to_markdown(results, env)
    os.makedirs(args.out, exist_ok=True)
    print(text)
    for kind, content in (('md', text), ('json', json.dumps(
            dict(environment=env, results=[dict(asdict(r), ok=r.ok)
                                           for r in results]), indent=1))):
        path = os.path.join(args.out, f'device_check.{kind}')
        with open(path, 'w') as f:
            f.write(content)
        print(f'wrote {kind}: {path}')
    return 0 if all(r.ok for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
