"""Backbone latency report for EfficientFormer / EfficientFormerV2 / EfficientViT: variants x
input sizes x runtimes x batch sizes, with MACs, achieved GFLOP/s and the fraction of this
machine's fp32 matmul throughput measured in the same rounds. The references (timm, and
:mod:`benchmarks.official_reference` standing in for the official dense code) can be timed
alongside (``compare=True``); all candidates of one setting run in interleaved rounds."""
import csv
import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from mmeformer.builder import build_model
from mmeformer.complexity import count_macs, count_params
from mmeformer.models import arch_names

from .allocator import keep_freed_memory
from .plot import plot
from .references import EXPORTED, INT8_SUFFIX, RUNTIMES, candidates
from .timing import (MATMUL_SIZE, environment, gflop_per_s, matmul_gflops, square_matmul,
                     time_interleaved)

DEFAULT_SIZES = ((224, 224), (512, 512), (800, 1344))


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


def run(variants: Sequence[str] = None, sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES,
        runtimes: Sequence[str] = ('eager', 'fused', 'onnxruntime'), batch_sizes=(1, ),
        threads: int = 2, device: str = 'cpu', dtype: str = 'float32', warmup: int = 2,
        repeats: int = 10, compare: bool = False, keep_memory: bool = True,
        progress: Callable = print) -> Report:
    """Time every (variant, size, implementation, runtime, batch). ``keep_memory`` applies
    :func:`benchmarks.allocator.keep_freed_memory` to this process first (all implementations
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
                    _significant(macs / 1e9), round(achieved, 1),
                    _significant(achieved / group_peak), round(group_peak, 1), note))
                progress(f'[{index}/{len(plan)}] {variant} {size[0]}x{size[1]} b{batch} '
                         f'{impl}/{runtime}: {median:.1f} ms (p90 {p90:.1f})')
    return report


def _significant(value: float, digits: int = 4) -> float:
    """Round to significant digits, not decimals: at tiny test sizes GMACs and matmul shares are
    around 1e-3, where four decimals would keep a single digit."""
    return float(f'{value:.{digits}g}')


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
             f"{env['torch']}, onnxruntime {env['onnxruntime']}, openvino {env.get('openvino')}, "
             f"ai-edge-litert {env.get('ai_edge_litert')}; {dtypes} matmul "
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
    fastest = fastest_lines(report)
    if fastest:
        lines += ['', 'Fastest verified runtime per backbone and size (float32 exports are '
                  'checked to 1e-4 of PyTorch, int8 exports are quantized):'] + fastest
    return '\n'.join(lines) + '\n'


def fastest_lines(report: Report) -> List[str]:
    """Per variant, size and batch: mmeformer's fastest float32 runtime against the official
    code's forward (when timed) and eager, and its fastest int8 runtime against float32 eager."""
    lines = []
    settings = sorted({(m.variant, m.height, m.width, m.batch) for m in report.measurements})
    for variant, height, width, batch in settings:
        rows = [m for m in report.measurements
                if (m.variant, m.height, m.width, m.batch) == (variant, height, width, batch)]
        ours = [m for m in rows if m.implementation == 'mmeformer']
        eager = next((m for m in ours if m.runtime == 'eager'), None)
        official = next((m for key in OFFICIAL for m in rows
                         if (m.implementation, m.runtime) == key), None)
        parts = []
        for label, group in (('float32', [m for m in ours if not m.runtime.endswith(
                INT8_SUFFIX)]), ('int8', [m for m in ours if m.runtime.endswith(INT8_SUFFIX)])):
            if not group:
                continue
            best = min(group, key=lambda m: m.median_ms)
            against = [f'{ref.median_ms / best.median_ms:.2f}x {name}' for ref, name in (
                (official, official and official.implementation), (eager, 'eager float32'))
                if ref is not None and (label == 'float32' or ref is eager)]
            parts.append(f'{label} {best.runtime} {best.median_ms:.1f} ms'
                         + (f' ({", ".join(against)})' if against else ''))
        lines.append(f'- {variant} {height}x{width} b{batch}: ' + '; '.join(parts))
    return lines


# (implementation, runtime) pairs compared in the ratios: (faster candidate, reference).
RATIO_PAIRS = ((('mmeformer', 'eager'), ('official (re-implemented)', 'eager')),
               (('mmeformer official-bias', 'eager'), ('official (re-implemented)', 'eager')),
               (('mmeformer', 'eager'), ('timm', 'eager')),
               (('mmeformer', 'fused'), ('mmeformer', 'eager')),
               (('mmeformer', 'compile'), ('mmeformer', 'eager')),
               *((('mmeformer', runtime), ('mmeformer', 'eager')) for runtime in RUNTIMES
                 if runtime.removesuffix(INT8_SUFFIX) in EXPORTED))
# The official code's forward, where the run has it: the re-implementation of the official
# dense code (V1 / V2 at detection / segmentation sizes), else timm's port.
OFFICIAL = (('official (re-implemented)', 'eager'), ('timm', 'eager'))


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
