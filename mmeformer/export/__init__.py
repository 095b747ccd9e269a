"""Export of the EfficientFormer / EfficientFormerV2 / EfficientViT backbones (optionally with
their neck) to ONNX, OpenVINO, LiteRT (TFLite), TorchScript and CoreML, float32 or int8, each
checked against PyTorch in its own runtime.

The tool exports the fused model (:func:`mmeformer.models.fuse`) unless asked otherwise. A
static-size export freezes the attention biases of that size, so its graph holds no gather or
bicubic resize of the bias tables; a dynamic export computes them from the input size. The
converters and runtimes other than ONNX's live in the ``deploy`` extra.

Example:
    >>> import torch
    >>> from mmeformer.models import create_backbone, fuse
    >>> from mmeformer.export import export_backbone, verify_export
    >>> model = fuse(create_backbone('efficientvit_m0').eval())
    >>> export_backbone(model, 'onnx', '/tmp/m0.onnx', (128, 128))
    >>> errors = verify_export(model, 'onnx', '/tmp/m0.onnx', [(128, 128)])
    >>> max(errors[(128, 128)]['relative']) < 1e-4
    True
"""
from .calibration import calibration_inputs
from .common import (FORMATS, IMAGENET_MEAN, IMAGENET_STD, ONNX_OPSET, TOLERANCE, ChannelsLast,
                     ExportError, ImageNetNormalize, check_request, check_sizes,
                     cosine_similarities, output_names, per_level, relative_errors,
                     set_attention_biases_for_export)
from .coreml_export import COREML_HELP, coreml_package_path, export_coreml, inspect_coreml
from .formats import export_backbone, load_runtime, verify_export
from .onnx_export import export_onnx
from .torchscript_export import export_torchscript

__all__ = [
    'FORMATS', 'IMAGENET_MEAN', 'IMAGENET_STD', 'ONNX_OPSET', 'TOLERANCE', 'COREML_HELP',
    'ChannelsLast', 'ExportError', 'ImageNetNormalize', 'calibration_inputs', 'check_request',
    'check_sizes', 'coreml_package_path', 'cosine_similarities', 'export_backbone',
    'export_coreml', 'export_onnx', 'export_torchscript', 'inspect_coreml', 'load_runtime',
    'output_names', 'per_level', 'relative_errors', 'set_attention_biases_for_export',
    'verify_export'
]
