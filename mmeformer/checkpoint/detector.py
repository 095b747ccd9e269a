"""Converting released full detector / segmentor checkpoints for mmdet 3.x / mmseg 1.x.

Sources: the snap-research EfficientFormer / EfficientFormerV2 COCO Mask R-CNN (mmdet 2.x) and
ADE20K Semantic FPN (mmseg 0.x) files, and the Cream EfficientViT-M4 COCO Mask R-CNN and
RetinaNet files. The backbone part (``backbone.*``) goes through
:func:`mmeformer.checkpoint.convert_state_dict`; neck and head keys are copied unchanged, because
the names of FPN, EfficientViTFPN, RPN, RoI (bbox / mask), RetinaNet and FPN decode heads did not
change between mmdet 2.x / mmseg 0.x and mmdet 3.x / mmseg 1.x. The result loads into the
matching config with zero missing and zero unexpected keys.

The written file records under ``meta['mmeformer_conversion']`` the family, arch and, for
EfficientFormer V1/V2, the bias mode the backbone must be built with (``'official'`` and the
reference image size), so that ``tools/test.py`` can refuse a config in another bias mode.
"""
import os
from typing import Dict, Optional, Tuple

import torch

from .convert import dense_bias_img_size, detect_family, detect_layout
from .io import CheckpointError, extract_state_dict, read_checkpoint
from .loading import convert_and_verify

# Top-level modules of mmdet / mmseg models whose keys are copied as they are.
HEAD_PREFIXES = ('neck.', 'rpn_head.', 'roi_head.', 'bbox_head.', 'mask_head.', 'decode_head.',
                 'auxiliary_head.')
META_KEY = 'mmeformer_conversion'


def is_full_model_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True when the keys are those of a whole detector / segmentor (``backbone.`` plus at least
    one neck or head key), not of a backbone alone."""
    return (any(k.startswith('backbone.') for k in state_dict)
            and any(k.startswith(HEAD_PREFIXES) for k in state_dict))


def convert_full_state_dict(state_dict: Dict[str, torch.Tensor], path: str = '<checkpoint>'
                            ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], dict]:
    """Convert a whole detector / segmentor state dict.

    Returns ``(converted, dropped, meta)``; ``dropped`` maps original key -> reason, ``meta`` has
    ``family``, ``arch``, ``heads`` and, for V1/V2 dense files, ``bias_mode`` /
    ``bias_img_size``.
    """
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items()
                if k.startswith('backbone.')}
    if not backbone:
        raise CheckpointError('no backbone.* keys: this is not a full detector / segmentor '
                              'checkpoint (convert backbone files without --full)')
    others = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    unknown = sorted({k.split('.')[0] for k in others if not k.startswith(HEAD_PREFIXES)})
    if unknown:
        raise CheckpointError(f'unknown top-level modules {unknown} next to the backbone; '
                              f'expected only {[p[:-1] for p in HEAD_PREFIXES]}')
    family = detect_family(backbone)
    if family is None:
        raise CheckpointError(f'the backbone.* keys are not EfficientFormer, EfficientFormerV2 '
                              f'or EfficientViT keys (they look like {sorted(backbone)[:3]})')
    converted_backbone, dropped, info, arch = convert_and_verify(backbone, family, path,
                                                                 prefix='backbone.')
    converted = {'backbone.' + k: v for k, v in converted_backbone.items()}
    converted.update(others)
    heads = sorted({k.split('.')[0] for k in others})
    meta = dict(family=family, arch=arch, heads=','.join(heads), source_layout=info['layout'])
    if family != 'EfficientViT':
        if info['dense']:
            meta.update(bias_mode='official', bias_img_size=dense_bias_img_size(
                converted_backbone))
        else:
            meta.update(bias_mode='table')
    return converted, {'backbone.' + k: v for k, v in dropped.items()}, meta


def convert_full_checkpoint(src: str, dst: str) -> dict:
    """Convert the full checkpoint file ``src`` into ``dst`` (``{'state_dict', 'meta'}``).

    Returns the conversion meta plus ``keys`` and ``dropped_keys``.
    """
    state_dict, _ = extract_state_dict(read_checkpoint(src), src)
    converted, dropped, meta = convert_full_state_dict(state_dict, src)
    meta = dict(meta, source=os.path.basename(src))
    converted = {k: v.contiguous() for k, v in converted.items()}
    if dst.endswith('.safetensors'):
        raise CheckpointError('full detector / segmentor checkpoints are written with '
                              'torch.save (mmengine loads them); use a .pth destination')
    torch.save(dict(state_dict=converted, meta={META_KEY: meta}), dst)
    return dict(meta, keys=len(converted), dropped_keys=dropped)


def conversion_meta(checkpoint: dict) -> Optional[dict]:
    """The ``meta['mmeformer_conversion']`` of a checkpoint written by
    :func:`convert_full_checkpoint` (as read by :func:`read_checkpoint`), or None for any other
    checkpoint."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    return meta.get(META_KEY) if isinstance(meta, dict) else None


def unconverted_backbone_family(checkpoint: dict, path: str) -> Optional[str]:
    """The family of a whole-model checkpoint (read from ``path``) whose ``backbone.*`` keys are
    still in a released original layout (mmdet 2.x / mmseg 0.x / Cream), or None. mmengine's
    ``load_from`` would skip each of those keys as unexpected and leave the backbone at its
    initialisation."""
    state_dict, _ = extract_state_dict(checkpoint, path)
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items()
                if k.startswith('backbone.')}
    family = detect_family(backbone)
    return family if family and detect_layout(backbone) == 'original' else None
