#!/usr/bin/env python
"""Export a backbone (optionally with its neck) to ONNX, TorchScript or CoreML and check it.

    python tools/export.py efficientformerv2_s0 --format onnx --shape 512 512 --dynamic \
        --out outputs/export/s0.onnx

ARCH is one of efficientformer_{l1,l3,l7}, efficientformerv2_{s0,s1,s2,l}, efficientvit_m{0..5},
or a detection / segmentation config (its backbone; with --with-neck also its neck). After the
export the file is run (ONNX Runtime / TorchScript) at the export size and, for a dynamic export,
at two more sizes; the largest relative difference against PyTorch is printed and the exit
status is 1 above 1e-4. CoreML packages are converted on Linux and checked by inspecting their
spec (prediction needs macOS).
"""
import sys

import torch

from mmeformer import export
from mmeformer.builder import build_model
from mmeformer.cli import doc_parser
from mmeformer.models import fuse


def parse_args(argv=None):
    parser = doc_parser(__doc__)
    parser.add_argument('arch', help='arch name or config file')
    parser.add_argument('--format', choices=['onnx', 'torchscript', 'coreml'], default='onnx')
    parser.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    parser.add_argument('--dynamic', action='store_true', help='ONNX: dynamic batch, H and W')
    parser.add_argument('--checkpoint', help='weights to load (any supported checkpoint)')
    parser.add_argument('--with-neck', action='store_true', help='export backbone + neck')
    parser.add_argument('--no-fuse', action='store_true', help='keep BatchNorms unfused')
    parser.add_argument('--opset', type=int, default=export.ONNX_OPSET)
    parser.add_argument('--coreml-input', choices=['image', 'tensor'], default='image',
                        help='image: RGB 0..255 with ImageNet normalisation in the graph; '
                             'tensor: float input, normalised by the caller')
    parser.add_argument('--out', required=True)
    args = parser.parse_args(argv)
    if args.dynamic and args.format != 'onnx':
        parser.error('--dynamic applies to ONNX only')
    if args.format == 'coreml':
        try:  # checked now, not after a model is built and traced
            args.out = export.coreml_package_path(args.out)
        except ValueError as err:
            parser.error(f'--out: {err}')
    if min(args.shape) < 32:
        parser.error('--shape must be at least 32x32')
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    try:
        model = build_model(args.arch, args.checkpoint, args.with_neck)
    except ValueError as err:  # unknown arch, a config error naming the key (ConfigError)
        print(f'error: {err}', file=sys.stderr)
        return 2
    if not args.no_fuse:
        fuse(model)  # the exporters freeze the attention biases of a fixed size themselves
    sizes = export.check_sizes(shape, args.dynamic)
    batch = 2 if args.dynamic else 1  # a dynamic export's batch axis is dynamic too
    if args.format == 'onnx':
        names = export.export_onnx(model, args.out, shape, args.dynamic, args.opset)
        errors = export.verify_onnx(model, args.out, sizes, batch)
        print(f'ONNX opset {args.opset} (TorchScript-based exporter), outputs {names}')
    elif args.format == 'torchscript':
        export.export_torchscript(model, args.out, shape)
        errors = export.verify_torchscript(model, args.out, sizes)
    else:
        try:
            summary = export.export_coreml(model, args.out, shape, args.coreml_input == 'image')
        except RuntimeError as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        print(f'CoreML mlprogram written to {args.out}: inputs {summary["inputs"]}, outputs '
              f'{summary["outputs"]}, {len(summary["ops"])} op types')
        resizes = [op for op in summary['ops'] if 'resize' in op or 'upsample' in op]
        print(f'resize/upsample ops: {resizes or "none"}')
        return 0
    worst = max(errors.values())
    for size, err in errors.items():
        print(f'  {size[0]}x{size[1]}, batch {batch}: max relative difference vs PyTorch '
              f'{err:.2e}')
    status = 'OK' if worst <= export.TOLERANCE else 'FAILED'
    print(f'{status}: largest difference {worst:.2e} (limit {export.TOLERANCE:.0e}); '
          f'wrote {args.out}')
    return 0 if worst <= export.TOLERANCE else 1


if __name__ == '__main__':
    sys.exit(main())
