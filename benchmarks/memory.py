"""Memory of inference and of a training step, each measured in a fresh process by
``tools/benchmark.py --eval-memory`` / ``--train-memory``."""
import os
import time
from typing import Dict, Tuple

import torch

from mmeformer.builder import build_model
from mmeformer.models import fuse
from mmeformer.models.layers import eval_cache_bytes

from .allocator import release_freed_memory
from .references import reference_builders
from .training import autocast, build_train_model


def _resident_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _memory_in_use(device: str) -> int:
    """CUDA: allocated bytes; CPU: resident bytes, glibc's free heap memory returned to the
    kernel first so that they count live memory only."""
    if device == 'cuda':
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    release_freed_memory()
    return _resident_bytes()


def _peak_resident_bytes() -> int:
    with open('/proc/self/status') as f:
        kib = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
    return int(kib) * 1024


def _start_memory_count(device: str, what: str) -> int:
    """Restart the peak count (CUDA's peak stats, or the kernel's peak resident set, VmHWM,
    Linux >= 4.0) and return the memory in use now."""
    if device != 'cuda' and not os.path.exists('/proc/self/clear_refs'):
        raise RuntimeError(f'CPU {what} memory is measured from /proc (Linux only); '
                           'use --device cuda elsewhere')
    in_use = _memory_in_use(device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    return in_use


def _peak_memory_since(device: str, before: int) -> int:
    if device == 'cuda':
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _peak_resident_bytes() - before


def eval_memory(variant: str, size: Tuple[int, int], implementation: str = 'mmeformer',
                runtime: str = 'eager', device: str = 'cpu') -> Dict:
    """Memory of inference (eval, no grad, batch 1): the first forward's peak above the model and
    input, and what stays held after a second one (the caches later forwards reuse), both
    measured, and the bytes of mmeformer's inference caches counted (``eval_cache_bytes``).

    CPU: resident-set sizes, glibc's free heap memory returned to the kernel before each reading
    (Linux); CUDA: allocated bytes. Run each in a fresh process (``tools/benchmark.py
    --eval-memory`` does): the model's own build leaves memory behind.
    """
    base = build_model(variant)
    if implementation == 'mmeformer' and runtime in ('eager', 'fused'):
        model = fuse(base) if runtime == 'fused' else base
    else:
        builds = [build for impl, rt, _, build in reference_builders(variant, base, size)
                  if (impl, rt) == (implementation, runtime)]
        if not builds:
            raise ValueError(f'no {implementation} / {runtime} model of {variant} at {size}')
        model = builds[0]()
    model = model.to(device).eval()
    x = torch.randn(1, 3, *size, device=device)
    before = _start_memory_count(device, 'inference')
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
        first_s = time.perf_counter() - start
        peak = _peak_memory_since(device, before)
        model(x)
    held = _memory_in_use(device) - before
    return dict(variant=variant, implementation=implementation, runtime=runtime,
                height=size[0], width=size[1], device=device,
                params_mib=round(sum(p.numel() * p.element_size()
                                     for p in model.parameters()) / 2 ** 20, 1),
                peak_mib=round(peak / 2 ** 20, 1), held_mib=round(held / 2 ** 20, 1),
                cache_mib=round(eval_cache_bytes(model) / 2 ** 20, 1),
                first_forward_s=round(first_s, 2))


def train_step_memory(variant: str, size: Tuple[int, int], batch: int = 2,
                      implementation: str = 'mmeformer', device: str = 'cpu',
                      dtype: str = 'float32') -> Dict:
    """Peak memory of one training step (forward + backward of ``sum(mean(feature))``; with
    ``dtype='bfloat16'`` the forward under CPU autocast) of ``implementation`` ('mmeformer',
    'official (re-implemented)', with the official bias grid of the size, or 'timm').

    CUDA: peak allocated bytes above those held before the step. CPU: the peak resident set
    during the step above the resident set before it, glibc's free heap memory returned to the
    kernel first (Linux); run each measurement in a fresh process (``tools/benchmark.py
    --train-memory`` does).
    """
    model = build_train_model(variant, implementation, size).to(device)
    x = torch.randn(batch, 3, *size, device=device)
    before = _start_memory_count(device, 'training')
    start = time.perf_counter()
    with autocast(dtype):
        levels = model(x)
    sum(f.float().mean() for f in levels).backward()
    peak = _peak_memory_since(device, before)
    return dict(variant=variant, implementation=implementation, height=size[0], width=size[1],
                batch=batch, device=device, dtype=dtype, peak_mib=round(peak / 2 ** 20, 1),
                step_s=round(time.perf_counter() - start, 2))
