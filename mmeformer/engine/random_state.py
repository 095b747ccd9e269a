"""The random states of a training process: recorded in checkpoints, restored on resume.

A resumed run draws the same random numbers as the run that was never interrupted when every
generator the rest of training reads is put back where it was at the checkpoint:

* :func:`capture_random_state` / :func:`restore_random_state`: Python's ``random``, numpy's
  global generator, torch's CPU generator and, with CUDA, every CUDA device's generator, of this
  process. The state holds only tensors, ints, floats, tuples and dicts, so a checkpoint that
  carries it still loads under ``torch.load(weights_only=True)`` with no extra allow-listed
  global (numpy's uint32 key array travels as an int64 tensor).
* :func:`gather_random_states`: the states of all ranks (a collective call), to be written by
  rank 0; :func:`random_state_of_rank` picks this rank's state back out of such a record and
  refuses a record of another number of processes.
* :func:`seeded_random_state`: a context that seeds the same generators from a tuple of
  integers and puts the previous states back afterwards, which is how each training sample's
  augmentation gets random numbers that depend on where the sample is in the data stream only
  (:mod:`mmeformer.engine.sampling`).
"""
import contextlib
import random
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info

from .errors import LaunchError

RECORD_FORMAT = 1


def capture_random_state() -> dict:
    """The state of every global random generator of this process."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = dict(
        python=random.getstate(),
        numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_random_state(state: dict) -> None:
    """Put the generators back to ``state`` (from :func:`capture_random_state`, possibly loaded
    from a checkpoint onto another device)."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    saved = state['numpy']
    keys = saved['keys'].cpu().numpy().astype(np.uint32)
    np.random.set_state(('MT19937', keys, saved['pos'], saved['has_gauss'],
                         saved['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise LaunchError(
                f'the checkpoint holds the random states of {len(cuda)} CUDA devices per '
                f'process, this process sees {torch.cuda.device_count()}: resume with the same '
                f'CUDA_VISIBLE_DEVICES as the interrupted run')
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def gather_random_states(state: Optional[dict] = None) -> dict:
    """The random states of every rank, in rank order (``state`` stands in for this rank's
    current one). Every rank must call it (a collective when distributed)."""
    state = capture_random_state() if state is None else state
    _, world_size = get_dist_info()
    states: List[dict] = all_gather_object(state) if world_size > 1 else [state]
    return dict(format=RECORD_FORMAT, world_size=world_size, ranks=states)


def random_state_of_rank(record: dict) -> dict:
    """This rank's state from a :func:`gather_random_states` record; a record of another number
    of processes is refused (each process would continue another process's streams, on other
    data: not the interrupted run)."""
    rank, world_size = get_dist_info()
    saved = record['world_size']
    if saved != world_size:
        relaunch = ('tools/train.py CONFIG --resume' if saved == 1 else
                    f'tools/dist_train.sh CONFIG {saved} --resume')
        raise LaunchError(
            f'the checkpoint was written by a run of {saved} process(es) and this run has '
            f'{world_size}: an exact resume needs the same number ({relaunch}). To go on with '
            f'{world_size} anyway (data order, batches and random numbers then differ from the '
            f'interrupted run), add --cfg-options '
            f'default_hooks.checkpoint.restore_random_states=False')
    return record['ranks'][rank]


def _seed_words(entropy: Sequence[int]) -> np.ndarray:
    # SeedSequence mixes the integers well, so neighbouring positions get unrelated seeds.
    return np.random.SeedSequence([int(e) % (1 << 64) for e in entropy]).generate_state(4)


@contextlib.contextmanager
def seeded_random_state(entropy: Sequence[int]) -> Iterator[None]:
    """Seed Python's ``random``, numpy's global generator and torch's CPU generator from the
    non-negative integers ``entropy``; restore their previous states on exit (in the main
    process, data loading then leaves the training's own streams untouched)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    words = _seed_words(entropy)
    seed64 = (int(words[0]) << 32) | int(words[1])
    random.seed(seed64)
    np.random.seed(words)
    torch.default_generator.manual_seed(seed64)  # CPU only: CUDA streams stay untouched
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
