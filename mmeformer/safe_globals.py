"""Loading mmengine's own training checkpoints under ``torch.load(weights_only=True)``.

PyTorch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10 calls ``torch.load``
without the argument, so ``resume`` and ``load_from`` of a checkpoint that mmengine itself wrote
fail, and so do mmdet's ``init_detector`` / ``DetInferencer`` and mmseg's ``init_model`` /
``MMSegInferencer``: besides tensors it pickles its ``HistoryBuffer`` logs (in ``message_hub``)
and numpy arrays and scalars.

This module is the one place that allow-lists exactly those globals, with
``torch.serialization.add_safe_globals``; everything else stays refused, and the safe loader is
never switched off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is not used and is rejected by the
tools). Importing :mod:`mmeformer.models`, which a config's
``custom_imports=dict(imports=['mmeformer.models'])`` does, calls
:func:`register_mmengine_checkpoint_globals`, so the ecosystem's own inference APIs load
mmeformer checkpoints with ``weights_only`` left on.
"""
import os
import pickle
from typing import List, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


def history_buffer_method(owner, name: str):
    """Stands in for ``getattr`` while unpickling: mmengine's ``HistoryBuffer`` keeps its
    statistics functions (``HistoryBuffer.min`` ...) in a dict, which pickle stores as
    ``getattr(HistoryBuffer, 'min')``. Only that lookup is allowed; any other ``getattr`` in a
    checkpoint is refused."""
    if owner is HistoryBuffer and isinstance(name, str) and (
            name in HistoryBuffer._statistics_methods or name in HISTORY_BUFFER_STATISTICS):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({owner!r}, {name!r}); only the statistics methods of '
        f'mmengine HistoryBuffer are allowed')


HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def mmengine_checkpoint_globals() -> List[Union[object, Tuple[object, str]]]:
    """The exact non-tensor globals found in checkpoints written by mmengine's Runner
    (``torch.serialization.get_unsafe_globals_in_checkpoint`` on a training checkpoint lists
    them): ``HistoryBuffer``, numpy arrays and scalars, and ``getattr`` (replaced by the
    restricted :func:`history_buffer_method`)."""
    core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
    multiarray = core.multiarray
    allowed = [HistoryBuffer, np.ndarray, np.dtype,
               (multiarray._reconstruct, f'{core.__name__}.multiarray._reconstruct'),
               (multiarray.scalar, f'{core.__name__}.multiarray.scalar'),
               (history_buffer_method, 'builtins.getattr')]
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.Float64DType, ...).
    dtype_classes = getattr(np, 'dtypes', None)
    if dtype_classes is not None:
        allowed += [getattr(dtype_classes, name) for name in ('Float64DType', 'Float32DType',
                                                              'Int64DType', 'Int32DType',
                                                              'BoolDType')]
    return allowed


def register_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine training checkpoints (idempotent:
    torch keeps the allowed globals in a set)."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())


def allow_mmengine_checkpoint_globals() -> None:
    """:func:`register_mmengine_checkpoint_globals`, for the tools that train and test.

    Raises RuntimeError when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set: that switches the
    protection off for every file and is not how mmeformer loads checkpoints.
    """
    if os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '0') not in ('', '0'):
        raise RuntimeError(
            'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which lets any checkpoint run code when '
            'loaded. Unset it: mmeformer allow-lists the few globals mmengine checkpoints need')
    register_mmengine_checkpoint_globals()
