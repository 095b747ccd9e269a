"""Released full detector / segmentor checkpoints, rebuilt from the fixture key tables (backbone,
EfficientViTFPN) plus random neck / head weights under their mmdet 2.x / mmseg 0.x names,
convert with tools/convert_checkpoint.py and load into the full model with zero missing and zero
unexpected keys."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import _load_checkpoint

from conftest import FIXTURES, random_checkpoint
from mmeformer.engine import LaunchError
from mmeformer.engine.runner import check_checkpoint_bias_mode
from test_conversion_values import backbone_part, check_against_source, released_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))
import convert_checkpoint  # noqa: E402


def _conv(prefix, bias=True):
    return [f'{prefix}.weight'] + ([f'{prefix}.bias'] if bias else [])


def _bn(prefix):
    return [f'{prefix}.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var',
                                      'num_batches_tracked')]


# Head key names as written by mmdet 2.x (FPN, RPNHead, Shared2FCBBoxHead, FCNMaskHead,
# RetinaHead) and mmseg 0.x (FPN, FPNHead with BN): the layout of the released files.
def mmdet2_fpn_keys(levels):
    return [k for i in range(levels) for k in _conv(f'neck.lateral_convs.{i}.conv')
            + _conv(f'neck.fpn_convs.{i}.conv')]


def mmdet2_mask_rcnn_head_keys():
    keys = _conv('rpn_head.rpn_conv') + _conv('rpn_head.rpn_cls') + _conv('rpn_head.rpn_reg')
    for name in ('fc_cls', 'fc_reg', 'shared_fcs.0', 'shared_fcs.1'):
        keys += _conv(f'roi_head.bbox_head.{name}')
    for i in range(4):
        keys += _conv(f'roi_head.mask_head.convs.{i}.conv')
    return keys + _conv('roi_head.mask_head.upsample') + _conv('roi_head.mask_head.conv_logits')


def mmdet2_retina_head_keys():
    keys = [k for i in range(4) for k in _conv(f'bbox_head.cls_convs.{i}.conv')
            + _conv(f'bbox_head.reg_convs.{i}.conv')]
    return keys + _conv('bbox_head.retina_cls') + _conv('bbox_head.retina_reg')


def mmseg0_fpn_head_keys(num_levels):
    keys = []
    for i in range(num_levels):
        for j in range(max(1, i)):  # conv (+ upsample) per factor 2 above stride 4
            keys += _conv(f'decode_head.scale_heads.{i}.{2 * j}.conv', bias=False)
            keys += _bn(f'decode_head.scale_heads.{i}.{2 * j}.bn')
    return keys + _conv('decode_head.conv_seg')


def fixture_keys(name):
    return list(json.loads((FIXTURES / f'{name}.json').read_text())['keys'])


CASES = {
    'v1_l1_maskrcnn': ('detection/maskrcnn_eformer_l1.py', 'dense_det_v1_l1',
                       lambda: mmdet2_fpn_keys(4) + mmdet2_mask_rcnn_head_keys(), 800),
    'v2_s0_maskrcnn': ('detection/maskrcnn_eformerv2_s0.py', 'dense_det_v2_s0',
                       lambda: mmdet2_fpn_keys(4) + mmdet2_mask_rcnn_head_keys(), 800),
    'v1_l1_semfpn': ('segmentation/semfpn_eformer_l1.py', 'dense_seg_v1_l1',
                     lambda: mmdet2_fpn_keys(4) + mmseg0_fpn_head_keys(4), 512),
    'v2_s0_semfpn': ('segmentation/semfpn_eformerv2_s0.py', 'dense_seg_v2_s0',
                     lambda: mmdet2_fpn_keys(4) + mmseg0_fpn_head_keys(4), 512),
    'ev_m4_maskrcnn': ('detection/maskrcnn_efficientvit_m4.py', 'dense_det_ev_m4',
                       lambda: fixture_keys('dense_det_ev_fpn_maskrcnn')
                       + mmdet2_mask_rcnn_head_keys(), None),
    'ev_m4_retinanet': ('detection/retinanet_efficientvit_m4.py', 'dense_det_ev_m4',
                        lambda: fixture_keys('dense_det_ev_fpn_retinanet')
                        + mmdet2_retina_head_keys(), None),
}


def _build(config, bias_img_size):
    cfg = Config.fromfile(str(REPO / 'configs' / config))
    cfg.model.backbone.init_cfg = None
    if bias_img_size is not None:
        cfg.model.backbone.update(bias_mode='official', bias_img_size=bias_img_size)
    init_default_scope(cfg.default_scope)
    model = importlib.import_module(f'{cfg.default_scope}.registry').MODELS.build(cfg.model)
    return cfg, model


# mmdet's own init_detector / mmseg's init_model in a fresh interpreter (the config's
# custom_imports brings the models in): every backbone tensor of the model holds the converted
# file's value.
INIT_SCRIPT = '''
import importlib, json, sys, torch
api, config, path, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
module, name = api.rsplit('.', 1)
init = getattr(importlib.import_module(module), name)
model = init(config, path, device='cpu', cfg_options=options or None)
saved = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
backbone = {k: v for k, v in model.state_dict().items() if k.startswith('backbone.')}
print('RESULT ' + json.dumps(dict(
    backbone=len(backbone), missing=sorted(set(backbone) - set(saved)),
    other_values=sorted(k for k in backbone.keys() & saved.keys()
                        if not torch.equal(backbone[k], saved[k])))))
'''
INIT_APIS = {'v1_l1_maskrcnn': 'mmdet.apis.init_detector',
             'ev_m4_maskrcnn': 'mmdet.apis.init_detector',
             'v1_l1_semfpn': 'mmseg.apis.init_model'}


def _check_init_api(api, config, converted, bias_img_size):
    options = {} if bias_img_size is None else {'model.backbone.bias_mode': 'official',
                                                'model.backbone.bias_img_size': bias_img_size}
    out = subprocess.run([sys.executable, '-c', INIT_SCRIPT, api,
                          str(REPO / 'configs' / config), str(converted), json.dumps(options)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (line, ) = [x for x in out.stdout.splitlines() if x.startswith('RESULT ')]
    found = json.loads(line[len('RESULT '):])
    assert found['backbone'] > 100 and found['missing'] == [] and found['other_values'] == []


@pytest.mark.parametrize('case', list(CASES))
def test_converted_release_loads_into_the_full_model(case, tmp_path, capsys):
    config, fixture, head_keys, bias_img_size = CASES[case]
    cfg, model = _build(config, bias_img_size)
    model_state = model.state_dict()

    # The mmdet 2.x / mmseg 0.x names are exactly the mmdet 3.x / mmseg 1.x ones.
    head_keys = head_keys()
    assert sorted(head_keys) == sorted(k for k in model_state if not k.startswith('backbone.'))

    released = tmp_path / 'released.pth'
    released_file(fixture, released)  # the fixture's random backbone (distinct BN counters)
    state = torch.load(str(released), weights_only=True)['state_dict']
    gen = torch.Generator().manual_seed(1)
    for key in head_keys:
        value = model_state[key]
        state[key] = (torch.randn(value.shape, generator=gen).to(value.dtype)
                      if value.is_floating_point() else torch.zeros_like(value))
    torch.save({'state_dict': state, 'meta': {'mmdet_version': '2.x', 'epoch': 12}},
               str(released))

    converted = tmp_path / 'converted.pth'
    assert convert_checkpoint.main([str(released), str(converted)]) == 0  # --full detected
    out = capsys.readouterr().out
    assert 'full model' in out
    if bias_img_size is not None:
        assert f'model.backbone.bias_img_size={bias_img_size}' in out

    checkpoint = _load_checkpoint(str(converted), map_location='cpu')
    result = model.load_state_dict(checkpoint['state_dict'], strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in head_keys)
    # The backbone by value: each tensor of the written file, and of the model after loading
    # it, is the released tensor it must come from (the mapping stated in
    # test_conversion_values, not the converter's).
    check_against_source(backbone_part(checkpoint['state_dict']), backbone_part(state), fixture,
                         tables='written', model_keys=list(backbone_part(model_state)))
    check_against_source(backbone_part(loaded), backbone_part(state), fixture)

    if case in INIT_APIS:
        _check_init_api(INIT_APIS[case], config, converted, bias_img_size)

    # tools/test.py refuses the training config (table mode) for a V1/V2 release.
    if bias_img_size is not None:
        check_checkpoint_bias_mode(cfg, checkpoint, str(converted))
        table_cfg = Config.fromfile(str(REPO / 'configs' / config))
        with pytest.raises(LaunchError, match=f'bias_img_size={bias_img_size}'):
            check_checkpoint_bias_mode(table_cfg, checkpoint, str(converted))


def test_backbone_conversion_keeps_working(tmp_path, capsys):
    released = tmp_path / 'imagenet.pth'
    random_checkpoint(FIXTURES / 'imagenet_v2_s0.json', released)
    assert convert_checkpoint.main([str(released), str(tmp_path / 'b.pth')]) == 0
    assert 'EfficientFormerV2 arch=s0' in capsys.readouterr().out
    state = torch.load(str(tmp_path / 'b.pth'), weights_only=True)['state_dict']
    assert all(not k.startswith('backbone.') for k in state)
