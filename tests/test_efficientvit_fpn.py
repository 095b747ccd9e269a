"""EfficientViTFPN against a written-out computation.

The neck is built with the settings of the Mask R-CNN and RetinaNet EfficientViT-M4 configs, given
random values for every parameter (biases included) under the released key layout (the fixture
key tables ``dense_det_ev_fpn_*``), and its outputs are compared with the same network spelled out
here in plain ``torch.nn.functional`` calls that read the neck's parameters by name:

* a 1x1 lateral conv on each of the 3 inputs (strides 16 / 32 / 64);
* top-down: each lateral plus the nearest-upsampled (to its own size) merged coarser lateral;
* a 3x3 conv on each merged lateral (strides 16 / 32 / 64);
* ``num_extra_trans_convs`` 2x2 stride-2 transposed convs chained from merged lateral 0 (the first
  reads lateral 0, each next one the previous transposed conv's raw output; nothing is added to
  them), which make strides 8 then 4; each goes through a 3x3 conv of ``extra_fpn_convs``, the
  finest level through ``extra_fpn_convs.0`` (the release's order: finest first);
* the coarse levels past stride 64: 1x1 max-pools of the previous output (``add_extra_convs``
  False) or stride-2 3x3 convs, the first on the last input / lateral / output, the next ones on
  the previous extra level (through a ReLU with ``relu_before_extra_convs``).

The maps are not square and not powers of two (13x21 at stride 16, 7x11, 4x6), so nearest
upsampling to the finer lateral's size is not a plain factor 2. Double precision: the two
computations agree to rounding.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config

from conftest import FIXTURES
from mmeformer.models import EfficientViTFPN

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    'maskrcnn': REPO / 'configs' / 'detection' / 'maskrcnn_efficientvit_m4.py',
    'retinanet': REPO / 'configs' / 'detection' / 'retinanet_efficientvit_m4.py',
}
# (height, width) of the backbone maps at strides 16 / 32 / 64 (stride-2 3x3 convs with padding
# 1 halve rounding up: 13 -> 7 -> 4, 21 -> 11 -> 6).
SIZES = ((13, 21), (7, 11), (4, 6))
_config_cache = {}


def neck_settings(name):
    """The ``model.neck`` of the config, minus ``type``."""
    if name not in _config_cache:
        _config_cache[name] = Config.fromfile(str(CONFIGS[name])).model.neck.to_dict()
    settings = dict(_config_cache[name])
    assert settings.pop('type') == 'mmeformer.EfficientViTFPN'
    return settings


def fixture_table(name):
    """Key -> shape of the released neck (keys without the ``neck.`` prefix)."""
    spec = json.loads((FIXTURES / f'dense_det_ev_fpn_{name}.json').read_text())
    assert all(key.startswith('neck.') for key in spec['keys'])
    return {key[len('neck.'):]: tuple(info['shape']) for key, info in spec['keys'].items()}


def random_state(shapes, seed):
    """Random values for every key: weights at a fan-in scale, biases at 0.5 (so that they
    matter next to the features)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if key.endswith('.weight'):
            fan_in = shape[1] * shape[2] * shape[3]
            if 'extra_trans_convs' in key:  # (in, out, 2, 2): one input pixel per output pixel
                fan_in = shape[0]
            state[key] = noise / fan_in ** 0.5
        else:
            assert key.endswith('.bias'), key
            state[key] = 0.5 * noise
    return state


def build_neck(settings, seed=0, released=None):
    """The neck in float64 with random parameters; with ``released``, the key table of that
    fixture must be exactly the neck's (names and shapes) and provides the keys."""
    neck = EfficientViTFPN(**settings).double().eval()
    own = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    if released is not None:
        table = fixture_table(released)
        assert own == table
        shapes = table
    else:
        shapes = own
    state = random_state(shapes, seed)
    neck.load_state_dict(state, strict=True)
    for key, value in neck.state_dict().items():  # nothing left at its initial value
        assert torch.equal(value, state[key]), key
        assert value.abs().min() > 0, key
    return neck


def make_inputs(in_channels, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
            for c, (h, w) in zip(in_channels, SIZES)]


# -- the written-out computation ----------------------------------------------------------------
def reference(params, inputs, num_outs, num_extra_trans_convs, add_extra_convs=False,
              relu_before_extra_convs=False):
    """{stride: output} of the EfficientViT FPN, from the parameter dict ``params``."""
    def conv(name, x, **kwargs):
        return F.conv2d(x, params[f'{name}.conv.weight'], params[f'{name}.conv.bias'], **kwargs)

    strides = [16, 32, 64]
    lateral = [conv(f'lateral_convs.{i}', x) for i, x in enumerate(inputs)]
    # Top-down, coarsest first: each level plus the nearest upsampling of the merged coarser one.
    merged = [None, None, lateral[2]]
    for i in (1, 0):
        size = lateral[i].shape[-2:]
        merged[i] = lateral[i] + F.interpolate(merged[i + 1], size=size, mode='nearest')
    outs = {s: conv(f'fpn_convs.{i}', merged[i], padding=1) for i, s in enumerate(strides)}

    # Transposed-conv chain from merged lateral 0: stride 8, then 4; raw outputs, nothing added.
    chain, x = [], merged[0]
    for k in range(num_extra_trans_convs):
        x = F.conv_transpose2d(x, params[f'extra_trans_convs.{k}.conv.weight'],
                               params[f'extra_trans_convs.{k}.conv.bias'], stride=2)
        chain.append(x)
    # extra_fpn_convs.0 is the 3x3 conv of the finest level (the last transposed conv's output).
    for k, x in enumerate(chain):
        j = num_extra_trans_convs - 1 - k
        outs[16 >> (k + 1)] = conv(f'extra_fpn_convs.{j}', x, padding=1)

    # Coarse levels past stride 64.
    num_coarse = num_outs - 3 - num_extra_trans_convs
    stride = 64
    for k in range(num_coarse):
        if not add_extra_convs:
            level = F.max_pool2d(outs[stride], kernel_size=1, stride=2)
        elif k == 0:
            source = {'on_input': inputs[2], 'on_lateral': merged[2],
                      'on_output': outs[64]}[add_extra_convs]
            level = conv('fpn_convs.3', source, stride=2, padding=1)
        else:
            x = F.relu(outs[stride]) if relu_before_extra_convs else outs[stride]
            level = conv(f'fpn_convs.{3 + k}', x, stride=2, padding=1)
        stride *= 2
        outs[stride] = level
    return outs


def by_stride(outputs, finest_stride):
    return {finest_stride << i: out for i, out in enumerate(outputs)}


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for stride in sorted(expected):
        torch.testing.assert_close(actual[stride], expected[stride], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, s=stride: f'stride {s}: {m}')


def mismatched_levels(actual, expected):
    return [s for s in sorted(expected)
            if actual[s].shape != expected[s].shape
            or not torch.allclose(actual[s], expected[s], rtol=1e-6, atol=1e-6)]


# Map sizes per stride: 13x21 at stride 16, transposed convs double exactly, stride-2 1x1 pools and
# stride-2 3x3 convs (padding 1) halve rounding up.
HEIGHTS = {4: 52, 8: 26, 16: 13, 32: 7, 64: 4, 128: 2, 256: 1}
WIDTHS = {4: 84, 8: 42, 16: 21, 32: 11, 64: 6, 128: 3, 256: 2}


# -- the config settings ------------------------------------------------------------------------
def test_config_neck_settings_are_the_released_ones():
    mask = neck_settings('maskrcnn')
    retina = neck_settings('retinanet')
    common = dict(in_channels=[128, 256, 384], out_channels=256, start_level=0, num_outs=5)
    assert mask == dict(common, num_extra_trans_convs=2)
    assert retina == dict(common, num_extra_trans_convs=1, add_extra_convs='on_input')


@pytest.mark.parametrize('name,finest,strides', [
    ('maskrcnn', 4, [4, 8, 16, 32, 64]),
    ('retinanet', 8, [8, 16, 32, 64, 128]),
])
def test_config_neck_matches_written_out_fpn(name, finest, strides):
    settings = neck_settings(name)
    neck = build_neck(settings, seed=3, released=name)
    inputs = make_inputs(settings['in_channels'])
    with torch.no_grad():
        outputs = neck(inputs)
        expected = reference(dict(neck.state_dict()), inputs, settings['num_outs'],
                             settings['num_extra_trans_convs'],
                             settings.get('add_extra_convs', False))
    assert sorted(expected) == strides
    actual = by_stride(outputs, finest)
    assert {s: tuple(o.shape) for s, o in actual.items()} == {
        s: (2, 256, HEIGHTS[s], WIDTHS[s]) for s in strides}
    assert_same(actual, expected)


@pytest.mark.parametrize('variant', [
    # Mask R-CNN's neck with one more output: a max-pooled stride-128 level.
    dict(base='maskrcnn', num_outs=6),
    # RetinaNet-style coarse conv chains: two extra convs (strides 128 and 256) on each source,
    # the second through a ReLU or not.
    dict(base='retinanet', num_outs=6, add_extra_convs='on_input', relu_before_extra_convs=True),
    dict(base='retinanet', num_outs=6, add_extra_convs='on_lateral',
         relu_before_extra_convs=True),
    dict(base='retinanet', num_outs=6, add_extra_convs='on_output',
         relu_before_extra_convs=False),
    dict(base='retinanet', num_outs=6, add_extra_convs='on_output',
         relu_before_extra_convs=True),
], ids=['maxpool', 'on_input_relu', 'on_lateral_relu', 'on_output', 'on_output_relu'])
def test_coarse_levels_match_written_out_fpn(variant):
    variant = dict(variant)
    settings = dict(neck_settings(variant.pop('base')), **variant)
    neck = build_neck(settings, seed=5)
    inputs = make_inputs(settings['in_channels'], seed=7)
    with torch.no_grad():
        outputs = neck(inputs)
        expected = reference(dict(neck.state_dict()), inputs, settings['num_outs'],
                             settings['num_extra_trans_convs'],
                             settings.get('add_extra_convs', False),
                             settings.get('relu_before_extra_convs', False))
    finest = 16 >> settings['num_extra_trans_convs']
    actual = by_stride(outputs, finest)
    assert_same(actual, expected)
    assert {s: tuple(o.shape[-2:]) for s, o in actual.items()} == {
        s: (HEIGHTS[s], WIDTHS[s]) for s in expected}
    coarsest = max(expected)
    if settings.get('add_extra_convs') and settings['num_outs'] == 6:
        # The ReLU flag must matter for the last level (the previous one has negative values).
        flipped = reference(dict(neck.state_dict()), inputs, settings['num_outs'],
                            settings['num_extra_trans_convs'], settings['add_extra_convs'],
                            not settings['relu_before_extra_convs'])
        assert mismatched_levels(actual, flipped) == [coarsest]


# -- negative controls: the comparison sees the errors it is meant to catch ---------------------
def test_reference_comparison_detects_wrong_parameters_and_wiring():
    settings = neck_settings('maskrcnn')
    neck = build_neck(settings, seed=11, released='maskrcnn')
    inputs = make_inputs(settings['in_channels'], batch=1, seed=13)
    with torch.no_grad():
        actual = by_stride(neck(inputs), 4)
    params = dict(neck.state_dict())

    def mismatches(params):
        with torch.no_grad():
            return mismatched_levels(actual, reference(params, inputs, 5, 2))

    assert mismatches(params) == []
    # A small change of the coarsest lateral's bias reaches every level through the top-down
    # path and the transposed-conv chain.
    nudged = dict(params)
    nudged['lateral_convs.2.conv.bias'] = params['lateral_convs.2.conv.bias'] + 1e-3
    assert mismatches(nudged) == [4, 8, 16, 32, 64]
    # The 3x3 convs after the two transposed convs swapped: only strides 4 and 8 differ.
    swapped = dict(params)
    for part in ('weight', 'bias'):
        swapped[f'extra_fpn_convs.0.conv.{part}'] = params[f'extra_fpn_convs.1.conv.{part}']
        swapped[f'extra_fpn_convs.1.conv.{part}'] = params[f'extra_fpn_convs.0.conv.{part}']
    assert mismatches(swapped) == [4, 8]
    # The second transposed conv's bias only reaches stride 4.
    nudged = dict(params)
    nudged['extra_trans_convs.1.conv.bias'] = params['extra_trans_convs.1.conv.bias'] + 1e-3
    assert mismatches(nudged) == [4]


def test_reference_distinguishes_bilinear_from_nearest_upsampling():
    """At 13x21 / 7x11 nearest and bilinear upsampling differ, so the comparison pins the
    module's ``upsample_cfg`` (nearest, to the finer lateral's size)."""
    settings = dict(neck_settings('maskrcnn'), upsample_cfg=dict(mode='bilinear',
                                                                  align_corners=False))
    neck = build_neck(settings, seed=17)
    inputs = make_inputs(settings['in_channels'], batch=1, seed=19)
    with torch.no_grad():
        actual = by_stride(neck(inputs), 4)
        expected = reference(dict(neck.state_dict()), inputs, 5, 2)
    assert mismatched_levels(actual, expected) == [4, 8, 16, 32]  # stride 64 has no top-down
