"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` or safetensors, with errors
that name the file and what is wrong with it."""
import os
import pickle
import zipfile
from typing import Dict, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


def read_checkpoint(path: str) -> dict:
    """Load ``path`` (``.pth``/``.pt``/``.bin`` through ``weights_only=True``, or ``.safetensors``)
    without ever executing code from the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path!r} is empty (0 bytes); download or convert it '
                              f'again')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f'checkpoint {path!r} is not a readable safetensors file '
                                  f'({err})') from err
    from ..engine.safe_load import mmengine_checkpoint_globals
    try:
        # Training checkpoints of mmengine also hold a few logging / numpy objects: exactly
        # those are allow-listed, everything else stays refused.
        with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f'checkpoint {path!r} was refused by the safe loader (torch.load weights_only=True): '
            f'it contains Python objects other than tensors and plain containers, so loading it '
            f'could run code. Convert a trusted copy with tools/convert_checkpoint.py. '
            f'Detail: {str(err).splitlines()[0]}') from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f'checkpoint {path!r} is truncated or corrupted and cannot be '
                              f'read ({type(err).__name__}: {str(err).splitlines()[0]})') from err


CONTAINER_KEYS = ('state_dict', 'model', 'model_ema', 'state_dict_ema')


def extract_state_dict(obj, path: str = '<checkpoint>') -> Tuple[Dict[str, torch.Tensor], str]:
    """Return (tensor dict, container key) from a loaded checkpoint object."""
    container = ''
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj, container = obj[key], key
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f'checkpoint {path!r} holds no state dict (expected a dict of '
                              f'tensors, possibly under one of {list(CONTAINER_KEYS)})')
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'checkpoint {path!r} holds no tensors')
    others = sorted(set(obj) - set(tensors))
    if others:
        raise CheckpointError(f'checkpoint {path!r}: entries that are not tensors in the state '
                              f'dict: {others[:5]}')
    return tensors, container
