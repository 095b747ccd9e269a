"""Training loops that resume exactly: a resumed run trains the same batches, with the same
augmentation and random numbers, as the run that was never interrupted.

mmengine's ``EpochBasedTrainLoop`` resumed from a checkpoint saved inside an epoch
(``CheckpointHook(by_epoch=False)``) replays that whole epoch, and its ``IterBasedTrainLoop``
reaches the checkpoint's iteration by loading and augmenting every batch trained before it.
Both loops here:

* train from the data of :func:`~mmeformer.engine.sampling.seeded_dataloader_config`: each
  sample's augmentation is seeded from its place in the stream, not from what a loader worker
  drew before;
* start the stream at the checkpoint's batch by drawing the skipped batches' indices only
  (:class:`~mmeformer.engine.sampling.KeyedBatchSampler`): nothing before it is loaded;
* put the random generators back to the checkpoint's states (recorded by
  :class:`~mmeformer.engine.checkpointing.AtomicCheckpointHook`) right where the interrupted run
  took them: before the epoch's hooks for a checkpoint at an epoch's end, before the next
  iteration for one inside an epoch.

``tools/train.py`` (:func:`mmeformer.engine.build_runner`) uses them in place of mmengine's
loops. A loop handed an already built ``DataLoader`` cannot key its samples: it skips the
trained batches by loading them, as mmengine does, and augmentation is not reproduced.
"""
from typing import Sequence

from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from ..registry import LOOPS
from .sampling import KeyedBatchSampler, seeded_dataloader_config

# The hook method that restores a resumed run's random states (AtomicCheckpointHook has it).
RESTORE_STAGE = 'restore_resumed_random_states'


def _keyed_batches(loop):
    batches = getattr(loop.dataloader, 'batch_sampler', None)
    return batches if isinstance(batches, KeyedBatchSampler) else None


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that resumes exactly, also inside an epoch; same arguments."""

    restores_random_states = True

    def __init__(self, runner, dataloader, *args, **kwargs):
        if isinstance(dataloader, dict):
            dataloader = seeded_dataloader_config(dataloader, runner.seed)
        super().__init__(runner, dataloader, *args, **kwargs)
        self._batches = _keyed_batches(self)

    def run_epoch(self) -> None:
        done = self._iter - self._epoch * len(self.dataloader)  # of this epoch, trained already
        if done <= 0:
            self.runner.call_hook(RESTORE_STAGE)  # a resume at an epoch's end: restore here
            if self._batches is not None:
                self._batches.start_pass(self._epoch)
            super().run_epoch()
            return
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        total = len(self.dataloader)
        if self._batches is not None:
            print_log(f'Resuming inside epoch {self._epoch + 1}: skipping its first {done} of '
                      f'{total} batches, trained before the checkpoint (their sample indices '
                      f'are drawn, nothing is loaded)', logger='current')
            self._batches.start_pass(self._epoch, skip=done)
            batches = enumerate(self.dataloader, start=done) if done < total else ()
        else:
            print_log(f'Resuming inside epoch {self._epoch + 1}: loading and skipping its '
                      f'first {done} of {total} batches, trained before the checkpoint',
                      logger='current')
            batches = ((idx, batch) for idx, batch in enumerate(self.dataloader)
                       if idx >= done)
        self.runner.call_hook(RESTORE_STAGE)  # the next iteration draws what it drew
        for idx, data_batch in batches:
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


class _BatchStream:
    """The endless batches of an iteration-based loop, from batch ``start`` on: passes over the
    dataloader one after another (an ``InfiniteSampler`` makes a single endless pass), the
    sampler's epoch set to the pass number as mmengine does. The batches before ``start`` are
    skipped by index only."""

    def __init__(self, dataloader, batches: KeyedBatchSampler, start: int):
        self.dataloader, self.batches = dataloader, batches
        self.pass_index = 0
        batches.start_pass(0, skip=start)
        self.iterator = iter(dataloader)

    def __iter__(self):
        return self

    def __next__(self) -> Sequence[dict]:
        while True:
            try:
                return next(self.iterator)
            except StopIteration:
                if self.batches.last_pass_batches == 0:
                    raise RuntimeError('the training dataloader yields no batch') from None
            self.pass_index += 1
            sampler = self.batches.sampler
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(self.pass_index)
            self.batches.start_pass(self.pass_index, skip=self.batches.pending_skip)
            self.iterator = iter(self.dataloader)


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that resumes exactly, without loading the batches trained before
    the checkpoint; same arguments."""

    restores_random_states = True

    def __init__(self, runner, dataloader, *args, **kwargs):
        if isinstance(dataloader, dict):
            # wait: mmengine's constructor starts iterating the loader (its workers prefetch)
            # before a resume has set where the stream starts.
            dataloader = seeded_dataloader_config(dataloader, runner.seed, wait=True)
        super().__init__(runner, dataloader, *args, **kwargs)
        self._batches = _keyed_batches(self)

    def run(self):
        self.runner.call_hook('before_train')
        # As mmengine's loop: the whole run is one big epoch for the hooks.
        self.runner.call_hook('before_train_epoch')
        if self._batches is not None:
            if self._iter > 0:
                print_log(f'Resuming at iteration {self._iter + 1}: skipping the {self._iter} '
                          f'batches trained before the checkpoint (their sample indices are '
                          f'drawn, nothing is loaded)', logger='current')
            self.dataloader_iterator = _BatchStream(self.dataloader, self._batches, self._iter)
        elif self._iter > 0:
            print_log(f'Resuming at iteration {self._iter + 1}: loading and skipping the '
                      f'{self._iter} batches trained before the checkpoint', logger='current')
            for _ in range(self._iter):
                next(self.dataloader_iterator)
        self.runner.call_hook(RESTORE_STAGE)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            self.run_iter(next(self.dataloader_iterator))
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0
                         or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        # Drop the stream now: its loader workers then shut down at once (left to a garbage
        # collection of the runner's reference cycles, torch waits out each worker's join
        # timeout).
        self.dataloader_iterator = None
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model
