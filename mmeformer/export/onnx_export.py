"""ONNX: the TorchScript-based exporter, ONNX Runtime, and int8 QDQ quantization with ONNX
Runtime's static quantizer."""
import os
import tempfile
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .common import ONNX_OPSET, output_names, require, set_attention_biases_for_export

# Weights and activations of these ops become int8; Softmax, LayerNorm, GELU, the residual adds
# and the (constant) attention biases stay float, where int8 ranges lose the most.
ONNX_INT8_OPS = ('Conv', 'MatMul', 'Gemm')


def export_onnx(model: nn.Module, path: str, shape: Tuple[int, int], dynamic: bool,
                opset: int = ONNX_OPSET) -> List[str]:
    """TorchScript-based exporter (``dynamo=False``), chosen explicitly: it keeps the input size
    symbolic through our shape arithmetic; one named output per level."""
    set_attention_biases_for_export(model, shape, dynamic)
    names = output_names(model, shape)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic_axes.update({n: {0: 'batch', 2: f'{n}_h', 3: f'{n}_w'} for n in names})
    torch.onnx.export(model, (torch.randn(1, 3, *shape), ), path, dynamo=False,
                      opset_version=opset, input_names=['image'], output_names=names,
                      dynamic_axes=dynamic_axes)
    return names


def quantize_onnx(float_path: str, path: str, calibration: Sequence[np.ndarray]) -> None:
    """Static int8 quantization of an exported float model: QDQ format, per-channel symmetric
    int8 weights, asymmetric uint8 activations with min/max ranges from ``calibration``."""
    quantization = require('onnxruntime.quantization', 'onnx --int8')
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, 'prepared.onnx')
        # Shape inference and graph clean-up first, as ONNX Runtime's quantizer recommends.
        quantization.shape_inference.quant_pre_process(float_path, prepared,
                                                       skip_symbolic_shape=True)
        reader = _Feed(calibration)
        quantization.quantize_static(
            prepared, path, reader, quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=list(ONNX_INT8_OPS), per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8)


class _Feed:
    """ONNX Runtime's CalibrationDataReader protocol over a list of inputs."""

    def __init__(self, inputs: Sequence[np.ndarray]):
        self._inputs = iter(inputs)

    def get_next(self):
        x = next(self._inputs, None)
        return None if x is None else {'image': x}


def onnxruntime_model(path: str, threads: int) -> Callable[[np.ndarray], List[np.ndarray]]:
    ort = require('onnxruntime', 'onnx')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle ONNX Runtime threads spin by default and take the cores from whatever runs next
    # (the rest of a detector, or the next candidate of a benchmark round).
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return lambda x: session.run(None, {'image': x})
