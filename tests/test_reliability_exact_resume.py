"""Exact resume: a run stopped at a checkpoint and resumed in a fresh Runner ends with the weights
and optimizer state of the run that was never interrupted, bit for bit on CPU, with data
augmentation on and loader workers (persistent or not, or none) in either run.

Checkpoints carry the random states of every rank (AtomicCheckpointHook), each training
sample's augmentation is seeded from its place in the data stream (mmeformer.engine.sampling)
and the loops skip the trained batches without loading them (mmeformer.engine.loops). The toy
Mask R-CNN is also SIGKILLed inside epoch 2 and resumed through tools/train.py here; the toy
Semantic FPN's SIGKILL case is in test_reliability_resume.py."""
import itertools
import os
import random
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import dist_launch, kill_after_iteration, train_command
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from mmeformer.datasets import make_toy_data
from mmeformer.engine import (LaunchError, MMEformerRunner, allow_mmengine_checkpoint_globals,
                              build_runner, load_config)
from mmeformer.engine.random_state import (capture_random_state, gather_random_states,
                                           restore_random_state, seeded_random_state)
from mmeformer.engine.sampling import SampleKey, SeededSampleDataset

REPO = Path(__file__).resolve().parents[1]


def _load(path):
    allow_mmengine_checkpoint_globals()  # mmengine's own globals only: nothing added for us
    return torch.load(str(path), map_location='cpu', weights_only=True)


def _tensors(checkpoint):
    """{name: tensor} of the weights and of every optimizer state entry."""
    found = {f'weight {k}': v for k, v in checkpoint['state_dict'].items()}
    for param, state in checkpoint['optimizer']['state'].items():
        for name, value in state.items():
            found[f'optimizer {param}.{name}'] = torch.as_tensor(value)
    return found


def _compare(reference, resumed):
    """(tensors compared, how many differ, max |difference|); weights and optimizer state."""
    a, b = _tensors(reference), _tensors(resumed)
    assert a.keys() == b.keys()
    assert (reference['optimizer']['param_groups'] == resumed['optimizer']['param_groups'])
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    biggest = max(((a[k].double() - b[k].double()).abs().max().item() for k in differ),
                  default=0.0)
    return len(a), len(differ), biggest


def _unique_name(names=itertools.count()):
    """A run name of its own (mmengine hands a run the visualizer of an earlier run of the same
    name, with that run's folders)."""
    return f'exact_resume_{next(names)}'


def _release_workers(runner):
    """Shut persistent loader workers down now: left to the garbage collection of the runner's
    reference cycles, torch waits out a 5 s join timeout per worker."""
    runner.train_dataloader._iterator = None


# -- the random states themselves ----------------------------------------------------------------
def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), \
        torch.rand(3).tolist()


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    np.random.randn()  # numpy holds a cached gaussian: part of the state
    record = gather_random_states()
    expected = _draws()
    torch.save({'random_states': record}, str(tmp_path / 'states.pth'))
    loaded = torch.load(str(tmp_path / 'states.pth'), weights_only=True)  # no global allowed
    assert torch.serialization.get_unsafe_globals_in_checkpoint(
        str(tmp_path / 'states.pth')) == []
    _draws()
    restore_random_state(loaded['random_states']['ranks'][0])
    assert _draws() == expected
    assert loaded['random_states']['world_size'] == 1

    # Seeding from a position: the same numbers wherever it runs, previous states kept.
    before = capture_random_state()
    with seeded_random_state((0, 0, 1, 5)):
        first = _draws()
    with seeded_random_state((0, 0, 1, 5)):
        assert _draws() == first
    with seeded_random_state((0, 0, 1, 6)):
        assert _draws() != first
    after = capture_random_state()
    assert after['python'] == before['python'] and torch.equal(after['torch'], before['torch'])
    assert torch.equal(after['numpy']['keys'], before['numpy']['keys'])


class _Listed:
    pipeline = 'original'

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return type(index).__name__, float(np.random.rand())


def test_seeded_dataset_seeds_keyed_samples_and_is_otherwise_the_dataset():
    wrapped = SeededSampleDataset(_Listed())
    key = SampleKey(1, (0, 0, 2, 7))
    first = wrapped[key]
    assert first == wrapped[key] and first[0] == 'int'  # the dataset sees a plain index
    assert wrapped[SampleKey(1, (0, 0, 2, 8))] != first
    assert wrapped[1] != wrapped[1]  # a plain index is loaded as it is, unseeded
    wrapped.pipeline = 'switched'  # as mmdet's PipelineSwitchHook does
    assert wrapped.dataset.pipeline == 'switched' and len(wrapped) == 3


# -- a tiny Runner drawing from every generator ---------------------------------------------------
class NoisyData(Dataset):
    """Six samples, each 'augmented' with numbers from Python's, numpy's and torch's global
    generators (in the loader workers, or in the main process without workers)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        noise = float(np.random.rand()) + random.random()
        return dict(x=torch.full((4, ), float(i)) * noise + torch.rand(4))


class NoisyModel(BaseModel):
    """Dropout (torch) and two more global draws (numpy, Python) in every training step."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, mode='loss'):
        scale = 1 + float(np.random.rand()) + random.random()
        return dict(loss=(self.fc(self.drop(torch.stack(x))) * scale).pow(2).mean())


def _tiny_run(work_dir, loop, resume=None, workers=2, persistent=True, amp=False,
              restore=True, hooks=()):
    """9 iterations (3 epochs of 3 batches, or max_iters=9), a checkpoint after each."""
    torch.manual_seed(1)  # the same initial weights in every run
    epoch = loop == 'epoch'
    optim = dict(optimizer=dict(type='AdamW', lr=1e-2))
    if amp:
        optim.update(type='mmeformer.CPUAmpOptimWrapper', dtype='float16', loss_scale='dynamic')
    runner = Runner(
        model=NoisyModel(), work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=NoisyData(), batch_size=2, num_workers=workers,
            persistent_workers=persistent and workers > 0,
            sampler=dict(type='DefaultSampler' if epoch else 'InfiniteSampler', shuffle=True),
            collate_fn=dict(type='pseudo_collate')),
        train_cfg=(dict(type='mmeformer.ResumableEpochBasedTrainLoop', max_epochs=3) if epoch
                   else dict(type='mmeformer.ResumableIterBasedTrainLoop', max_iters=9)),
        optim_wrapper=optim,
        default_hooks=dict(checkpoint=dict(type='mmeformer.AtomicCheckpointHook', by_epoch=False,
                                           interval=1, restore_random_states=restore)),
        custom_hooks=list(hooks), randomness=dict(seed=0), load_from=resume,
        resume=resume is not None, experiment_name=_unique_name())
    runner.train()
    _release_workers(runner)
    return _load(Path(work_dir) / 'iter_9.pth')


@pytest.mark.parametrize('loop,amp', [('epoch', False), ('iter', False), ('iter', True)])
def test_tiny_runner_resumes_exactly(loop, amp, tmp_path):
    """From an epoch's end (iteration 3) and from inside an epoch (4), with 1 or no loader
    worker where the reference had 2 persistent ones: the same final weights and optimizer
    state (float16 loss scale included), bit for bit. Negative control: the same resume with
    the random states left unrestored ends elsewhere."""
    reference = _tiny_run(tmp_path / 'reference', loop, amp=amp)
    for start, workers in ((3, 1), (4, 0)):
        resumed = _tiny_run(tmp_path / f'from_{start}', loop, amp=amp, workers=workers,
                            persistent=False,
                            resume=str(tmp_path / 'reference' / f'iter_{start}.pth'))
        assert _compare(reference, resumed)[1:] == (0, 0.0), start
        if amp:
            assert (resumed['optimizer']['loss_scaler'] ==
                    reference['optimizer']['loss_scaler'])
    control = _tiny_run(tmp_path / 'control', loop, amp=amp, workers=0, restore=False,
                        resume=str(tmp_path / 'reference' / 'iter_4.pth'))
    assert _compare(reference, control)[1] > 0


def test_old_checkpoint_resumes_with_a_warning_and_another_process_count_is_refused(
        tmp_path):
    reference = _tiny_run(tmp_path / 'reference', 'iter', workers=0)
    checkpoint = _load(tmp_path / 'reference' / 'iter_4.pth')

    # A checkpoint from before the random states were recorded: resumes, warns, differs.
    old = dict(checkpoint)
    del old['random_states']
    torch.save(old, str(tmp_path / 'old.pth'))
    resumed = _tiny_run(tmp_path / 'from_old', 'iter', workers=0,
                        resume=str(tmp_path / 'old.pth'))
    [log] = (tmp_path / 'from_old').glob('*/*.log')
    assert re.search(r'WARNING - The checkpoint records no random states .* so it will differ '
                     r'from an uninterrupted run', log.read_text())
    assert _compare(reference, resumed)[1] > 0

    # Written by 2 processes, resumed by 1: refused, naming the launch that fits.
    two = dict(checkpoint)
    two['random_states'] = dict(checkpoint['random_states'], world_size=2,
                                ranks=checkpoint['random_states']['ranks'] * 2)
    torch.save(two, str(tmp_path / 'two.pth'))
    with pytest.raises(LaunchError, match=r'2 process\(es\) and this run has 1.*'
                       r'tools/dist_train\.sh CONFIG 2 --resume.*restore_random_states=False'):
        _tiny_run(tmp_path / 'from_two', 'iter', workers=0, resume=str(tmp_path / 'two.pth'))


# -- toy Mask R-CNN + EfficientFormer-L1, epoch-based ---------------------------------------------
@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('exact_resume_toy')
    make_toy_data(str(root / 'data' / 'toy'), num_train=4, num_val=2)
    return root


# A checkpoint after iteration 3, inside epoch 2 (by_epoch=False), beside the epoch checkpoints.
CHECKPOINT_AT_3 = dict(type='mmeformer.AtomicCheckpointHook', by_epoch=False, interval=3,
                       save_last=False)


def _small_maskrcnn(folder, width=32):
    """Write the toy Mask R-CNN + EfficientFormer-L1 at a fraction of its step time and
    checkpoint size: 128 px images, fewer proposals and RoIs, narrower neck and heads (RandomFlip
    stays, prob 0.5); 2 epochs of 2 iterations (4 images, batch 2), a checkpoint every epoch and
    one after iteration 3, seed 0, no validation. Returns the config's path, for tools/train.py
    and for the in-process runs alike."""
    cfg = Config.fromfile(str(REPO / 'configs' / 'detection' / 'toy' / 'maskrcnn_eformer_l1.py'))
    for step in cfg.train_dataloader.dataset.pipeline:
        if step.type == 'Resize':
            step.scale = (128, 128)
    model = cfg.model
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
    model.train_cfg.rcnn.sampler.num = 32
    model.neck.out_channels = width
    model.rpn_head.in_channels = model.rpn_head.feat_channels = width
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = width
    roi.bbox_head.in_channels = roi.mask_head.in_channels = width
    roi.bbox_head.fc_out_channels = 2 * width
    roi.mask_head.conv_out_channels = width
    cfg.merge_from_dict({'train_cfg.max_epochs': 2, 'train_cfg.val_interval': 10,
                         'randomness': dict(seed=0), 'default_hooks.checkpoint.interval': 1,
                         'default_hooks.logger.interval': 1})
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [CHECKPOINT_AT_3]
    path = Path(folder) / 'small_maskrcnn_eformer_l1.py'
    cfg.dump(str(path))
    return path


def _train_maskrcnn(config, work_dir, resume=None, workers=0, restore=True):
    """Train ``config`` in this process (a fresh Runner) to the end of epoch 2."""
    cfg = load_config(str(config), work_dir=str(work_dir), resume=resume, cfg_options={
        'default_hooks.checkpoint.restore_random_states': restore,
        'train_dataloader.num_workers': workers, 'train_dataloader.persistent_workers': False})
    cfg.experiment_name = _unique_name()
    # Every checkpoint hook restores the random states it finds; the iteration-3 one too.
    cfg.custom_hooks = [dict(hook, restore_random_states=restore) for hook in cfg.custom_hooks]
    runner = build_runner(cfg)
    assert isinstance(runner, MMEformerRunner)  # its loader workers die with the process
    runner.train()
    _release_workers(runner)
    [log] = Path(work_dir).glob('*/*.log')
    return _load(Path(work_dir) / 'epoch_2.pth'), log.read_text()


def _train_tool(config, work_dir, cwd, env, *extra):
    """tools/train.py as a user runs it; returns the process and its output. (A killed run
    that times out here left loader workers holding its output pipe:
    mmeformer/engine/workers.py.)"""
    proc = subprocess.run(train_command(config, work_dir, *extra), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, proc.stdout + proc.stderr


def test_maskrcnn_resumes_exactly_from_an_epoch_end_and_from_inside_an_epoch(
        toy_root, tmp_path, monkeypatch):
    """Toy Mask R-CNN + EfficientFormer-L1 with RandomFlip (prob 0.5). The uninterrupted run
    (tools/train.py, one persistent loader worker) against:

    * a tools/train.py run SIGKILLed after iteration 3 (inside epoch 2, two loader workers) and
      finished by ``tools/train.py --resume``, which picks the iteration-3 checkpoint;
    * a fresh Runner in this process resumed from the epoch-1 checkpoint (two workers) and one
      resumed from the iteration-3 checkpoint (no worker; it loads only the batch it trains).

    Each ends with the weights and AdamW state of the uninterrupted run, every tensor bit for
    bit. Negative control: the same resume without restoring the random states (RPN / RoI
    sampling) ends elsewhere."""
    config = _small_maskrcnn(tmp_path)
    # This process's thread count in the tools too: bitwise equality needs the same reductions
    # (the in-process runs below compare with the tool's reference).
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=f'{REPO}{os.pathsep}{tmp_path}')
    workers = ['--cfg-options', 'train_dataloader.num_workers=2',
               'train_dataloader.persistent_workers=False']
    with open(tmp_path / 'reference.log', 'w') as out:
        uninterrupted = subprocess.Popen(
            train_command(config, tmp_path / 'reference', '--cfg-options',
                          'train_dataloader.num_workers=1',
                          'train_dataloader.persistent_workers=True'),
            cwd=toy_root, env=env, stdout=out, stderr=subprocess.STDOUT)
    killed = tmp_path / 'killed'
    proc, log = _train_tool(kill_after_iteration(config, 3, tmp_path, [CHECKPOINT_AT_3]),
                            killed, toy_root, env, *workers)
    assert proc.returncode == -signal.SIGKILL, log[-4000:]
    assert (killed / 'last_checkpoint').read_text() == str(killed / 'iter_3.pth')
    proc, log = _train_tool(config, killed, toy_root, env, '--resume', *workers)
    assert proc.returncode == 0, log[-4000:]
    assert 'Resuming inside epoch 2: skipping its first 1 of 2 batches' in log, log[-4000:]
    assert 'Restored the random states of rank 0' in log
    assert re.findall(r'Epoch\(train\) \[(\d)\]\[\s*(\d)/2\]', log) == [('2', '2')], log[-4000:]
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / 'reference.log').read_text()[-4000:]
    reference = _load(tmp_path / 'reference' / 'epoch_2.pth')
    compared, differ, biggest = _compare(reference, _load(killed / 'epoch_2.pth'))
    print(f'SIGKILLed after iteration 3, tools/train.py --resume: {differ} of {compared} '
          f'tensors differ, max |diff| {biggest}')
    assert (differ, biggest) == (0, 0.0) and compared > 500

    monkeypatch.chdir(toy_root)
    resumed, log = _train_maskrcnn(config, tmp_path / 'from_epoch_1', workers=2,
                                   resume=str(tmp_path / 'reference' / 'epoch_1.pth'))
    assert 'Restored the random states of rank 0' in log
    assert 'resumed epoch: 1, iter: 2' in log and 'skipping' not in log
    compared, differ, biggest = _compare(reference, resumed)
    print(f'resumed from epoch 1 (iteration 2): {differ} of {compared} tensors differ, '
          f'max |diff| {biggest}')
    assert (differ, biggest) == (0, 0.0)

    loaded = []
    load = SeededSampleDataset.__getitem__
    monkeypatch.setattr(SeededSampleDataset, '__getitem__',
                        lambda self, index: loaded.append(int(index)) or load(self, index))
    resumed, log = _train_maskrcnn(config, tmp_path / 'from_3',
                                   resume=str(tmp_path / 'reference' / 'iter_3.pth'))
    assert 'skipping its first 1 of 2 batches' in log and len(loaded) == 2, loaded
    compared, differ, biggest = _compare(reference, resumed)
    print(f'resumed from iteration 3: {differ} of {compared} tensors differ, max |diff| '
          f'{biggest}')
    assert (differ, biggest) == (0, 0.0)

    control, _ = _train_maskrcnn(config, tmp_path / 'control', restore=False,
                                 resume=str(tmp_path / 'reference' / 'iter_3.pth'))
    compared, differ, biggest = _compare(reference, control)
    print(f'control, resumed from iteration 3 without the random states: {differ} of '
          f'{compared} tensors differ, max |diff| {biggest:.3g}')
    assert differ > 0


# -- 2 CPU processes (gloo), toy Semantic FPN + EfficientViT-M4, iteration-based -----------------
def _dist_train(toy_root, tmp_path, work_dir, *extra):
    config = REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_efficientvit_m4.py'
    proc = dist_launch('dist_train.sh', [
        config, 2, '--work-dir', work_dir, *extra, '--cfg-options', 'train_cfg.max_iters=3',
        'train_cfg.val_interval=10', 'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
        'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=1',
        'train_dataloader.persistent_workers=False', 'randomness.seed=0',
        'randomness.diff_rank_seed=True'], toy_root, tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def test_two_process_run_resumes_exactly(toy_root, tmp_path):
    """tools/dist_train.sh CONFIG 2 on CPU (gloo), the toy Semantic FPN + EfficientViT-M4
    (RandomResize / RandomCrop / RandomFlip in a loader worker per rank; a seed per rank, so
    the ranks' streams differ): resumed at iteration 2 by a new 2-process launch, it ends with
    the weights and optimizer state of the uninterrupted launch, bit for bit; the checkpoint
    holds each rank's own random states."""
    _dist_train(toy_root, tmp_path, tmp_path / 'reference')
    checkpoint = _load(tmp_path / 'reference' / 'iter_2.pth')
    record = checkpoint['random_states']
    assert record['world_size'] == 2 and len(record['ranks']) == 2
    assert not torch.equal(record['ranks'][0]['torch'], record['ranks'][1]['torch'])

    log = _dist_train(toy_root, tmp_path, tmp_path / 'resumed', '--resume',
                      str(tmp_path / 'reference' / 'iter_2.pth'))
    assert 'Restored the random states of rank 0' in log, log[-4000:]  # rank 0 logs
    # Launch decisions logged before the Runner's logger exists: once, not once per process.
    assert len(re.findall(r'CPU training: replaced \d+ SyncBN', log)) == 1, log[-4000:]
    assert re.findall(r'Iter\(train\) \[\s*(\d+)/3\]', log) == ['3'], log[-4000:]
    compared, differ, biggest = _compare(_load(tmp_path / 'reference' / 'iter_3.pth'),
                                         _load(tmp_path / 'resumed' / 'iter_3.pth'))
    print(f'2 processes, resumed from iteration 2: {differ} of {compared} tensors differ, '
          f'max |diff| {biggest}')
    assert (differ, biggest) == (0, 0.0) and compared > 500
