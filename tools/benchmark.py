#!/usr/bin/env python
"""Backbone latency report: variants x sizes x runtimes x batch sizes x threads, as Markdown, CSV,
JSON (with the environment) and a PNG plot.

    python tools/benchmark.py --quick                       # about a minute
    python tools/benchmark.py --out outputs/benchmark        # all 13 at 224, 512, 800x1344
    python tools/benchmark.py --compare --sizes 800x1344 512x512 224x224   # vs timm / official
    python tools/benchmark.py --profile --compare --variants efficientformerv2_s0 --sizes 512x512

--compare adds, in the same run: timm (all 13 at 224; EfficientViT with img_size=512 at every
size); for EfficientFormer V1/V2 at detection / segmentation sizes, mmeformer with
bias_mode='official' and benchmarks/official_reference.py, a plain re-implementation of the official
dense backbones (bias matrix gathered and resized bicubically on every forward) that stands in
for the official code. The report ends with the speed ratios of the run.

--profile (CPU, eager, batch 1) instead shows where the time goes: the part spent inside the
attention modules (those owning an attention-bias table) against the rest of the network, and
the time inside each aten op, for mmeformer and, with --compare, the references. Ops that
multiply matrices (GEMMs, convolutions) also get their GFLOP/s, against the fp32 matmul
throughput measured at the start of the run.

--size-stream N (CPU, fp32, batch 1, eager / fused) instead runs N images of a seeded stream of
detection test sizes (keep-ratio resize into 1333x800, padded to 32; see
benchmarks/size_stream.py), each through every candidate in turn, and reports
the mean time per image and the bytes of attention biases cached at the end: what an
evaluation pays for new input sizes, which a fixed-size run never shows.

--train (CPU, batch 2 unless --batch-sizes) instead times the training step of each backbone
(train mode, forward, backward from dense level gradients, AdamW step; see
benchmarks/training.py) at 512x512 and 800x1344, in float32 and CPU bfloat16 autocast
(--train-dtypes), against the official code's re-implementation (V1 / V2) or timm (EfficientViT)
in interleaved rounds (each setting in its own process: one that runs out of memory is listed
as not timed), with GFLOP/s (3x the forward MACs) and, unless --no-peak-memory, the
peak memory of forward + backward measured per candidate in a fresh process (--train-compile
adds mmeformer under torch.compile to the rounds). --train-detector
times a toy Mask R-CNN's training iteration per family (--configs) split into backbone, neck
and the rest, beside the reference backbone:

    python tools/benchmark.py --train --variants efficientformer_l1 efficientvit_m4
    python tools/benchmark.py --train-detector
"""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the lab (benchmarks/) sits beside the package, not installed

from benchmarks import isolation, latency, memory, profiling, references, training  # noqa: E402
from benchmarks import size_stream as stream  # noqa: E402
from mmeformer.builder import build_model  # noqa: E402
from mmeformer.cli import doc_parser, image_size  # noqa: E402
from mmeformer.models import arch_names  # noqa: E402

# Two variants of each family, so that the figure draws a line per family.
QUICK = dict(variants=['efficientformer_l1', 'efficientformer_l3', 'efficientformerv2_s0',
                       'efficientformerv2_s1', 'efficientvit_m0', 'efficientvit_m4'],
             sizes=[(224, 224), (512, 512)], runtimes=['eager', 'fused', 'onnxruntime'],
             warmup=1, repeats=5)
PROFILE_VARIANTS = ['efficientformer_l1', 'efficientformerv2_s0', 'efficientvit_m4']


def main(argv=None):
    parser = doc_parser(__doc__)
    parser.add_argument('--variants', nargs='+', choices=arch_names(), metavar='ARCH')
    parser.add_argument('--sizes', nargs='+', type=image_size, metavar='HxW')
    parser.add_argument('--runtimes', nargs='+', choices=references.RUNTIMES,
                        help='eager, fused, compile, and the deployment runtimes '
                        '(fused fixed-size exports): onnxruntime, openvino, litert, each also '
                        'as NAME-int8')
    parser.add_argument('--int8', action='store_true', help='add the int8 export of each '
                        'deployment runtime timed (onnxruntime-int8, ...)')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'], default='float32')
    parser.add_argument('--warmup', type=int)
    parser.add_argument('--repeats', type=int)
    parser.add_argument('--compare', action='store_true', help='also time timm and the official '
                        'code stand-in (see below)')
    parser.add_argument('--quick', action='store_true',
                        help='6 variants (2 per family), 2 sizes, about a minute')
    parser.add_argument('--train-memory', action='store_true',
                        help='instead of latency: peak memory of one training step (forward + '
                        'backward) per variant, each in a fresh process (default batch 2, '
                        '800x1344; with --compare also the official re-implementation)')
    parser.add_argument('--eval-memory', action='store_true',
                        help='instead of latency: memory of inference (batch 1, eval, no grad) '
                        'per variant and runtime (eager, fused), each in a fresh process: peak '
                        'above the model, memory held after two forwards, bytes of the '
                        'inference caches (default 800x1344; with --compare also the '
                        'references)')
    parser.add_argument('--profile', action='store_true',
                        help='instead of latency: time in the attention modules against the '
                        'rest, and per aten op, with the GFLOP/s of the matrix ops (CPU eager; '
                        'see below)')
    parser.add_argument('--size-stream', type=int, metavar='N',
                        help='instead of latency: N images of detection test sizes in a '
                        'stream (see below)')
    parser.add_argument('--malloc', choices=['kept', 'default'], default='kept',
                        help="latency runs: 'kept' (default) keeps freed memory in glibc's heap "
                        "for this process, for every implementation alike (see "
                        "benchmarks/allocator.py); 'default' leaves glibc's settings")
    parser.add_argument('--train', action='store_true',
                        help='instead of latency: the training step against the official code '
                        '(see below)')
    parser.add_argument('--train-dtypes', nargs='+', choices=training.TRAIN_DTYPES,
                        default=list(training.TRAIN_DTYPES), help='--train: step dtypes')
    parser.add_argument('--no-peak-memory', action='store_true',
                        help='--train: skip the peak-memory processes')
    parser.add_argument('--train-compile', action='store_true',
                        help='--train: also mmeformer under torch.compile (compiled during the '
                        'warmup)')
    parser.add_argument('--train-detector', action='store_true',
                        help='instead of latency: a toy Mask R-CNN training iteration split into '
                        'backbone, neck and the rest (see below)')
    parser.add_argument('--configs', nargs='+', metavar='CONFIG',
                        default=list(training.DETECTOR_CONFIGS),
                        help='--train-detector: the configs (default: one toy per family)')
    parser.add_argument('--out', default='outputs/benchmark')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available here')
    if args.device == 'cpu' and args.dtype == 'float16':
        parser.error('float16 on CPU is not a meaningful benchmark; use bfloat16 or --device cuda')
    if args.train_memory:
        return train_memory(args)
    if args.train or args.train_detector:
        if args.device != 'cpu':
            parser.error('--train / --train-detector time CPU training steps')
        return train_detector(args) if args.train_detector else train_speed(args)
    if args.eval_memory:
        if set(args.runtimes or ()) - {'eager', 'fused'}:
            parser.error('--eval-memory measures the eager and fused runtimes only')
        return eval_memory(args)
    if args.profile:
        return profile(args)
    if args.size_stream is not None:
        return size_stream(args, parser)
    settings = dict(QUICK) if args.quick else dict(
        variants=arch_names(), sizes=list(latency.DEFAULT_SIZES),
        runtimes=['eager', 'fused', 'compile', 'onnxruntime'], warmup=2, repeats=10)
    for key in ('variants', 'sizes', 'runtimes', 'warmup', 'repeats'):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.int8:
        settings['runtimes'] = list(dict.fromkeys(settings['runtimes'] + [
            r + references.INT8_SUFFIX for r in settings['runtimes'] if r in references.EXPORTED]))
    if args.device == 'cuda':  # the deployment runtimes are timed on CPU
        settings['runtimes'] = [r for r in settings['runtimes']
                                if r.removesuffix(references.INT8_SUFFIX)
                                not in references.EXPORTED]
    report = latency.run(batch_sizes=args.batch_sizes, threads=args.threads,
                           device=args.device, dtype=args.dtype, compare=args.compare,
                           keep_memory=args.malloc == 'kept',
                           progress=lambda line: print(line, flush=True), **settings)
    paths = latency.write(report, args.out)
    print(latency.to_markdown(report))
    for kind, path in paths.items():
        print(f'wrote {kind}: {path}')
    return 0


def profile(args) -> int:
    if args.device != 'cpu' or args.dtype != 'float32':
        print('--profile times CPU fp32 eager forwards only', file=sys.stderr)
        return 2
    repeats = args.repeats or 5
    rows = profiling.profile(args.variants or PROFILE_VARIANTS, args.sizes or [(512, 512)],
                             compare=args.compare, threads=args.threads,
                             warmup=args.warmup or 2, repeats=repeats,
                             keep_memory=args.malloc == 'kept',
                             progress=lambda line: print(line, flush=True))
    text = (f'{args.threads} threads, batch 1, fp32, eval; medians of {repeats} '
            f'forwards; fp32 matmul {rows[0].matmul_gflops:.0f} GFLOP/s.\n\n'
            + profiling.profile_markdown(rows))
    write_report(args.out, 'profile', text, [asdict(r) for r in rows])
    return 0


def write_report(out_dir: str, name: str, text: str, data) -> None:
    """Print ``text`` and write it as ``name``.md, and ``data`` as ``name``.json."""
    os.makedirs(out_dir, exist_ok=True)
    print(text)
    for kind, content in (('md', text), ('json', json.dumps(data, indent=1))):
        path = os.path.join(out_dir, f'{name}.{kind}')
        with open(path, 'w') as f:
            f.write(content)
        print(f'wrote {kind}: {path}')


def size_stream(args, parser) -> int:
    runtimes = args.runtimes or ['eager']
    if args.device != 'cpu' or args.dtype != 'float32' or args.size_stream < 1:
        parser.error('--size-stream N (N >= 1) times CPU fp32 forwards only')
    if set(runtimes) - set(stream.STREAM_RUNTIMES):
        parser.error('--size-stream times the eager and fused runtimes only (the others are '
                     'built for one input size)')
    env, results = stream.size_stream(
        args.variants or PROFILE_VARIANTS, args.size_stream, runtimes, compare=args.compare,
        threads=args.threads, warmup=args.warmup or 1, keep_memory=args.malloc == 'kept',
        progress=lambda line: print(line, flush=True))
    write_report(args.out, 'size_stream', stream.size_stream_markdown(env, results),
                 dict(environment=env, results=[asdict(r) for r in results]))
    return 0


def _in_fresh_processes(calls: List[tuple], threads: int, keep_failed: bool = False) -> List[dict]:
    """Run each :mod:`benchmarks.memory` call, ``(function, *args)``, in its own process (a
    process's peak resident set only grows); the rows of those that succeeded (with
    ``keep_failed``, None in place of those that failed)."""
    rows = []
    for fn, *call_args in calls:
        call = f'{fn.__name__}({", ".join(map(repr, call_args))})'
        row = isolation.in_fresh_process(isolation.with_threads, threads, fn, *call_args)
        if isinstance(row, str):  # how its process died
            print(f'{call}: failed: {row}', flush=True)
            if keep_failed:
                rows.append(None)
            continue
        rows.append(row)
        print(f'{call}: ' + ', '.join(f'{key} {value}' for key, value in row.items()
                                      if key.endswith(('_mib', '_s'))), flush=True)
    return rows


def _write_table(args, name: str, lines: List[str]) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f'{name}.md')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    print(f'wrote md: {path}')


def train_speed(args) -> int:
    batch = args.batch_sizes[0] if args.batch_sizes != [1] else 2
    env, rows = training.run(args.variants, args.sizes or training.TRAIN_SIZES,
                             args.train_dtypes, batch, args.threads, args.warmup or 1,
                             args.repeats or 5, keep_memory=args.malloc == 'kept',
                             compile=args.train_compile,
                             progress=lambda line: print(line, flush=True))
    if not args.no_peak_memory:
        eager = [r for r in rows if r.implementation != training.COMPILED]
        calls = [(memory.train_step_memory, r.variant, (r.height, r.width), batch,
                  r.implementation, 'cpu', r.dtype) for r in eager]
        for row, peak in zip(eager, _in_fresh_processes(calls, args.threads, keep_failed=True)):
            row.peak_mib = None if peak is None else peak['peak_mib']
    write_report(args.out, 'training', training.to_markdown(env, rows),
                 dict(environment=env, results=[asdict(r) for r in rows],
                      ratios=training.ratios(rows)))
    return 0


def train_detector(args) -> int:
    rows = []
    for config in args.configs:
        rows.append(training.detector_breakdown(config, args.warmup or 1, args.repeats or 5,
                                                args.threads, args.malloc == 'kept'))
        print(f'{config}: {rows[-1]}', flush=True)
    env = training.environment('cpu', args.threads)
    write_report(args.out, 'training_detector', training.detector_markdown(env, rows),
                 dict(environment=env, results=[dict(asdict(r), backbone_ratio=r.backbone_ratio,
                                                     iteration_ratio=r.iteration_ratio)
                                                for r in rows]))
    return 0


def train_memory(args) -> int:
    variants = args.variants or arch_names()
    (h, w), = args.sizes or [(800, 1344)]
    batch = args.batch_sizes[0] if args.batch_sizes != [1] else 2
    calls = [(memory.train_step_memory, variant, (h, w), batch, impl, args.device)
             for variant in variants
             for impl in ['mmeformer'] + (['official (re-implemented)'] if args.compare and
                                          not variant.startswith('efficientvit_') else [])]
    rows = _in_fresh_processes(calls, args.threads)
    lines = [f'Training step (forward + backward), batch {batch}, {h}x{w}, {args.device}, '
             f'{args.threads} threads, fp32, random weights; peak memory above the '
             'model + input (CPU: growth of the peak resident set).', '',
             '| variant | implementation | peak MiB | step s |', '|---|---|---|---|']
    lines += [f"| {r['variant']} | {r['implementation']} | {r['peak_mib']:.0f} | "
              f"{r['step_s']:.1f} |" for r in rows]
    _write_table(args, 'train_memory', lines)
    return 0 if rows else 1


def eval_memory(args) -> int:
    calls = []
    for variant in args.variants or arch_names():
        base = build_model(variant) if args.compare else None  # names its references
        for h, w in args.sizes or [(800, 1344)]:
            settings = [('mmeformer', runtime) for runtime in args.runtimes or ('eager', 'fused')]
            if args.compare:
                settings += [(impl, runtime) for impl, runtime, _, _ in
                             references.reference_builders(variant, base, (h, w))]
            calls += [(memory.eval_memory, variant, (h, w), impl, runtime, args.device)
                      for impl, runtime in settings]
    rows = _in_fresh_processes(calls, args.threads)
    lines = [f'Inference (eval, no grad, batch 1), {args.device}, {args.threads} threads, fp32, '
             'random weights, each in a fresh process. Peak: the first forward, above the model '
             '+ input; held: after a second forward, what stays (CPU: resident set, free heap '
             "memory returned first); caches: mmeformer's inference caches (folded and packed "
             'weights, attention biases), counted.', '',
             '| variant | size | implementation | runtime | params MiB | peak MiB | held MiB | '
             'caches MiB | first forward s |', '|---|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['variant']} | {r['height']}x{r['width']} | {r['implementation']} | "
              f"{r['runtime']} | {r['params_mib']:.1f} | {r['peak_mib']:.0f} | "
              f"{r['held_mib']:.0f} | {r['cache_mib']:.1f} | {r['first_forward_s']:.2f} |"
              for r in rows]
    _write_table(args, 'eval_memory', lines)
    return 0 if len(rows) == len(calls) else 1


if __name__ == '__main__':
    sys.exit(main())
