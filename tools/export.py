#!/usr/bin/env python
"""Export a backbone (optionally with its neck) and check it in its runtime.

    python tools/export.py efficientformerv2_s0 --format onnx --shape 512 512 --dynamic \
        --out outputs/export/s0.onnx
    python tools/export.py efficientformer_l1 --format litert --shape 512 512 --nhwc \
        --out outputs/export/l1.tflite
    python tools/export.py efficientformer_l1 --format openvino --int8 --calib-images DIR \
        --shape 512 512 --out outputs/export/l1_int8.xml

ARCH is one of efficientformer_{l1,l3,l7}, efficientformerv2_{s0,s1,s2,l}, efficientvit_m{0..5},
or a detection / segmentation config (its backbone; with --with-neck also its neck). Several
ARCHs, or `all` (the 13 backbones): --out is a folder, each file is named after its ARCH, and a
table of the results ends the output.

    python tools/export.py all --format litert --shape 224 224 --out outputs/export/litert/

Formats: onnx (ONNX Runtime), openvino (IR .xml + .bin, OpenVINO CPU plugin in float32),
litert (.tflite, LiteRT interpreter with XNNPACK), torchscript, coreml (.mlpackage; converted
on Linux and checked by inspecting its spec, since prediction needs macOS). --dynamic (any
batch and size): onnx and openvino. --nhwc (channels-last input and outputs): litert.

After the export the file is run in its runtime at the export size and, for a dynamic export,
at two more sizes. float32: the largest relative difference per level against PyTorch is
printed, exit status 1 above 1e-4. --int8 (onnx: QDQ with per-channel weights; openvino: NNCF;
litert: PT2E; calibrated on --calib-count images of --calib-images, default generated toy
images): the relative difference and the cosine similarity per level on calibration-like images
are printed, exit status 1 when a level's cosine similarity is below 0.99.

--randomize gives the model random weights of a trained model's scale instead of its initial
ones, for conversion and int8 checks without a checkpoint: the initial weights switch
EfficientViT's residual branches off (zero-initialised BatchNorm scales), which leaves the int8
calibration nothing realistic to measure (and made OpenVINO's CPU plugin crash).

    python tools/export.py all --format litert --int8 --randomize --out outputs/export/int8/
"""
import os
import sys
import time
from pathlib import Path
from typing import Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lab (benchmarks/), not installed

from benchmarks.randomize import randomize_  # noqa: E402
from mmeformer import export  # noqa: E402
from mmeformer.builder import build_model  # noqa: E402
from mmeformer.cli import doc_parser  # noqa: E402
from mmeformer.models import arch_names, fuse  # noqa: E402

INT8_MIN_COSINE = 0.99


def parse_args(argv=None):
    parser = doc_parser(__doc__)
    parser.add_argument('arch', nargs='+', help='arch name(s) or config file(s), or all')
    parser.add_argument('--format', choices=list(export.FORMATS), default='onnx')
    parser.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    parser.add_argument('--dynamic', action='store_true', help='any batch, H and W')
    parser.add_argument('--nhwc', action='store_true', help='channels-last input and outputs')
    parser.add_argument('--int8', action='store_true',
                        help='post-training static int8 quantization')
    parser.add_argument('--calib-images', metavar='DIR',
                        help='calibration images for --int8 (default: generated toy images)')
    parser.add_argument('--calib-count', type=int, default=32, metavar='N')
    parser.add_argument('--checkpoint', help='weights to load (any supported checkpoint)')
    parser.add_argument('--randomize', action='store_true',
                        help='random weights of realistic scale (seed 0) instead of the initial '
                             'ones; not with --checkpoint')
    parser.add_argument('--with-neck', action='store_true', help='export backbone + neck')
    parser.add_argument('--no-fuse', action='store_true', help='keep BatchNorms unfused')
    parser.add_argument('--opset', type=int, default=export.ONNX_OPSET)
    parser.add_argument('--coreml-input', choices=['image', 'tensor'], default='image',
                        help='image: RGB 0..255 with ImageNet normalisation in the graph; '
                             'tensor: float input, normalised by the caller')
    parser.add_argument('--out', required=True)
    args = parser.parse_args(argv)
    args.arch = arch_names() if args.arch == ['all'] else args.arch
    try:  # checked now, not after a model is built and traced
        export.check_request(args.format, args.dynamic, args.int8, args.nhwc)
        if args.format == 'coreml' and len(args.arch) == 1:
            args.out = export.coreml_package_path(args.out)
    except ValueError as err:
        parser.error(f'--out: {err}' if 'ML program package' in str(err) else str(err))
    if (args.calib_images or args.calib_count != 32) and not args.int8:
        parser.error('--calib-images / --calib-count apply to --int8 only')
    if min(args.shape) < 32:
        parser.error('--shape must be at least 32x32')
    if args.randomize and args.checkpoint:
        parser.error('--randomize replaces the weights: drop --checkpoint or --randomize')
    return args


def main(argv=None):
    args = parse_args(argv)
    if len(args.arch) == 1:
        return export_one(args, args.arch[0], args.out)[0]
    suffix = export.FORMATS[args.format].suffix
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for arch in args.arch:
        name = os.path.splitext(os.path.basename(arch))[0]
        print(f'\n== {name}', flush=True)
        start = time.time()
        status, detail = export_one(args, arch, os.path.join(args.out, name + suffix))
        rows.append((name, status, detail, time.time() - start))
    print(f'\n| arch | {args.format}{" int8" if args.int8 else ""} {args.shape[0]}x'
          f'{args.shape[1]} | check | seconds (export + check) |\n|---|---|---|---|')
    for name, status, detail, seconds in rows:
        print(f'| {name} | {("OK", "FAILED check", "ERROR")[status]} | {detail} | '
              f'{seconds:.0f} |')
    return max(row[1] for row in rows)


def export_one(args, arch: str, out: str) -> Tuple[int, str]:
    """Export and check one ARCH: (exit status, what the check found)."""
    torch.manual_seed(0)
    shape = tuple(args.shape)
    try:
        model = build_model(arch, args.checkpoint, args.with_neck)
        if args.randomize:
            randomize_(model)
        if not args.no_fuse:
            fuse(model)  # the exporters freeze the attention biases of a fixed size themselves
        calibration = (export.calibration_inputs(shape, args.calib_images, args.calib_count)
                       if args.int8 else None)
        summary = export.export_backbone(
            model, args.format, out, shape, dynamic=args.dynamic, int8=args.int8,
            calibration=calibration, nhwc=args.nhwc, opset=args.opset,
            image_input=args.coreml_input == 'image')
    except (ValueError, RuntimeError) as err:  # unknown arch, config, export or converter error
        print(f'error: {err}', file=sys.stderr)
        return 2, str(err).replace('|', '/')[:160]
    if args.format == 'coreml':
        print(f'CoreML mlprogram written to {out}: inputs {summary["inputs"]}, outputs '
              f'{summary["outputs"]}, {len(summary["ops"])} op types')
        resizes = [op for op in summary['ops'] if 'resize' in op or 'upsample' in op]
        print(f'resize/upsample ops: {resizes or "none"}')
        return 0, f'spec: {len(summary["ops"])} op types, resize ops {resizes or "none"}'
    batch = 2 if args.dynamic else 1  # a dynamic export's batch axis is dynamic too
    sizes = export.check_sizes(shape, args.dynamic)
    # int8: checked on images (4 per size, like the calibration's); errors on noise say little.
    inputs = ((lambda size: export.calibration_inputs(size, args.calib_images, 4))
              if args.int8 else None)
    errors = export.verify_export(model, args.format, out, sizes, batch, args.nhwc, inputs)
    print(f'{args.format}{" int8" if args.int8 else ""} export of {arch} written to '
          f'{out}; outputs {export.output_names(model, shape)}')
    for size, levels in errors.items():
        print(f'  {size[0]}x{size[1]}, batch {batch}: relative difference per level '
              f'{_row(levels["relative"], ".1e")}, cosine similarity '
              f'{_row(levels["cosine"], ".5f")}')
    worst = export.per_level(errors)
    if args.int8:
        ok = min(worst['cosine']) >= INT8_MIN_COSINE
        detail = (f'cosine >= {min(worst["cosine"]):.5f}, relative difference <= '
                  f'{max(worst["relative"]):.2e}')
        print(f'{"OK" if ok else "FAILED"}: smallest cosine similarity '
              f'{min(worst["cosine"]):.5f} (limit {INT8_MIN_COSINE}); largest relative '
              f'difference {max(worst["relative"]):.2e}')
    else:
        ok = max(worst['relative']) <= export.TOLERANCE
        detail = f'relative difference <= {max(worst["relative"]):.1e}'
        print(f'{"OK" if ok else "FAILED"}: largest difference {max(worst["relative"]):.2e} '
              f'(limit {export.TOLERANCE:.0e}); wrote {out}')
    return (0 if ok else 1), detail


def _row(values, fmt):
    return '[' + ', '.join(format(v, fmt) for v in values) + ']'


if __name__ == '__main__':
    sys.exit(main())
