#!/usr/bin/env python
"""Convert a released EfficientFormer / EfficientFormerV2 / EfficientViT checkpoint (original
ImageNet release, official dense backbone, timm) into an mmeformer backbone state dict.

    python tools/convert_checkpoint.py SRC DST [--prefix backbone.]

DST ending in ``.safetensors`` is written as safetensors, anything else with ``torch.save`` as
``{'state_dict': ..., 'meta': ...}``; both load with ``init_cfg=dict(type='Pretrained', ...)``.
"""
import argparse
import sys

import torch

from mmeformer.checkpoint import (CheckpointError, convert_state_dict, guess_arch,
                                  read_backbone_state_dict)


def convert_file(src: str, dst: str, prefix=None) -> dict:
    state_dict, family, prefix, outside = read_backbone_state_dict(src, prefix)
    converted, dropped, info = convert_state_dict(state_dict, family)
    arch = guess_arch(converted, family)
    meta = dict(family=family, arch=arch or 'unknown', source=src, source_layout=info['layout'],
                dense_bias_tables=str(info['dense']), dropped=str(len(dropped)))
    converted = {k: v.contiguous() for k, v in converted.items()}
    if dst.endswith('.safetensors'):
        from safetensors.torch import save_file
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
    args = parser.parse_args(argv)
    try:
        result = convert_file(args.src, args.dst, args.prefix)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f"{result['family']} arch={result['arch']} ({result['source_layout']} layout): wrote "
          f"{result['keys']} tensors to {args.dst}; dropped {len(result['dropped_keys'])} "
          f'(heads, index buffers, placeholders)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
