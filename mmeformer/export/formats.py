"""One entry point per step, whatever the format: :func:`export_backbone` writes the file,
:func:`load_runtime` runs it here, :func:`verify_export` compares it with PyTorch."""
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .common import (ONNX_OPSET, ExportError, check_request, cosine_similarities,
                     relative_errors)
from .coreml_export import export_coreml
from .litert_export import export_litert, litert_model
from .onnx_export import export_onnx, onnxruntime_model, quantize_onnx
from .openvino_export import (check_openvino_compiles, convert_openvino, openvino_model,
                              quantize_openvino, save_openvino)
from .torchscript_export import export_torchscript, torchscript_model

RUNTIMES = {'onnx': onnxruntime_model, 'openvino': openvino_model, 'litert': litert_model,
            'torchscript': torchscript_model}


def export_backbone(model: nn.Module, fmt: str, path: str, shape: Tuple[int, int], *,
                    dynamic: bool = False, int8: bool = False,
                    calibration: Optional[Sequence[np.ndarray]] = None, nhwc: bool = False,
                    opset: int = ONNX_OPSET, image_input: bool = True) -> Optional[Dict]:
    """Write ``model`` (a backbone, or backbone + neck; fused or not, in eval mode) as ``fmt``.

    Args:
        fmt (str): one of :data:`~mmeformer.export.FORMATS`.
        path (str): the file to write, with the format's suffix.
        shape (tuple[int, int]): the export's input size (H, W); the only one it accepts unless
            ``dynamic``.
        dynamic (bool): any batch and input size (ONNX, OpenVINO). Defaults to False.
        int8 (bool): post-training static int8 quantization. Defaults to False.
        calibration (list[np.ndarray], optional): (1, 3, H, W) inputs for the int8 ranges,
            from :func:`~mmeformer.export.calibration_inputs`; required with ``int8``.
        nhwc (bool): channels-last input and outputs (LiteRT). Defaults to False.
        opset (int): ONNX opset. Defaults to 17.
        image_input (bool): CoreML: an RGB 0..255 image input with the normalisation inside.

    Returns:
        dict | None: for CoreML, the inputs, outputs and op types of the package.

    Raises:
        ExportError: a request the format cannot do, a missing converter, or a conversion that
            failed (with the converter's message, not its stack trace).
    """
    spec = check_request(fmt, dynamic, int8, nhwc)
    if not path.rstrip('/').endswith(spec.suffix):
        raise ExportError(f'a {fmt} export is a {spec.suffix} file: name the output '
                          f'{os.path.splitext(path.rstrip("/"))[0]}{spec.suffix}')
    if int8 and not calibration:
        raise ExportError('int8 quantization needs calibration inputs '
                          '(mmeformer.export.calibration_inputs)')
    model.eval()
    try:
        if fmt == 'onnx' and int8:
            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(model, os.path.join(tmp, 'float.onnx'), shape, dynamic, opset)
                quantize_onnx(os.path.join(tmp, 'float.onnx'), path, calibration)
        elif fmt == 'onnx':
            export_onnx(model, path, shape, dynamic, opset)
        elif fmt == 'openvino':
            converted = convert_openvino(model, shape, dynamic)
            save_openvino(quantize_openvino(converted, calibration) if int8 else converted, path)
            if int8:
                check_openvino_compiles(path)
        elif fmt == 'litert':
            export_litert(model, path, shape, nhwc, calibration if int8 else None)
        elif fmt == 'torchscript':
            export_torchscript(model, path, shape)
        else:
            return export_coreml(model, path, shape, image_input)
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - converters raise anything; report it in one line
        if fmt == 'coreml' and isinstance(err, RuntimeError):
            raise  # export_coreml's own message, which names the fix
        raise _conversion_failed(fmt, err) from err
    return None


def _conversion_failed(fmt: str, err: Exception) -> ExportError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return ExportError(f'{fmt} conversion failed with torch {torch.__version__}: '
                       f'{type(err).__name__}: {first[:300]}')


def load_runtime(fmt: str, path: str,
                 threads: Optional[int] = None) -> Callable[[np.ndarray], List[np.ndarray]]:
    """A function from an input array (NCHW, or NHWC for a channels-last LiteRT file) to the
    list of output arrays, running ``path`` in the format's runtime on this CPU."""
    if fmt not in RUNTIMES:
        raise ExportError(f'{fmt} files do not run here; runnable formats: '
                          f'{", ".join(RUNTIMES)}')
    return RUNTIMES[fmt](path, threads or torch.get_num_threads())


def verify_export(model: nn.Module, fmt: str, path: str, sizes: Sequence[Tuple[int, int]],
                  batch: int = 1, nhwc: bool = False,
                  inputs: Optional[Callable[[Tuple[int, int]], Sequence[np.ndarray]]] = None
                  ) -> Dict:
    """Per input size, the per-level largest relative difference and cosine similarity of the
    exported outputs against ``model``'s, on a random batch of ``batch`` (> 1 only for an export
    with a dynamic batch), or on ``inputs(size)``: images, for int8, whose errors on noise say
    little."""
    run = load_runtime(fmt, path)
    results = {}
    for size in sizes:
        relative, cosine = [], []
        for x in inputs(size) if inputs else [torch.randn(batch, 3, *size).numpy()]:
            with torch.no_grad():
                reference = model(torch.from_numpy(x))
            fed = x.transpose(0, 2, 3, 1).copy() if nhwc else x
            outputs = [o.transpose(0, 3, 1, 2) if nhwc else o for o in run(fed)]
            relative.append(relative_errors(reference, outputs))
            cosine.append(cosine_similarities(reference, outputs))
        results[size] = dict(relative=np.max(relative, axis=0).tolist(),
                             cosine=np.min(cosine, axis=0).tolist())
    return results
