"""An epoch-based training loop that resumes exactly from a mid-epoch checkpoint.

mmengine's ``EpochBasedTrainLoop`` resumed from a checkpoint saved inside an epoch
(``CheckpointHook(by_epoch=False)``) replays that whole epoch: the iterations done before the
checkpoint are trained a second time and the run ends with more iterations than it was set up
for. :class:`ResumableEpochBasedTrainLoop` skips the batches of the interrupted epoch that were
already trained (the sampler's order is the same: it depends on the seed, restored from the
checkpoint, and the epoch), so a resumed run trains exactly the iterations an uninterrupted run
would. ``tools/train.py`` (:func:`mmeformer.engine.build_runner`) uses it in place of
``EpochBasedTrainLoop``; resuming at an epoch boundary is unchanged.
"""
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop

from ..registry import LOOPS


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that continues a resumed epoch where its checkpoint was taken;
    same arguments."""

    def run_epoch(self) -> None:
        done = self._iter - self._epoch * len(self.dataloader)  # of this epoch, trained already
        if done <= 0:
            super().run_epoch()
            return
        print_log(f'Resuming inside epoch {self._epoch + 1}: skipping its first {done} of '
                  f'{len(self.dataloader)} batches, trained before the checkpoint',
                  logger='current')
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        for idx, data_batch in enumerate(self.dataloader):
            if idx >= done:
                self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1
