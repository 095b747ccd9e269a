"""Bad inputs and bad configs end in clear errors: NaN / Inf checking behind ``check_finite``,
a training batch BatchNorm cannot normalise, neck / decode-head ``in_channels`` that do not
match the backbone and misspelt backbone keywords, all at build time with the key and the valid
values (through the Python API, the registries and the tools)."""
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mmeformer.engine import ConfigError, backbone_out_channels, check_model_config
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
sys.path.insert(0, str(REPO / 'tools'))


# -- NaN / Inf checking -------------------------------------------------------------------------
@pytest.mark.parametrize('cls,arch', [(EfficientFormer, 'l1'), (EfficientFormerV2, 's0'),
                                      (EfficientViT, 'm0')])
def test_check_finite_names_the_bad_samples(cls, arch):
    model = cls(arch=arch, check_finite=True).eval()
    x = torch.randn(3, 3, 64, 64)
    assert len(model(x)) == len(model.out_indices)  # finite input: normal output
    x[1, 2, 5, 7] = float('nan')
    x[2, 0, 0, 0] = float('inf')
    with pytest.raises(ValueError, match=r'non-finite input \(1 NaN, 1 Inf of 36864 values\) '
                       r'in batch sample\(s\) \[1, 2\], first at \(n, c, y, x\) = \(1, 2, 5, 7\)'):
        model(x)
    # Off by default: the same input runs through and the NaN propagates silently.
    plain = cls(arch=arch).eval()
    assert not plain.check_finite
    assert not all(torch.isfinite(o).all() for o in plain(x))


def test_check_finite_catches_non_finite_outputs_of_finite_inputs():
    model = EfficientFormerV2(arch='s0', check_finite=True).eval()
    with torch.no_grad():
        model.stages[2].blocks[0].mlp.fc1.conv.weight[0, 0] = float('inf')  # a bad weight
    with pytest.raises(ValueError, match=r'non-finite output at stage 2 \(stride 16\).*from a '
                       r'finite input'):
        model(torch.randn(1, 3, 64, 64))


def test_check_finite_through_a_config():
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    model = MODELS.build(dict(type='mmeformer.EfficientViT', arch='m0', check_finite=True))
    with pytest.raises(ValueError, match='non-finite input'):
        model.eval()(torch.full((1, 3, 64, 64), float('nan')))


def test_single_image_training_batch_with_a_1x1_map_is_explained():
    model = EfficientViT(arch='m0').train()
    with pytest.raises(ValueError, match=r'batch of one 64x64 image: its stride-64 feature map '
                       r'is 1x1.*2 or more images per batch'):
        model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-2:] for o in model(torch.randn(1, 3, 65, 64))][-1] == (2, 1)
    assert len(model(torch.randn(2, 3, 64, 64))) == 3  # two images: BatchNorm has 2 values
    assert len(model.eval()(torch.randn(1, 3, 64, 64))) == 3
    assert len(EfficientViT(arch='m0', norm_eval=True).train()(torch.randn(1, 3, 64, 64))) == 3
    # EfficientFormerV2 also attends at stride 32 inside stage 2.
    v2 = EfficientFormerV2(arch='s0', out_indices=(0, 1, 2)).train()
    with pytest.raises(ValueError, match='stride-32 feature map is 1x1'):
        v2(torch.randn(1, 3, 32, 32))


# -- config validation --------------------------------------------------------------------------
# One config per detector / segmentor base and family, largest arch (the toy configs inherit
# these models; tests/test_det_seg_configs.py runs a forward of every config).
SAMPLE_CONFIGS = ['detection/maskrcnn_eformer_l7.py', 'detection/maskrcnn_eformerv2_l.py',
                  'detection/maskrcnn_efficientvit_m5.py', 'detection/retinanet_efficientvit_m4.py',
                  'segmentation/semfpn_eformer_l3.py', 'segmentation/semfpn_eformerv2_s2.py',
                  'segmentation/semfpn_efficientvit_m4.py']


def test_shipped_configs_pass_the_check():
    for name in SAMPLE_CONFIGS:
        cfg = Config.fromfile(str(CONFIGS / name))
        out_channels = check_model_config(cfg)
        assert out_channels is not None, name  # an mmeformer backbone: it was checked
        neck = cfg.model.get('neck')
        assert neck is None or list(neck.in_channels) == out_channels, name


MISMATCHES = {
    # config: (neck in_channels to set, the valid ones)
    'detection/maskrcnn_eformer_l3.py': ([48, 96, 224, 448], [64, 128, 320, 512]),  # mmdet FPN
    'detection/maskrcnn_efficientvit_m4.py': ([128, 256, 320], [128, 256, 384]),  # EfficientViTFPN
    'segmentation/semfpn_eformerv2_s1.py': ([32, 48, 96, 176], [32, 48, 120, 224]),  # mmseg FPN
}


@pytest.mark.parametrize('name', list(MISMATCHES))
def test_neck_in_channels_mismatch_names_key_and_valid_values(name):
    wrong, valid = MISMATCHES[name]
    cfg = Config.fromfile(str(CONFIGS / name))
    cfg.model.neck.in_channels = wrong
    message = (rf'model\.neck\.in_channels={_re(wrong)} does not match the backbone: .*'
               rf'returns out_channels {_re(valid)}\. Set model\.neck\.in_channels={_re(valid)}')
    with pytest.raises(ConfigError, match=message):
        check_model_config(cfg)
    assert isinstance(ConfigError('x'), ValueError)


def _re(values):
    return r'\[' + ', '.join(str(v) for v in values) + r'\]'


def test_neck_check_follows_out_indices_and_decode_head_without_neck():
    cfg = Config.fromfile(str(CONFIGS / 'segmentation' / 'semfpn_eformer_l1.py'))
    cfg.model.backbone.out_indices = (1, 2, 3)
    with pytest.raises(ConfigError, match=r'out_indices=\(1, 2, 3\) returns out_channels '
                       r'\[96, 224, 448\]'):
        check_model_config(cfg)
    cfg.model.neck.in_channels = [96, 224, 448]
    assert check_model_config(cfg) == [96, 224, 448]

    headless = copy.deepcopy(cfg)
    headless.model.pop('neck')
    headless.model.decode_head = dict(type='FCNHead', in_channels=224, in_index=1, channels=64,
                                      num_classes=150)
    assert check_model_config(headless) == [96, 224, 448]
    headless.model.decode_head.in_index = 2
    with pytest.raises(ConfigError, match=r'model\.decode_head\.in_channels=224 .*in_index=2 '
                       r'selects 448\. Set model\.decode_head\.in_channels=448'):
        check_model_config(headless)
    headless.model.decode_head.in_index = 3
    with pytest.raises(ConfigError, match=r'in_index=3 is out of range .* valid: 0\.\.2'):
        check_model_config(headless)


def test_unknown_backbone_keyword_names_the_valid_ones():
    valid = ', '.join(EfficientFormerV2.valid_keywords())
    expected = (r"EfficientFormerV2 got an unexpected keyword argument 'drop_path' \(did you mean "
                rf"'drop_path_rate'\?\); valid keywords: {valid}")
    with pytest.raises(TypeError, match=expected):
        EfficientFormerV2(arch='s0', drop_path=0.1)
    # Through mmengine's registry the message reaches the user unchanged...
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmseg')
    with pytest.raises(TypeError, match=expected):
        MODELS.build(dict(type='mmeformer.EfficientFormerV2', drop_path=0.1))
    # ...and the config check prefixes the key.
    cfg = Config.fromfile(str(CONFIGS / 'segmentation' / 'semfpn_eformerv2_s0.py'))
    cfg.model.backbone.drop_path = 0.1
    with pytest.raises(ConfigError, match='model.backbone: ' + expected):
        check_model_config(cfg)
    cfg.model.backbone.pop('drop_path')
    cfg.model.backbone.frozen_stages = 7
    with pytest.raises(ConfigError, match=r'model\.backbone: frozen_stages=7 is out of range'):
        check_model_config(cfg)


def test_backbone_is_built_on_the_meta_device():
    cfg = Config.fromfile(str(CONFIGS / 'detection' / 'maskrcnn_eformer_l7.py'))
    # No weights are read (the ImageNet file of init_cfg does not exist here) or allocated.
    assert not Path(cfg.model.backbone.init_cfg.checkpoint).exists()
    assert backbone_out_channels(cfg) == [96, 192, 384, 768]
    resnet = dict(model=dict(backbone=dict(type='ResNet', depth=50)), default_scope='mmdet')
    assert check_model_config(Config(resnet)) is None  # other backbones are left alone


def test_train_tool_reports_a_config_error_before_building(tmp_path, capsys):
    import train as train_tool
    config = str(CONFIGS / 'detection' / 'toy' / 'maskrcnn_eformer_l1.py')
    code = train_tool.main([config, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                            'model.neck.in_channels=[64,128,320,512]'])
    err = capsys.readouterr().err
    assert code == 2
    assert ('error: model.neck.in_channels=[64, 128, 320, 512] does not match the backbone'
            in err and 'Set model.neck.in_channels=[48, 96, 224, 448]' in err), err
    assert not (tmp_path / 'w').exists()  # nothing was built or written
    code = train_tool.main([config, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                            'model.backbone.out_indice=[1,2]'])
    err = capsys.readouterr().err
    assert code == 2 and "unexpected keyword argument 'out_indice' (did you mean " \
        "'out_indices'?); valid keywords: arch, in_channels" in err, err


def test_export_tool_with_neck_reports_a_config_error(tmp_path, capsys):
    import export as export_tool
    bad = tmp_path / 'bad_neck.py'
    bad.write_text(f"_base_ = ['{CONFIGS / 'detection' / 'maskrcnn_efficientvit_m4.py'}']\n"
                   f"model = dict(neck=dict(in_channels=[128, 256, 512]))\n")
    code = export_tool.main([str(bad), '--with-neck', '--shape', '64', '64', '--out',
                             str(tmp_path / 'm.onnx')])
    err = capsys.readouterr().err
    assert code == 2 and 'model.neck.in_channels=[128, 256, 512] does not match' in err, err
    assert 'Set model.neck.in_channels=[128, 256, 384]' in err


def test_export_tool_refuses_a_coreml_output_without_the_package_extension(capsys):
    import export as export_tool
    with pytest.raises(SystemExit) as exit_info:  # argparse: before any model is built
        export_tool.main(['efficientvit_m0', '--format', 'coreml', '--out', 'm.coreml'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "--out: CoreML export writes an ML program package: name 'm.coreml' with the " \
        '.mlpackage extension' in err, err


def test_doctor_reports_a_usable_environment():
    proc = subprocess.run([sys.executable, '-m', 'mmeformer.doctor'], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r'^torch\s+2\.13\.0', proc.stdout, re.M)
    assert 'OK: the environment is usable.' in proc.stdout
