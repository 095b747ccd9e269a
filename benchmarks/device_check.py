"""Do the EfficientFormer / EfficientFormerV2 / EfficientViT backbones (papers: arXiv:2206.01191,
arXiv:2212.08059, arXiv:2305.07027) compute on another device, in another dtype or runtime what
they compute in float32 on CPU?

The test suite checks the CPU float32 models against independent implementations (timm, the
official re-implementation). A GPU runs other code: the plain PyTorch ops where CPU inference
uses oneDNN kernels, ``F.interpolate`` instead of the banded bicubic resize, chunks of all heads
instead of one head at a time (see :mod:`mmeformer.models.layers`), other kernels, and half
precision. This module runs both on the same randomized weights (:func:`benchmarks.randomize.
randomize_`) and inputs and reports the relative difference of each output:

* inference, twice: the second forward reads the fold and attention-bias caches the first one
  filled;
* a training step (batch 2, under autocast for half dtypes): the outputs and the gradient of
  every parameter; BatchNorm in training mode in float32, with its statistics frozen in the
  half dtypes (see ``TRAINING_GRADIENT_TOLERANCES``).

``tools/device_check.py`` is the command; on CPU it compares bfloat16 and the deploy-fused
runtime with float32 eager, which the test suite runs.
"""
import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mmeformer.builder import build_model
from mmeformer.export import relative_errors
from mmeformer.models import fuse

from .randomize import randomize_
from .references import official_bias_img_size

# Largest accepted relative difference of an inference output (max |diff| / max |reference|),
# by dtype. float32 differs from CPU by summation order only (TF32 is switched off during the
# check). The half dtypes: bfloat16 keeps 8 mantissa bits, float16 11. Measured on CPU (all 13
# at 250x330, both bias modes, eager and fused; tools/device_check.py --device cpu --sizes
# 250x330 --dtypes float32 bfloat16): bfloat16 0.85-2.2e-2, float32 fused 0.
TOLERANCES = {'float32': 1e-4, 'float16': 2e-2, 'bfloat16': 6e-2}
# A training step. BatchNorm on the batch statistics of 2 images of random-weight networks
# amplifies any rounding chaotically (a channel with a tiny batch variance is divided by it): with
# BN in training mode, EfficientViT-M0's bfloat16 step at 130x170 differs from float32 by 0.53
# in its last output and 1.15 in its gradients, and rounding the input to bfloat16 alone moves
# the float32 step as much; a tolerance scaled to that would pass an output off by 3x. So:
# * float32 trains with BN in training mode, within TRAINING_FACTOR times the difference that
#   moving the input by one ulp makes in the reference step (another summation order, 1 thread
#   instead of 2, gave up to 16x on EfficientViT-M0's gradients), at least the dtype tolerance;
# * the half dtypes train under autocast with the BN statistics frozen (``norm_eval``, as the
#   EfficientViT configs train), reference included: their outputs then stay within the dtype
#   tolerance and their gradients within TRAINING_GRADIENT_TOLERANCES (measured on CPU, all
#   families at 130x170 and 250x330: bfloat16 up to 0.17, float16 up to 0.05, for
#   EfficientFormerV2-L at 250x330, where the rounding of activations adds up over 40 blocks).
# No tolerance exceeds MAX_TOLERANCE: an output scaled by 3 or of the wrong sign (a relative
# difference of 2) always fails.
TRAINING_FACTOR = 20
TRAINING_GRADIENT_TOLERANCES = {'float16': 0.1, 'bfloat16': 0.35}  # float32: see TRAINING_FACTOR
MAX_TOLERANCE = 0.5
RUNTIMES = ('eager', 'fused')


@dataclass
class ParityResult:
    variant: str
    bias_mode: str
    height: int
    width: int
    device: str
    dtype: str
    runtime: str
    step: str  # 'inference', 'inference, cached' or 'training'
    errors: List[float]  # one per output; for training, the outputs and then the gradients
    tolerances: List[float]  # one per error
    # Inference: the largest |value| of any module output of the float32 reference, when that
    # is beyond the largest finite value of ``dtype`` (then the dtype cannot hold the reference
    # and the comparison says nothing about the code); else None.
    reference_beyond_range: Optional[float] = None

    @property
    def worst(self) -> int:
        """The index of the error closest to (or furthest above) its tolerance; a NaN error is
        the worst."""
        return max(range(len(self.errors)), key=lambda i: (
            self.errors[i] / self.tolerances[i] if math.isfinite(self.errors[i]) else math.inf))

    @property
    def within_tolerance(self) -> bool:
        return all(e <= t for e, t in zip(self.errors, self.tolerances))

    @property
    def ok(self) -> bool:
        """Within tolerance, or not comparable (:attr:`reference_beyond_range`)."""
        return self.within_tolerance or self.reference_beyond_range is not None

    @property
    def verdict(self) -> str:
        if self.within_tolerance:
            return 'ok'
        if self.reference_beyond_range is not None:
            return (f'not comparable: the reference reaches {self.reference_beyond_range:.3g}, '
                    f'beyond {self.dtype}')
        return 'above'


@torch.inference_mode()
def _reference_outputs(model: torch.nn.Module, x: torch.Tensor,
                       peak_of_modules: bool) -> Tuple[List[torch.Tensor], Optional[float]]:
    """The outputs of a copy of ``model`` (the candidates start with empty caches) and, with
    ``peak_of_modules``, the largest |value| that any of its modules returns."""
    model = copy.deepcopy(model)
    peaks = []

    def record(module, args, output):
        for t in output if isinstance(output, (tuple, list)) else (output, ):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                peaks.append(float(t.abs().max()))

    hooks = ([m.register_forward_hook(record) for m in model.modules()]
             if peak_of_modules else [])
    try:
        outs = [o.clone() for o in model(x)]
    finally:
        for hook in hooks:
            hook.remove()
    return outs, (max(peaks) if peaks else None)


def _gradient_error(reference: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> float:
    """|diff| / |reference| of all parameter gradients together."""
    ref = torch.cat([g.detach().float().cpu().flatten() for g in reference])
    out = torch.cat([g.detach().float().cpu().flatten() for g in grads])
    return float((out - ref).norm() / max(float(ref.norm()), 1e-12))


def _training_step(model: torch.nn.Module, x: torch.Tensor, autocast_dtype: Optional[torch.dtype],
                   frozen_norms: bool = False) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The outputs and parameter gradients of one training step of a copy of ``model``; with
    ``frozen_norms`` its BatchNorms normalise with their running statistics."""
    model = copy.deepcopy(model).to(x.device)
    if frozen_norms:
        model.norm_eval = True
    model.train()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        outs = model(x)
    # A fixed random projection of every output: the gradient of a plain mean would vanish
    # through the final BatchNorms of the stages.
    gen = torch.Generator().manual_seed(0)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).mean()
               for o in outs)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:  # a parameter that no output depends on is a bug of its own
        raise RuntimeError(f'no gradient reached {missing[:5]}')
    return ([o.detach().float().cpu() for o in outs],
            [p.grad for p in model.parameters() if p.requires_grad])


def _training_errors(reference, step) -> List[float]:
    """The relative difference of each output and of the gradients (together) of two training
    steps."""
    return relative_errors(reference[0], step[0]) + [_gradient_error(reference[1], step[1])]


def _moved_by_one_ulp(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every element moved by one ulp in a random direction."""
    up = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    return torch.nextafter(x, torch.where(up, float('inf'), float('-inf')))


class _TF32Off:
    """TF32 off for CUDA matmuls and convolutions inside the block: the float32 check compares
    float32 arithmetic."""

    def __enter__(self):
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved


def nothing_to_check(device: str, dtypes: Sequence[str],
                     runtimes: Sequence[str]) -> Optional[str]:
    """Why these settings would check nothing (float32 eager on CPU is the reference itself,
    and its training step too), or None."""
    if any(device != 'cpu' or dtype != 'float32' or runtime != 'eager'
           for dtype in dtypes for runtime in runtimes):
        return None
    return (f'nothing to check on {device} with dtypes {list(dtypes)} and runtimes '
            f'{list(runtimes)}: float32 eager on CPU is the reference itself; add a dtype '
            f'(bfloat16) or the fused runtime')


def check_variant(variant: str, size: Tuple[int, int], device: str,
                  dtypes: Sequence[str] = ('float32', ), runtimes: Sequence[str] = RUNTIMES,
                  bias_mode: str = 'table', training: bool = True, seed: int = 0,
                  model: Optional[torch.nn.Module] = None) -> List[ParityResult]:
    """Every check of one variant and input size on ``device``, against float32 eager on CPU
    (computed once): inference for each dtype and runtime (the same pair on CPU is skipped),
    and with ``training`` one training step per dtype (eager). ``model`` (a CPU float32
    module) replaces the randomized build of ``variant`` and ``bias_mode``."""
    reason = nothing_to_check(device, dtypes, runtimes)
    if reason:
        raise ValueError(reason)
    if model is None:
        bias_args = {} if bias_mode == 'table' else dict(
            bias_mode=bias_mode, bias_img_size=official_bias_img_size(size))
        model = randomize_(build_model(variant, **bias_args), seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, generator=gen)
    # float16's range (65504) is narrower than the values that random weights can reach.
    reference, peak = _reference_outputs(model, x[:1], 'float16' in dtypes)
    train_references = {}  # frozen_norms -> the float32 CPU step
    results = []

    def result(dtype, runtime, step, errors, tolerances=None):
        beyond = (peak if step != 'training' and peak is not None
                  and peak > torch.finfo(getattr(torch, dtype)).max else None)
        results.append(ParityResult(variant, bias_mode, size[0], size[1], device, dtype, runtime,
                                    step, errors, [min(t, MAX_TOLERANCE) for t in tolerances
                                                   or [TOLERANCES[dtype]] * len(errors)],
                                    beyond))

    with _TF32Off():
        for dtype in dtypes:
            torch_dtype = getattr(torch, dtype)
            for runtime in runtimes:
                if device == 'cpu' and dtype == 'float32' and runtime == 'eager':
                    continue  # the reference itself
                candidate = copy.deepcopy(model)
                if runtime == 'fused':
                    candidate = fuse(candidate)
                elif runtime != 'eager':
                    raise ValueError(f'unknown runtime {runtime!r}; choose from {RUNTIMES}')
                candidate = candidate.to(device=device, dtype=torch_dtype).eval()
                xd = x[:1].to(device=device, dtype=torch_dtype)
                for step in ('inference', 'inference, cached'):
                    with torch.inference_mode():
                        outs = [o.float().cpu() for o in candidate(xd)]
                    result(dtype, runtime, step, relative_errors(reference, outs))
            if training and not (device == 'cpu' and dtype == 'float32'):
                result(dtype, 'eager', 'training',
                       *_training_check(model, x, device, dtype, train_references))
    return results


def _training_check(model: torch.nn.Module, x: torch.Tensor, device: str, dtype: str,
                    references: Dict[bool, tuple]) -> Tuple[List[float], List[float]]:
    """The errors of one training step on ``device`` in ``dtype`` against float32 on CPU, and
    their tolerances (see ``TRAINING_GRADIENT_TOLERANCES``); ``references`` caches the CPU
    steps."""
    frozen = dtype != 'float32'
    if frozen not in references:
        references[frozen] = _training_step(model, x, None, frozen)
    reference = references[frozen]
    # Half dtypes train under autocast, with float32 parameters, as mmengine's
    # AmpOptimWrapper does.
    step = _training_step(model, x.to(device), getattr(torch, dtype) if frozen else None, frozen)
    errors = _training_errors(reference, step)
    if frozen:
        return errors, ([TOLERANCES[dtype]] * (len(errors) - 1)
                        + [TRAINING_GRADIENT_TOLERANCES[dtype]])
    sensitivity = _training_errors(reference, _training_step(model, _moved_by_one_ulp(x), None))
    return errors, [max(TOLERANCES[dtype], TRAINING_FACTOR * e) for e in sensitivity]


def run(variants: Sequence[str], sizes: Sequence[Tuple[int, int]], device: str,
        dtypes: Sequence[str], runtimes: Sequence[str] = RUNTIMES, official_bias: bool = True,
        training: bool = True, progress=print) -> List[ParityResult]:
    """:func:`check_variant` for every variant and size; with ``official_bias`` also
    ``bias_mode='official'`` for EfficientFormer V1 / V2 (inference only: its training path is
    the same as the table mode's apart from the bias)."""
    results = []
    for variant in variants:
        modes = ['table'] + (['official'] if official_bias and
                             not variant.startswith('efficientvit_') else [])
        for size in sizes:
            for mode in modes:
                rows = check_variant(variant, size, device, dtypes, runtimes, mode,
                                     training and mode == 'table')
                for r in rows:
                    e, t = r.errors[r.worst], r.tolerances[r.worst]
                    progress(f'{r.variant} {mode} {r.height}x{r.width} {r.device} {r.dtype} '
                             f'{r.runtime} {r.step}: {e:.2e} (tolerance {t:.1e}) {r.verdict}')
                results += rows
    return results


def to_markdown(results: Sequence[ParityResult], environment: Dict) -> str:
    lines = [f"Device check on {environment.get('gpu') or environment['cpu']}, torch "
             f"{environment['torch']}: relative difference from float32 eager on CPU (per output: "
             f"max |diff| / max |reference|; training: also the gradients' |diff| / "
             f"|reference|), of the output closest to its tolerance.", '',
             '| variant | bias mode | size | device | dtype | runtime | step | rel. diff '
             '| tolerance | |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        lines.append(f'| {r.variant} | {r.bias_mode} | {r.height}x{r.width} | {r.device} | '
                     f'{r.dtype} | {r.runtime} | {r.step} | {r.errors[r.worst]:.2e} | '
                     f'{r.tolerances[r.worst]:.1e} | '
                     f'{r.verdict if r.ok else "**above**"} |')
    within = sum(r.within_tolerance for r in results)
    void = sum(r.ok and not r.within_tolerance for r in results)
    lines += ['', f'{within} of {len(results)} checks within tolerance.']
    if void:
        lines[-1] += (f' {void} not comparable: the float32 reference (random weights) holds '
                      'values beyond the range of their dtype, which overflows there; not a '
                      'defect of the code.')
    return '\n'.join(lines) + '\n'
