"""Training data whose randomness depends on where each sample is in the data stream only.

mmengine seeds each data-loader worker once, from the seed, the rank and the worker id: the
random numbers a sample's augmentation gets (``RandomFlip`` and the other transforms draw from
numpy's and Python's global generators) then depend on how many numbers that worker drew
before, which changes with the number of workers, with persistent workers or not, and across a
resume (the workers restart with their initial seeds). Here they are a function of
``(seed, rank, pass, position)``, the sample's place in the stream, whatever process loads it:

* :class:`KeyedBatchSampler` wraps the configured batch sampler (or a plain ``BatchSampler``)
  and hands out :class:`SampleKey` indices that carry that tuple; it can also start a pass a
  number of batches in, drawing the skipped batches' indices only (nothing is loaded).
* :class:`SeededSampleDataset` wraps the dataset and loads each keyed sample inside
  :func:`~mmeformer.engine.random_state.seeded_random_state`.

:func:`seeded_dataloader_config` applies both to a dataloader config; the resumable training
loops (:mod:`mmeformer.engine.loops`) use it.
"""
import copy
from typing import Iterator, List, Optional, Sequence

import torch
from mmengine.dist import get_rank
from mmengine.registry import DATA_SAMPLERS, DATASETS
from torch.utils.data import BatchSampler, Dataset, Sampler

from .random_state import seeded_random_state


class SampleKey(int):
    """A dataset index that carries the integers its sample's random numbers are seeded from
    (``entropy``); it is the plain index everywhere an int is expected."""

    def __new__(cls, index: int, entropy: Sequence[int]):
        key = super().__new__(cls, index)
        key.entropy = tuple(entropy)
        return key

    def __reduce__(self):  # to the loader workers, with the entropy
        return SampleKey, (int(self), self.entropy)

    def __repr__(self) -> str:
        return f'SampleKey({int(self)}, entropy={self.entropy})'


class _KeyedIndices(Sampler):
    """The sampler's indices as :class:`SampleKey`; any other attribute is the sampler's (the
    wrapped batch sampler may read ``.dataset``)."""

    def __init__(self, owner: 'KeyedBatchSampler'):
        self._owner = owner

    def __iter__(self) -> Iterator[SampleKey]:
        owner = self._owner
        base = (owner.seed, owner.rank, owner.pass_index)
        for position, index in enumerate(owner.sampler):
            yield SampleKey(index, base + (position, ))

    def __len__(self) -> int:
        return len(self._owner.sampler)

    def __getattr__(self, name):
        if name.startswith('__') or name == '_owner':
            raise AttributeError(name)
        return getattr(self._owner.sampler, name)


class KeyedBatchSampler(Sampler):
    """Batches of :class:`SampleKey` indices.

    Args:
        sampler (Sampler): The index sampler (mmengine builds it from the dataloader config);
            kept as ``.sampler``, where ``DistSamplerSeedHook`` finds its ``set_epoch``.
        batch_size (int): Samples per batch.
        seed (int): The run's seed, the first integer of every key.
        batch_sampler (dict, optional): Config of the batch sampler to wrap (e.g. mmdet's
            ``AspectRatioBatchSampler``); a ``BatchSampler`` without one.
        drop_last (bool): ``BatchSampler``'s ``drop_last`` when there is no ``batch_sampler``.
        wait (bool): Yield nothing until :meth:`start_pass` is first called, so that iterating
            the loader early (mmengine's iteration-based loop does on construction) draws
            nothing from a stateful sampler's stream.
    """

    def __init__(self,
                 sampler: Sampler,
                 batch_size: int,
                 seed: int,
                 batch_sampler: Optional[dict] = None,
                 drop_last: bool = False,
                 wait: bool = False):
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = get_rank()
        self.pass_index = 0
        self.pending_skip = 0
        self.waiting = wait
        self.last_pass_batches = 0
        keyed = _KeyedIndices(self)
        if batch_sampler is None:
            self.batch_sampler = BatchSampler(keyed, batch_size, drop_last)
        else:
            self.batch_sampler = DATA_SAMPLERS.build(
                batch_sampler, default_args=dict(sampler=keyed, batch_size=batch_size))

    def start_pass(self, pass_index: int, skip: int = 0) -> None:
        """The next iteration is pass ``pass_index`` (part of every key; the epoch, or the
        number of restarts of an iteration-based loop) and leaves out its first ``skip``
        batches, drawing their indices only."""
        self.pass_index, self.pending_skip, self.waiting = int(pass_index), int(skip), False

    def __iter__(self) -> Iterator[List[SampleKey]]:
        if self.waiting:
            return
        skip, self.pending_skip = self.pending_skip, 0
        count = 0
        for count, batch in enumerate(self.batch_sampler, 1):
            if count > skip:
                yield batch
        self.last_pass_batches = count
        # A pass shorter than the skip leaves the rest to skip in the next one.
        self.pending_skip = max(skip - count, 0)

    def __len__(self) -> int:
        return len(self.batch_sampler)


class SeededSampleDataset(Dataset):
    """Loads each :class:`SampleKey` sample of ``dataset`` with the global random generators
    seeded from its key (see :func:`~mmeformer.engine.random_state.seeded_random_state`); plain
    indices load as they are. Every other attribute, read or written, is the wrapped dataset's
    (a hook that swaps ``dataset.pipeline`` reaches the real one).

    Args:
        dataset (Dataset or dict): The dataset, or its config.
    """

    def __init__(self, dataset):
        built = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        object.__setattr__(self, 'dataset', built)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        entropy = getattr(index, 'entropy', None)
        if entropy is None:
            return self.dataset[index]
        with seeded_random_state(entropy):
            return self.dataset[int(index)]

    def __getattr__(self, name):
        if name.startswith('__') or name == 'dataset':  # not set yet while unpickling
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name, value):
        setattr(self.dataset, name, value)


def seeded_dataloader_config(dataloader: dict, seed: int, wait: bool = False) -> dict:
    """A copy of the training ``dataloader`` config whose dataset, batch sampler and loader
    generator make its randomness a function of the stream position (see the module doc); the
    loader's own generator (worker base seeds) is private, so creating a loader iterator draws
    nothing from torch's global generator."""
    cfg = copy.copy(dict(dataloader))
    cfg['dataset'] = dict(type=SeededSampleDataset, dataset=cfg['dataset'])
    cfg.setdefault('batch_size', 1)
    cfg['batch_sampler'] = dict(type=KeyedBatchSampler, seed=seed, wait=wait,
                                batch_sampler=cfg.get('batch_sampler'),
                                drop_last=cfg.pop('drop_last', False))
    cfg['generator'] = torch.Generator().manual_seed(int(seed) % (1 << 63))
    return cfg
