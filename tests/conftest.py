"""Shared helpers: random checkpoints built from the key tables of the released checkpoints
(tests/fixtures/checkpoints)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite tests the CPU paths (CI has no GPU): with a GPU visible, mmengine would pick NCCL
# and the CUDA AMP wrapper instead, in this process and in the tools it starts. Set before
# torch initialises CUDA; child processes inherit it.
os.environ['CUDA_VISIBLE_DEVICES'] = ''
# `make test` runs two pytest-xdist workers: each worker, and every tool it starts (children
# inherit the environment), gets its share of the cores instead of one thread per core each.
# Oversubscribed, the toy training tests ran several times slower (docs/testing.md).
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
    os.environ.setdefault('OMP_NUM_THREADS',
                          str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'checkpoints'

ARCHS = {
    'EfficientFormer': ['l1', 'l3', 'l7'],
    'EfficientFormerV2': ['s0', 's1', 's2', 'l'],
    'EfficientViT': ['m0', 'm1', 'm2', 'm3', 'm4', 'm5'],
}
ALL_ARCHS = [(family, arch) for family, archs in ARCHS.items() for arch in archs]
FAMILY_OF_TAG = {'v1': 'EfficientFormer', 'v2': 'EfficientFormerV2', 'ev': 'EfficientViT'}
# Temporary disk the suite needs at once: pytest.ini deletes each passing test's tmp_path, and
# `make test` peaked at 1.48 GB under /tmp (random checkpoints, toy work dirs of two workers;
# sampled every 5 s). With a margin, so that a nearly full disk stops the run at its start with
# the fix named, not at 90% with ENOSPC.
MIN_FREE_TMP_BYTES = 2e9


def pytest_sessionstart(session):
    if os.environ.get('PYTEST_XDIST_WORKER'):
        return  # the controller checks once
    folder = session.config.option.basetemp or tempfile.gettempdir()
    while not os.path.isdir(folder):  # a --basetemp that does not exist yet
        folder = os.path.dirname(os.path.abspath(folder))
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_TMP_BYTES:
        raise pytest.UsageError(
            f'only {free / 1e9:.2f} GB free under {folder}; the tests need about '
            f'{MIN_FREE_TMP_BYTES / 1e9:.1f} GB of temporary space: free some (old pytest runs '
            f'live in {tempfile.gettempdir()}/pytest-of-*) or point TMPDIR at a larger disk')


def backbone_class(family):
    from mmeformer import models
    return getattr(models, family)


def fixture_files():
    return sorted(FIXTURES.glob('*.json'))


def parse_fixture_name(name):
    """'dense_det_v2_s0' -> ('dense_det', 'EfficientFormerV2', 's0')."""
    m = re.match(r'(imagenet|dense_det|dense_seg)_(v1|v2|ev)_([a-z0-9]+)$', name)
    return (m.group(1), FAMILY_OF_TAG[m.group(2)], m.group(3)) if m else None


def random_checkpoint(fixture_path, out_path, seed=0, key_order=None):
    """Write a checkpoint with the fixture's container, keys, shapes and dtypes."""
    spec = json.loads(Path(fixture_path).read_text())
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, info in spec['keys'].items():
        dtype = getattr(torch, info['dtype'])
        if dtype.is_floating_point:
            state[key] = torch.randn(info['shape'], generator=gen).to(dtype)
        else:
            state[key] = torch.zeros(info['shape'], dtype=dtype)
    if key_order == 'sorted':
        state = dict(sorted(state.items()))
    elif key_order == 'reversed':
        state = dict(reversed(list(state.items())))
    torch.save({spec['container']: state}, out_path)
    return spec


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# A hook that SIGKILLs its own training process at the end of an iteration, after that
# iteration's optimizer step, log line and checkpoints (their hooks run at higher priority),
# however fast the machine is.
KILL_HOOK = '''
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAfterIteration(Hook):

    def __init__(self, iteration):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def train_command(config, work_dir, *extra):
    """The command line of ``tools/train.py CONFIG --work-dir WORK_DIR EXTRA...``."""
    return [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--work-dir',
            str(work_dir), *map(str, extra)]


def kill_after_iteration(config, iteration, folder, hooks=()):
    """Write a config that trains ``config`` with ``hooks`` plus :data:`KILL_HOOK` killing the
    process after training iteration ``iteration``; the hook's module goes to ``folder``, which
    the training process needs on its PYTHONPATH. Returns the config's path."""
    folder = Path(folder)
    (folder / 'kill_hook.py').write_text(KILL_HOOK)
    hooks = [*hooks, dict(type='KillAfterIteration', iteration=iteration, priority='LOWEST')]
    path = folder / f'killed_{Path(config).stem}.py'
    path.write_text(f'_base_ = [{str(config)!r}]\n'
                    "custom_imports = dict(imports=['mmeformer.models', 'kill_hook'], "
                    'allow_failed_imports=False)\n'
                    f'custom_hooks = {hooks!r}\n')
    return path


def free_port():
    """A TCP port nobody listens on now, for a launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def dist_launch(script, args, cwd, tmp_dir, timeout=600):
    """``bash tools/SCRIPT ARGS`` (dist_train.sh / dist_test.sh: torchrun, gloo on CPU) on a
    free port, one thread per process, torchrun's torchelastic_* log folder under ``tmp_dir``;
    returns the finished process, its output captured."""
    env = dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable, OMP_NUM_THREADS='1',
               TMPDIR=str(tmp_dir))
    return subprocess.run(['bash', str(REPO / 'tools' / script), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
