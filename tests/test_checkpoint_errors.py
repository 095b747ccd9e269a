"""Bad checkpoints get a clear error naming the fix: strict key checks in load_pretrained and
tools/convert_checkpoint.py, unsafe / corrupt files, wrong paths, and unconverted releases passed
to tools/test.py."""
import argparse
import logging
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REPO, random_checkpoint
from mmeformer.checkpoint import CheckpointError, load_pretrained, read_checkpoint
from mmeformer.engine import LaunchError, load_config
from mmeformer.engine import test as run_test  # not named test_*: pytest would collect it
from mmeformer.engine.runner import check_checkpoint_converted
from mmeformer.models import EfficientFormer, EfficientFormerV2

sys.path.insert(0, str(REPO / 'tools'))
import convert_checkpoint  # noqa: E402


def released(name, tmp_path, edit=None, container=None):
    """A random release of fixture ``name``, its state dict changed by ``edit``."""
    path = tmp_path / f'{name}.pth'
    spec = random_checkpoint(FIXTURES / f'{name}.json', path)
    if edit is not None:
        state = torch.load(path, weights_only=True)[spec['container']]
        torch.save({container or spec['container']: edit(state)}, path)
    return path


def ddp(state):
    return {'module.' + k: v for k, v in state.items()}


def with_extra_key(state):
    return dict(state, **{'network.0.0.extra.weight': torch.zeros(3)})


def without_key(state):
    return {k: v for k, v in state.items() if k != 'network.2.1.mlp.fc1.weight'}


def with_wrong_shape(state):
    return dict(state, **{'network.2.1.mlp.fc1.weight': torch.zeros(1, 1, 1, 1)})


def test_ddp_file_is_refused_naming_the_prefix_and_loads_with_it(tmp_path):
    path = released('imagenet_v2_s0', tmp_path, ddp)
    model = EfficientFormerV2('s0')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"0 of 559 model tensors.*missing from the file: "
                                              r"559.*prefix='module\.'.*strict=False"):
        load_pretrained(model, str(path), logger='silent')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    report = load_pretrained(model, str(path), prefix='module.', logger='silent')
    assert report.missing == [] and report.unused == []


@pytest.mark.parametrize('edit,key', [(with_extra_key, 'stages.0.blocks.0.extra.weight'),
                                      (without_key, 'stages.1.blocks.1.mlp.fc1.conv.weight')])
def test_extra_or_missing_key_is_refused_unless_strict_false(edit, key, tmp_path, caplog):
    path = released('imagenet_v2_s0', tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf'\(first: {key}\).*strict=False'):
        load_pretrained(EfficientFormerV2('s0'), str(path), logger='silent')

    model = EfficientFormerV2('s0')
    logger = logging.getLogger('test_checkpoint_errors')
    with caplog.at_level(logging.INFO, logger.name):
        report = load_pretrained(model, str(path), strict=False, logger=logger)
    assert key in report.missing + report.unused and report.expected == {}
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and key in caplog.text
    raw = torch.load(path, weights_only=True)['model']
    assert torch.equal(model.state_dict()['stem.conv1.conv.weight'], raw['patch_embed.0.weight'])


def test_expected_gaps_stay_info(tmp_path, caplog):
    path = released('imagenet_v1_l1', tmp_path)
    logger = logging.getLogger('test_checkpoint_errors')
    with caplog.at_level(logging.INFO, logger.name):
        report = load_pretrained(EfficientFormer('l1'), str(path), logger=logger)
    assert set(report.expected) == set(report.missing) and len(report.missing) == 8
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert 'left initialised 8 key(s): output norms' in caplog.text


@pytest.mark.parametrize('edit,message', [
    (ddp, r"cannot tell which released EfficientFormerV2 arch.*--prefix module\."),
    (with_extra_key, r'file tensors the model does not have: 1 \(first: stages.0.blocks.0.extra'),
    (without_key, r'missing from the file: 1 \(first: stages.1.blocks.1.mlp.fc1.conv.weight\)'),
    (with_wrong_shape, r'1 tensors differ in shape'),
], ids=['ddp', 'extra', 'missing', 'shape'])
def test_convert_tool_refuses_files_that_would_not_load(edit, message, tmp_path, capsys):
    src, dst = released('imagenet_v2_s0', tmp_path, edit), tmp_path / 'out.pth'
    assert convert_checkpoint.main([str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err
    assert re.search(message, err), err
    assert not dst.exists()


def test_convert_tool_verifies_the_backbone_of_full_conversions(tmp_path, capsys):
    neck = torch.load(released('dense_det_ev_fpn_maskrcnn', tmp_path),
                      weights_only=True)['state_dict']
    src = released('dense_det_ev_m4', tmp_path, lambda s: {
        **{k: v for k, v in s.items() if k != 'backbone.blocks3.3.mixer.m.attn.qkvs.0.c.weight'},
        **neck})
    assert convert_checkpoint.main([str(src), str(tmp_path / 'out.pth')]) == 1
    assert 'missing from the file: 1 (first: stages.2.blocks.0.mixer.m.attn.qkvs.0.conv.weight)' \
        in capsys.readouterr().err


def test_unsafe_file_names_the_global_and_a_fix_that_works(tmp_path):
    path = released('imagenet_v2_s0', tmp_path)
    state = torch.load(path, weights_only=True)['model']
    torch.save({'model': state, 'args': argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(CheckpointError, match='pickles the Python object argparse.Namespace') \
            as info:
        load_pretrained(EfficientFormerV2('s0'), str(path), logger='silent')
    message = str(info.value)
    assert '\x1b' not in message and 'convert_checkpoint' not in message
    command = next(line for line in message.splitlines() if line.strip().startswith('python'))
    argv = shlex.split(command)
    subprocess.run([sys.executable] + argv[1:], check=True)
    report = load_pretrained(EfficientFormerV2('s0'), str(tmp_path / 'clean.pth'),
                             logger='silent')
    assert report.missing == [] and report.unused == []


@pytest.mark.parametrize('content', [bytes(range(256)) * 16, b'not a checkpoint\n' * 8],
                         ids=['random-bytes', 'text'])
def test_corrupt_file_is_not_called_unsafe(content, tmp_path):
    path = tmp_path / 'junk.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='not a PyTorch checkpoint') as info:
        load_pretrained(EfficientFormerV2('s0'), str(path), logger='silent')
    assert 'Python object' not in str(info.value)


def test_path_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(CheckpointError, match='is a directory'):
        load_pretrained(EfficientFormerV2('s0'), str(tmp_path), logger='silent')
    with pytest.raises(CheckpointError, match='does not download.*pass the local path'):
        load_pretrained(EfficientFormerV2('s0'), 'https://example.com/eformer_s0_450.pth',
                        logger='silent')
    src, folder = released('imagenet_v2_s0', tmp_path), tmp_path / 'no' / 'such'
    assert convert_checkpoint.main([str(src), str(folder / 'out.pth')]) == 1
    err = capsys.readouterr().err
    assert f'the folder of DST {str(folder / "out.pth")!r} does not exist' in err
    assert f'mkdir -p {folder}' in err


@pytest.mark.parametrize('fixture,config', [
    ('dense_det_v1_l1', 'detection/maskrcnn_eformer_l1.py'),
    ('dense_det_ev_m4', 'detection/maskrcnn_efficientvit_m4.py'),
])
def test_evaluating_an_unconverted_release_names_the_converter(fixture, config, tmp_path):
    path = released(fixture, tmp_path, lambda s: dict(s, **{
        'neck.lateral_convs.0.conv.weight': torch.zeros(1)}))
    cfg = load_config(str(REPO / 'configs' / config), work_dir=str(tmp_path / 'work'))
    fix = f'python tools/convert_checkpoint.py {path} CONVERTED.pth (it detects --full)'
    with pytest.raises(LaunchError, match=re.escape(fix)):
        run_test(cfg, str(path))
    converted = tmp_path / 'converted.pth'
    assert convert_checkpoint.main([str(path), str(converted)]) == 0
    check_checkpoint_converted(read_checkpoint(converted), str(converted))  # it passes


def test_dense_output_norms_of_levels_not_returned_are_dropped(tmp_path):
    """Dense V1 weights into a backbone that returns fewer levels (a RetinaNet's 1..3) or has no
    output norms: the surplus norms are dropped with their reason, not an error."""
    path = released('dense_det_v1_l1', tmp_path)
    for kwargs, surplus in [(dict(out_indices=(1, 2, 3)), 2), (dict(out_norm_cfg=None), 8)]:
        model = EfficientFormer('l1', bias_mode='official', bias_img_size=800, **kwargs)
        report = load_pretrained(model, str(path))
        norms = [k for k in report.dropped if k.startswith('out_norms.')]
        assert len(norms) == surplus and report.missing == [] and report.unused == []
