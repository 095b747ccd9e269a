"""Training-step speed of the backbones against the official code's stand-ins
(:mod:`benchmarks.official_reference` for EfficientFormer V1 / V2, timm for EfficientViT), and
where a toy detector's training iteration spends its time.

A backbone's step is what a detector's iteration asks of it: train mode, the forward (under CPU
bfloat16 autocast for ``dtype='bfloat16'``), the backward of the levels from fixed dense NCHW
gradients (what a neck sends back) and an AdamW step, the optimizer of the configs. The candidates
of one (variant, size, dtype) run in interleaved rounds with a square matmul, the yardstick of
the achieved GFLOP/s (3x the forward MACs: the backward does about twice the forward's work).
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mmeformer.builder import build_model
from mmeformer.complexity import count_macs
from mmeformer.models import arch_names

from .allocator import keep_freed_memory
from .isolation import in_fresh_process
from .official_reference import build_official_reference
from .timing import MATMUL_SIZE, environment, gflop_per_s, square_matmul, time_interleaved

TRAIN_SIZES = ((512, 512), (800, 1344))
TRAIN_DTYPES = ('float32', 'bfloat16')
OFFICIAL = 'official (re-implemented)'
COMPILED = 'mmeformer torch.compile'


@dataclass
class TrainStep:
    variant: str
    implementation: str
    height: int
    width: int
    batch: int
    threads: int
    dtype: str
    median_ms: Optional[float]  # None (and the next four): not timed, ``note`` says why
    p90_ms: Optional[float]
    gmacs: Optional[float]  # of one image's forward
    gflops_per_s: Optional[float]  # 3x the forward MACs of the batch, per second
    matmul_fraction: Optional[float]  # of the matmul timed in the same rounds
    peak_mib: Optional[float] = None  # filled in by tools/benchmark.py (fresh processes)
    note: str = ''


def reference_name(variant: str) -> str:
    """The implementation a variant's training step is compared with."""
    return 'timm' if variant.startswith('efficientvit_') else OFFICIAL


def build_train_model(variant: str, implementation: str, size: Tuple[int, int]):
    """The backbone of ``variant`` as ``implementation`` builds it, in train mode."""
    from .references import official_bias_img_size, timm_model  # timm: an extra
    if implementation == 'mmeformer':
        model = build_model(variant)
    elif implementation == 'timm':
        model = timm_model(variant)
    elif implementation == OFFICIAL:
        model = build_official_reference(build_model(variant).family, variant.split('_', 1)[1],
                                         official_bias_img_size(size))
    else:
        raise ValueError(f'unknown implementation {implementation!r}')
    return model.train()


def autocast(dtype: str):
    """CPU autocast for ``'bfloat16'``, nothing for ``'float32'``."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast('cpu', dtype=getattr(torch, dtype))


def level_gradients(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> List[torch.Tensor]:
    """Fixed random NCHW gradients for the levels ``model`` returns for ``x``."""
    with torch.no_grad():
        levels = model(x)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(level.shape, generator=gen) for level in levels]


def backward_from(levels: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Backward of the levels from ``grads`` (a neck's gradients, as one loss)."""
    sum((level.float() * grad).sum() for level, grad in zip(levels, grads)).backward()


def train_step(model: torch.nn.Module, x: torch.Tensor, grads: Sequence[torch.Tensor],
               dtype: str = 'float32') -> Callable[[], None]:
    """One training step of a backbone: forward, backward from ``grads``, AdamW step (the
    configs' optimizer, with their weight decay)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-4, weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(dtype):
            levels = model(x)
        backward_from(levels, grads)
        optimizer.step()
    return step


def run(variants: Sequence[str] = None, sizes: Sequence[Tuple[int, int]] = TRAIN_SIZES,
        dtypes: Sequence[str] = TRAIN_DTYPES, batch: int = 2, threads: int = 2,
        warmup: int = 1, repeats: int = 5, keep_memory: bool = True, compile: bool = False,
        progress: Callable = print) -> Tuple[Dict, List[TrainStep]]:
    """Time the training step of every (variant, size, dtype) for mmeformer and its reference
    in interleaved rounds (CPU); with ``compile`` also mmeformer's backbone under
    torch.compile (inductor; compiled in the warmup, which must then be at least 1). Returns
    the environment and the measurements.

    Each setting runs in a fresh process: every setting starts from the same heap, and one that
    does not fit in memory (EfficientFormer-L7 at 800x1344 needs more than 24 GiB with both
    candidates) kills only its own process; its rows come back with ``note`` saying so and no
    times."""
    if keep_memory:  # here only for the report's environment: the settings run in children
        keep_freed_memory()
    rows = []
    plan = [(v, s, d) for v in (variants or arch_names()) for s in sizes for d in dtypes]
    for index, (variant, size, dtype) in enumerate(plan, 1):
        timed = in_fresh_process(_time_setting, variant, size, dtype, batch, threads, warmup,
                                 repeats, keep_memory, compile, index)
        label = f'[{index}/{len(plan)}] {variant} {size[0]}x{size[1]} {dtype}'
        if isinstance(timed, str):  # why the process died
            impls = ['mmeformer', reference_name(variant)] + ([COMPILED] if compile else [])
            rows += [TrainStep(variant, impl, size[0], size[1], batch, threads, dtype, None,
                               None, None, None, None, note=timed) for impl in impls]
            progress(f'{label}: not timed: {timed}')
            continue
        rows += timed
        for row in timed:
            progress(f'{label} {row.implementation}: {row.median_ms:.0f} ms '
                     f'(p90 {row.p90_ms:.0f})')
    return environment('cpu', threads), rows


def _time_setting(variant: str, size: Tuple[int, int], dtype: str, batch: int, threads: int,
                  warmup: int, repeats: int, keep_memory: bool, compile: bool,
                  seed: int) -> List[TrainStep]:
    """The rows of one (variant, size, dtype): its candidates in interleaved rounds."""
    if keep_memory:  # as the latency report: page faults otherwise dominate the spread
        keep_freed_memory()
    torch.set_num_threads(threads)
    macs = count_macs(build_model(variant), size)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    timed = {}
    for impl in ('mmeformer', reference_name(variant)):
        model = build_train_model(variant, impl, size)
        timed[impl] = train_step(model, x, level_gradients(model, x), dtype)
    if compile:
        model = build_train_model(variant, 'mmeformer', size)
        timed[COMPILED] = train_step(torch.compile(model), x, level_gradients(model, x), dtype)
    # An fp32 matmul whatever the step's dtype: one yardstick for every row.
    timed['matmul'] = square_matmul('cpu', torch.float32)
    results = time_interleaved(timed, warmup, repeats, 'cpu')
    matmul_median, _ = results.pop('matmul')
    peak = gflop_per_s(2 * MATMUL_SIZE ** 3, matmul_median)
    rows = []
    for impl, (median, p90) in results.items():
        achieved = gflop_per_s(3 * 2 * macs * batch, median)
        rows.append(TrainStep(variant, impl, size[0], size[1], batch, threads, dtype,
                              round(median, 1), round(p90, 1), round(macs / 1e9, 3),
                              round(achieved, 1), round(achieved / peak, 3)))
    return rows


def ratios(rows: Sequence[TrainStep]) -> List[Tuple[str, str, str, str, str, float]]:
    """(variant, size, dtype, faster, slower, slower ms / faster ms) of every setting timed with
    both: mmeformer against its reference, and mmeformer compiled against eager."""
    index = {(r.variant, (r.height, r.width), r.dtype, r.implementation): r for r in rows
             if r.median_ms is not None}
    out = []
    for (variant, size, dtype, impl), row in index.items():
        slower = {'mmeformer': reference_name(variant), COMPILED: 'mmeformer'}.get(impl)
        ref = index.get((variant, size, dtype, slower))
        if ref is not None:
            out.append((variant, f'{size[0]}x{size[1]}', dtype, impl, slower,
                        ref.median_ms / row.median_ms))
    return out


def to_markdown(env: Dict, rows: Sequence[TrainStep]) -> str:
    batch = rows[0].batch if rows else 2
    lines = [f"Machine: {env['cpu']}, {env['threads']} threads, torch {env['torch']}, timm "
             f"{env['timm']}; {env['allocator']}. Training step of the backbone: train mode, "
             f'batch {batch}, forward (bfloat16: CPU autocast), backward from fixed dense NCHW '
             'level gradients, AdamW step; random weights; medians of interleaved rounds. '
             'GFLOP/s: 3x the forward MACs of the batch; matmul: the share of a 2048^3 fp32 '
             'matmul timed in the same rounds. Peak MiB: forward + backward in a fresh process, '
             'above the model and input.', '',
             '| variant | size | dtype | implementation | median ms | p90 ms | GMACs | GFLOP/s | '
             'of matmul | peak MiB |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        peak = '' if r.peak_mib is None else f'{r.peak_mib:.0f}'
        setting = f'| {r.variant} | {r.height}x{r.width} | {r.dtype} | {r.implementation} | '
        if r.median_ms is None:
            lines.append(setting + f'not timed: {r.note} | - | - | - | - | {peak or "-"} |')
            continue
        lines.append(setting + f'{r.median_ms:.0f} | {r.p90_ms:.0f} | {r.gmacs:.2f} | '
                     f'{r.gflops_per_s:.0f} | {100 * r.matmul_fraction:.0f}% | {peak} |')
    found = ratios(rows)
    if found:
        lines += ['', '| variant | size | dtype | speed-up | of | over |',
                  '|---|---|---|---|---|---|']
        lines += [f'| {v} | {s} | {d} | {ratio:.2f}x | {fast} | {slow} |'
                  for v, s, d, fast, slow, ratio in found]
    return '\n'.join(lines) + '\n'


# -- the whole detector ----------------------------------------------------------------------
DETECTOR_CONFIGS = ('configs/detection/toy/maskrcnn_eformer_l1.py',
                    'configs/detection/toy/maskrcnn_eformerv2_s0.py',
                    'configs/detection/toy/maskrcnn_efficientvit_m4.py')


@dataclass
class DetectorBreakdown:
    config: str
    variant: str
    input_shape: Tuple[int, int, int, int]
    iteration_ms: float  # the runner's train_step: preprocessing, forward, losses, AdamW
    backbone_ms: float  # mmeformer backbone forward + backward on the same batch
    neck_ms: float  # backbone + neck minus backbone
    rest_ms: float  # heads, losses, preprocessing and the optimizer step
    reference: str
    reference_backbone_ms: float  # the reference backbone's forward + backward, same rounds

    @property
    def backbone_ratio(self) -> float:
        return self.reference_backbone_ms / self.backbone_ms

    @property
    def iteration_ratio(self) -> float:
        """The iteration with the reference backbone in place of mmeformer's, estimated by
        swapping the backbone's time, over the iteration measured."""
        return (self.iteration_ms - self.backbone_ms
                + self.reference_backbone_ms) / self.iteration_ms


def detector_breakdown(config: str, warmup: int = 1, repeats: int = 5, threads: int = 2,
                       keep_memory: bool = True) -> DetectorBreakdown:
    """Time a toy config's training iteration (one batch of its own train loader) and the
    backbone and backbone + neck alone on that batch, in interleaved rounds, with the reference
    backbone beside them."""
    from mmengine.config import Config  # mmdet / mmengine runner parts: this report only
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner

    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).train()
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader, seed=0)))
    with torch.no_grad():
        inputs = model.data_preprocessor(batch, True)['inputs']
    variant = _variant_of(model.backbone)
    reference = build_train_model(variant, reference_name(variant), tuple(inputs.shape[-2:]))
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    grads = level_gradients(model.backbone, inputs)
    neck_grads = level_gradients(lambda x: model.neck(model.backbone(x)), inputs)
    ref_grads = level_gradients(reference, inputs)

    def fwd_bwd(forward, level_grads):
        return lambda: backward_from(forward(inputs), level_grads)

    timed = dict(iteration=lambda: model.train_step(batch, optim_wrapper),
                 backbone=fwd_bwd(model.backbone, grads),
                 backbone_neck=fwd_bwd(lambda x: model.neck(model.backbone(x)), neck_grads),
                 reference=fwd_bwd(reference, ref_grads))
    times = {key: median for key, (median, _) in
             time_interleaved(timed, warmup, repeats, 'cpu').items()}
    model.zero_grad(set_to_none=True)
    return DetectorBreakdown(config, variant, tuple(inputs.shape), round(times['iteration'], 1),
                             round(times['backbone'], 1),
                             round(times['backbone_neck'] - times['backbone'], 1),
                             round(times['iteration'] - times['backbone_neck'], 1),
                             reference_name(variant), round(times['reference'], 1))


def _variant_of(backbone: torch.nn.Module) -> str:
    """The variant name (``efficientformer_l1``) of a built mmeformer backbone."""
    prefix = {'EfficientFormer': 'efficientformer', 'EfficientFormerV2': 'efficientformerv2',
              'EfficientViT': 'efficientvit'}[backbone.family]
    return f"{prefix}_{backbone.arch['name']}"


def detector_markdown(env: Dict, rows: Sequence[DetectorBreakdown]) -> str:
    lines = [f"Machine: {env['cpu']}, {env['threads']} threads, torch {env['torch']}; "
             'fp32. One batch of the toy config\'s train loader; medians of interleaved rounds '
             'of the runner\'s train_step (preprocessing, forward, losses, backward, AdamW) and '
             'of the backbone and backbone + neck alone (forward + backward from fixed dense '
             'gradients) on that batch. Rest = iteration - backbone - neck (heads, losses, '
             'preprocessing, optimizer step). With the reference: the iteration with the '
             'reference backbone\'s time in place of mmeformer\'s.', '',
             '| config | input | iteration ms | backbone ms (share) | neck ms | heads + rest ms '
             '| reference | its backbone ms | backbone ratio | iteration ratio |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        shape = 'x'.join(str(d) for d in r.input_shape)
        lines.append(f'| {r.config.rsplit("/", 1)[-1]} | {shape} | {r.iteration_ms:.0f} | '
                     f'{r.backbone_ms:.0f} ({100 * r.backbone_ms / r.iteration_ms:.0f}%) | '
                     f'{r.neck_ms:.0f} | {r.rest_ms:.0f} | {r.reference} | '
                     f'{r.reference_backbone_ms:.0f} | {r.backbone_ratio:.2f}x | '
                     f'{r.iteration_ratio:.2f}x |')
    return '\n'.join(lines) + '\n'
