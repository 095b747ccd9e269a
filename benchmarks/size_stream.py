"""A stream of detection test sizes, as an evaluation feeds them: what new input sizes cost
(bias caches), which a fixed-size benchmark never shows."""
import math
import random
import statistics
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mmeformer.builder import build_model
from mmeformer.models.layers import RelativeBiasAttention

from .allocator import keep_freed_memory
from .latency import ratio_lines
from .references import candidates
from .timing import environment, interleaved_rounds, median_p90


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
                median, p90 = median_p90(timed)
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
