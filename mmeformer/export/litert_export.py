"""LiteRT (TFLite): a ``.tflite`` flatbuffer converted with ``litert-torch``, run with the
LiteRT interpreter (XNNPACK on CPU); int8 through PyTorch's PT2E static quantization."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .common import ChannelsLast, require, set_attention_biases_for_export


def export_litert(model: nn.Module, path: str, shape: Tuple[int, int], nhwc: bool = False,
                  calibration: Optional[Sequence[np.ndarray]] = None) -> None:
    """A fixed-size model (LiteRT has no dynamic spatial sizes). ``nhwc``: channels-last input
    and outputs. ``calibration`` (NCHW inputs): int8 weights and activations, per-channel
    symmetric, with the ranges observed on those inputs."""
    litert_torch = require('litert_torch', 'litert')
    litert_torch.config.show_progress = False  # its per-pass progress lines
    set_attention_biases_for_export(model, shape, dynamic=False)
    net = (ChannelsLast(model) if nhwc else model).eval()
    example = torch.randn(1, *shape, 3) if nhwc else torch.randn(1, 3, *shape)
    quant_config = None
    if calibration is not None:
        net, quant_config = _quantize_pt2e(net, example, calibration, nhwc)
    with torch.no_grad():
        converted = litert_torch.convert(net, (example, ), quant_config=quant_config)
    converted.export(path)


def _quantize_pt2e(net: nn.Module, example: torch.Tensor, calibration: Sequence[np.ndarray],
                   nhwc: bool):
    # Function-level: the deploy extra, whose presence export_litert checked (require).
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    with torch.no_grad():
        graph = torch.export.export(net, (example, )).module()
        graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
        for x in calibration:
            x = torch.from_numpy(x)
            graph(x.permute(0, 2, 3, 1).contiguous() if nhwc else x)
        graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    move_exported_model_to_eval(graph)  # an exported graph has no .eval() of its own
    return graph, QuantConfig(pt2e_quantizer=quantizer)


def litert_model(path: str, threads: int) -> Callable[[np.ndarray], List[np.ndarray]]:
    interpreter = require('ai_edge_litert.interpreter', 'litert')
    runner = interpreter.Interpreter(model_path=path, num_threads=threads).get_signature_runner()
    (input_name, input_detail), = runner.get_input_details().items()
    output_details = runner.get_output_details()
    # output_0, output_1, ...: in the order the model returns them.
    order = sorted(output_details, key=lambda k: int(k.rsplit('_', 1)[-1]))

    def run(x):
        outputs = runner(**{input_name: _quantize(x, input_detail)})
        return [_dequantize(outputs[k], output_details[k]) for k in order]
    return run


def _quantize(x: np.ndarray, detail: Dict) -> np.ndarray:
    """A float input for a fully int8 model (PT2E quantizes the input and outputs too), with
    the scale and zero point stored in the file, as an app would feed it."""
    if not np.issubdtype(detail['dtype'], np.integer):
        return x
    scale, zero_point = detail['quantization']
    info = np.iinfo(detail['dtype'])
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(detail['dtype'])


def _dequantize(y: np.ndarray, detail: Dict) -> np.ndarray:
    if not np.issubdtype(detail['dtype'], np.integer):
        return y
    scale, zero_point = detail['quantization']
    return (y.astype(np.float32) - zero_point) * np.float32(scale)
