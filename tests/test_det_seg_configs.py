"""Every detection / segmentation config (toy included) parses, follows its published recipe and
builds its real mmdet / mmseg model, which runs a forward on a small input."""
import copy
import functools
import importlib
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmeformer.engine import LaunchError, default_work_dir, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / 'configs'
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob('*.py') if '_base_' not in p.parts)
REAL = [p for p in CONFIGS if 'toy' not in p.parts]
TOY = [p for p in CONFIGS if 'toy' in p.parts]

EXPECTED_DET = (
    [f'maskrcnn_eformer_{a}' for a in ('l1', 'l3', 'l7')]
    + [f'maskrcnn_eformerv2_{a}' for a in ('s0', 's1', 's2', 'l')]
    + [f'maskrcnn_efficientvit_m{i}' for i in range(6)] + ['retinanet_efficientvit_m4'])
EXPECTED_SEG = ([f'semfpn_eformer_{a}' for a in ('l1', 'l3', 'l7')]
                + [f'semfpn_eformerv2_{a}' for a in ('s0', 's1', 's2', 'l')]
                + ['semfpn_efficientvit_m4'])

IMAGENET_FILES = {
    'EfficientFormer': 'weights/efficientformer_{}_300d.pth',
    'EfficientFormerV2': 'weights/eformer_{}_450.pth',
    'EfficientViT': 'weights/efficientvit_{}.pth',
}


@functools.lru_cache(maxsize=None)
def _parsed(path):
    return Config.fromfile(str(path))


def _config(path):
    """Each config is parsed once per session (parsing mmdet:: / mmseg:: bases is slow)."""
    return copy.deepcopy(_parsed(Path(path)))


def _rel(path):
    return str(path.relative_to(REPO))


def test_every_required_config_and_its_toy_counterpart_exist():
    for task, names in (('detection', EXPECTED_DET), ('segmentation', EXPECTED_SEG)):
        for name in names:
            assert (CONFIG_ROOT / task / f'{name}.py').is_file(), name
            assert (CONFIG_ROOT / task / 'toy' / f'{name}.py').is_file(), name
    assert {p.name for p in TOY} == {p.name for p in REAL}


def _family(cfg):
    return cfg.model.backbone.type.split('.')[-1]


@pytest.mark.parametrize('path', REAL, ids=_rel)
def test_real_config_follows_the_published_recipe(path):
    cfg = _config(path)
    assert cfg.custom_imports == dict(imports=['mmeformer.models'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    assert backbone.type.startswith('mmeformer.')
    family = _family(cfg)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=IMAGENET_FILES[family].format(
        backbone.arch))
    assert backbone.get('bias_mode', 'table') == 'table'  # new training: the geometric bias
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW'
    assert optim.paramwise_cfg.custom_keys['attention_biases'] == dict(decay_mult=0.)
    if path.parent.name == 'detection':
        assert cfg.default_scope == 'mmdet'
        assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
        assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs
        assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.param_scheduler[0].end == 500 and cfg.param_scheduler[1].milestones == [8, 11]
        assert cfg.train_dataloader.dataset.pipeline[2].scale == (1333, 800)
        lr, wd = {'EfficientFormer': (2e-4, 1e-4), 'EfficientFormerV2': (2e-4, 0.05),
                  'EfficientViT': (1e-4, 0.05)}[family]
    else:
        assert cfg.default_scope == 'mmseg'
        assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=32)
        assert cfg.train_dataloader.batch_size == 4  # x 8 GPUs
        assert cfg.train_dataloader.dataset.data_root == 'data/ade/ADEChallengeData2016'
        assert cfg.train_cfg.max_iters == 40000
        assert cfg.param_scheduler[0].type == 'PolyLR' and cfg.param_scheduler[0].power == 0.9
        assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
        lr, wd = (2e-4, 0.05 if family == 'EfficientViT' else 1e-4)
    assert (optim.optimizer.lr, optim.optimizer.weight_decay) == (lr, wd)


@pytest.mark.parametrize('path', TOY, ids=_rel)
def test_toy_config_only_switches_data_and_schedule(path):
    toy = _config(path)
    real = _config(path.parent.parent / path.name)
    assert toy.model.backbone.init_cfg is None
    assert toy.train_dataloader.dataset.data_root.startswith('data/toy/')
    assert toy.val_dataloader.dataset.data_root.startswith('data/toy/')
    assert toy.optim_wrapper == real.optim_wrapper
    assert toy.auto_scale_lr == real.auto_scale_lr
    for key in ('type', 'arch'):
        assert toy.model.backbone[key] == real.model.backbone[key]
    assert toy.model.neck == real.model.neck
    if toy.default_scope == 'mmdet':
        assert toy.val_evaluator.ann_file.startswith('data/toy/coco/')


@pytest.mark.parametrize('path', CONFIGS, ids=_rel)
def test_config_builds_its_model_and_runs_a_forward(path):
    cfg = _config(path)
    init_default_scope(cfg.default_scope)
    models = importlib.import_module(f'{cfg.default_scope}.registry').MODELS
    model = models.build(cfg.model).eval()
    assert type(model.backbone).__module__.startswith('mmeformer.')
    assert list(cfg.model.neck.in_channels) == list(model.backbone.out_channels)
    inputs = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        if cfg.default_scope == 'mmdet':
            feats = model.extract_feat(inputs)
            assert len(feats) == 5 and all(f.shape[1] == 256 for f in feats)
            # Strides of the heads' anchor generators: 4..64 (Mask R-CNN) or 8..128 (RetinaNet).
            head = model.rpn_head if hasattr(model, 'rpn_head') else model.bbox_head
            strides = [s[0] for s in head.prior_generator.strides]
            assert [f.shape[-1] for f in feats] == [-(-128 // s) for s in strides]
        else:
            logits = model(inputs, mode='tensor')
            assert logits.shape == (1, 150, 24, 32)
    assert torch.isfinite(logits if cfg.default_scope == 'mmseg' else feats[0]).all()


def test_work_dir_default_keeps_toy_and_real_apart():
    real = default_work_dir(str(CONFIG_ROOT / 'detection' / 'maskrcnn_eformer_l1.py'))
    toy = default_work_dir(str(CONFIG_ROOT / 'detection' / 'toy' / 'maskrcnn_eformer_l1.py'))
    assert real == 'work_dirs/detection/maskrcnn_eformer_l1'
    assert toy == 'work_dirs/detection/toy/maskrcnn_eformer_l1'


def test_load_config_errors_name_the_fix(tmp_path):
    with pytest.raises(LaunchError, match='does not exist'):
        load_config(str(tmp_path / 'missing.py'))
    config = str(CONFIG_ROOT / 'segmentation' / 'toy' / 'semfpn_eformerv2_s0.py')
    with pytest.raises(LaunchError, match='no such checkpoint'):
        load_config(config, resume=str(tmp_path / 'nope.pth'))
    # CPU autocast wrapper (tests/test_reliability_amp.py); the suite hides GPUs (conftest.py).
    assert load_config(config, amp=True).optim_wrapper.type == 'mmeformer.CPUAmpOptimWrapper'
    with pytest.raises(LaunchError, match="--amp-dtype 'float8'"):
        load_config(config, amp='float8')
    cfg = load_config(config, auto_scale_lr=True, resume='auto',
                      cfg_options={'train_cfg.max_iters': 3})
    assert cfg.auto_scale_lr.enable and cfg.resume and cfg.train_cfg.max_iters == 3
