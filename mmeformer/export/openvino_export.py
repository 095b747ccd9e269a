"""OpenVINO: an IR (``.xml`` + ``.bin``) converted from the PyTorch module, run on the CPU
plugin, and int8 quantization with NNCF's post-training quantization."""
import os
import subprocess
import sys
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .common import ExportError, output_names, require, set_attention_biases_for_export

# float32 asked for: on CPUs with bfloat16 / AMX units the plugin picks a reduced inference
# precision by default, and the outputs then differ by 1e-2.
CPU_CONFIG = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY'}
# Compiles an IR as openvino_model does, in a child process: a crash of the CPU plugin there
# cannot take the caller with it.
_COMPILE_CHECK = ("import sys, openvino as ov; "
                  f"ov.Core().compile_model(sys.argv[1], 'CPU', {CPU_CONFIG!r})")


def convert_openvino(model: nn.Module, shape: Tuple[int, int], dynamic: bool):
    """The in-memory ``openvino.Model``, its input named ``image`` and outputs like ONNX's."""
    ov = require('openvino', 'openvino')
    set_attention_biases_for_export(model, shape, dynamic)
    names = output_names(model, shape)
    spec = [-1, 3, -1, -1] if dynamic else [1, 3, *shape]
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=torch.randn(1, 3, *shape),
                                     input=[ov.PartialShape(spec)])
    converted.inputs[0].get_tensor().set_names({'image'})
    for output, name in zip(converted.outputs, names):
        output.get_tensor().set_names({name})
    return converted


def save_openvino(converted, path: str) -> None:
    ov = require('openvino', 'openvino')
    # save_model halves the weights to float16 unless told not to.
    ov.save_model(converted, path, compress_to_fp16=False)


def quantize_openvino(converted, calibration: Sequence[np.ndarray]):
    """NNCF post-training int8 quantization, with the transformer model type that keeps
    Softmax, LayerNorm and the other precision-sensitive ops of attention in float."""
    nncf = require('nncf', 'openvino --int8')
    return nncf.quantize(converted, nncf.Dataset(list(calibration)),
                         model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))


def check_openvino_compiles(path: str) -> None:
    """Compile the IR at ``path`` on the CPU plugin in a child process, and remove it with an
    :class:`ExportError` when the plugin crashes there: OpenVINO 2026.4's CPU plugin dies with
    SIGSEGV compiling NNCF's int8 EfficientViT with its initial weights, whose residual branches
    output exactly zero (docs/deploy.md, known limits)."""
    proc = subprocess.run([sys.executable, '-c', _COMPILE_CHECK, path], capture_output=True,
                          text=True)
    if proc.returncode == 0:
        return
    for name in (path, os.path.splitext(path)[0] + '.bin'):
        if os.path.exists(name):
            os.remove(name)
    how = (f'crashed (signal {-proc.returncode})' if proc.returncode < 0 else
           f'failed: {(proc.stderr.strip().splitlines() or ["no message"])[-1]}')
    raise ExportError(f'the OpenVINO CPU plugin {how} compiling the int8 model, so no file was '
                      'kept; export it in float32 for OpenVINO, or in int8 for onnx or litert '
                      '(seen with initial weights: quantize a trained checkpoint)')


def openvino_model(path: str, threads: int) -> Callable[[np.ndarray], List[np.ndarray]]:
    ov = require('openvino', 'openvino')
    compiled = ov.Core().compile_model(path, 'CPU',
                                       dict(CPU_CONFIG, INFERENCE_NUM_THREADS=threads))
    request = compiled.create_infer_request()

    def run(x):
        results = request.infer({0: x})
        return [np.array(results[output]) for output in compiled.outputs]
    return run
