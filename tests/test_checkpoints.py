"""Checkpoint conversion and loading against the key tables of every released flavour."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, backbone_class, fixture_files, parse_fixture_name, random_checkpoint
from mmeformer.checkpoint import (CheckpointError, extract_state_dict, load_pretrained,
                                  read_checkpoint)
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT, EfficientViTFPN
from test_conversion_values import check_against_source, released_file

BACKBONE_FIXTURES = [f for f in fixture_files() if parse_fixture_name(f.stem)]
FPN_FIXTURES = [f for f in fixture_files() if 'fpn' in f.stem]


def model_for(name, **overrides):
    kind, family, arch = parse_fixture_name(name)
    kwargs = dict(arch=arch)
    if kind == 'imagenet' and family == 'EfficientFormer':
        kwargs['out_norm_cfg'] = None  # the output norms exist only in the dense release
    if kind != 'imagenet' and family != 'EfficientViT':
        kwargs.update(bias_mode='official', bias_img_size=800 if kind == 'dense_det' else 512)
    kwargs.update(overrides)
    return backbone_class(family)(**kwargs)


def test_every_fixture_is_covered():
    assert len(BACKBONE_FIXTURES) == 28 and len(FPN_FIXTURES) == 2


@pytest.mark.parametrize('fixture', BACKBONE_FIXTURES, ids=lambda f: f.stem)
def test_fixture_loads_with_exact_key_coverage(fixture, tmp_path):
    path = tmp_path / 'ckpt.pth'
    spec = random_checkpoint(fixture, path)
    model = model_for(fixture.stem)
    report = load_pretrained(model, str(path), logger='silent')  # strict
    assert report.missing == [] and report.unused == [] and report.expected == {}
    # Each file key either filled exactly one model tensor or is listed as dropped with a reason
    # (heads, index buffers, dense placeholders).
    assert len(report.dropped) + len(model.state_dict()) == len(spec['keys'])
    assert all(reason for reason in report.dropped.values())
    assert all('idx' in k or k.split('.')[0] in ('head', 'dist_head', 'norm') or
               k.endswith('attention_biases') for k in
               (key[len('backbone.'):] if key.startswith('backbone.') else key
                for key in report.dropped))
    if fixture.stem.startswith('imagenet_ev'):
        assert len(report.resized) == model.arch['depths'][-1]  # stage-3 tables 4x4 -> 7x7


@pytest.mark.parametrize('fixture', FPN_FIXTURES, ids=lambda f: f.stem)
def test_fpn_key_layout_matches_release(fixture):
    spec = json.loads(fixture.read_text())
    retina = 'retinanet' in fixture.stem
    neck = EfficientViTFPN([128, 256, 384], 256, 5, num_extra_trans_convs=1 if retina else 2,
                           add_extra_convs='on_input' if retina else False)
    expected = {k[len('neck.'):]: tuple(v['shape']) for k, v in spec['keys'].items()}
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == expected


def test_loaded_values_are_exact_and_independent_of_key_order(tmp_path):
    fixture = next(f for f in BACKBONE_FIXTURES if f.stem == 'imagenet_v2_s0')
    states = []
    for order in (None, 'sorted', 'reversed'):
        path = tmp_path / f'{order}.pth'
        random_checkpoint(fixture, path, key_order=order)
        model = model_for(fixture.stem)
        load_pretrained(model, str(path), logger='silent')
        states.append(model.state_dict())
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    # Spot-check a renamed tensor against the file.
    raw = torch.load(tmp_path / 'None.pth', weights_only=True)['model']
    assert torch.equal(states[0]['stages.3.downsample.attn.q.proj.conv.weight'],
                       raw['network.5.attn.q.proj.0.weight'])
    assert torch.equal(states[0]['stages.2.blocks.4.ls1.gamma'],
                       raw['network.4.4.layer_scale_1'].flatten())


def test_imagenet_v1_into_dense_model_reports_only_the_new_output_norms(tmp_path):
    path = tmp_path / 'l1.pth'
    random_checkpoint(next(f for f in BACKBONE_FIXTURES if f.stem == 'imagenet_v1_l1'), path)
    report = load_pretrained(EfficientFormer('l1'), str(path), logger='silent')
    assert report.unused == []
    assert report.missing == sorted(f'out_norms.{i}.{p}' for i in range(4)
                                    for p in ('weight', 'bias'))
    assert set(report.expected) == set(report.missing)  # a gap the design expects: no error
    assert all('output norms' in reason for reason in report.expected.values())
    assert {'head.weight', 'dist_head.weight', 'norm.weight'} <= set(report.dropped)


def test_wrong_family_and_wrong_arch_name_both(tmp_path):
    path = tmp_path / 's1.pth'
    random_checkpoint(next(f for f in BACKBONE_FIXTURES if f.stem == 'imagenet_v2_s1'), path)
    with pytest.raises(CheckpointError, match=r"EfficientFormerV2 checkpoint \(arch 's1'\).*"
                                              r'EfficientViT m4'):
        load_pretrained(EfficientViT('m4'), str(path), logger='silent')
    with pytest.raises(CheckpointError, match=r"EfficientFormerV2 s0.*arch='s1'"):
        load_pretrained(EfficientFormerV2('s0'), str(path), logger='silent')


def test_dense_biases_need_official_mode_and_the_right_size(tmp_path):
    path = tmp_path / 'det.pth'
    random_checkpoint(next(f for f in BACKBONE_FIXTURES if f.stem == 'dense_det_v1_l1'), path)
    with pytest.raises(CheckpointError, match="bias_mode='official', bias_img_size=800"):
        load_pretrained(EfficientFormer('l1'), str(path), logger='silent')
    with pytest.raises(CheckpointError, match='bias_img_size=800'):
        load_pretrained(EfficientFormer('l1', bias_mode='official', bias_img_size=512),
                        str(path), logger='silent')


def test_imagenet_into_official_mode_drops_biases_with_a_reason(tmp_path):
    path = tmp_path / 'in.pth'
    random_checkpoint(next(f for f in BACKBONE_FIXTURES if f.stem == 'imagenet_v2_s0'), path)
    model = EfficientFormerV2('s0', bias_mode='official', bias_img_size=800)
    report = load_pretrained(model, str(path), logger='silent')
    bias_keys = [k for k in model.state_dict() if k.endswith('attention_biases')]
    assert report.missing == sorted(bias_keys)
    assert all("bias_mode='official'" in report.dropped[k] for k in bias_keys)
    assert report.expected == {k: report.dropped[k] for k in bias_keys}


def test_own_checkpoints_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file
    source = EfficientViT('m0').eval()
    for p in source.parameters():
        torch.nn.init.normal_(p)
    torch.save(source.state_dict(), tmp_path / 'own.pth')
    save_file(source.state_dict(), str(tmp_path / 'own.safetensors'))
    for name in ('own.pth', 'own.safetensors'):
        target = EfficientViT('m0')
        report = load_pretrained(target, str(tmp_path / name), logger='silent')
        assert report.missing == [] and report.unused == [] and report.resized == []
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_init_cfg_pretrained_with_prefix(tmp_path):
    path = tmp_path / 'det.pth'
    random_checkpoint(next(f for f in BACKBONE_FIXTURES if f.stem == 'dense_det_ev_m4'), path)
    for prefix in ('backbone.', None):
        model = EfficientViT('m4', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                                 prefix=prefix))
        model.init_weights()
        raw = torch.load(path, weights_only=True)['state_dict']
        assert torch.equal(model.state_dict()['stages.2.blocks.0.mixer.m.attn.attention_biases'],
                           raw['backbone.blocks3.3.mixer.m.attn.attention_biases'])
    with pytest.raises(CheckpointError, match="prefix 'neck.x'"):
        EfficientViT('m4', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                         prefix='neck.x')).init_weights()


@pytest.mark.parametrize('stem', ['imagenet_v1_l3', 'dense_seg_v2_s2', 'imagenet_ev_m5'])
def test_convert_tool_writes_loadable_files(stem, tmp_path):
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    source = released_file(stem, src)  # the fixture's random file (distinct BN counters)
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'),
                           str(src), str(dst)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'arch=' + parse_fixture_name(stem)[2] in proc.stdout
    model = model_for(stem)
    report = load_pretrained(model, str(dst), logger='silent')
    assert report.missing == [] and report.unused == [] and report.dropped == {}
    # By value: the written file and the loaded backbone hold the released tensors.
    written, _ = extract_state_dict(read_checkpoint(str(dst)), str(dst))
    check_against_source(written, source, stem, tables='written',
                         model_keys=list(model.state_dict()))
    check_against_source(model.state_dict(), source, stem)


def test_unsafe_truncated_and_empty_files_are_refused(tmp_path):
    marker = tmp_path / 'payload-ran'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    evil = tmp_path / 'evil.pth'
    torch.save({'model': {'x': torch.zeros(1)}, 'extra': Payload()}, evil)
    with pytest.raises(CheckpointError, match='safe loader'):
        load_pretrained(EfficientFormer('l1'), str(evil), logger='silent')
    assert not marker.exists()

    good = tmp_path / 'good.pth'
    torch.save(EfficientFormer('l1').state_dict(), good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='truncated.pth.*truncated or corrupted'):
        load_pretrained(EfficientFormer('l1'), str(truncated), logger='silent')
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        load_pretrained(EfficientFormer('l1'), str(empty), logger='silent')


def test_efficientvit_imagenet_stage3_tables_are_resized_bicubically(tmp_path):
    """ImageNet EfficientViT's stage-3 tables are 4x4 (its map is 4x4 at 224); the downstream
    7x7 windows need 7x7 tables: the values must be the bicubic resize of the 4x4 grid (as
    Cream's loader does), the 7x7 tables of stages 1-2 copied unchanged."""
    path = tmp_path / 'm4.pth'
    random_checkpoint(next(f for f in BACKBONE_FIXTURES if f.stem == 'imagenet_ev_m4'), path)
    model = EfficientViT('m4')
    report = load_pretrained(model, str(path))
    raw = torch.load(path, weights_only=True)['model']
    state = model.state_dict()
    for block in (3, 4, 5):
        table = raw[f'blocks3.{block}.mixer.m.attn.attention_biases']
        expected = torch.nn.functional.interpolate(
            table.view(1, 4, 4, 4), size=(7, 7), mode='bicubic', align_corners=False)
        key = f'stages.2.blocks.{block - 3}.mixer.m.attn.attention_biases'
        assert key in report.resized
        torch.testing.assert_close(state[key], expected.reshape(4, 49), rtol=0, atol=1e-6)
    assert torch.equal(state['stages.1.blocks.0.mixer.m.attn.attention_biases'],
                       raw['blocks2.3.mixer.m.attn.attention_biases'])
