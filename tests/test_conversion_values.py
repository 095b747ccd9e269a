"""Checkpoint conversion checked by value, not by key counts.

For every released checkpoint flavour (the fixture key tables) a random file in the released
layout is converted and every backbone tensor is compared with the tensor of the file it must
come from. Which file tensor that is, is stated here (``source_key``), from the model's own
parameter names and the module layout of the original code (snap-research EfficientFormer /
EfficientFormerV2, Microsoft Cream EfficientViT), independently of the rules of
mmeformer.checkpoint.convert: the tables below map native -> original, the converter maps
original -> native. The same check runs on the files tools/convert_checkpoint.py writes
(backbone mode here; ``--full`` in test_det_seg_convert.py).

The random files also get distinct ``num_batches_tracked`` values, so that even the integer
buffers of two same-shaped BatchNorms cannot be swapped unnoticed.
"""
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, backbone_class, fixture_files, parse_fixture_name, random_checkpoint
from mmeformer.checkpoint import load_pretrained, read_checkpoint

sys.path.insert(0, str(REPO / 'tools'))
import convert_checkpoint  # noqa: E402

BACKBONE_FIXTURES = [f for f in fixture_files() if parse_fixture_name(f.stem)]
FIXTURE_BY_NAME = {f.stem: f for f in BACKBONE_FIXTURES}


# -- the models the released files are meant for ----------------------------------------------
def model_for_flavour(name, **overrides):
    """The backbone a released flavour loads into: ImageNet V1 files have no output norms; the
    dense V1 / V2 files hold the official ``*_seg`` bias tables of an 800 (COCO) or 512 (ADE20K)
    pixel reference input."""
    kind, family, arch = parse_fixture_name(name)
    kwargs = dict(arch=arch)
    if kind == 'imagenet' and family == 'EfficientFormer':
        kwargs['out_norm_cfg'] = None
    if kind != 'imagenet' and family != 'EfficientViT':
        kwargs.update(bias_mode='official', bias_img_size=800 if kind == 'dense_det' else 512)
    kwargs.update(overrides)
    return backbone_class(family)(**kwargs)


# -- native key -> original key ---------------------------------------------------------------
# network.N of the original V1 / V2 code: the block list of stage i is network.2i, the
# downsampling into stage i (an ``Embedding``) is network.2i-1.
NETWORK_INDEX = {('blocks', 0): 0, ('downsample', 1): 1, ('blocks', 1): 2, ('downsample', 2): 3,
                 ('blocks', 2): 4, ('downsample', 3): 5, ('blocks', 3): 6}

# Module paths below a model prefix -> module path in the original file; a native key's tail
# must start with exactly one of them (the longest is taken), the rest (``.weight``,
# ``.running_var``, ...) is kept. A tail no entry covers fails the test: every model tensor
# needs a stated source.
V1_STEM = {'conv1': 'patch_embed.0', 'norm1': 'patch_embed.1', 'conv2': 'patch_embed.3',
           'norm2': 'patch_embed.4'}
V1_DOWNSAMPLE = {'conv': 'proj', 'norm': 'norm'}
V1_BLOCK = {
    # Meta4D: pooling token mixer (no parameters) and a conv MLP with BN.
    'ls1.gamma': 'layer_scale_1', 'ls2.gamma': 'layer_scale_2',
    'mlp.fc1': 'mlp.fc1', 'mlp.norm1': 'mlp.norm1', 'mlp.fc2': 'mlp.fc2',
    'mlp.norm2': 'mlp.norm2',
    # Meta3D: pre-LN attention and linear MLP.
    'norm1': 'norm1', 'norm2': 'norm2', 'token_mixer.qkv': 'token_mixer.qkv',
    'token_mixer.proj': 'token_mixer.proj',
    'token_mixer.attention_biases': 'token_mixer.attention_biases',
}

V2_STEM = {'conv1.conv': 'patch_embed.0', 'conv1.bn': 'patch_embed.1',
           'conv2.conv': 'patch_embed.3', 'conv2.bn': 'patch_embed.4'}
# The original Embedding names its conv / BN 'proj' / 'norm', but 'conv' / 'bn' in the one that
# also has the attention path (into the last stage).
V2_DOWNSAMPLE = {'conv.conv': 'proj', 'conv.bn': 'norm'}
V2_ATTN_DOWNSAMPLE = {
    'conv.conv': 'conv', 'conv.bn': 'bn',
    'attn.q.local': 'attn.q.local.0',  # LGQuery: local = Sequential(dw conv)
    'attn.q.proj.conv': 'attn.q.proj.0', 'attn.q.proj.bn': 'attn.q.proj.1',
    'attn.k.conv': 'attn.k.0', 'attn.k.bn': 'attn.k.1',
    'attn.v.conv': 'attn.v.0', 'attn.v.bn': 'attn.v.1',
    'attn.v_local.conv': 'attn.v_local.0', 'attn.v_local.bn': 'attn.v_local.1',
    'attn.proj.conv': 'attn.proj.1', 'attn.proj.bn': 'attn.proj.2',  # proj = (act, conv, bn)
    'attn.attention_biases': 'attn.attention_biases',
}
V2_BLOCK = {
    'ls1.gamma': 'layer_scale_1', 'ls2.gamma': 'layer_scale_2',
    'mlp.fc1.conv': 'mlp.fc1', 'mlp.fc1.bn': 'mlp.norm1',
    'mlp.mid.conv': 'mlp.mid', 'mlp.mid.bn': 'mlp.mid_norm',
    'mlp.fc2.conv': 'mlp.fc2', 'mlp.fc2.bn': 'mlp.norm2',
    'token_mixer.stride_conv.conv': 'token_mixer.stride_conv.0',
    'token_mixer.stride_conv.bn': 'token_mixer.stride_conv.1',
    'token_mixer.q.conv': 'token_mixer.q.0', 'token_mixer.q.bn': 'token_mixer.q.1',
    'token_mixer.k.conv': 'token_mixer.k.0', 'token_mixer.k.bn': 'token_mixer.k.1',
    'token_mixer.v.conv': 'token_mixer.v.0', 'token_mixer.v.bn': 'token_mixer.v.1',
    'token_mixer.v_local.conv': 'token_mixer.v_local.0',
    'token_mixer.v_local.bn': 'token_mixer.v_local.1',
    'token_mixer.talking_head1': 'token_mixer.talking_head1',
    'token_mixer.talking_head2': 'token_mixer.talking_head2',
    'token_mixer.proj.conv': 'token_mixer.proj.1', 'token_mixer.proj.bn': 'token_mixer.proj.2',
    'token_mixer.attention_biases': 'token_mixer.attention_biases',
}

EV_STEM = {'conv1': 'patch_embed.0', 'conv2': 'patch_embed.2', 'conv3': 'patch_embed.4',
           'conv4': 'patch_embed.6'}  # (Conv2d_BN, ReLU) x 3 + Conv2d_BN in one Sequential
# blocks2 / blocks3 of Cream's EfficientViT start with the inter-stage modules:
# [Residual dw, Residual FFN], PatchMerging, [Residual dw, Residual FFN]; blocks follow.
EV_DOWNSAMPLE = {'res1': '0', 'patchmerge': '1', 'res2': '2'}
EV_FIRST_BLOCK = 3


def _by_table(tail, table, where):
    matches = [m for m in table if tail == m or tail.startswith(m + '.')]
    assert matches, f'no stated source for {where}{tail}'
    module = max(matches, key=len)
    return table[module] + tail[len(module):]


def _split(key):
    """'stages.2.blocks.4.mlp.fc1.weight' -> ('blocks', 2, 4, 'mlp.fc1.weight'); the stem
    -> ('stem', None, None, tail); output norms -> ('out_norms', i, None, tail)."""
    parts = key.split('.')
    if parts[0] in ('stem', 'patch_embed'):
        return 'stem', None, None, '.'.join(parts[1:])
    if parts[0] == 'out_norms':
        return 'out_norms', int(parts[1]), None, '.'.join(parts[2:])
    assert parts[0] == 'stages', key
    stage = int(parts[1])
    if parts[2] == 'blocks':
        return 'blocks', stage, int(parts[3]), '.'.join(parts[4:])
    assert parts[2] == 'downsample', key
    return 'downsample', stage, None, '.'.join(parts[3:])


def _v1_source(key, dense, attn_downsample_stages):
    role, stage, block, tail = _split(key)
    if role == 'stem':
        return _by_table(tail, V1_STEM, 'stem.')
    if role == 'out_norms':  # the dense backbone's norm0 / norm2 / norm4 / norm6
        assert dense, key
        return f'norm{NETWORK_INDEX["blocks", stage]}.{tail}'
    index = NETWORK_INDEX[role, stage]
    if role == 'downsample':
        return f'network.{index}.' + _by_table(tail, V1_DOWNSAMPLE, 'downsample.')
    # The 3D blocks come after the original's Flat placeholder; mmeformer keeps a
    # parameterless MapToTokens there, so block indices are the original ones.
    return f'network.{index}.{block}.' + _by_table(tail, V1_BLOCK, 'block.')


def _v2_source(key, dense, attn_downsample_stages):
    role, stage, block, tail = _split(key)
    if role == 'stem':
        return _by_table(tail, V2_STEM, 'stem.')
    index = NETWORK_INDEX[role, stage]
    if role == 'downsample':
        table = V2_ATTN_DOWNSAMPLE if stage in attn_downsample_stages else V2_DOWNSAMPLE
        return f'network.{index}.' + _by_table(tail, table, 'downsample.')
    return f'network.{index}.{block}.' + _by_table(tail, V2_BLOCK, 'block.')


def _ev_module(tail):
    """Inside Cream's modules only the conv of a Conv2d_BN is named differently ('c')."""
    return '.'.join('c' if part == 'conv' else part for part in tail.split('.'))


def _ev_source(key, dense, attn_downsample_stages):
    role, stage, block, tail = _split(key)
    if role == 'stem':
        return _by_table(_ev_module(tail), EV_STEM, 'patch_embed.')
    if role == 'downsample':
        part, rest = tail.split('.', 1)
        return f'blocks{stage + 1}.{EV_DOWNSAMPLE[part]}.{_ev_module(rest)}'
    first = EV_FIRST_BLOCK if stage > 0 else 0
    return f'blocks{stage + 1}.{first + block}.{_ev_module(tail)}'


SOURCE_KEY = {'EfficientFormer': _v1_source, 'EfficientFormerV2': _v2_source,
              'EfficientViT': _ev_source}


def source_key(key, family, kind, attn_downsample_stages=(3, )):
    """The key of the released file (below its ``backbone.`` prefix) that the native ``key``
    must be loaded from. The official dense V1 / V2 backbones compute their attention with the
    ``*_seg`` tables."""
    original = SOURCE_KEY[family](key, kind != 'imagenet', attn_downsample_stages)
    if kind != 'imagenet' and family != 'EfficientViT' and original.endswith('attention_biases'):
        original += '_seg'
    return original


def dropped_kind(original, family, kind):
    """Why a released backbone key has no model tensor (None: it must fill one)."""
    top = original.split('.')[0]
    if kind == 'imagenet' and top in ('head', 'dist_head', 'norm'):
        return 'classifier'  # V1 / V2 norm + head + dist_head; EfficientViT head.bn / head.l
    if original.split('.')[-1] in ('attention_bias_idxs', 'attention_bias_idxs_seg'):
        return 'index buffer'
    if kind != 'imagenet' and family != 'EfficientViT' and original.endswith('.attention_biases'):
        return 'ImageNet-size placeholder of a dense file'
    return None


def _resized_table(table, side):
    """Cream's loader: the (heads, s*s) table bicubically resized as an s x s image."""
    heads, old = table.shape[0], round(table.shape[1] ** 0.5)
    grid = table.reshape(1, heads, old, old).float()
    return F.interpolate(grid, size=(side, side), mode='bicubic',
                         align_corners=False).reshape(heads, side * side).to(table.dtype)


def check_against_source(native, source, flavour, tables='loaded', model_keys=None):
    """Every tensor of ``native`` (a backbone state dict in mmeformer's layout) equals the tensor
    of ``source`` (the released backbone, without its ``backbone.`` prefix) it must come from,
    and every released tensor is used exactly once or is of a dropped kind.

    ``tables``: 'loaded' for the tensors of a backbone after loading (ImageNet EfficientViT
    stage-3 tables 4x4 -> 7x7), 'written' for the file the convert tool writes (released tables
    as they are: the resize happens when the file is loaded). ``model_keys``: the keys
    ``native`` must have (default: its own).
    """
    kind, family, _ = parse_fixture_name(flavour)
    if model_keys is not None:
        assert sorted(native) == sorted(model_keys)
    attn_stages = {int(k.split('.')[1]) for k in native if '.downsample.attn.' in k}
    used, wrong = {}, []
    for key, value in native.items():
        original = source_key(key, family, kind, attn_stages)
        assert original in source, f'{key}: stated source {original} is not in the {flavour} file'
        assert original not in used, f'{key} and {used[original]} both from {original}'
        assert dropped_kind(original, family, kind) is None, f'{key} from dropped {original}'
        used[original] = key
        expected = source[original]
        if family == 'EfficientFormerV2' and key.endswith(('ls1.gamma', 'ls2.gamma')):
            assert expected.shape[1:] == (1, 1), (original, expected.shape)  # stored (C, 1, 1)
            expected = expected.reshape(-1)
        if (tables == 'loaded' and family == 'EfficientViT' and kind == 'imagenet'
                and key.startswith('stages.2.') and key.endswith('attention_biases')):
            assert expected.shape[1] == 16 and value.shape[1] == 49, (key, value.shape)
            expected = _resized_table(expected, 7)
            same = value.dtype == expected.dtype and torch.allclose(value, expected, rtol=0,
                                                                    atol=1e-6)
        else:
            same = value.dtype == expected.dtype and torch.equal(value, expected)
        if not same:
            wrong.append(f'{key} != {original}')
    assert not wrong, f'{len(wrong)} of {len(native)} tensors hold other values, e.g. {wrong[:3]}'
    unused = sorted(k for k in source if k not in used and dropped_kind(k, family, kind) is None)
    assert unused == [], f'released tensors no model tensor comes from: {unused[:5]}'
    return used


# -- the released files -----------------------------------------------------------------------
def released_file(flavour, path, seed=0):
    """A random file of ``flavour`` with the released container, keys, shapes and dtypes (plus
    distinct BatchNorm counters); returns its backbone state dict without the prefix."""
    written = {}
    real_save = torch.save

    def save_with_distinct_counters(checkpoint, target):
        # random_checkpoint fills integer tensors with zeros; numbering the counters before the
        # one write costs nothing (a second load + save would, for the L7 files).
        (state, ) = checkpoint.values()
        counters = [k for k in state if k.endswith('num_batches_tracked')]
        gen = torch.Generator().manual_seed(seed + 1)
        for key, value in zip(counters, torch.randperm(10 * len(counters), generator=gen) + 1):
            state[key] = value.reshape(state[key].shape).to(state[key].dtype)
        written.update(state)
        real_save(checkpoint, target)

    with mock.patch.object(torch, 'save', save_with_distinct_counters):
        random_checkpoint(FIXTURE_BY_NAME[flavour], path, seed=seed)
    assert written, 'random_checkpoint no longer writes through torch.save'
    return backbone_part(written)


def backbone_part(state):
    if any(k.startswith('backbone.') for k in state):
        return {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return dict(state)


def test_every_released_flavour_is_covered():
    assert len(BACKBONE_FIXTURES) == 28
    assert {parse_fixture_name(f.stem)[:2] for f in BACKBONE_FIXTURES} == {
        (kind, family) for kind in ('imagenet', 'dense_det', 'dense_seg')
        for family in ('EfficientFormer', 'EfficientFormerV2', 'EfficientViT')
    } - {('dense_seg', 'EfficientViT')}


@pytest.mark.parametrize('flavour', sorted(FIXTURE_BY_NAME))
def test_loaded_backbone_holds_the_released_values(flavour, tmp_path):
    path = tmp_path / 'released.pth'
    source = released_file(flavour, path)
    model = model_for_flavour(flavour)
    report = load_pretrained(model, str(path), logger='silent')  # strict
    check_against_source(model.state_dict(), source, flavour)
    kind, family, _ = parse_fixture_name(flavour)
    # What the loader reports as dropped is exactly what the released file holds besides the
    # backbone's tensors.
    dropped = {k[len('backbone.'):] if k.startswith('backbone.') else k for k in report.dropped}
    assert dropped == {k for k in source if dropped_kind(k, family, kind)}


def test_the_check_sees_swapped_flipped_and_missing_tensors(tmp_path):
    """The check itself: a converter that swaps two same-shaped tensors, flips one or leaves
    one out must not pass it."""
    flavour = 'imagenet_ev_m0'
    path = tmp_path / 'released.pth'
    source = released_file(flavour, path)
    model = model_for_flavour(flavour)
    load_pretrained(model, str(path), logger='silent')
    good = model.state_dict()
    check_against_source(good, source, flavour)
    a, b = (f'stages.1.blocks.0.{ffn}.m.pw1.conv.weight' for ffn in ('ffn0', 'ffn1'))
    swapped = dict(good, **{a: good[b], b: good[a]})
    with pytest.raises(AssertionError, match='2 of .* tensors hold other values'):
        check_against_source(swapped, source, flavour)
    flipped = dict(good, **{a: good[a].flip(0)})
    with pytest.raises(AssertionError, match='1 of .* tensors hold other values'):
        check_against_source(flipped, source, flavour)
    missing = {k: v for k, v in good.items() if k != a}
    with pytest.raises(AssertionError, match='released tensors no model tensor comes from'):
        check_against_source(missing, source, flavour)
    with pytest.raises(AssertionError):
        check_against_source(missing, source, flavour, model_keys=list(good))


TOOL_CASES = [
    ('imagenet_v1_l1', '.pth'), ('dense_seg_v1_l1', '.pth'),
    ('imagenet_v2_s1', '.pth'), ('dense_det_v2_s0', '.safetensors'),
    ('imagenet_ev_m4', '.pth'), ('imagenet_ev_m0', '.safetensors'), ('dense_det_ev_m4', '.pth'),
]


@pytest.mark.parametrize('flavour,suffix', TOOL_CASES, ids=[f'{f}{s}' for f, s in TOOL_CASES])
def test_convert_tool_writes_the_released_values(flavour, suffix, tmp_path, capsys):
    src, dst = tmp_path / 'released.pth', tmp_path / f'converted{suffix}'
    source = released_file(flavour, src)
    assert convert_checkpoint.main([str(src), str(dst)]) == 0  # backbone mode (detected)
    assert 'full model' not in capsys.readouterr().out
    written = read_checkpoint(str(dst))
    written = written['state_dict'] if suffix == '.pth' else written
    model = model_for_flavour(flavour)
    check_against_source(written, source, flavour, tables='written',
                         model_keys=list(model.state_dict()))
    # And the written file loads into the backbone with the released values.
    report = load_pretrained(model, str(dst), logger='silent')
    assert report.missing == [] and report.unused == [] and report.dropped == {}
    check_against_source(model.state_dict(), source, flavour)
