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
"""
import inspect
import os
import os.path as osp
import re
import secrets
from pathlib import Path
from typing import List, Union

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS

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

    Same arguments as :class:`mmengine.hooks.CheckpointHook`. With a local ``out_dir`` and no
    ``backend_args`` / ``file_client_args`` of its own it writes through
    :class:`AtomicLocalBackend`; outdated checkpoints (``max_keep_ckpts``) are removed only
    after the new checkpoint and the pointer naming it are complete on disk.
    """

    def __init__(self, *args, **kwargs):
        given = inspect.signature(CheckpointHook.__init__).bind_partial(
            self, *args, **kwargs).arguments
        positional = 'backend_args' in given and 'backend_args' not in kwargs
        if (not _is_remote(given.get('out_dir')) and given.get('backend_args') is None
                and given.get('file_client_args') is None and not positional):
            kwargs['backend_args'] = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, **kwargs)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process():
            for directory in {runner.work_dir, self.out_dir}:
                if not _is_remote(directory):
                    for path in remove_stale_partials(directory):
                        runner.logger.info(f'Removed {path}, a checkpoint that a killed run '
                                           f'was writing')

    def _save_checkpoint_with_step(self, runner, step, meta):
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

        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        for old_step in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # checkpoints saved by DeepSpeed are directories
                self.file_backend.rmtree(path)
