"""What ``--compare`` times beside mmeformer: timm's models and the re-implementation of the
official dense code, and the candidates (mmeformer's runtimes plus those references) of one
variant and input size."""
import copy
import functools
import os
from typing import Callable, List, Sequence, Tuple

import torch

from mmeformer.builder import build_model
from mmeformer.export import (FORMATS, ExportError, calibration_inputs, export_backbone,
                              load_runtime)
from mmeformer.models import fuse

from .official_reference import build_official_reference
from .randomize import randomize_

# Deployment runtimes and the export format each runs (fused, fixed-size files).
EXPORTED = {'onnxruntime': 'onnx', 'openvino': 'openvino', 'litert': 'litert'}
INT8_SUFFIX = '-int8'
RUNTIMES = ('eager', 'fused', 'compile', *EXPORTED, *(r + INT8_SUFFIX for r in EXPORTED))
# Latency does not depend on the calibration set; a few images keep int8 exports quick.
BENCHMARK_CALIBRATION_IMAGES = 4


def official_bias_img_size(size: Tuple[int, int]) -> int:
    """``bias_img_size`` of the released dense weights for inputs of ``size``: 800 (COCO) at
    detection sizes, 512 (ADE20K) below."""
    return 800 if max(size) >= 640 else 512


class TimmFeatures(torch.nn.Module):
    """A timm model returning its multi-scale features (``forward_intermediates``), as a module
    so that it moves with ``.to()`` like the others."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_intermediates(x, intermediates_only=True)


def timm_model(variant: str) -> TimmFeatures:
    import timm  # an extra: only --compare needs it
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
                      else '', lambda: timm_model(variant)))
    if not variant.startswith('efficientvit_') and size != (224, 224):
        bias_img_size = official_bias_img_size(size)
        items.append(('mmeformer official-bias', 'eager',
                      f"bias_mode='official', bias_img_size={bias_img_size}",
                      lambda: build_model(variant, bias_mode='official',
                                          bias_img_size=bias_img_size)))
        items.append(('official (re-implemented)', 'eager',
                      'benchmarks/official_reference.py: bias gathered + resized every forward',
                      lambda: build_official_reference(base.family, base.arch['name'],
                                                       bias_img_size).eval()))
    return items


def _raise(err: Exception, *args):
    raise err


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
        elif runtime.removesuffix(INT8_SUFFIX) in EXPORTED:
            fmt = EXPORTED[runtime.removesuffix(INT8_SUFFIX)]
            int8 = runtime.endswith(INT8_SUFFIX)
            path = os.path.join(workdir, f'{variant}_{size[0]}x{size[1]}_{runtime}'
                                f'{FORMATS[fmt].suffix}')
            calibration = (calibration_inputs(size, count=BENCHMARK_CALIBRATION_IMAGES)
                           if int8 else None)
            # int8 quantizes weights of a trained model's scale: on the initial ones EfficientViT's
            # residual branches are off (zero BN scales), which crashes OpenVINO's CPU plugin.
            # The exporters freeze the attention biases of the size themselves.
            model = copy.deepcopy(base)
            try:
                export_backbone(fuse(randomize_(model) if int8 else model), fmt, path, size,
                                int8=int8, calibration=calibration)
                run = load_runtime(fmt, path, torch.get_num_threads())
            except ExportError as err:  # the timing loop reports a candidate whose call fails
                run = functools.partial(_raise, err)
            items.append(('mmeformer', runtime, lambda x, run=run: run(x.cpu().numpy()),
                          f'static-size fused export{", int8" if int8 else ""}'))
        else:
            raise ValueError(f'unknown runtime {runtime!r}; choose from {RUNTIMES}')
    if compare:
        items += [(implementation, runtime, build(), note)
                  for implementation, runtime, note, build in reference_builders(variant, base,
                                                                                  size)]
    return items
