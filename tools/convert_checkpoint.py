#!/usr/bin/env python
"""Convert a released EfficientFormer / EfficientFormerV2 / EfficientViT checkpoint (original
ImageNet release, official dense backbone, timm) into an mmeformer backbone state dict.

    python tools/convert_checkpoint.py SRC DST [--prefix backbone.]
    python tools/convert_checkpoint.py SRC DST --full

DST ending in ``.safetensors`` is written as safetensors, anything else with ``torch.save`` as
``{'state_dict': ..., 'meta': ...}``; both load with ``init_cfg=dict(type='Pretrained', ...)``.

``--full`` (chosen automatically when SRC holds a whole model: ``backbone.*`` plus neck / head
keys, unless ``--prefix`` is given) converts a released snap-research mmdet 2.x Mask R-CNN or
mmseg 0.x Semantic FPN checkpoint, or the Cream EfficientViT-M4 Mask R-CNN / RetinaNet one, into
a whole-model file that tools/test.py loads into the matching config with no missing and no
unexpected keys (logic in mmeformer/checkpoint/detector.py).

Before writing, the converted backbone is checked against the released arch it comes from, with
the strict key check of ``init_cfg`` loading: a file that would fail or load only in part (DDP
``module.`` keys, missing, extra or mis-shaped tensors, an unknown arch) exits with status 1 and
the reason instead.
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file

from mmeformer.checkpoint import (CheckpointError, extract_state_dict, read_backbone_state_dict,
                                  read_checkpoint)
from mmeformer.checkpoint.detector import convert_full_checkpoint, is_full_model_state_dict
from mmeformer.checkpoint.loading import convert_and_verify


def check_destination(dst: str) -> None:
    """Fail before any work when ``dst`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(dst))
    if os.path.isdir(dst):
        raise CheckpointError(f'DST {dst!r} is a directory; give a file name, e.g. '
                              f'{os.path.join(dst, "converted.pth")!r}')
    if not os.path.isdir(folder):
        raise CheckpointError(f'the folder of DST {dst!r} does not exist: create it first '
                              f'(mkdir -p {folder}) or write elsewhere')


def convert_file(src: str, dst: str, prefix=None) -> dict:
    state_dict, family, prefix, outside = read_backbone_state_dict(src, prefix)
    converted, dropped, info, arch = convert_and_verify(state_dict, family, src, prefix)
    meta = dict(family=family, arch=arch, source=src, source_layout=info['layout'],
                dense_bias_tables=str(info['dense']), dropped=str(len(dropped)))
    converted = {k: v.contiguous() for k, v in converted.items()}
    if dst.endswith('.safetensors'):
        save_file(converted, dst, metadata=meta)
    else:
        torch.save(dict(state_dict=converted, meta=meta), dst)
    return dict(meta, keys=len(converted), prefix=prefix, outside_prefix=outside,
                dropped_keys=dropped)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src')
    parser.add_argument('dst')
    parser.add_argument('--prefix', default=None,
                        help="key prefix of the backbone, e.g. 'backbone.' (default: automatic)")
    parser.add_argument('--full', action='store_true',
                        help='convert the whole detector / segmentor (default: automatic for '
                        'full-model files unless --prefix is given)')
    args = parser.parse_args(argv)
    try:
        check_destination(args.dst)
        full = args.full
        if args.full and args.prefix is not None:
            raise CheckpointError('--full converts the whole model; drop --prefix')
        if not full and args.prefix is None:
            state_dict, _ = extract_state_dict(read_checkpoint(args.src), args.src)
            full = is_full_model_state_dict(state_dict)
        if full:
            return _convert_full(args.src, args.dst)
        result = convert_file(args.src, args.dst, args.prefix)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f"{result['family']} arch={result['arch']} ({result['source_layout']} layout): wrote "
          f"{result['keys']} tensors to {args.dst}; dropped {len(result['dropped_keys'])} "
          f'(heads, index buffers, placeholders)')
    return 0


def _convert_full(src: str, dst: str) -> int:
    result = convert_full_checkpoint(src, dst)
    print(f"{result['family']} arch={result['arch']} full model ({result['heads']}): wrote "
          f"{result['keys']} tensors to {dst}; dropped {len(result['dropped_keys'])} "
          f'(index buffers, placeholders)')
    if result.get('bias_mode') == 'official':
        print(f"evaluate with: tools/test.py CONFIG {dst} --cfg-options "
              f"model.backbone.bias_mode=official "
              f"model.backbone.bias_img_size={result['bias_img_size']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
