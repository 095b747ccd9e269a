"""The ecosystem's own front doors on checkpoints written by tools/train.py: mmdet's
``init_detector`` / ``inference_detector`` / ``DetInferencer`` and mmseg's ``init_model`` /
``inference_model`` / ``MMSegInferencer``, each in a fresh interpreter that imports nothing of
mmeformer itself (the config's ``custom_imports`` does), with ``torch.load(weights_only=True)``
left on; a hostile pickle is still refused and its payload does not run; ``tools/infer.py``
draws and writes the predictions of every input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from conftest import dist_launch

from mmeformer.datasets import make_toy_data
from mmeformer.engine import allow_mmengine_checkpoint_globals

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TOOLS = REPO / 'tools'
DET_CONFIG = REPO / 'configs' / 'detection' / 'toy' / 'maskrcnn_eformer_l1.py'
SEG_CONFIG = REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_eformer_l1.py'
DET_IMAGES = 'data/toy/coco/val2017'
SEG_IMAGES = 'data/toy/ade/ADEChallengeData2016/images/validation'


class _Payload:
    """Unpickling this runs a shell command (creates ``marker``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


def _run(args, cwd, timeout=600):
    out = subprocess.run([PYTHON] + [str(a) for a in args], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def _dist_train(root, *args):
    """tools/dist_train.sh SEG_CONFIG with 2 CPU processes (gloo)."""
    out = dist_launch('dist_train.sh', [SEG_CONFIG, 2, *args], root, root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Toy data (4 training, 2 validation images per task), a toy Mask R-CNN and a toy Semantic
    FPN trained 2 iterations each by tools/train.py, a toy Semantic FPN trained by 2 processes
    under --amp (float16) and resumed, and a hostile checkpoint file."""
    root = tmp_path_factory.mktemp('inference_apis')
    make_toy_data(str(root / 'data' / 'toy'), num_train=4, num_val=2)
    options = ['randomness.seed=0', 'default_hooks.checkpoint.interval=2']
    _run([TOOLS / 'train.py', DET_CONFIG, '--work-dir', root / 'det', '--cfg-options',
          'train_cfg.max_epochs=1', 'train_cfg.val_interval=2', *options], root)
    _run([TOOLS / 'train.py', SEG_CONFIG, '--work-dir', root / 'seg', '--cfg-options',
          'train_cfg.max_iters=2', 'train_cfg.val_interval=2', *options], root)
    # AMP, distributed and resumed: a checkpoint with a loss scaler and two ranks' states.
    small = ['train_cfg.val_interval=10', 'val_dataloader=None', 'val_cfg=None',
             'val_evaluator=None', 'default_hooks.checkpoint.interval=1',
             'train_dataloader.batch_size=1', 'randomness.seed=0']
    _dist_train(root, '--work-dir', root / 'amp_dist', '--amp', '--cfg-options',
                'train_cfg.max_iters=1', *small)
    log = _dist_train(root, '--work-dir', root / 'amp_dist', '--amp', '--resume',
                      '--cfg-options', 'train_cfg.max_iters=2', *small)
    assert 'Restored the random states of rank 0' in log, log[-3000:]
    hostile = root / 'hostile.pth'
    torch.save({'state_dict': {}, 'meta': _Payload(root / 'payload_ran')}, str(hostile))
    return root


# Each script runs in a fresh interpreter as a user's would: only mmdet / mmseg is imported.
DET_SCRIPT = '''
import json, sys
from mmdet.apis import DetInferencer, inference_detector, init_detector
config, checkpoint, image, hostile = sys.argv[1:]
assert not any(m.startswith('mmeformer') for m in sys.modules)
found = {}
model = init_detector(config, checkpoint, device='cpu')
sample = inference_detector(model, image)
found['inference_detector'] = dict(
    type=type(sample).__name__, n=len(sample.pred_instances),
    bboxes=list(sample.pred_instances.bboxes.shape),
    masks=list(sample.pred_instances.masks.shape), image=list(sample.ori_shape))
prediction = DetInferencer(model=config, weights=checkpoint, device='cpu',
                           show_progress=False)(image)['predictions'][0]
found['DetInferencer'] = dict(keys=sorted(prediction), n=len(prediction['scores']),
                              box=len(prediction['bboxes'][0]))
for name, load in (('init_detector', lambda: init_detector(config, hostile, device='cpu')),
                   ('DetInferencer', lambda: DetInferencer(model=config, weights=hostile,
                                                           device='cpu'))):
    try:
        load()
        found['hostile ' + name] = 'loaded'
    except Exception as err:
        found['hostile ' + name] = type(err).__name__ + ': ' + str(err)
print('RESULT ' + json.dumps(found))
'''

SEG_SCRIPT = '''
import json, sys
from mmseg.apis import MMSegInferencer, inference_model, init_model
config, image, *checkpoints = sys.argv[1:]
assert not any(m.startswith('mmeformer') for m in sys.modules)
found = {}
for checkpoint in checkpoints:
    sample = inference_model(init_model(config, checkpoint, device='cpu'), image)
    prediction = MMSegInferencer(model=config, weights=checkpoint, device='cpu')(image)
    found[checkpoint] = {
        'inference_model': dict(type=type(sample).__name__,
                                seg=list(sample.pred_sem_seg.data.shape),
                                image=list(sample.ori_shape)),
        'MMSegInferencer': dict(keys=sorted(prediction),
                                seg=list(prediction['predictions'].shape))}
print('RESULT ' + json.dumps(found))
'''


def _result(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith('RESULT ')]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0][len('RESULT '):])


def _check_infer_tool(root, config, checkpoint, images, extra_keys):
    """tools/infer.py on a folder: one drawn image of the input's size and one JSON each."""
    out = root / f'infer_{config.stem}'
    stdout = _run([TOOLS / 'infer.py', config, checkpoint, root / images, '--out', out], root)
    inputs = sorted((root / images).iterdir())
    assert f'{len(inputs)} image(s)' in stdout
    for image in inputs:
        drawn, source = cv2.imread(str(out / 'vis' / image.name)), cv2.imread(str(image))
        assert drawn is not None and drawn.shape == source.shape, image
        assert drawn.std() > 0
        record = json.loads((out / 'preds' / f'{image.stem}.json').read_text())
        assert record['image'] == str(image)
        assert extra_keys <= record.keys(), record.keys()
    return out, inputs


def test_mmdet_apis_load_train_checkpoints_and_refuse_a_hostile_pickle(trained):
    checkpoint = trained / 'det' / 'epoch_1.pth'
    image = sorted((trained / DET_IMAGES).iterdir())[0]
    found = _result(_run(['-c', DET_SCRIPT, DET_CONFIG, checkpoint, image,
                          trained / 'hostile.pth'], trained))
    height, width = cv2.imread(str(image)).shape[:2]
    sample = found['inference_detector']
    assert sample['type'] == 'DetDataSample' and sample['image'] == [height, width]
    assert sample['bboxes'] == [sample['n'], 4] and sample['masks'] == [sample['n'], height,
                                                                       width]
    assert sample['n'] > 0
    prediction = found['DetInferencer']
    assert prediction['keys'] == ['bboxes', 'labels', 'masks', 'scores']
    assert prediction['n'] > 0 and prediction['box'] == 4
    for name in ('init_detector', 'DetInferencer'):
        refused = found['hostile ' + name]
        assert refused.startswith('UnpicklingError') and 'posix.system' in refused, refused
    assert not (trained / 'payload_ran').exists()

    out, inputs = _check_infer_tool(trained, DET_CONFIG, checkpoint, DET_IMAGES,
                                    {'labels', 'scores', 'bboxes', 'masks', 'label_names'})
    record = json.loads((out / 'preds' / f'{inputs[0].stem}.json').read_text())
    assert len(record['bboxes']) == len(record['masks']) == len(record['label_names']) > 0


def test_mmseg_apis_load_train_checkpoints(trained):
    """A plain checkpoint, and one written by 2 processes under --amp (float16) after a
    resume."""
    checkpoint, amp_dist = trained / 'seg' / 'iter_2.pth', trained / 'amp_dist' / 'iter_2.pth'
    allow_mmengine_checkpoint_globals()
    record = torch.load(str(amp_dist), map_location='cpu', weights_only=True)
    assert record['optimizer']['loss_scaler']['scale'] > 0
    assert record['random_states']['world_size'] == 2 and record['meta']['iter'] == 2
    image = sorted((trained / SEG_IMAGES).iterdir())[0]
    found = _result(_run(['-c', SEG_SCRIPT, SEG_CONFIG, image, checkpoint, amp_dist], trained))
    height, width = cv2.imread(str(image)).shape[:2]
    assert sorted(found) == sorted([str(checkpoint), str(amp_dist)])
    for result in found.values():
        assert result['inference_model'] == dict(type='SegDataSample', seg=[1, height, width],
                                                 image=[height, width])
        assert result['MMSegInferencer'] == dict(keys=['predictions', 'visualization'],
                                                 seg=[height, width])

    out, inputs = _check_infer_tool(trained, SEG_CONFIG, checkpoint, SEG_IMAGES,
                                    {'height', 'width', 'label_map', 'pixels_per_class'})
    for image in inputs:
        record = json.loads((out / 'preds' / f'{image.stem}.json').read_text())
        label_map = cv2.imread(str(out / 'preds' / record['label_map']), cv2.IMREAD_UNCHANGED)
        assert label_map.shape == (record['height'], record['width'])
        assert sum(record['pixels_per_class'].values()) == label_map.size


def test_infer_tool_refuses_a_hostile_pickle_and_missing_inputs(trained):
    for args, message in (
            ([trained / 'hostile.pth', trained / DET_IMAGES], 'posix.system'),
            ([trained / 'det' / 'epoch_1.pth', trained / 'nothing_here'], 'does not exist')):
        out = subprocess.run([PYTHON, 'tools/infer.py', DET_CONFIG] + [str(a) for a in args],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-3000:]
        assert 'Traceback' not in out.stderr
    assert not (trained / 'payload_ran').exists()
