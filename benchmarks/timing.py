"""Timing on a shared machine: interleaved rounds of several candidates, and the dense-GEMM
yardstick that achieved GFLOP/s are compared with."""
import os
import platform
import statistics
import time
from importlib import metadata
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch

from .allocator import allocator_description


def environment(device: str, threads: int) -> Dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    versions = {}
    for name in ('torch', 'onnxruntime', 'timm', 'mmengine'):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    for dist in ('openvino', 'ai-edge-litert'):  # by distribution: importing litert is slow
        try:
            versions[dist.replace('-', '_')] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist.replace('-', '_')] = None
    env = dict(cpu=cpu, cores=os.cpu_count(), threads=threads, device=device,
               python=platform.python_version(), allocator=allocator_description(), **versions)
    if device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(0)
    return env


def _sync(device: str):
    if device == 'cuda':
        torch.cuda.synchronize()


def median_p90(times: List[float]) -> Tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]


def time_ms(fn: Callable, warmup: int, repeats: int, device: str) -> Tuple[float, float]:
    """Median and 90th percentile of ``repeats`` timed calls after ``warmup`` calls."""
    return time_interleaved({None: fn}, warmup, repeats, device)[None]


def interleaved_rounds(fns: Dict, warmup: int, rounds: Iterable[tuple], device: str,
                       warmup_args: tuple = ()) -> Iterator[Dict[object, float]]:
    """After ``warmup`` calls of each of ``fns`` (key -> callable) with ``warmup_args``, one
    round per argument tuple of ``rounds``: one call of each, yielding their wall times in ms.
    On a shared machine whose speed drifts (runs here varied 1.5x within minutes) every
    candidate then sees the same conditions, which keeps the ratios honest."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(*warmup_args)
    _sync(device)
    for args in rounds:
        times = {}
        for key, fn in fns.items():
            start = time.perf_counter()
            fn(*args)
            _sync(device)
            times[key] = (time.perf_counter() - start) * 1e3
        yield times


def sample_interleaved(fns: Dict, warmup: int, repeats: int,
                       device: str) -> Dict[object, List[float]]:
    """Wall times in ms of ``repeats`` calls of each of ``fns``, after ``warmup`` calls each,
    timed in :func:`interleaved_rounds`."""
    times = {key: [] for key in fns}
    for round_times in interleaved_rounds(fns, warmup, [()] * repeats, device):
        for key, ms in round_times.items():
            times[key].append(ms)
    return times


def time_interleaved(fns: Dict, warmup: int, repeats: int,
                     device: str) -> Dict[object, Tuple[float, float]]:
    """Median and 90th percentile in ms of each of ``fns``, timed as in
    :func:`sample_interleaved`."""
    return {key: median_p90(t)
            for key, t in sample_interleaved(fns, warmup, repeats, device).items()}


MATMUL_SIZE = 2048


def square_matmul(device: str, dtype: torch.dtype, n: int = MATMUL_SIZE) -> Callable:
    """A callable multiplying two n x n matrices: this machine's dense-GEMM speed, the yardstick
    of the achieved GFLOP/s (``2 n^3`` FLOPs per call)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b


def gflop_per_s(flop: float, ms: float) -> float:
    """Throughput of ``flop`` floating-point operations done in ``ms`` milliseconds."""
    return flop / ms * 1e-6


@torch.inference_mode()
def matmul_gflops(device: str, dtype: torch.dtype, n: int = MATMUL_SIZE,
                  repeats: int = 5) -> float:
    median, _ = time_ms(square_matmul(device, dtype, n), 2, repeats, device)
    return gflop_per_s(2 * n ** 3, median)
