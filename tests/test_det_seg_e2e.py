"""End to end on generated toy data with the real runners and metrics: train, save, resume, test
and learn (CocoMetric bbox + segm, IoUMetric) per family and task, 2-process CPU training and
testing through tools/dist_train.sh and tools/dist_test.sh, and mmengine checkpoints read under
``torch.load(weights_only=True)``."""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import dist_launch, free_port
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mmeformer.datasets import make_toy_data
from mmeformer.engine import allow_mmengine_checkpoint_globals, load_config, train
from mmeformer.engine import test as run_test  # not named test_*: pytest would collect it

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SMALL_SCALE = (192, 192)


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    """A directory holding data/toy/{coco,ade} (4 training, 2 validation images each)."""
    root = tmp_path_factory.mktemp('toy_run')
    make_toy_data(str(root / 'data' / 'toy'), num_train=4, num_val=2)
    return root


def _shrink_detection(cfg):
    """Smaller images and fewer RoIs than the toy config, to keep CI short."""
    for loader in (cfg.train_dataloader, cfg.test_dataloader, cfg.val_dataloader):
        for step in loader.dataset.pipeline:
            if step.type == 'Resize':
                step.scale = SMALL_SCALE
    if 'rpn' in cfg.model.test_cfg:
        cfg.model.train_cfg.rcnn.sampler.num = 64
        cfg.model.test_cfg.rcnn.max_per_img = 20


# (config, unit, length, floors): each run trains the first unit (epoch / 2 iterations), is
# resumed to ``length`` units and then evaluated on its own training images, where it must beat
# floors that a backbone returning zeros cannot reach. Measured while writing them (seed 0,
# 2-core CPU): V1 Mask R-CNN bbox / segm mAP@50 0.44-0.63 at seeds 0-2; V2-S0 0.51 / 0.51;
# EfficientViT-M4 (slower to start from random weights, 16 epochs) 0.27 / 0.27; Semantic FPN
# with EfficientViT-M4 mIoU 86.5. With every backbone level multiplied by zero: 0.0 mAP for
# Mask R-CNN, 15.5 mIoU (the background class only).
E2E_CASES = {
    'v1_maskrcnn': ('detection/toy/maskrcnn_eformer_l1.py', 'epoch', 8,
                    {'coco/bbox_mAP_50': 0.25, 'coco/segm_mAP_50': 0.25}),
    'v2_maskrcnn': ('detection/toy/maskrcnn_eformerv2_s0.py', 'epoch', 8,
                    {'coco/bbox_mAP_50': 0.25, 'coco/segm_mAP_50': 0.25}),
    'ev_maskrcnn': ('detection/toy/maskrcnn_efficientvit_m4.py', 'epoch', 16,
                    {'coco/bbox_mAP_50': 0.1, 'coco/segm_mAP_50': 0.1}),
    'ev_semfpn': ('segmentation/toy/semfpn_efficientvit_m4.py', 'iter', 30, {'mIoU': 40.}),
}
TRAIN_ANN = 'annotations/instances_train2017.json'


def _learning_options(unit, length, resumed):
    """Run 1 trains the first unit and checkpoints it; the resumed run goes on to ``length``,
    validating and checkpointing at the end only. A short warm-up and a learning rate for
    random weights; the test split is the training images."""
    options = {'optim_wrapper.optimizer.lr': 4e-4, 'randomness': dict(seed=0),
               'param_scheduler': [dict(type='LinearLR', start_factor=0.01, by_epoch=False,
                                        begin=0, end=5)]}
    if unit == 'epoch':  # 4 images / batch 2 = 2 iterations per epoch
        end = length if resumed else 1
        options.update({'train_cfg.max_epochs': end, 'train_cfg.val_interval': length,
                        'default_hooks.checkpoint.interval': end,
                        'test_dataloader.dataset.ann_file': TRAIN_ANN,
                        'test_dataloader.dataset.data_prefix.img': 'train2017/',
                        'test_evaluator.ann_file': 'data/toy/coco/' + TRAIN_ANN})
    else:
        end = length if resumed else 2
        options.update({'train_cfg.max_iters': end, 'train_cfg.val_interval': length,
                        'default_hooks.checkpoint.interval': end,
                        'test_dataloader.dataset.data_prefix': dict(
                            img_path='images/training', seg_map_path='annotations/training')})
    return options


@HOOKS.register_module(name='TestWeightsAtStart', force=True)
class _WeightsAtStart(Hook):
    """Keeps a copy of the model's weights as training starts (after a resume has loaded), in
    ``seen`` (configs are dumped to text: the hook cannot be handed a container)."""
    seen = {}

    def before_train(self, runner):
        self.seen.clear()
        self.seen.update({k: v.detach().clone() for k, v in runner.model.state_dict().items()})


@pytest.mark.parametrize('case', list(E2E_CASES))
def test_train_resume_and_learn_on_toy_data(case, toy_root, tmp_path, monkeypatch):
    """Train, save, resume and test with the real runners and metrics, per family and task:
    the resumed run starts from the checkpoint's weights, optimizer and schedule, and the
    model learns (CocoMetric bbox + segm, IoUMetric) beyond what no backbone reaches."""
    config, unit, length, floors = E2E_CASES[case]
    monkeypatch.chdir(toy_root)  # the toy configs read data/toy/... relative to the cwd
    work = tmp_path / 'work'

    def run(resume=None):
        cfg = load_config(str(REPO / 'configs' / config), work_dir=str(work), resume=resume,
                          cfg_options=_learning_options(unit, length, resume is not None))
        cfg.experiment_name = f'{case}_{"resumed" if resume else "first"}'
        if cfg.default_scope == 'mmdet':
            _shrink_detection(cfg)
            for step in cfg.train_dataloader.dataset.pipeline:
                if step.type == 'RandomFlip':
                    step.prob = 0.
        return cfg

    train(run())
    first = work / ('epoch_1.pth' if unit == 'epoch' else 'iter_2.pth')
    saved = torch.load(str(first), map_location='cpu', weights_only=True)
    assert saved['meta']['iter'] == 2

    # Resume from the latest checkpoint; its message hub / optimizer / schedulers load safely,
    # and the resumed run starts from the checkpoint's weights, every one of them.
    resumed_cfg = run(resume='auto')
    resumed_cfg.custom_hooks = list(resumed_cfg.get('custom_hooks', [])) + [
        dict(type='TestWeightsAtStart')]
    _WeightsAtStart.seen.clear()
    train(resumed_cfg)
    at_start = _WeightsAtStart.seen
    assert at_start.keys() == saved['state_dict'].keys()
    assert all(torch.equal(at_start[k], v) for k, v in saved['state_dict'].items())
    logs = [log.read_text() for log in work.glob('*/*.log')]
    resumed = [log for log in logs if 'resumed epoch' in log]
    assert len(logs) == 2 and len(resumed) == 1, logs
    # Each run writes its config and scalars into its own folder (mmengine would reuse the
    # first run's visualizer, named 'visualizer' by the config, and write into that one).
    for name in ('config.py', 'scalars.json'):
        assert len(list(work.glob(f'*/vis_data/{name}'))) == 2, name
    # The second run continues after iteration 2 instead of training from scratch.
    assert f'Auto resumed from the latest checkpoint {first}' in resumed[0]
    assert re.search(r'resumed epoch: [01], iter: 2$', resumed[0], re.M)
    iters = 2 * length if unit == 'epoch' else length
    last = work / (f'epoch_{length}.pth' if unit == 'epoch' else f'iter_{length}.pth')
    checkpoint = torch.load(str(last), map_location='cpu', weights_only=True)
    assert checkpoint['meta']['iter'] == iters
    assert checkpoint['meta']['epoch'] == (length if unit == 'epoch' else 0)
    steps = [{int(state['step']) for state in c['optimizer']['state'].values()}
             for c in (saved, checkpoint)]
    assert steps == [{2}, {iters}]  # AdamW's state carried over

    metrics = run_test(run(), str(last))
    for key, floor in floors.items():
        assert metrics[key] >= floor, (key, metrics)


def test_dist_train_two_cpu_processes_then_test(toy_root, tmp_path):
    config = str(REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_eformerv2_s0.py')
    work_dir = tmp_path / 'dist'
    train_run = dist_launch(
        'dist_train.sh', [config, 2, '--work-dir', work_dir, '--cfg-options',
                          'train_cfg.max_iters=2', 'train_cfg.val_interval=10',
                          'default_hooks.checkpoint.interval=2', 'train_dataloader.batch_size=2'],
        toy_root, tmp_path)
    log = train_run.stdout + train_run.stderr
    assert train_run.returncode == 0, log[-4000:]
    assert "'backend': 'gloo'" in log or 'gloo' in log
    assert 'replaced' in log and 'SyncBN' in log  # CPU: SyncBN -> BN
    assert re.search(r'Iter\(train\) \[2/2\]', log), log[-4000:]
    checkpoint = work_dir / 'iter_2.pth'
    assert checkpoint.is_file()

    # The same checkpoint evaluated in one process and in two (tools/dist_test.sh: each rank
    # takes half of the validation images, the metric gathers them): the same mIoU.
    test_run = subprocess.run(
        [PYTHON, str(REPO / 'tools' / 'test.py'), config, str(checkpoint), '--work-dir',
         str(tmp_path / 'test')], cwd=toy_root, env=dict(os.environ, OMP_NUM_THREADS='1'),
        capture_output=True, text=True, timeout=600)
    dist_run = dist_launch('dist_test.sh', [config, checkpoint, 2, '--work-dir',
                                            tmp_path / 'dist_test'], toy_root, tmp_path)
    metrics = []
    for run in (test_run, dist_run):
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        assert run.stdout.count('metrics: {') == 1, run.stdout[-2000:]  # rank 0 alone prints
        assert re.search(r'^mIoU: [0-9.]+$', run.stdout, re.M), run.stdout[-2000:]
        last = run.stdout.splitlines()[-1]
        assert last.startswith('metrics: {')
        metrics.append(json.loads(last[len('metrics: '):]))
    assert "'backend': 'gloo'" in dist_run.stdout + dist_run.stderr
    assert metrics[0]['mIoU'] == metrics[1]['mIoU'], metrics


def test_distributed_train_and_test_leave_no_process_group_to_the_interpreter_exit(
        toy_root, tmp_path, monkeypatch):
    """train() and test() in a (one-process gloo) distributed run leave no
    DistributedDataParallel wrapper alive, not even as uncollected garbage, and the process
    group destroyed: the wrapper's reducer holds the group, and a group left to the interpreter's
    exit could abort a rank that had finished its work (see _close_process_group). train()
    returns the unwrapped model."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    monkeypatch.chdir(toy_root)
    config = str(REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_eformerv2_s0.py')
    options = {'train_cfg.max_iters': 1, 'train_cfg.val_interval': 10,
               'default_hooks.checkpoint.interval': 1, 'train_dataloader.batch_size': 1}

    def launch():  # torchrun's environment for one process
        for key, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                               MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(key, value)
        return load_config(config, work_dir=str(tmp_path / 'work'), launcher='pytorch',
                           cfg_options=options)

    def wrappers_alive():
        return [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]

    try:
        model = train(launch())
        assert dist.is_available() and not dist.is_initialized()
        assert type(model).__name__ == 'EncoderDecoder'
        assert wrappers_alive() == []
        metrics = run_test(launch(), str(tmp_path / 'work' / 'iter_1.pth'))
        assert 'mIoU' in metrics
        assert not dist.is_initialized() and wrappers_alive() == []
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _SneakyGetattr:
    """Pickles as ``getattr(HistoryBuffer, '__init__')``: an allowed class, but a getattr that
    is not one of its statistics methods."""

    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer
        return getattr, (HistoryBuffer, '__init__')


def test_safe_globals_do_not_open_getattr(tmp_path):
    allow_mmengine_checkpoint_globals()
    path = tmp_path / 'sneaky.pth'
    torch.save({'x': _SneakyGetattr()}, str(path))
    with pytest.raises(pickle.UnpicklingError, match='only the statistics methods'):
        torch.load(str(path), weights_only=True)


def test_forced_unsafe_loading_is_refused(monkeypatch):
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.raises(RuntimeError, match='Unset it'):
        allow_mmengine_checkpoint_globals()
