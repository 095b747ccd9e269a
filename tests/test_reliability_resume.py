"""Interrupted training: a toy run SIGKILLed mid-epoch resumes from its last checkpoint with the
same iteration count, learning-rate schedule and optimizer state; a checkpoint being written when
the process dies never replaces (or loses) the previous good one.

The kill-while-writing cases use ``RLIMIT_FSIZE``: a write past the limit makes the kernel send
``SIGXFSZ``, which kills the process in the middle of that write, a real death mid-write at a
known point."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_after_iteration, train_command

from mmeformer.datasets import make_toy_data
from mmeformer.engine import allow_mmengine_checkpoint_globals
from mmeformer.engine.checkpointing import PARTIAL_SUFFIX, atomic_write, remove_stale_partials

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _load(path):
    allow_mmengine_checkpoint_globals()
    return torch.load(str(path), map_location='cpu', weights_only=True)


def _partials(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def _child_env():
    env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONPATH=str(REPO))
    return env


# -- atomic writes ------------------------------------------------------------------------------
WRITE_CHILD = textwrap.dedent('''
    import resource, signal, sys
    import torch
    from mmengine.runner.checkpoint import save_checkpoint
    import mmeformer.engine  # registers the 'mmeformer_atomic' file backend
    path, backend, on_error = sys.argv[1], sys.argv[2], sys.argv[3]
    big = {'meta': {'iter': 4}, 'state_dict': {'w': torch.ones(1 << 18)}}  # 1 MiB of floats
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Python ignores SIGXFSZ (a write past the limit fails with EFBIG); 'die' restores the
    # default action, which kills the process inside the write.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if on_error == 'die' else signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    args = dict(backend=backend) if backend != 'plain' else None
    try:
        save_checkpoint(big, path, backend_args=args)  # what Runner.save_checkpoint calls
    except OSError as err:
        print(f'write failed: errno {err.errno}', flush=True)
        sys.exit(3)
''')


def _write_good_checkpoint(path):
    good = {'meta': {'iter': 2}, 'state_dict': {'w': torch.arange(1000.)}}
    torch.save(good, str(path))
    return path.read_bytes()


def _write_in_child(path, backend, on_error):
    return subprocess.run([PYTHON, '-c', WRITE_CHILD, str(path), backend, on_error],
                          env=_child_env(), capture_output=True, text=True, timeout=120)


def test_process_killed_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / 'iter_2.pth'
    before = _write_good_checkpoint(path)
    proc = _write_in_child(path, 'mmeformer_atomic', 'die')
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-3000:]  # died inside the write
    # The final name still holds the previous checkpoint, byte for byte, and it loads.
    assert path.read_bytes() == before
    assert _load(path)['meta']['iter'] == 2
    # What was being written is only a hidden partial file, cut at the limit...
    partials = _partials(tmp_path)
    assert len(partials) == 1 and partials[0].startswith('.iter_2.pth.'), partials
    assert (tmp_path / partials[0]).stat().st_size == 64 * 1024
    # ...which the next run removes (its writer is dead).
    assert remove_stale_partials(tmp_path) == [str(tmp_path / partials[0])]
    assert _partials(tmp_path) == []

    # Control: mmengine's plain local backend in the same situation destroys the checkpoint.
    control = tmp_path / 'control' / 'iter_2.pth'
    control.parent.mkdir()
    _write_good_checkpoint(control)
    proc = _write_in_child(control, 'plain', 'die')
    assert proc.returncode == -signal.SIGXFSZ
    assert control.stat().st_size == 64 * 1024
    with pytest.raises(Exception):
        _load(control)


def test_failed_write_raises_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / 'iter_2.pth'
    before = _write_good_checkpoint(path)
    proc = _write_in_child(path, 'mmeformer_atomic', 'raise')
    assert proc.returncode == 3 and 'errno 27' in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert path.read_bytes() == before
    assert _partials(tmp_path) == []  # the temporary file was removed on the error

    atomic_write(tmp_path / 'last_checkpoint', str(path))  # text, and replacing a file
    atomic_write(tmp_path / 'last_checkpoint', 'new')
    assert (tmp_path / 'last_checkpoint').read_text() == 'new'
    assert oct((tmp_path / 'last_checkpoint').stat().st_mode & 0o777) == oct(
        0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A tiny real mmengine Runner (a linear model on random data) that checkpoints every iteration
# with max_keep_ckpts=1 and dies (SIGXFSZ) while writing its second checkpoint.
RUNNER_CHILD = textwrap.dedent('''
    import resource, signal, sys
    import torch, torch.nn as nn
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    import mmeformer.engine

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(512, 512)  # 1 MiB of weights, 3 MiB with AdamW state
        def forward(self, x, mode='loss'):
            return dict(loss=self.fc(torch.stack(x)).pow(2).mean())

    class LimitFileSize(Hook):  # from the second iteration on, a checkpoint cannot be written
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # die inside the write (Python ignores it)
    hook_type = sys.argv[2]
    runner = Runner(
        model=Toy(), work_dir=sys.argv[1],
        train_dataloader=dict(dataset=[dict(x=torch.randn(512)) for _ in range(8)], batch_size=2,
                              sampler=dict(type='InfiniteSampler', shuffle=False),
                              collate_fn=dict(type='pseudo_collate')),
        train_cfg=dict(by_epoch=False, max_iters=4),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
        default_hooks=dict(checkpoint=dict(type=hook_type, by_epoch=False, interval=1,
                                           max_keep_ckpts=1)),
        custom_hooks=[dict(type=LimitFileSize)])
    runner.train()
''')


@pytest.mark.parametrize('hook_type', ['mmeformer.AtomicCheckpointHook', 'CheckpointHook'])
def test_runner_killed_while_checkpointing_keeps_a_resumable_checkpoint(hook_type, tmp_path):
    proc = subprocess.run([PYTHON, '-c', RUNNER_CHILD, str(tmp_path), hook_type],
                          env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGXFSZ, (proc.stdout + proc.stderr)[-3000:]
    pointer = (tmp_path / 'last_checkpoint').read_text()
    if hook_type == 'CheckpointHook':
        # mmengine's hook: iter_1.pth deleted before iter_2.pth was written, and that one is
        # truncated: nothing left to resume from (why the atomic hook exists).
        assert not (tmp_path / 'iter_1.pth').exists()
        assert (tmp_path / 'iter_2.pth').stat().st_size == 1 << 20
        with pytest.raises(Exception):
            _load(tmp_path / 'iter_2.pth')
        return
    # Atomic hook: the previous checkpoint is kept, complete, and the pointer still names it.
    assert pointer == str(tmp_path / 'iter_1.pth')
    assert not (tmp_path / 'iter_2.pth').exists()
    checkpoint = _load(tmp_path / 'iter_1.pth')
    assert checkpoint['meta']['iter'] == 1
    assert checkpoint['message_hub']['runtime_info']['keep_ckpt_ids'] == [1]
    assert len(_partials(tmp_path)) == 1


# -- mid-epoch resumption of an epoch-based loop ------------------------------------------------
# A tiny Runner, 12 samples in batches of 2 (6 iterations per epoch), 2 epochs, a checkpoint
# every 4 iterations; it SIGKILLs itself as iteration 6 starts (mid-epoch 1) and is resumed.
# The model logs the sample ids of every batch it trains on.
EPOCH_CHILD = textwrap.dedent('''
    import json, os, signal, sys
    import torch, torch.nn as nn
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from mmeformer.engine import allow_mmengine_checkpoint_globals

    allow_mmengine_checkpoint_globals()  # resume under torch.load(weights_only=True)
    work_dir, loop_type, kill_at, resume = sys.argv[1:5]
    seen = os.path.join(work_dir, 'seen.jsonl')

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)
        def forward(self, x, idx, mode='loss'):
            with open(seen, 'a') as f:
                f.write(json.dumps(idx) + '\\n')
            return dict(loss=self.fc(torch.stack(x)).pow(2).mean())

    class KillAt(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(0)
    runner = Runner(
        model=Toy(), work_dir=work_dir,
        train_dataloader=dict(dataset=[dict(x=torch.randn(4), idx=i) for i in range(12)],
                              batch_size=2, sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='pseudo_collate')),
        train_cfg=dict(type=loop_type, max_epochs=2),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
        default_hooks=dict(checkpoint=dict(type='mmeformer.AtomicCheckpointHook',
                                           by_epoch=False, interval=4)),
        custom_hooks=[dict(type=KillAt)], randomness=dict(seed=0), resume=resume == 'resume')
    runner.train()
''')


def _seen(work_dir):
    return [json.loads(line) for line in (Path(work_dir) / 'seen.jsonl').read_text().splitlines()]


def _run_epoch_child(work_dir, loop, kill_at=-1, resume=False):
    return subprocess.run([PYTHON, '-c', EPOCH_CHILD, str(work_dir), loop, str(kill_at),
                           'resume' if resume else 'fresh'], env=_child_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def uninterrupted_batches(tmp_path_factory):
    """The batches of the same run without interruption (the same with either loop)."""
    work_dir = tmp_path_factory.mktemp('reference')
    proc = _run_epoch_child(work_dir, 'EpochBasedTrainLoop')
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _seen(work_dir)


@pytest.mark.parametrize('loop', ['mmeformer.ResumableEpochBasedTrainLoop',
                                  'EpochBasedTrainLoop'])
def test_epoch_loop_resumes_mid_epoch_exactly(loop, uninterrupted_batches, tmp_path):
    killed = _run_epoch_child(tmp_path, loop, kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _load(tmp_path / 'iter_4.pth')['meta']['epoch'] == 0  # inside epoch 1 of 2
    resumed = _run_epoch_child(tmp_path, loop, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, seen = uninterrupted_batches, _seen(tmp_path)
    assert len(expected) == 12 and seen[:5] == expected[:5]  # 5 trained before the kill
    if loop == 'EpochBasedTrainLoop':
        # Control, mmengine's loop: it replays the whole interrupted epoch (4 extra iterations).
        assert len(seen[5:]) == 12 and seen[5:11] == expected[:6]
        return
    # The resumed run trains exactly iterations 5..12, on the same batches as the reference.
    assert seen[5:] == expected[4:]
    assert 'skipping its first 4 of 6 batches' in resumed.stdout + resumed.stderr
    final = _load(tmp_path / 'iter_12.pth')
    assert final['meta']['iter'] == 12 and final['message_hub']['runtime_info']['epoch'] == 1
    assert {int(s['step']) for s in final['optimizer']['state'].values()} == {12}


def test_tools_use_the_atomic_hook_and_the_resumable_loop():
    from mmeformer.engine import (load_config, use_atomic_checkpoints, use_resumable_epoch_loop,
                                  use_resumable_iter_loop)
    cfg = load_config(str(REPO / 'configs' / 'detection' / 'toy' / 'maskrcnn_eformer_l1.py'))
    assert use_atomic_checkpoints(cfg) and use_resumable_epoch_loop(cfg)
    assert cfg.default_hooks.checkpoint.type == 'mmeformer.AtomicCheckpointHook'
    assert cfg.train_cfg.type == 'mmeformer.ResumableEpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == 4  # the other settings are kept
    cfg = load_config(str(REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_eformer_l1.py'))
    assert use_atomic_checkpoints(cfg) and not use_resumable_epoch_loop(cfg)  # iteration-based
    assert use_resumable_iter_loop(cfg) and not use_resumable_iter_loop(cfg)  # swapped once
    assert cfg.train_cfg.type == 'mmeformer.ResumableIterBasedTrainLoop'
    assert cfg.train_cfg.max_iters == 200


# -- loader workers of a killed process -------------------------------------------------------
# A training loader as the resumable loops build it (seeded_dataloader_config) and a plain one as
# the validation loop builds it, both through the Runner build_runner makes, two workers each
# whose samples (8 MB numpy arrays, pickled through the result pipe) fill that pipe; the
# process prints its workers' pids and SIGKILLs itself.
ORPHAN_CHILD = textwrap.dedent('''
    import os, signal
    import numpy as np
    from torch.utils.data import Dataset
    from mmeformer.engine import MMEformerRunner
    from mmeformer.engine.sampling import seeded_dataloader_config

    class Big(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            return np.full(1 << 20, float(index))

    plain = dict(dataset=Big(), batch_size=1, num_workers=2, persistent_workers=False,
                 sampler=dict(type='DefaultSampler', shuffle=False))
    pids = []
    for loader in (seeded_dataloader_config(plain, seed=0), plain):
        batches = iter(MMEformerRunner.build_dataloader(loader, seed=0))
        next(batches)
        pids += [w.pid for w in batches._workers]
    print(' '.join(map(str, pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
''')


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl(PR_SET_PDEATHSIG) is '
                    'Linux only')
def test_loader_workers_die_with_a_killed_training_process(tmp_path):
    """torch's workers of a SIGKILLed process leave their loop but then wait forever to flush
    their full result pipe (measured: orphans of a killed toy Mask R-CNN run still there 25
    minutes later, 700 MB each, and holding the run's stdout open). The workers of the
    training and validation loaders die with it."""
    out = tmp_path / 'child.out'  # a file, not a pipe: orphans would hold a pipe open
    with open(out, 'w') as stdout:
        proc = subprocess.run([PYTHON, '-c', ORPHAN_CHILD], env=_child_env(), stdout=stdout,
                              stderr=subprocess.STDOUT, timeout=120)
    pids = [int(p) for p in out.read_text().split()[-4:]]
    try:
        assert proc.returncode == -signal.SIGKILL, out.read_text()[-3000:]
        deadline = time.monotonic() + 20
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, pids)), f'workers {pids} outlived their killed process'
    finally:
        for pid in filter(_alive, pids):
            os.kill(pid, signal.SIGKILL)


class _WorkerState(torch.utils.data.Dataset):
    """Reports what the worker set-up left: a config's own init's mark and numpy's first
    number."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return os.environ.get('MMEFORMER_TEST_MARK'), float(np.random.rand())


def _mark_worker(worker_id, value):
    os.environ['MMEFORMER_TEST_MARK'] = f'{value}-{worker_id}'


def test_workers_keep_the_set_up_they_would_have_had():
    """Besides dying with the process, the workers run the worker set-up mmengine would have
    run: the config's own worker_init_fn with its arguments, else mmengine's seeding (numpy
    seeded with num_workers * rank + worker_id + seed)."""
    from mmeformer.engine import MMEformerRunner

    def first(**extra):
        loader = MMEformerRunner.build_dataloader(dict(
            dataset=_WorkerState(), batch_size=1, num_workers=1, persistent_workers=False,
            sampler=dict(type='DefaultSampler', shuffle=False), collate_fn=dict(
                type='pseudo_collate'), **extra), seed=7)
        (mark, ), (number, ) = next(iter(loader))  # pseudo_collate: one tuple per field
        return mark, number

    assert first(worker_init_fn=dict(type=_mark_worker, value='own'))[0] == 'own-0'
    mark, number = first()
    np.random.seed(7)
    assert mark is None and number == float(np.random.rand())


# -- SIGKILL mid-epoch and --resume through tools/train.py ---------------------------------------
# Toy Semantic FPN + EfficientFormerV2-S0: 8 training images, batch 2 = 4 iterations per epoch,
# a checkpoint and a validation every 2 iterations; killed after iteration 3 (mid-epoch),
# resumed to iteration 4. The toy augmentation (RandomResize, RandomCrop, RandomFlip) runs in a
# loader worker.
RESUME_CONFIG = '''
_base_ = ['{base}']
train_dataloader = dict(batch_size=2, num_workers=1, persistent_workers=False)
train_cfg = dict(max_iters=4, val_interval=2)
default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
'''



SEED = 1234


def _logged(work_dir, key):
    """{iteration: value} of a scalar logged by the runs in ``work_dir`` (vis_data)."""
    values = {}
    for scalars in sorted(Path(work_dir).glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            if key in record:
                values.setdefault(record['step'], []).append(record[key])
    return values


def _reference_lrs(base_lr, scheduler_cfg, steps):
    """The learning rates of an uninterrupted run: mmengine's own scheduler on a bare
    optimizer, stepped once per iteration."""
    from mmengine.optim.scheduler import PolyLR
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    args = {k: v for k, v in scheduler_cfg.items() if k != 'type'}
    assert scheduler_cfg['type'] == 'PolyLR'
    scheduler = PolyLR(optimizer, **args)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]['lr']


def test_sigkill_mid_epoch_then_resume_continues_the_run(tmp_path):
    make_toy_data(str(tmp_path / 'data' / 'toy'), num_train=8, num_val=2, tasks=('ade', ))
    config = tmp_path / 'resume_cfg.py'
    base = REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_eformerv2_s0.py'
    config.write_text(RESUME_CONFIG.format(base=base))
    work = tmp_path / 'work'
    # One thread per run: the uninterrupted reference runs beside run 1 (two OpenMP pools of 2
    # threads on 2 cores would spin against each other), and every run uses the same count.
    env = dict(_child_env(), OMP_NUM_THREADS='1')
    # The same run never interrupted, beside run 1 (its output to a file: a full pipe would
    # stall it).
    reference_log = tmp_path / 'reference.log'
    with open(reference_log, 'w') as out:
        reference = subprocess.Popen(
            train_command(config, tmp_path / 'reference', '--cfg-options',
                       f'randomness.seed={SEED}'),
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)

    # 1. Train with a hook that SIGKILLs the process after iteration 3 (the iteration-2
    # checkpoint and its pointer are on disk by then, the iteration-4 one is not).
    killed_config = kill_after_iteration(config, 3, tmp_path)
    env_run1 = dict(env, PYTHONPATH=f'{env["PYTHONPATH"]}{os.pathsep}{tmp_path}')
    # Run 1 alone fixes its seed; the resumed run (its config sets none) takes it from the
    # checkpoint.
    proc = subprocess.run(train_command(killed_config, work, '--cfg-options',
                                     f'randomness.seed={SEED}'),
                          cwd=tmp_path, env=env_run1, capture_output=True, text=True,
                          timeout=300)
    run1 = proc.stdout + proc.stderr
    pointer = work / 'last_checkpoint'
    assert proc.returncode == -signal.SIGKILL, run1[-4000:]
    assert re.findall(r'Iter\(train\) \[\s*(\d+)/4\]', run1) == ['1', '2', '3'], run1[-4000:]
    assert pointer.read_text() == str(work / 'iter_2.pth'), run1[-4000:]
    assert not (work / 'iter_4.pth').exists()  # killed mid-run, before the next checkpoint
    assert 'AtomicCheckpointHook' in run1
    assert _partials(work) == []

    # 2. --resume (latest checkpoint of the work dir) runs to the end.
    resumed = subprocess.run(train_command(config, work, '--resume'), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    run2 = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, run2[-4000:]
    assert 'resumed epoch: 0, iter: 2' in run2
    # The data sampler of the resumed run shuffles with the interrupted run's seed.
    seeds = [re.search(r'^\s*seed: (\d+)$', log, re.M).group(1) for log in (run1, run2)]
    assert seeds[0] == seeds[1]
    # The data position is restored without loading the 2 batches trained before, and the
    # random states recorded in the checkpoint are put back.
    assert 'skipping the 2 batches trained before the checkpoint' in run2
    assert 'Restored the random states of rank 0' in run2
    # Same iteration count: it trains iterations 3 and 4 only, never restarting from 1.
    assert re.findall(r'Iter\(train\) \[\s*(\d+)/4\]', run2) == ['3', '4'], run2[-4000:]
    assert pointer.read_text() == str(work / 'iter_4.pth')

    before, after = _load(work / 'iter_2.pth'), _load(work / 'iter_4.pth')
    assert (before['meta']['iter'], after['meta']['iter']) == (2, 4)
    hub_before = before['message_hub']['runtime_info']
    hub_after = after['message_hub']['runtime_info']
    assert hub_after['iter'] - hub_before['iter'] == 2 and hub_after['max_iters'] == 4
    # Optimizer state carried over: AdamW's per-parameter step counts continue 2 -> 4 (a fresh
    # optimizer would be at 2) and every state entry exists for the same parameters.
    steps_before = {int(s['step']) for s in before['optimizer']['state'].values()}
    steps_after = {int(s['step']) for s in after['optimizer']['state'].values()}
    assert (steps_before, steps_after) == ({2}, {4})
    assert before['optimizer']['state'].keys() == after['optimizer']['state'].keys()
    assert ([g['initial_lr'] for g in before['optimizer']['param_groups']] ==
            [g['initial_lr'] for g in after['optimizer']['param_groups']])
    # Learning-rate schedule: the scheduler state continues, and the rates logged by the two
    # processes are those of one uninterrupted run.
    [sched_before], [sched_after] = before['param_schedulers'], after['param_schedulers']
    assert (sched_before['last_step'], sched_after['last_step']) == (2, 4)
    from mmengine.config import Config
    cfg = Config.fromfile(str(config))
    base_lr = before['optimizer']['param_groups'][0]['initial_lr']
    expected, lr_after_4 = _reference_lrs(base_lr, cfg.param_scheduler[0], 4)
    assert sched_after['_last_value'][0] == pytest.approx(lr_after_4, rel=1e-9)
    logged = _logged(work, 'lr')
    assert sorted(logged) == [1, 2, 3, 4], logged
    for step, values in logged.items():  # iteration 3 may be logged by both runs
        assert values == pytest.approx([expected[step - 1]] * len(values), rel=1e-9), step
    assert _partials(work) == []

    # 3. The killed and resumed run ends with the weights and optimizer state of the
    # uninterrupted one, bit for bit (augmentation, dropout and the validation at the
    # checkpoint's iteration included).
    assert reference.wait(timeout=300) == 0, reference_log.read_text()[-4000:]
    uninterrupted = _load(tmp_path / 'reference' / 'iter_4.pth')
    assert uninterrupted['state_dict'].keys() == after['state_dict'].keys()
    differ = [k for k, v in uninterrupted['state_dict'].items()
              if not torch.equal(v, after['state_dict'][k])]
    for param, state in uninterrupted['optimizer']['state'].items():
        differ += [f'{param}.{k}' for k, v in state.items()
                   if not torch.equal(torch.as_tensor(v),
                                      torch.as_tensor(after['optimizer']['state'][param][k]))]
    assert differ == []
