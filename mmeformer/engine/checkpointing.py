"""Crash-safe checkpoint writing for training runs.

A training process can die at any moment (SIGKILL, out of memory, a pre-empted node). mmengine
writes a checkpoint by opening its final name and streaming the bytes into it, and rewrites the
``last_checkpoint`` pointer the same way, so a process killed in the middle leaves a truncated
``iter_N.pth`` (or an empty pointer) that ``--resume`` then fails on. With ``max_keep_ckpts`` it
even deletes the oldest kept checkpoint *before* writing the new one.

* :func:`atomic_write` writes to a temporary file in the same directory, flushes and fsyncs it,
  then renames it over the final name (``os.replace``, atomic on POSIX and Windows) and fsyncs
  the directory: readers see the old file or the complete new one, never a partial one.
* :class:`AtomicLocalBackend` is mmengine's local file backend with atomic ``put`` /
  ``put_text``; ``Runner.save_checkpoint`` writes through it when it is given
  ``backend_args=dict(backend='mmeformer_atomic')``.
* :class:`AtomicCheckpointHook` is mmengine's ``CheckpointHook`` that uses that backend, writes
  ``last_checkpoint`` atomically, and removes outdated checkpoints only after the new one and
  the pointer are on disk. ``tools/train.py`` (:func:`mmeformer.engine.build_runner`) swaps it
  in for the configs' ``CheckpointHook``; a config can also name it:
  ``default_hooks = dict(checkpoint=dict(type='mmeformer.AtomicCheckpointHook', interval=1))``.

A process killed while writing leaves only a hidden ``.<name>.<pid>.<random>.partial`` file,
which the hook deletes when the next run starts.

The hook also makes a resume exact (with :mod:`mmeformer.engine.loops`): each checkpoint it
writes carries the random states of every rank (``checkpoint['random_states']``, see
:mod:`mmeformer.engine.random_state`), a resumed run puts them back where the interrupted run
took them, and validation runs with its own random numbers, so that a validation right after a
checkpoint cannot shift the training's streams.
"""
import inspect
import os
import os.path as osp
import re
import secrets
from pathlib import Path
from typing import List, Union

from mmengine.dist import get_rank, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS
from .random_state import (capture_random_state, gather_random_states, random_state_of_rank,
                           restore_random_state)

ATOMIC_BACKEND = 'mmeformer_atomic'
PARTIAL_SUFFIX = '.partial'
_PARTIAL_NAME = re.compile(r'^\..+\.(\d+)\.[0-9a-f]+' + re.escape(PARTIAL_SUFFIX) + '$')


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], data: Union[bytes, bytearray, memoryview, str],
                 encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its previous content or all of
    ``data``, whenever the process dies.

    The bytes go to ``.<name>.<pid>.<random>.partial`` in the same directory (same file system,
    so the rename is atomic), which is flushed, fsynced and then renamed over ``path``. On an
    error the temporary file is removed and the error re-raised; ``path`` is untouched.
    """
    path = osp.abspath(os.fspath(path))
    directory, name = osp.split(path)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode(encoding)
    partial = osp.join(directory, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}')
    # 0o666 filtered by the umask: the same permissions as a file written with open(path, 'wb').
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_partials(directory: Union[str, Path]) -> List[str]:
    """Delete the ``.partial`` files that :func:`atomic_write` calls of dead processes left in
    ``directory``; returns their paths. Files of running processes are kept."""
    removed = []
    directory = os.fspath(directory)
    if not osp.isdir(directory):
        return removed
    for entry in os.scandir(directory):
        match = _PARTIAL_NAME.match(entry.name)
        if match and entry.is_file() and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:
                pass
    return removed


@register_backend(ATOMIC_BACKEND, force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes are atomic (see :func:`atomic_write`).

    Use it with ``backend_args=dict(backend='mmeformer_atomic')`` wherever mmengine takes
    ``backend_args`` (``CheckpointHook``, ``Runner.save_checkpoint``, ``mmengine.fileio.dump``).
    """

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj, encoding=encoding)


def _is_remote(path) -> bool:
    return path is not None and '://' in str(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose checkpoints and ``last_checkpoint`` pointer survive a process
    killed at any moment.

    Same arguments as :class:`mmengine.hooks.CheckpointHook`, plus ``restore_random_states``.
    With a local ``out_dir`` and no ``backend_args`` / ``file_client_args`` of its own it
    writes through :class:`AtomicLocalBackend`; outdated checkpoints (``max_keep_ckpts``) are
    removed only after the new checkpoint and the pointer naming it are complete on disk.

    Every checkpoint records the random states of all ranks. ``restore_random_states=True``
    (default): a resumed run restores them (a run of another number of processes is refused);
    ``False``: the recorded states are ignored and the run continues with fresh streams.
    """

    def __init__(self, *args, restore_random_states: bool = True, **kwargs):
        given = inspect.signature(CheckpointHook.__init__).bind_partial(
            self, *args, **kwargs).arguments
        positional = 'backend_args' in given and 'backend_args' not in kwargs
        if (not _is_remote(given.get('out_dir')) and given.get('backend_args') is None
                and given.get('file_client_args') is None and not positional):
            kwargs['backend_args'] = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, **kwargs)
        self.restore_random_states = restore_random_states
        self._states_to_write = None  # gathered by every rank, written by rank 0
        self._loaded = None  # (iteration, random-state record) of the last loaded checkpoint
        self._states_to_restore = None  # this rank's, until training continues
        self._before_val = None  # the training's states while a validation runs

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process():
            for directory in {runner.work_dir, self.out_dir}:
                if not _is_remote(directory):
                    for path in remove_stale_partials(directory):
                        runner.logger.info(f'Removed {path}, a checkpoint that a killed run '
                                           f'was writing')
        self._states_to_restore = self._resumed_states(runner)
        if not getattr(runner.train_loop, 'restores_random_states', False):
            self.restore_resumed_random_states(runner)  # a loop that does not say where

    # -- random states ---------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint) -> None:
        meta = checkpoint.get('meta') or {}
        self._loaded = (meta.get('iter'), checkpoint.get('random_states'))

    def _resumed_states(self, runner):
        """This rank's recorded states when the run resumes a checkpoint (a ``load_from`` that
        only initialises the weights starts at iteration 0 and restores nothing)."""
        loaded, self._loaded = self._loaded, None
        if loaded is None or not loaded[0] or loaded[0] != runner.iter:
            return None
        record = loaded[1]
        if not self.restore_random_states:
            runner.logger.warning('restore_random_states=False: the resumed run draws other '
                                  'random numbers than the interrupted run would have')
            return None
        if record is None:
            runner.logger.warning(
                'The checkpoint records no random states (written before mmeformer recorded '
                'them, or by another checkpoint hook): the run resumes with its weights, '
                'optimizer and schedule, but its random streams (RPN / RoI sampling, dropout, '
                'drop path) were not recorded, so it will differ from an uninterrupted run')
            return None
        return random_state_of_rank(record)

    def restore_resumed_random_states(self, runner) -> None:
        """Put back the resumed checkpoint's random states of this rank (once; the resumable
        loops call this where the interrupted run took them)."""
        state, self._states_to_restore = self._states_to_restore, None
        if state is not None:
            restore_random_state(state)
            runner.logger.info(f'Restored the random states of rank {get_rank()} recorded in '
                               f'the checkpoint (iteration {runner.iter})')

    def before_val(self, runner) -> None:
        # Validation draws random numbers too (a loader iterator's base seed, ...); training
        # continues with its own states, as a resumed run, which does not validate, would.
        self._before_val = capture_random_state()

    def after_val(self, runner) -> None:
        state, self._before_val = self._before_val, None
        if state is not None:
            restore_random_state(state)

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        if self._states_to_write is not None:  # rank 0 only (Runner.save_checkpoint)
            checkpoint['random_states'] = self._states_to_write

    def _save_checkpoint_with_step(self, runner, step, meta):
        # Every rank passes here (only rank 0 writes): gather the states of all. During a
        # validation (best-checkpoint saves) the training's are the ones from before it.
        self._states_to_write = gather_random_states(self._before_val)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        # Decide which checkpoints become outdated, but delete them only once the new one is
        # safely written (the saved message hub already lists the ids kept after this save).
        outdated = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                            and self.keep_ckpt_ids[-1] == step):
            while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        runner.save_checkpoint(
            self.out_dir,
            filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        self._states_to_write = None

        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        for old_step in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # checkpoints saved by DeepSpeed are directories
                self.file_backend.rmtree(path)
