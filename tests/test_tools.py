"""The tools as commands (toy data writer, Slurm and torchrun launchers) and the CoreML input
wrapper's normalisation.

The Slurm scripts run against a fake ``srun`` first on PATH (there is no Slurm here) that records
its arguments and environment; what reaches it is compared argument by argument.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmeformer.export import ImageNetNormalize
from mmeformer.models import EfficientFormerV2
from benchmarks.randomize import randomize_

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB
STD = (0.229, 0.224, 0.225)


# -- CoreML input wrapper -----------------------------------------------------------------------
def channel_distinct_image(height=64, width=64):
    """A 0..255 RGB batch whose channels differ in level and pattern."""
    ys = torch.arange(height, dtype=torch.float32).view(height, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, width).expand(height, width)
    gen = torch.Generator().manual_seed(0)
    red = 255. * xs / (width - 1)  # horizontal ramp 0..255
    green = 40. + 30. * torch.sin(ys / 5.)  # dark, vertical waves
    blue = (200. + 40. * torch.rand(height, width, generator=gen)).clamp(0, 255)  # bright noise
    image = torch.stack([red, green, blue])
    return torch.stack([image, image.flip(-1)])  # batch of 2


def normalised(x):
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x / 255. - mean) / std


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_imagenet_normalize_is_the_per_channel_imagenet_normalisation():
    x = channel_distinct_image()
    with torch.no_grad():
        identity = ImageNetNormalize(torch.nn.Identity()).eval()(x)
    torch.testing.assert_close(identity, normalised(x), rtol=1e-6, atol=1e-5)
    # The test image is discriminating: any other channel order is visibly different.
    for order in ([0, 2, 1], [1, 0, 2], [2, 1, 0]):
        assert (normalised(x[:, order]) - identity).abs().max() > 0.5, order


def test_coreml_wrapper_matches_backbone_on_normalised_input():
    model = randomize_(EfficientFormerV2('s0'), seed=0).eval()
    wrapped = ImageNetNormalize(model).eval()  # randomized first: its buffers stay ImageNet's
    x = channel_distinct_image()
    with torch.no_grad():
        got = wrapped(x)
        want = model(normalised(x))
        swapped = model(normalised(x.flip(1)))  # BGR fed as RGB
    assert len(got) == len(want) == 4
    for level, (g, w, s) in enumerate(zip(got, want, swapped)):
        assert g.shape == w.shape
        assert relative_error(g, w) < 1e-4, level
        assert relative_error(s, w) > 1e-2, level  # negative control: channel order matters


# -- tools/make_toy_data.py ---------------------------------------------------------------------
def make_toy_data(*args):
    return subprocess.run([sys.executable, str(TOOLS / 'make_toy_data.py'), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def changed(before, after):
    """Files added, removed or rewritten with other bytes."""
    return sorted(name for name in set(before) | set(after)
                  if before.get(name) != after.get(name))


def snapshot(root):
    """Relative path -> bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob('*')) if p.is_file()}


COCO_FILES = {'coco/annotations/instances_train2017.json',
              'coco/annotations/instances_val2017.json',
              'coco/train2017/000000000001.jpg', 'coco/train2017/000000000002.jpg',
              'coco/val2017/000000100001.jpg'}
ADE = 'ade/ADEChallengeData2016'
ADE_FILES = {f'{ADE}/images/training/ADE_train_00000001.jpg',
             f'{ADE}/images/training/ADE_train_00000002.jpg',
             f'{ADE}/images/validation/ADE_val_00000001.jpg',
             f'{ADE}/annotations/training/ADE_train_00000001.png',
             f'{ADE}/annotations/training/ADE_train_00000002.png',
             f'{ADE}/annotations/validation/ADE_val_00000001.png'}
SIZES = [(320, 240), (240, 320)]  # (width, height) of the first images


def check_coco(root):
    next_annotation_id = 1
    for split, first_id, count in (('train2017', 1, 2), ('val2017', 100001, 1)):
        data = json.loads((root / 'coco' / 'annotations' / f'instances_{split}.json').read_text())
        assert set(data) >= {'images', 'annotations', 'categories'}
        assert len(data['categories']) == 80
        assert [c['id'] for c in data['categories']][:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                                13]
        names = {c['id']: c['name'] for c in data['categories']}
        assert (names[1], names[3], names[37]) == ('person', 'car', 'sports ball')
        images = {im['id']: im for im in data['images']}
        assert sorted(images) == list(range(first_id, first_id + count))
        for index, image_id in enumerate(sorted(images)):
            info = images[image_id]
            assert info['file_name'] == f'{image_id:012d}.jpg'
            with Image.open(root / 'coco' / split / info['file_name']) as im:
                assert im.format == 'JPEG' and im.mode == 'RGB'
                assert im.size == (info['width'], info['height']) == SIZES[index]
        assert data['annotations'], split
        for ann in data['annotations']:
            assert ann['id'] == next_annotation_id  # numbered on across the splits
            next_annotation_id += 1
            image = images[ann['image_id']]
            assert ann['category_id'] in (1, 3, 37) and ann['iscrowd'] == 0
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= image['width'] and y + h <= image['height']
            assert 0 < ann['area'] <= w * h
            polygon, = ann['segmentation']
            assert len(polygon) >= 8 and len(polygon) % 2 == 0


def check_ade(root):
    for split, prefix, count in (('training', 'ADE_train', 2), ('validation', 'ADE_val', 1)):
        for index in range(count):
            stem = f'{prefix}_{index + 1:08d}'
            with Image.open(root / ADE / 'images' / split / f'{stem}.jpg') as im:
                assert im.format == 'JPEG' and im.mode == 'RGB' and im.size == SIZES[index]
            with Image.open(root / ADE / 'annotations' / split / f'{stem}.png') as im:
                assert im.format == 'PNG' and im.mode == 'L' and im.size == SIZES[index]
                labels = np.asarray(im)
            assert set(np.unique(labels)) <= {0, 1, 8, 13, 21, 37}
            assert {1} < set(np.unique(labels)) - {0}  # wall plus at least one object
            border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(),
                                     labels[:, :2].ravel(), labels[:, -2:].ravel()])
            assert (border == 0).all() and (labels[2:-2, 2:-2] > 0).all()


def test_make_toy_data_writes_coco_and_ade(tmp_path):
    out = tmp_path / 'toy'
    args = ['--out', out, '--num-train', 2, '--num-val', 1, '--seed', 0]
    proc = make_toy_data(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f'coco: 2 training and 1 validation images in {out}/coco',
        f'ade: 2 training and 1 validation images in {out}/{ADE}']
    files = snapshot(out)
    assert set(files) == COCO_FILES | ADE_FILES
    check_coco(out)
    check_ade(out)
    # The same arguments again: byte-identical files.
    proc = make_toy_data(*args)
    assert proc.returncode == 0, proc.stderr
    assert changed(files, snapshot(out)) == []


def test_make_toy_data_only_ade_is_deterministic_per_seed(tmp_path):
    runs = {}
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        out = tmp_path / name
        proc = make_toy_data('--out', out, '--num-train', 2, '--num-val', 1, '--seed', seed,
                             '--only', 'ade')
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            f'ade: 2 training and 1 validation images in {out}/{ADE}']
        runs[name] = snapshot(out)
    assert set(runs['a']) == ADE_FILES  # no COCO
    check_ade(tmp_path / 'a')
    assert changed(runs['a'], runs['b']) == []
    # Negative control: another seed, other images and labels.
    assert changed(runs['a'], runs['c']) == sorted(ADE_FILES)


@pytest.mark.parametrize('args,message', [
    (['--num-train', 0], 'error: num_train must be a positive integer, got 0'),
    (['--num-val', -1, '--only', 'ade'], 'error: num_val must be a positive integer, got -1'),
    (['--only', 'voc'], "error: argument --only: invalid choice: 'voc'"),
    (['--num-train', 'two'], "error: argument --num-train: invalid int value: 'two'"),
    (['--seed', -1], 'error: seed must be a non-negative integer, got -1'),
])
def test_make_toy_data_refuses_bad_arguments(tmp_path, args, message):
    out = tmp_path / 'toy'
    proc = make_toy_data('--out', out, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ''
    assert not out.exists()  # refused before writing anything


# -- tools/slurm_train.sh, tools/slurm_test.sh --------------------------------------------------
FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: record the arguments (NUL-separated) and the environment, exit with FAKE_SRUN_RC.
printf '%s\\0' "$@" > "$SRUN_RECORD/argv"
env -0 > "$SRUN_RECORD/env"
exit "${FAKE_SRUN_RC:-0}"
"""


@pytest.fixture
def fake_srun(tmp_path):
    """(environment with the fake srun first on PATH, folder of its records)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    srun = bin_dir / 'srun'
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    record = tmp_path / 'record'
    record.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ('GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS', 'PYTHON',
                        'PYTHONPATH', 'FAKE_SRUN_RC', 'NNODES', 'NODE_RANK', 'PORT',
                        'MASTER_ADDR')}
    env.update(PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}', SRUN_RECORD=str(record))
    return env, record


def recorded(record):
    argv = (record / 'argv').read_bytes().decode().split('\0')
    assert argv[-1] == ''
    env = dict(item.split('=', 1)
               for item in (record / 'env').read_bytes().decode().split('\0') if item)
    return argv[:-1], env


def run_script(name, args, env):
    return subprocess.run([str(TOOLS / name), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def srun_options(partition, job, gpus, per_node, cpus, srun_args=()):
    return ['-p', partition, f'--job-name={job}', f'--gres=gpu:{per_node}', f'--ntasks={gpus}',
            f'--ntasks-per-node={per_node}', f'--cpus-per-task={cpus}', '--kill-on-bad-exit=1',
            *srun_args]


EXTRA = ['--cfg-options', 'train_cfg.max_epochs=2', 'work dir with spaces', '--amp', '*']


@pytest.mark.parametrize('script,tool,fourth', [
    ('slurm_train.sh', 'train.py', 'work dirs/run 1'),
    ('slurm_test.sh', 'test.py', 'ckpts/epoch 12.pth'),
])
def test_slurm_scripts_pass_everything_to_srun(fake_srun, script, tool, fourth):
    env, record = fake_srun
    env.update(GPUS='16', GPUS_PER_NODE='4', CPUS_PER_TASK='7',
               SRUN_ARGS='--mem=0  --exclusive', PYTHON=sys.executable,
               PYTHONPATH='/opt/site one:/opt/two', SOME_SETTING='kept')
    config = 'configs/detection/mask rcnn.py'
    proc = run_script(script, ['gpu part', 'job name', config, fourth, *EXTRA], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv, srun_env = recorded(record)
    tail = ([config, f'--work-dir={fourth}'] if tool == 'train.py' else [config, fourth])
    assert argv == srun_options('gpu part', 'job name', 16, 4, 7, ['--mem=0', '--exclusive']) + [
        sys.executable, '-u', f'{REPO}/tools/{tool}', *tail, '--launcher', 'slurm', *EXTRA]
    assert srun_env['PYTHONPATH'] == f'{REPO}:/opt/site one:/opt/two'
    assert srun_env['SOME_SETTING'] == 'kept'


@pytest.mark.parametrize('script,tool', [('slurm_train.sh', 'train.py'),
                                         ('slurm_test.sh', 'test.py')])
def test_slurm_scripts_defaults(fake_srun, script, tool):
    env, record = fake_srun
    proc = run_script(script, ['p', 'j', 'cfg.py', 'x'], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv, srun_env = recorded(record)
    tail = ['cfg.py', '--work-dir=x'] if tool == 'train.py' else ['cfg.py', 'x']
    assert argv == srun_options('p', 'j', 8, 8, 5) + [
        'python', '-u', f'{REPO}/tools/{tool}', *tail, '--launcher', 'slurm']
    # The repository alone: an empty entry after it would put the submit directory on the path.
    assert srun_env['PYTHONPATH'] == str(REPO)


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_slurm_scripts_return_the_srun_status(fake_srun, script):
    env, record = fake_srun
    env['FAKE_SRUN_RC'] = '3'
    assert run_script(script, ['p', 'j', 'cfg.py', 'x'], env).returncode == 3


@pytest.mark.parametrize('script,usage', [
    ('slurm_train.sh', 'PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]'),
    ('slurm_test.sh', 'PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options]'),
])
@pytest.mark.parametrize('nargs', [0, 3])
def test_slurm_scripts_usage(fake_srun, script, usage, nargs):
    env, record = fake_srun
    proc = run_script(script, ['p', 'j', 'cfg.py'][:nargs], env)
    assert proc.returncode == 2
    assert proc.stderr == f'usage: {TOOLS / script} {usage}\n'
    assert proc.stdout == ''
    assert not (record / 'argv').exists()  # srun never ran


# -- tools/dist_test.sh -------------------------------------------------------------------------
@pytest.fixture
def fake_python(fake_srun, tmp_path):
    """Environment whose PYTHON records its arguments to ``record/python-argv``."""
    env, record = fake_srun
    path = tmp_path / 'bin' / 'fake-python'
    path.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$SRUN_RECORD/python-argv"\n')
    path.chmod(0o755)
    env['PYTHON'] = str(path)
    return env, record / 'python-argv'


@pytest.mark.parametrize('nargs', [0, 2])
def test_dist_test_usage(fake_python, nargs):
    env, python_argv = fake_python
    proc = run_script('dist_test.sh', ['cfg.py', 'ckpt.pth'][:nargs], env)
    assert proc.returncode == 2
    assert proc.stderr == (f'usage: {TOOLS / "dist_test.sh"} CONFIG CHECKPOINT GPUS '
                           '[tools/test.py options]\n')
    assert proc.stdout == ''
    assert not python_argv.exists()  # refused before anything ran


def test_dist_test_with_three_arguments_starts_torchrun(fake_python):
    """Control for the usage test: with CONFIG CHECKPOINT GPUS the PYTHON does run."""
    env, python_argv = fake_python
    proc = run_script('dist_test.sh', ['cfg.py', 'ckpt.pth', '2', '--out', 'a b.pkl'], env)
    assert proc.returncode == 0, proc.stderr
    argv = python_argv.read_bytes().decode().split('\0')[:-1]
    assert argv == ['-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
                    '--master_addr=127.0.0.1', '--nproc_per_node=2', '--master_port=29500',
                    f'{REPO}/tools/test.py', 'cfg.py', 'ckpt.pth', '--launcher', 'pytorch',
                    '--out', 'a b.pkl']
