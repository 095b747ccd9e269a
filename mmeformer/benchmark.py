"""Backbone latency report for EfficientFormer / EfficientFormerV2 / EfficientViT (papers:
arXiv:2206.01191, arXiv:2212.08059, arXiv:2305.07027): variants x input sizes x runtimes x batch
sizes, with MACs, achieved GFLOP/s and the fraction of this machine's fp32 matmul throughput
measured in the same run. Reference implementations (timm, and
:mod:`mmeformer.official_reference` standing in for the official dense code) can be timed
alongside (``compare=True``); all candidates of one setting run in interleaved rounds.
:func:`profile` shows where a CPU forward's time goes: inside the attention modules against the
rest of the network, and per aten op. :func:`size_stream` times a stream of detection test sizes,
as an evaluation feeds them.
"""
import copy
import csv
import functools
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .allocator import allocator_description, keep_freed_memory, release_freed_memory
from .complexity import count_macs, count_params
from .deploy import fuse
from .export import arch_names, build_model, export_onnx, official_bias_img_size
from .models.layers import RelativeBiasAttention, eval_cache_bytes
from .official_reference import build_official_reference

RUNTIMES = ('eager', 'fused', 'compile', 'onnxruntime')
DEFAULT_SIZES = ((224, 224), (512, 512), (800, 1344))

# Published accuracy (papers / official repositories, as listed in the design notes; not
# measured here).
PUBLISHED_TOP1 = {
    'efficientformer_l1': 79.2, 'efficientformer_l3': 82.4, 'efficientformer_l7': 83.3,
    'efficientformerv2_s2': 82.0, 'efficientformerv2_l': 83.5, 'efficientvit_m4': 74.3,
}
PUBLISHED_COCO_BOX_AP = {
    'efficientformer_l1': 37.9, 'efficientformer_l3': 41.4, 'efficientformer_l7': 42.6,
    'efficientformerv2_s2': 43.4, 'efficientformerv2_l': 44.7,
}


@dataclass
class Measurement:
    variant: str
    implementation: str
    runtime: str
    height: int
    width: int
    batch: int
    threads: int
    dtype: str
    median_ms: float
    p90_ms: float
    params_m: float
    gmacs: float
    gflops_per_s: float
    matmul_fraction: float  # of matmul_gflops
    matmul_gflops: float  # the 2048^3 matmul, timed in the same rounds as this measurement
    note: str = ''


@dataclass
class Report:
    environment: Dict
    matmul_gflops: float
    measurements: List[Measurement] = field(default_factory=list)


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
    env = dict(cpu=cpu, cores=os.cpu_count(), threads=threads, device=device,
               python=platform.python_version(), allocator=allocator_description(), **versions)
    if device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(0)
    return env


def _sync(device: str):
    if device == 'cuda':
        torch.cuda.synchronize()


def _median_p90(times: List[float]) -> Tuple[float, float]:
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
    return {key: _median_p90(t)
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


class TimmFeatures(torch.nn.Module):
    """A timm model returning its multi-scale features (``forward_intermediates``), as a module
    so that it moves with ``.to()`` like the others."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_intermediates(x, intermediates_only=True)


def _timm_model(variant: str) -> TimmFeatures:
    import timm
    kwargs = dict(num_classes=0)
    if variant.startswith('efficientvit_'):
        kwargs['img_size'] = 512  # 7x7 windows everywhere: the downstream semantics
    return TimmFeatures(timm.create_model(variant, **kwargs)).eval()


def reference_builders(variant: str, base: torch.nn.Module,
                       size: Tuple[int, int]) -> List[Tuple[str, str, str, Callable]]:
    """(implementation, runtime, note, build) of the references that ``--compare`` sets beside
    ``base`` (the mmeformer model of ``variant``) at ``size``; ``build()`` makes the model."""
    items = []
    # timm's EfficientFormer V1/V2 run only at 224 x 224.
    if variant.startswith('efficientvit_') or size == (224, 224):
        items.append(('timm', 'eager', 'img_size=512' if variant.startswith('efficientvit_')
                      else '', lambda: _timm_model(variant)))
    if not variant.startswith('efficientvit_') and size != (224, 224):
        bias_img_size = official_bias_img_size(size)
        items.append(('mmeformer official-bias', 'eager',
                      f"bias_mode='official', bias_img_size={bias_img_size}",
                      lambda: build_model(variant, bias_mode='official',
                                          bias_img_size=bias_img_size)))
        items.append(('official (re-implemented)', 'eager',
                      'mmeformer.official_reference: bias gathered + resized every forward',
                      lambda: build_official_reference(base.family, base.arch['name'],
                                                       bias_img_size).eval()))
    return items


def candidates(variant: str, base: torch.nn.Module, size: Tuple[int, int],
               runtimes: Sequence[str], compare: bool,
               workdir: str) -> List[Tuple[str, str, Callable, str]]:
    """(implementation, runtime, callable taking x, note) to time for one variant and size;
    ``base`` is the eager model (the other runtimes work on copies)."""
    items = []
    for runtime in runtimes:
        if runtime == 'eager':
            items.append(('mmeformer', 'eager', base, ''))
        elif runtime == 'fused':
            items.append(('mmeformer', 'fused', fuse(copy.deepcopy(base)), ''))
        elif runtime == 'compile':
            compiled = torch.compile(fuse(copy.deepcopy(base)), dynamic=False)
            items.append(('mmeformer', 'compile', compiled, 'torch.compile (inductor)'))
        elif runtime == 'onnxruntime':
            import onnxruntime as ort
            path = os.path.join(workdir, f'{variant}_{size[0]}x{size[1]}.onnx')
            # export_onnx freezes the attention biases of the size itself.
            export_onnx(fuse(copy.deepcopy(base)), path, size, dynamic=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            # ONNX Runtime's idle threads spin by default; timed in rounds with the other
            # candidates, they took the cores from the next one (eager measured 2x slower).
            options.add_session_config_entry('session.intra_op.allow_spinning', '0')
            session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
            items.append(('mmeformer', 'onnxruntime',
                          lambda x, s=session: s.run(None, {'image': x.cpu().numpy()}),
                          'static-size fused export'))
        else:
            raise ValueError(f'unknown runtime {runtime!r}; choose from {RUNTIMES}')
    if compare:
        items += [(implementation, runtime, build(), note)
                  for implementation, runtime, note, build in reference_builders(variant, base,
                                                                                  size)]
    return items


def run(variants: Sequence[str] = None, sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES,
        runtimes: Sequence[str] = ('eager', 'fused', 'onnxruntime'), batch_sizes=(1, ),
        threads: int = 2, device: str = 'cpu', dtype: str = 'float32', warmup: int = 2,
        repeats: int = 10, compare: bool = False, keep_memory: bool = True,
        progress: Callable = print) -> Report:
    """Time every (variant, size, implementation, runtime, batch). ``keep_memory`` applies
    :func:`mmeformer.allocator.keep_freed_memory` to this process first (all implementations
    alike): with glibc's defaults, page faults on fresh multi-MB tensors add up to 2x run-to-run
    spread on CPU, and penalise whichever implementation allocates more."""
    variants = list(variants or arch_names())
    if keep_memory and device == 'cpu':
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    peak = matmul_gflops(device, torch_dtype)
    report = Report(environment(device, threads), peak)
    plan = [(v, s) for v in variants for s in sizes]
    with tempfile.TemporaryDirectory() as workdir:
        for index, (variant, size) in enumerate(plan, 1):
            base = build_model(variant)
            params, macs = count_params(base), count_macs(base, size)
            timed = {}
            for impl, runtime, fn, note in candidates(variant, base, size, runtimes, compare,
                                                      workdir):
                if isinstance(fn, torch.nn.Module):
                    fn = fn.to(device=device, dtype=torch_dtype)
                for batch in batch_sizes:
                    x = torch.randn(batch, 3, *size, device=device, dtype=torch_dtype)
                    try:  # one call first: a candidate that fails is reported, not timed
                        with torch.inference_mode():
                            fn(x)
                    except Exception as err:  # noqa: BLE001 - report and keep going
                        progress(f'  skipped {impl}/{runtime}: {type(err).__name__}: {err}')
                        continue
                    timed[(impl, runtime, batch, note)] = functools.partial(fn, x)
            # The yardstick runs in the same rounds: this machine's speed drifts within a run,
            # and a matmul speed measured once at the start gave shares above 100% later on.
            timed['matmul'] = square_matmul(device, torch_dtype)
            with torch.inference_mode():
                results = time_interleaved(timed, warmup, repeats, device)
            matmul_median, _ = results.pop('matmul')
            group_peak = gflop_per_s(2 * MATMUL_SIZE ** 3, matmul_median)
            for (impl, runtime, batch, note), (median, p90) in results.items():
                achieved = gflop_per_s(2 * macs * batch, median)
                report.measurements.append(Measurement(
                    variant, impl, runtime, size[0], size[1], batch, threads, dtype,
                    round(median, 2), round(p90, 2), round(params / 1e6, 3),
                    round(macs / 1e9, 4), round(achieved, 1), round(achieved / group_peak, 4),
                    round(group_peak, 1), note))
                progress(f'[{index}/{len(plan)}] {variant} {size[0]}x{size[1]} b{batch} '
                         f'{impl}/{runtime}: {median:.1f} ms (p90 {p90:.1f})')
    return report


# -- a stream of detection test sizes --------------------------------------------------------
def detection_test_sizes(count: int, seed: int = 0, scale: Tuple[int, int] = (1333, 800),
                         divisor: int = 32) -> List[Tuple[int, int]]:
    """``count`` (H, W) inputs as an mmdet test pipeline makes them from photos (keep-ratio
    resize to fit ``scale``, padded to a multiple of ``divisor``). The photos: half 480x640; the
    others 640 px on the long side and 300-640 px on the short one, 30% of them portrait.
    Seeded, so every run times the same stream."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        if rng.random() < 0.5:
            h, w = 480, 640
        else:
            short = rng.randint(300, 640)
            h, w = (short, 640) if rng.random() < 0.7 else (640, short)
        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
        sizes.append(tuple(math.ceil(round(v * factor) / divisor) * divisor for v in (h, w)))
    return sizes


def bias_cache_bytes(model) -> Optional[int]:
    """Bytes of the attention biases cached in ``model``'s modules; None where it has none."""
    modules = ([m for m in model.modules() if isinstance(m, RelativeBiasAttention)]
               if isinstance(model, torch.nn.Module) else [])
    return sum(m.cached_bias_bytes() for m in modules) if modules else None


@dataclass
class StreamResult:
    variant: str
    implementation: str
    runtime: str
    images: int
    distinct_sizes: int
    mean_ms: float
    median_ms: float
    p90_ms: float
    bias_cache_mb: Optional[float]
    note: str = ''


STREAM_RUNTIMES = ('eager', 'fused')


def size_stream(variants: Sequence[str], count: int, runtimes: Sequence[str] = ('eager', ),
                compare: bool = False, threads: int = 2, warmup: int = 1,
                keep_memory: bool = True,
                progress: Callable = print) -> Tuple[Dict, List[StreamResult]]:
    """CPU fp32 eval forwards, batch 1, over one stream of :func:`detection_test_sizes`, each
    image through every candidate in turn (the candidates of :func:`run`; runtimes eager and
    fused only: the others are built for one size). A fixed-size benchmark never pays for a new
    input size; an evaluation does whenever a size is not in the attention-bias caches. Also
    reports the bytes those caches hold at the end."""
    unknown = [r for r in runtimes if r not in STREAM_RUNTIMES]
    if unknown:
        raise ValueError(f'a size stream times the eager and fused runtimes only, not {unknown}')
    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    sizes = detection_test_sizes(count)
    results = []
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        for variant in variants:
            base = build_model(variant)
            items = candidates(variant, base, sizes[0], runtimes, compare, workdir)
            first = torch.randn(1, 3, *sizes[0])
            images = ((torch.randn(1, 3, *size), ) for size in sizes)
            rounds = interleaved_rounds({i: item[2] for i, item in enumerate(items)}, warmup,
                                        images, 'cpu', warmup_args=(first, ))
            times = [[] for _ in items]
            for index, (size, round_times) in enumerate(zip(sizes, rounds), 1):
                for i, ms in round_times.items():
                    times[i].append(ms)
                progress(f'{variant} image {index}/{count} {size[0]}x{size[1]}: ' + ', '.join(
                    f'{impl}/{runtime} {t[-1]:.1f} ms'
                    for t, (impl, runtime, _, _) in zip(times, items)))
            for timed, (impl, runtime, fn, note) in zip(times, items):
                median, p90 = _median_p90(timed)
                cached = bias_cache_bytes(fn)
                results.append(StreamResult(
                    variant, impl, runtime, count, len(set(sizes)),
                    round(statistics.fmean(timed), 2), round(median, 2), round(p90, 2),
                    None if cached is None else round(cached / 2**20, 1), note))
    return environment('cpu', threads), results


def size_stream_markdown(env: Dict, results: Sequence[StreamResult]) -> str:
    lines = [f"Machine: {env['cpu']}, {env['threads']} threads, torch {env['torch']}; "
             f"{env.get('allocator', 'allocator not recorded')}.", '',
             '| variant | implementation | runtime | images (sizes) | mean ms | median ms | '
             'p90 ms | bias cache MB at the end |', '|---|---|---|---|---|---|---|---|']
    for r in results:
        cache = '-' if r.bias_cache_mb is None else f'{r.bias_cache_mb:.1f}'
        lines.append(f'| {r.variant} | {r.implementation} | {r.runtime} | {r.images} '
                     f'({r.distinct_sizes}) | {r.mean_ms:.1f} | {r.median_ms:.1f} | '
                     f'{r.p90_ms:.1f} | {cache} |')
    ratios = ratio_lines(results, list(dict.fromkeys(r.variant for r in results)),
                         lambda r: r.variant, lambda r: r.mean_ms, str,
                         '(mean {} -> {} ms per image)')
    if ratios:
        lines += ['', 'Ratios in this run (mean time per image):'] + ratios
    return '\n'.join(lines) + '\n'


# -- where the time goes --------------------------------------------------------------------
def attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The attention modules of any of the implementations timed here (mmeformer, timm, the
    official stand-in): the outermost modules that own a learned attention-bias table (a
    parameter named ``attention_biases*``)."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if any(n.startswith('attention_biases') for n, _ in module.named_parameters(recurse=False)):
            found.append(module)
            inside.add(name + '.')
    return found


class AttentionClock:
    """Wall time spent inside a model's :func:`attention_modules`, from forward hooks (CPU;
    the modules never nest). ``spent_ms`` counts since the last :meth:`reset`."""

    def __init__(self, model: torch.nn.Module):
        self.modules = attention_modules(model)
        self.spent_ms, self._start = 0., 0.
        self._handles = [h for m in self.modules for h in (
            m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave))]

    def _enter(self, module, args):
        self._start = time.perf_counter()

    def _leave(self, module, args, output):
        self.spent_ms += (time.perf_counter() - self._start) * 1e3

    def reset(self):
        self.spent_ms = 0.

    def remove(self):
        for handle in self._handles:
            handle.remove()


# Ops that multiply matrices (GEMMs, convolutions) by name: each output element is a dot product
# whose length is read from this argument (index, dim) of the op: FLOPs = 2 x outputs x length.
_DOT_LENGTH = {
    'mm': (0, -1), 'matmul': (0, -1), 'bmm': (0, -1), 'linear': (0, -1),
    '_linear_pointwise': (0, -1), 'addmm': (1, -1), 'baddbmm': (1, -1),
    'conv2d': (1, None), 'convolution': (1, None), 'mkldnn_convolution': (1, None),
    '_convolution_pointwise': (1, None),  # .binary overload: weight at 2 (handled below)
}


def _matrix_flops(name: str, func, args, out) -> Optional[int]:
    """FLOPs of one call of op ``func`` (named ``name``) if it multiplies matrices (see
    ``_DOT_LENGTH``); None for every other op."""
    if name not in _DOT_LENGTH or not isinstance(out, torch.Tensor):
        return None
    index, dim = _DOT_LENGTH[name]
    if func._overloadname == 'binary':
        index += 1
    operand = args[index]
    # Convolutions: weight (out, in / groups, kh, kw); one output sums in / groups * kh * kw.
    length = operand[0].numel() if dim is None else operand.shape[dim]
    return 2 * out.numel() * length


def op_costs(fn: Callable) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Time in ms spent inside each aten op (by name) in one call of ``fn``, measured around
    every op, and the GFLOP done by the ops that multiply matrices (GEMMs, convolutions).

    torch.profiler is not used: on the 2-core CI machine it inflated some ops 3-4x (a
    channels-last bilinear upsampling: 2.6 ms under the profiler, 0.7 ms timed directly),
    which misattributes the time. Timing in a dispatch mode adds Python overhead between the
    ops, not inside them (CPU ops are synchronous).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    seconds: Dict[str, float] = {}
    flops: Dict[str, float] = {}

    class OpTimer(TorchDispatchMode):

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            begin = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split('.')[0]
            seconds[name] = seconds.get(name, 0.) + time.perf_counter() - begin
            count = _matrix_flops(name, func, args, out)
            if count is not None:
                flops[name] = flops.get(name, 0.) + count
            return out

    with OpTimer():
        fn()
    return ({name: t * 1e3 for name, t in seconds.items()},
            {name: f / 1e9 for name, f in flops.items()})


@dataclass
class Profile:
    variant: str
    implementation: str
    height: int
    width: int
    total_ms: float
    attention_ms: float
    attention_modules: int
    ops_ms: Dict[str, float]  # mean time inside each aten op per forward, largest first
    ops_gflop: Dict[str, float]  # work per forward of the ops that multiply matrices
    matmul_gflops: float  # this machine's fp32 2048^3 matmul throughput, measured in the run

    @property
    def matrix_ms(self) -> float:
        return sum(self.ops_ms.get(name, 0.) for name in self.ops_gflop)

    @property
    def matrix_gflops(self) -> float:
        """Achieved throughput of the matrix ops (GEMMs, convolutions) together."""
        return gflop_per_s(sum(self.ops_gflop.values()) * 1e9, max(self.matrix_ms, 1e-9))


def profile(variants: Sequence[str], sizes: Sequence[Tuple[int, int]], compare: bool = False,
            threads: int = 2, warmup: int = 2, repeats: int = 5, keep_memory: bool = True,
            progress: Callable = print) -> List[Profile]:
    """Where the time of a CPU eval forward goes (batch 1, fp32), for mmeformer's eager model
    and, with ``compare``, the references of :func:`candidates`: the time inside the attention
    modules (median forward of ``repeats``, with its attention time) and inside each aten op
    (mean of ``repeats`` instrumented forwards), with the GFLOP/s of the ops that multiply
    matrices against the matmul throughput measured at the start. All implementations of a
    setting run in interleaved rounds (:func:`sample_interleaved`)."""
    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    peak = matmul_gflops('cpu', torch.float32)
    rows = []
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        for variant in variants:
            for size in sizes:
                models = {impl: model for impl, _, model, _ in candidates(
                    variant, build_model(variant), size, ['eager'], compare, workdir)}
                x = torch.randn(1, 3, *size)
                clocks = {impl: AttentionClock(model) for impl, model in models.items()}
                attention = {impl: [] for impl in models}
                ops = {impl: [] for impl in models}

                def timed_forward(impl):
                    clocks[impl].reset()
                    models[impl](x)
                    attention[impl].append(clocks[impl].spent_ms)

                totals = sample_interleaved(
                    {impl: functools.partial(timed_forward, impl) for impl in models},
                    warmup, repeats, 'cpu')
                sample_interleaved({impl: lambda impl=impl: ops[impl].append(
                    op_costs(functools.partial(models[impl], x))) for impl in models},
                    0, repeats, 'cpu')
                for impl, clock in clocks.items():
                    clock.remove()
                    # The median forward, with the attention time of that same call.
                    runs = sorted(zip(totals[impl], attention[impl][warmup:]))
                    total, in_attention = runs[len(runs) // 2]
                    times = [run_times for run_times, _ in ops[impl]]
                    mean_ops = {name: sum(run.get(name, 0.) for run in times) / repeats
                                for name in set().union(*times)}
                    rows.append(Profile(
                        variant, impl, size[0], size[1], round(total, 2),
                        round(in_attention, 2), len(clock.modules),
                        {k: round(v, 3) for k, v in sorted(mean_ops.items(),
                                                           key=lambda kv: -kv[1])},
                        {k: round(v, 6) for k, v in ops[impl][0][1].items()}, round(peak, 1)))
                    progress(f'{variant} {size[0]}x{size[1]} {impl}: {total:.1f} ms, '
                             f'{in_attention:.1f} ms in attention modules')
    return rows


def profile_markdown(rows: Sequence[Profile], top: int = 5) -> str:
    """One line per profile; matrix ops (GEMMs, convolutions) carry their GFLOP/s, whose
    fraction of the matmul throughput says how far each is from being compute-bound."""
    lines = ['| variant | size | implementation | forward ms | in attention modules ms '
             '| rest ms | attention modules | inside aten ops ms '
             '| of which matrix ops ms (GFLOP/s, % of matmul) | top ops (ms per forward) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        ops = []
        for name, ms in list(r.ops_ms.items())[:top]:
            rate = (f' [{gflop_per_s(r.ops_gflop[name] * 1e9, ms):.0f} GFLOP/s]'
                    if name in r.ops_gflop and ms > 0 else '')
            ops.append(f'{name} {ms:.1f}{rate}')
        lines.append(f'| {r.variant} | {r.height}x{r.width} | {r.implementation} | '
                     f'{r.total_ms:.1f} | {r.attention_ms:.1f} | '
                     f'{r.total_ms - r.attention_ms:.1f} | {r.attention_modules} | '
                     f'{sum(r.ops_ms.values()):.1f} | {r.matrix_ms:.1f} '
                     f'({r.matrix_gflops:.0f}, {100 * r.matrix_gflops / r.matmul_gflops:.0f}%) | '
                     f'{", ".join(ops)} |')
    return '\n'.join(lines) + '\n'


# -- memory ------------------------------------------------------------------------------------
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
                      implementation: str = 'mmeformer', device: str = 'cpu') -> Dict:
    """Peak memory of one training step (forward + backward of ``sum(mean(feature))``).

    CUDA: peak allocated bytes above those held before the step. CPU: the peak resident set
    during the step above the resident set before it, glibc's free heap memory returned to the
    kernel first (Linux); run each measurement in a fresh process (``tools/benchmark.py
    --train-memory`` does).
    """
    if implementation == 'mmeformer':
        model = build_model(variant)
    elif implementation == 'official (re-implemented)':
        family = build_model(variant).family
        model = build_official_reference(family, variant.split('_', 1)[1], 800)
    else:
        raise ValueError(f'unknown implementation {implementation!r}')
    model = model.to(device).train()
    x = torch.randn(batch, 3, *size, device=device)
    before = _start_memory_count(device, 'training')
    start = time.perf_counter()
    sum(f.float().mean() for f in model(x)).backward()
    peak = _peak_memory_since(device, before)
    return dict(variant=variant, implementation=implementation, height=size[0], width=size[1],
                batch=batch, device=device, peak_mib=round(peak / 2 ** 20, 1),
                step_s=round(time.perf_counter() - start, 2))


# -- writing ---------------------------------------------------------------------------------
def _rate(gflops: float) -> str:
    """GFLOP/s for a table: whole numbers, two digits below 10 (bfloat16 matmuls on a CPU
    without bfloat16 units run at a fraction of 1 GFLOP/s)."""
    return f'{gflops:.0f}' if gflops >= 10 else f'{gflops:.2g}'


def to_markdown(report: Report) -> str:
    env = report.environment
    dtypes = '/'.join(sorted({m.dtype for m in report.measurements})) or 'float32'
    group_peaks = [m.matmul_gflops for m in report.measurements]
    alongside = (f'; timed in the same rounds as each variant and size: '
                 f'{_rate(min(group_peaks))}-{_rate(max(group_peaks))} GFLOP/s, the yardstick '
                 f'of the last column' if group_peaks else '')
    device = env['device'] + (f" ({env['gpu']})" if env.get('gpu') else '')
    lines = [f"Machine: {env['cpu']}, {env['threads']} threads, device {device}, torch "
             f"{env['torch']}, onnxruntime {env['onnxruntime']}; {dtypes} matmul "
             f'({MATMUL_SIZE}^3) at the start of the run: {_rate(report.matmul_gflops)} GFLOP/s'
             f"{alongside}; {env.get('allocator', 'allocator not recorded')}.", '',
             '| variant | implementation | runtime | size | batch | median ms | p90 ms | params M '
             '| GMACs | GFLOP/s | of matmul peak |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for m in report.measurements:
        lines.append(f'| {m.variant} | {m.implementation} | {m.runtime} | {m.height}x{m.width} '
                     f'| {m.batch} | {m.median_ms:.1f} | {m.p90_ms:.1f} | {m.params_m:.2f} | '
                     f'{m.gmacs:.3f} | {_rate(m.gflops_per_s)} | {100 * m.matmul_fraction:.1f}% |')
    speedups = speedup_lines(report)
    if speedups:
        lines += ['', 'Ratios in this run (median latencies):'] + speedups
    return '\n'.join(lines) + '\n'


# (implementation, runtime) pairs compared in the ratios: (faster candidate, reference).
RATIO_PAIRS = ((('mmeformer', 'eager'), ('official (re-implemented)', 'eager')),
               (('mmeformer official-bias', 'eager'), ('official (re-implemented)', 'eager')),
               (('mmeformer', 'eager'), ('timm', 'eager')),
               (('mmeformer', 'fused'), ('mmeformer', 'eager')),
               (('mmeformer', 'compile'), ('mmeformer', 'eager')),
               (('mmeformer', 'onnxruntime'), ('mmeformer', 'eager')))


def ratio_lines(rows: Sequence, settings: Sequence, setting_of: Callable, ms_of: Callable,
                describe: Callable, times: str) -> List[str]:
    """The :data:`RATIO_PAIRS` ratios of ``rows`` (each with an ``implementation`` and a
    ``runtime``) within each of ``settings`` (``setting_of(row)``), in that order;
    ``describe(setting)`` names the setting and ``times`` formats the slower and faster ms."""
    index = {(setting_of(r), r.implementation, r.runtime): r for r in rows}
    lines = []
    for setting in settings:
        for fast, slow in RATIO_PAIRS:
            a, b = index.get((setting, *fast)), index.get((setting, *slow))
            if a is not None and b is not None:
                lines.append(f'- {describe(setting)}: {"/".join(fast)} is '
                             f'{ms_of(b) / ms_of(a):.2f}x faster than {"/".join(slow)} '
                             + times.format(f'{ms_of(b):.1f}', f'{ms_of(a):.1f}'))
    return lines


def speedup_lines(report: Report) -> List[str]:
    """Ratios within this run: mmeformer against the references, and each runtime's gain."""
    def setting_of(m):
        return m.variant, m.height, m.width, m.batch

    return ratio_lines(report.measurements, sorted({setting_of(m) for m in report.measurements}),
                       setting_of, lambda m: m.median_ms,
                       lambda setting: '{} {}x{} b{}'.format(*setting), '({} -> {} ms)')


def write(report: Report, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f'latency.{k}') for k in ('md', 'csv', 'json', 'png')}
    with open(paths['md'], 'w') as f:
        f.write(to_markdown(report))
    rows = [asdict(m) for m in report.measurements]
    with open(paths['csv'], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(Measurement.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths['json'], 'w') as f:
        json.dump(dict(environment=report.environment, matmul_gflops=report.matmul_gflops,
                       measurements=rows), f, indent=1)
    plot(report, paths['png'])
    return paths


def plot(report: Report, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ours = [m for m in report.measurements if m.implementation == 'mmeformer' and m.batch == 1]
    for (runtime, h, w) in sorted({(m.runtime, m.height, m.width) for m in ours}):
        pts = [m for m in ours if (m.runtime, m.height, m.width) == (runtime, h, w)]
        ax1.scatter([m.gmacs for m in pts], [m.median_ms for m in pts],
                    label=f'{runtime} {h}x{w}')
    ax1.set(xscale='log', yscale='log', xlabel='GMACs (measured)', ylabel='median latency (ms)',
            title='Latency against MACs (this machine)')
    ax1.legend(fontsize=7)
    for table, (h, w), label in ((PUBLISHED_TOP1, (224, 224), 'ImageNet top-1 @224'),
                                 (PUBLISHED_COCO_BOX_AP, (800, 1344), 'COCO box AP @800x1344')):
        pts = [m for m in ours if m.runtime == 'eager' and (m.height, m.width) == (h, w)
               and m.variant in table]
        if pts:
            ax2.scatter([m.median_ms for m in pts], [table[m.variant] for m in pts], label=label)
            for m in pts:
                ax2.annotate(m.variant.split('_', 1)[1], (m.median_ms, table[m.variant]),
                             fontsize=7)
    ax2.set(xscale='log', xlabel='median latency, eager (ms, measured)',
            ylabel='accuracy (PUBLISHED, not measured here)',
            title='Published accuracy against measured latency')
    if ax2.collections:
        ax2.legend(fontsize=7)
    else:  # the published numbers are at 224x224 (ImageNet) and 800x1344 (COCO) only
        ax2.text(0.5, 0.5, 'no eager run at 224x224 or 800x1344 in this report',
                 ha='center', va='center', transform=ax2.transAxes, fontsize=8)
    env = report.environment
    fig.suptitle(f"{env['cpu']} - {env['threads']} threads - torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
