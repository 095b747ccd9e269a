"""Configs with ``custom_imports`` build mmeformer models under mmdet's and mmseg's scopes."""
import importlib

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

BACKBONE_CFG = """
custom_imports = dict(imports=['mmeformer.models'], allow_failed_imports=False)
model = dict(type='mmeformer.EfficientFormerV2', arch='s0', out_indices=(1, 2, 3))
"""

DETECTOR_CFG = """
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['mmeformer.models'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='mmeformer.EfficientViT', arch='m4'),
    neck=dict(_delete_=True, type='mmeformer.EfficientViTFPN', in_channels=[128, 256, 384],
              out_channels=256, num_outs=5, num_extra_trans_convs=2))
"""


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_backbone_config_builds_under_downstream_scope(scope, tmp_path):
    (tmp_path / 'cfg.py').write_text(BACKBONE_CFG)
    cfg = Config.fromfile(str(tmp_path / 'cfg.py'))
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    model = registry.build(cfg.model)
    assert type(model).__module__.startswith('mmeformer.')
    outs = model.eval()(torch.randn(1, 3, 96, 128))
    assert [o.shape[1] for o in outs] == [48, 96, 176]


def test_mask_rcnn_with_efficientvit_and_its_fpn(tmp_path):
    (tmp_path / 'det.py').write_text(DETECTOR_CFG)
    cfg = Config.fromfile(str(tmp_path / 'det.py'))
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    detector = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        feats = detector.extract_feat(torch.randn(1, 3, 256, 320))
    # Strides 4, 8, 16, 32, 64 as the RPN / RoI heads of mask-rcnn_r50_fpn expect.
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 80), (32, 40), (16, 20), (8, 10),
                                                    (4, 5)]
