"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` or safetensors, with errors
that name the file and what is wrong with it."""
import os
import pickle
import re
import warnings
import zipfile
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..safe_globals import register_mmengine_checkpoint_globals


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


ANSI_ESCAPE = re.compile(r'\x1b\[[0-9;]*m')
# What torch's safe unpickler names when it refuses a file ('Unsupported global: GLOBAL
# argparse.Namespace ...', 'unsupported GLOBAL posix.system ...') and what
# mmeformer.safe_globals refuses ('asks for getattr(...)').
REFUSED_GLOBAL = re.compile(r'GLOBAL ([\w.]+)|asks for (getattr\(.*?\));')


def check_checkpoint_path(path: str) -> None:
    """Refuse, with the fix, a path that cannot be a local checkpoint file."""
    if '://' in path:
        raise CheckpointError(f'checkpoint {path!r} is a URL: mmeformer does not download '
                              f'checkpoints. Download it (e.g. wget -P weights/ URL) and pass '
                              f'the local path')
    if os.path.isdir(path):
        raise CheckpointError(f'checkpoint {path!r} is a directory; pass the checkpoint file '
                              f'inside it')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path!r} is empty (0 bytes); download or convert it '
                              f'again')


def _torch_error_detail(err: Exception) -> str:
    """The informative line of a torch.load error, without its terminal colour codes."""
    text = ANSI_ESCAPE.sub('', str(err))
    m = re.search(r'WeightsUnpickler error:\s*(\S.*)', text)
    return m.group(1).strip() if m else (text.strip().splitlines() or [''])[0]


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """Load ``path`` (``.pth``/``.pt``/``.bin`` through ``weights_only=True``, or ``.safetensors``)
    without ever executing code from the file. ``mmap``: map zip-format files instead of
    reading them (for callers that only look at keys and meta)."""
    path = os.fspath(path)
    check_checkpoint_path(path)
    if path.endswith('.safetensors'):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f'checkpoint {path!r} is not a readable safetensors file '
                                  f'({err})') from err
    try:
        # Training checkpoints of mmengine also hold a few logging / numpy objects: exactly
        # those are allow-listed, everything else stays refused. Registered for good, not with
        # torch.serialization.safe_globals(): leaving that context removes its globals even
        # when they were registered before, and mmdet's / mmseg's loaders then fail.
        register_mmengine_checkpoint_globals()
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Detected pickle protocol')  # junk files
            return torch.load(path, map_location='cpu', weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # noqa: B902 - a corrupt file fails anywhere in the unpickler
        refused = _refused_global(err)
        if refused:
            raise CheckpointError(_refusal_message(path, refused)) from err
        raise CheckpointError(
            f'checkpoint {path!r} is truncated or corrupted, or not a PyTorch checkpoint at all, '
            f'and cannot be read ({type(err).__name__}: {_torch_error_detail(err)}); download '
            f'or save it again') from err


def _refused_global(err: Exception) -> Optional[str]:
    if not isinstance(err, pickle.UnpicklingError):
        return None
    m = REFUSED_GLOBAL.search(ANSI_ESCAPE.sub('', str(err)))
    return (m.group(1) or m.group(2)) if m else None


def _refusal_message(path: str, refused: str) -> str:
    clean = os.path.join(os.path.dirname(path), 'clean.pth')
    return (f'checkpoint {path!r} was refused by the safe loader (torch.load weights_only=True): '
            f'besides tensors it pickles the Python object {refused}, and loading that could run '
            f'code. If you trust the file, keep only its weights (use the key that holds them, '
            f"e.g. 'state_dict' instead of 'model'):\n"
            f'  python -c "import torch; ckpt = torch.load({path!r}, map_location=\'cpu\', '
            f"weights_only=False); torch.save({{'model': ckpt['model']}}, {clean!r})\"\n"
            f'and load {clean!r} instead')


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
