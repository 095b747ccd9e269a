"""What every export format shares: the format table and its checks, output names, the
attention-bias freeze of a fixed-size export, the input wrappers, and the comparison of an
exported model's outputs with PyTorch's."""
import importlib
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..models.deploy import freeze_attention_biases, unfreeze_attention_biases

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_OPSET = 17
TOLERANCE = 1e-4  # largest accepted relative difference (max |diff| / max |reference|)
INSTALL_DEPLOY = "pip install 'mmeformer[deploy]' (make setup installs it)"


class ExportError(ValueError):
    """A request a format cannot do, or a runtime that is not installed; says what to do."""


@dataclass(frozen=True)
class FormatSpec:
    name: str
    suffix: str
    runtime: str  # what runs the file here ('' when nothing on Linux can)
    dynamic: bool  # one file for any input size
    int8: bool
    nhwc: bool  # channels-last input and outputs on request


FORMATS = {
    'onnx': FormatSpec('onnx', '.onnx', 'onnxruntime', dynamic=True, int8=True, nhwc=False),
    'openvino': FormatSpec('openvino', '.xml', 'openvino', dynamic=True, int8=True, nhwc=False),
    'litert': FormatSpec('litert', '.tflite', 'ai_edge_litert', dynamic=False, int8=True,
                         nhwc=True),
    'torchscript': FormatSpec('torchscript', '.pt', 'torch', dynamic=False, int8=False,
                              nhwc=False),
    'coreml': FormatSpec('coreml', '.mlpackage', '', dynamic=False, int8=False, nhwc=False),
}


def check_request(fmt: str, dynamic: bool = False, int8: bool = False,
                  nhwc: bool = False) -> FormatSpec:
    """The format's spec, or an :class:`ExportError` naming what it cannot do and what can."""
    if fmt not in FORMATS:
        raise ExportError(f'unknown format {fmt!r}; choose from {", ".join(FORMATS)}')
    spec = FORMATS[fmt]
    for flag, asked, what in (('dynamic', dynamic, 'a dynamic input size'),
                              ('int8', int8, 'int8 quantization'),
                              ('nhwc', nhwc, 'channels-last (NHWC) input')):
        if asked and not getattr(spec, flag):
            others = [f.name for f in FORMATS.values() if getattr(f, flag)]
            hint = '; for a fixed size, export once per input size' if flag == 'dynamic' else ''
            raise ExportError(f'{fmt} export does not support {what}; formats that do: '
                              f'{", ".join(others)}{hint}')
    return spec


def require(module: str, fmt: str):
    """Import a runtime / converter that lives in the ``deploy`` extra, or say how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExportError(f'{fmt} needs the Python package of {module.split(".")[0]!r}, which '
                          f'is not importable ({err}): {INSTALL_DEPLOY}') from err


def output_names(model: nn.Module, shape: Tuple[int, int]) -> List[str]:
    """``stride4``, ``stride8``, ... for a backbone; ``level0``, ... for a backbone + neck."""
    strides = getattr(model, 'out_strides', None)
    if strides is not None:
        return [f'stride{s}' for s in strides]
    with torch.no_grad():
        outs = model(torch.zeros(1, 3, *shape))
    return [f'level{i}' for i in range(len(outs))]


def set_attention_biases_for_export(model: nn.Module, shape: Tuple[int, int],
                                    dynamic: bool) -> None:
    """A traced graph takes every attention bias that is frozen in ``model`` as a constant
    (:meth:`~mmeformer.models.layers.RelativeBiasAttention.attention_bias`). So a fixed-size
    export freezes those of ``shape``, whatever size the model was fused at (the graph then holds
    no bias gather or bicubic resize), and a dynamic export unfreezes them, since each size
    needs its own. Outputs do not change: frozen biases are a cache."""
    model.eval()
    if dynamic:
        unfreeze_attention_biases(model)
    else:
        freeze_attention_biases(model, shape)


class ChannelsLast(nn.Module):
    """NHWC in and out, as Android / TFLite pipelines feed and read tensors; the converter folds
    the transposes into its own layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(o.permute(0, 2, 3, 1) for o in self.model(x.permute(0, 3, 1, 2)))


class ImageNetNormalize(nn.Module):
    """(x / 255 - mean) / std in front of the backbone, for CoreML ``ImageType`` inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def _pairs(reference: Sequence[torch.Tensor], outputs: Sequence):
    if len(outputs) != len(reference):
        raise ValueError(f'the exported model returns {len(outputs)} outputs, PyTorch '
                         f'{len(reference)}')
    for ref, out in zip(reference, outputs):
        ref = ref.detach().float().cpu().numpy() if torch.is_tensor(ref) else np.asarray(ref)
        out = np.asarray(out, dtype=np.float32)
        if ref.shape != out.shape:
            raise ValueError(f'exported output shape {out.shape} != PyTorch {ref.shape}')
        yield ref.astype(np.float64), out.astype(np.float64)


def relative_errors(reference: Sequence[torch.Tensor], outputs: Sequence) -> List[float]:
    """Largest difference of each exported output from PyTorch's, relative to PyTorch's
    largest value; the exported model must return as many outputs of the same shapes."""
    return [float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
            for ref, out in _pairs(reference, outputs)]


def cosine_similarities(reference: Sequence[torch.Tensor], outputs: Sequence) -> List[float]:
    """Cosine similarity of each whole output with PyTorch's (1.0 = same direction): the
    usual yardstick of a quantized feature map, where the largest difference says little."""
    return [float((ref * out).sum() / max(np.linalg.norm(ref) * np.linalg.norm(out), 1e-30))
            for ref, out in _pairs(reference, outputs)]


def check_sizes(shape: Tuple[int, int], dynamic: bool) -> List[Tuple[int, int]]:
    """The export size, plus two other (odd, non-square) sizes for a dynamic export."""
    h, w = shape
    return [shape] + ([(h + 32, w + 64), (max(h - 33, 32), max(w - 21, 32))] if dynamic else [])


def per_level(errors: Dict[Tuple[int, int], Dict[str, List[float]]]) -> Dict[str, List[float]]:
    """Worst value per level over the checked sizes: the largest relative difference, the
    smallest cosine similarity."""
    rows = list(errors.values())
    return dict(relative=[max(r['relative'][i] for r in rows)
                          for i in range(len(rows[0]['relative']))],
                cosine=[min(r['cosine'][i] for r in rows) for i in range(len(rows[0]['cosine']))])
