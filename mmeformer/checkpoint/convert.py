"""Deterministic conversion of released checkpoints into mmeformer's parameter layout.

Accepted sources, for each family: the original ImageNet releases (snap-research
EfficientFormer / EfficientFormerV2 ``network.N`` layout, Microsoft EfficientViT ``blocksN``
layout), the official dense (mmdet 2.x / mmseg 0.x) backbones, timm state dicts and mmeformer's
own files. Every key is mapped by a rule on its own name (never by its position in the file);
keys that are deliberately not loaded are returned with the reason.
"""
import math
import re
from typing import Dict, Optional, Tuple

import torch

from ..models.archs import FAMILIES as ARCHS
from .io import CheckpointError

FAMILIES = tuple(ARCHS)

# Dropped on purpose, with the reason reported to the user.
HEAD_REASON = 'classification head / norm (not part of the backbone)'
INDEX_REASON = 'index buffer (rebuilt from the grid sizes, never loaded)'
PLACEHOLDER_REASON = ('ImageNet-shape bias placeholder of the dense release (its attention uses '
                      'the *_seg tables)')


def detect_family(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    keys = list(state_dict)
    if any(k.startswith('blocks1.') or '.mixer.m.attn.' in k for k in keys):
        return 'EfficientViT'
    if any('.mlp.mid.' in k or '.mlp.mid_norm.' in k for k in keys):
        return 'EfficientFormerV2'
    if any('token_mixer.qkv.' in k or '.mlp.norm1.' in k or '.mlp.fc1.weight' in k
           for k in keys):
        return 'EfficientFormer'
    return None


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """'original' (released ``network.N`` / ``blocksN`` files) or 'native' (timm / mmeformer)."""
    original = ('network.', 'blocks1.', 'blocks2.', 'patch_embed.0.')
    if any(k.startswith(original) for k in state_dict):
        return 'original'
    return 'native'


def _drop_reason(key: str) -> Optional[str]:
    if key.split('.')[0] in ('head', 'head_dist', 'dist_head', 'norm', 'fc', 'classifier'):
        return HEAD_REASON
    if 'attention_bias_idxs' in key:
        return INDEX_REASON
    return None


# -- original -> native rules, one function per family ----------------------------------------
def _stage_of_network_index(index: int) -> Tuple[int, str]:
    """network.N -> (stage, role): even N are block lists, odd N downsamplings."""
    return (index // 2, 'blocks') if index % 2 == 0 else ((index + 1) // 2, 'downsample')


V1_STEM = {'patch_embed.0.': 'stem.conv1.', 'patch_embed.1.': 'stem.norm1.',
           'patch_embed.3.': 'stem.conv2.', 'patch_embed.4.': 'stem.norm2.'}
V2_STEM = {'patch_embed.0.': 'stem.conv1.conv.', 'patch_embed.1.': 'stem.conv1.bn.',
           'patch_embed.3.': 'stem.conv2.conv.', 'patch_embed.4.': 'stem.conv2.bn.'}

V2_BLOCK_RULES = [
    (r'\.layer_scale_(\d)$', r'.ls\1.gamma'),
    (r'\.mlp\.fc1\.', '.mlp.fc1.conv.'), (r'\.mlp\.norm1\.', '.mlp.fc1.bn.'),
    (r'\.mlp\.mid\.', '.mlp.mid.conv.'), (r'\.mlp\.mid_norm\.', '.mlp.mid.bn.'),
    (r'\.mlp\.fc2\.', '.mlp.fc2.conv.'), (r'\.mlp\.norm2\.', '.mlp.fc2.bn.'),
    (r'\.(token_mixer|attn)\.(q|k|v|v_local|stride_conv)\.0\.', r'.\1.\2.conv.'),
    (r'\.(token_mixer|attn)\.(q|k|v|v_local|stride_conv)\.1\.', r'.\1.\2.bn.'),
    (r'\.(token_mixer|attn)\.proj\.1\.', r'.\1.proj.conv.'),
    (r'\.(token_mixer|attn)\.proj\.2\.', r'.\1.proj.bn.'),
    (r'\.attn\.q\.local\.0\.', '.attn.q.local.'),
    (r'\.attn\.q\.proj\.0\.', '.attn.q.proj.conv.'),
    (r'\.attn\.q\.proj\.1\.', '.attn.q.proj.bn.'),
]


def _apply_rules(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _v1_v2_original_key(key: str, family: str) -> str:
    stem = V1_STEM if family == 'EfficientFormer' else V2_STEM
    for old, new in stem.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r'norm(\d)\.(.*)$', key)  # dense V1 output norms norm0/2/4/6
    if m:
        stage, role = _stage_of_network_index(int(m.group(1)))
        return f'out_norms.{stage}.{m.group(2)}'
    m = re.match(r'network\.(\d+)\.(.*)$', key)
    if not m:
        return key
    stage, role = _stage_of_network_index(int(m.group(1)))
    rest = m.group(2)
    if role == 'blocks':
        key = f'stages.{stage}.blocks.{rest}'
    elif family == 'EfficientFormer':
        rest = re.sub(r'^proj\.', 'conv.', rest)
        key = f'stages.{stage}.downsample.{rest}'
    else:
        rest = re.sub(r'^(proj|conv)\.', 'conv.conv.', rest)
        rest = re.sub(r'^(norm|bn)\.', 'conv.bn.', rest)
        key = f'stages.{stage}.downsample.{rest}'
    if family == 'EfficientFormer':
        return re.sub(r'\.layer_scale_(\d)$', r'.ls\1.gamma', key)
    return _apply_rules(key, V2_BLOCK_RULES)


EV_PATCH_EMBED = {'0': 'conv1', '2': 'conv2', '4': 'conv3', '6': 'conv4'}
EV_DOWNSAMPLE_PARTS = {0: 'res1', 1: 'patchmerge', 2: 'res2'}


def _ev_original_key(key: str) -> str:
    parts = key.split('.')
    if parts[0] == 'patch_embed' and parts[1] in EV_PATCH_EMBED:
        parts = ['patch_embed', EV_PATCH_EMBED[parts[1]]] + parts[2:]
    m = re.match(r'blocks(\d)$', parts[0])
    if m:
        stage, index = int(m.group(1)) - 1, int(parts[1])
        if stage > 0 and index < 3:
            parts = ['stages', str(stage), 'downsample', EV_DOWNSAMPLE_PARTS[index]] + parts[2:]
        else:
            parts = ['stages', str(stage), 'blocks', str(index - 3 if stage > 0 else index)
                     ] + parts[2:]
    # ConvNorm pairs: the original names the conv 'c', timm and mmeformer 'conv'.
    return '.'.join('conv' if p == 'c' else p for p in parts)


def convert_state_dict(state_dict: Dict[str, torch.Tensor], family: str):
    """Convert to mmeformer's layout.

    Returns ``(converted, dropped, info)``: ``dropped`` maps original key -> reason; ``info``
    has ``layout`` and ``dense`` (whether the file holds the official ``*_seg`` bias tables).
    """
    if family not in FAMILIES:
        raise ValueError(f'unknown family {family!r}; one of {FAMILIES}')
    layout = detect_layout(state_dict)
    has_seg = any(k.endswith('attention_biases_seg') for k in state_dict)
    converted, dropped = {}, {}
    for key, value in state_dict.items():
        reason = _drop_reason(key)
        if reason is None and has_seg and key.endswith('.attention_biases'):
            reason = PLACEHOLDER_REASON
        if reason is not None:
            dropped[key] = reason
            continue
        new_key = key
        if key.endswith('attention_biases_seg'):
            new_key = key[:-len('_seg')]
        if layout == 'original':
            new_key = (_ev_original_key(new_key) if family == 'EfficientViT'
                       else _v1_v2_original_key(new_key, family))
        if family == 'EfficientFormerV2' and new_key.endswith(('ls1.gamma', 'ls2.gamma')):
            value = value.reshape(-1)  # original V2 stores (C, 1, 1)
        if new_key in converted:
            raise CheckpointError(f'two checkpoint keys map to {new_key!r}; the file mixes '
                                  f'layouts')
        converted[new_key] = value
    return converted, dropped, dict(layout=layout, dense=has_seg)


# -- arch guessing ------------------------------------------------------------------------------
WIDTH_KEYS = {
    'EfficientFormer': ['stem.conv2.weight'] + [
        f'stages.{i}.downsample.conv.weight' for i in (1, 2, 3)],
    'EfficientFormerV2': ['stem.conv2.conv.weight'] + [
        f'stages.{i}.downsample.conv.conv.weight' for i in (1, 2, 3)],
    'EfficientViT': ['patch_embed.conv4.conv.weight'] + [
        f'stages.{i}.downsample.patchmerge.conv3.conv.weight' for i in (1, 2)],
}


def table_side(table: torch.Tensor) -> int:
    """Side of the square (|dy|, |dx|) grid of a (heads, side * side) bias table; 0 for a tensor
    of another shape."""
    return int(round(math.sqrt(table.shape[-1]))) if table.dim() == 2 else 0


def dense_bias_img_size(converted: Dict[str, torch.Tensor]) -> Optional[int]:
    """Reference image size of the official dense bias tables: the smallest (stride-32) table is
    ``ceil(size / 32)`` on a side."""
    sides = [table_side(v) for k, v in converted.items()
             if k.endswith('attention_biases') and v.dim() == 2]
    return 32 * min(sides) if sides else None


def checkpoint_widths(converted: Dict[str, torch.Tensor], family: str) -> Optional[list]:
    keys = WIDTH_KEYS[family]
    if not all(k in converted for k in keys):
        return None
    return [int(converted[k].shape[0]) for k in keys]


def guess_arch(converted: Dict[str, torch.Tensor], family: str) -> Optional[str]:
    """Name of the released arch whose stage widths match the checkpoint, if any."""
    settings = ARCHS[family][1]
    widths = checkpoint_widths(converted, family)
    for name, arch in settings.items():
        if widths == list(arch['widths']):
            return name
    return None
