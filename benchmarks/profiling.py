"""Where a CPU forward's time goes: inside the attention modules against the rest of the
network, and per aten op, with the GFLOP/s of the ops that multiply matrices."""
import functools
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmeformer.builder import build_model

from .allocator import keep_freed_memory
from .references import candidates
from .timing import gflop_per_s, matmul_gflops, sample_interleaved


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
