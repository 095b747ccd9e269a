"""Data-loader workers that die with the process that started them.

When a training process is killed (SIGKILL: the out-of-memory killer, a preempted job, ``kill
-9``), torch's loader workers notice that their parent is gone and leave their loop, but their
exit then joins the thread that feeds their result pipe. If the pipe is full (prefetched batches
nobody reads; the workers themselves still hold its read end), that join never returns: the
orphaned workers sleep forever, each holding the memory of a training process, and a caller
that waits for the job's output pipe waits with them. On Linux the workers of every loader
that :class:`mmeformer.engine.runner.MMEformerRunner` builds (training, validation and test) are
asked (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to be killed with their parent instead; elsewhere
torch's behaviour stays.
"""
import ctypes
import os
import signal
import sys
from typing import Callable, Optional

from mmengine.dataset import worker_init_fn as mmengine_worker_init_fn
from mmengine.dist import get_rank
from mmengine.registry import FUNCTIONS

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux). Returns
    whether it was set."""
    if not sys.platform.startswith('linux'):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')
    return True


def die_with_parent(worker_id: int, parent_pid: int, init: Optional[Callable] = None,
                    **init_kwargs) -> None:
    """A loader ``worker_init_fn``: die with the process ``parent_pid`` (at once when it is gone
    already), then run ``init(worker_id, **init_kwargs)``, the worker set-up it replaces."""
    if set_parent_death_signal() and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed
    if init is not None:
        init(worker_id, **init_kwargs)


def die_with_parent_config(dataloader: dict, seed: Optional[int]) -> dict:
    """The ``worker_init_fn`` config for ``dataloader`` (a config dict) that wraps the worker
    set-up mmengine would have used: the config's own ``worker_init_fn``, else mmengine's
    seeding of each worker from ``seed``, the rank and the worker id (none without a seed). As
    mmengine does for its seeding, that case moves ``disable_subprocess_warning`` out of
    ``dataloader`` (changed in place) into the new entry."""
    own = dataloader.get('worker_init_fn')
    init, init_kwargs = None, {}
    if own is not None:
        init_kwargs = dict(own)
        init = init_kwargs.pop('type')
        if isinstance(init, str):
            init = FUNCTIONS.get(init)
    elif seed is not None:
        init = mmengine_worker_init_fn
        init_kwargs = dict(num_workers=dataloader.get('num_workers', 0), rank=get_rank(),
                           seed=seed, disable_subprocess_warning=dataloader.pop(
                               'disable_subprocess_warning', False))
    return dict(type=die_with_parent, parent_pid=os.getpid(), init=init, **init_kwargs)
