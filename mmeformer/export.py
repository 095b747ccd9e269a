"""Export of the EfficientFormer / EfficientFormerV2 / EfficientViT backbones to ONNX,
TorchScript and CoreML, each followed by a numerical check against PyTorch.

The tool exports the fused model (:func:`mmeformer.models.fuse`) unless asked otherwise. A
static-size export freezes the attention biases of that size, so its graph holds no gather or
bicubic resize of the bias tables; a dynamic export computes them from the input size.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .models.deploy import freeze_attention_biases, unfreeze_attention_biases

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_OPSET = 17
TOLERANCE = 1e-4  # largest accepted relative difference (max |diff| / max |reference|)


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


def relative_errors(reference: Sequence[torch.Tensor], outputs: Sequence) -> List[float]:
    """Largest difference of each exported output from PyTorch's, relative to PyTorch's
    largest value; the exported model must return as many outputs of the same shapes."""
    if len(outputs) != len(reference):
        raise ValueError(f'the exported model returns {len(outputs)} outputs, PyTorch '
                         f'{len(reference)}')
    errors = []
    for ref, out in zip(reference, outputs):
        ref = ref.detach().float().numpy()
        out = np.asarray(out, dtype=np.float32)
        if ref.shape != out.shape:
            raise ValueError(f'exported output shape {out.shape} != PyTorch {ref.shape}')
        errors.append(float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return errors


def check_sizes(shape: Tuple[int, int], dynamic: bool) -> List[Tuple[int, int]]:
    """The export size, plus two other (odd, non-square) sizes for a dynamic export."""
    h, w = shape
    return [shape] + ([(h + 32, w + 64), (max(h - 33, 32), max(w - 21, 32))] if dynamic else [])


def verify_onnx(model: nn.Module, path: str, sizes: Sequence[Tuple[int, int]],
                batch: int = 1) -> Dict:
    """Largest relative difference from PyTorch per input size, on ``batch`` images (more than
    one only for an export with a dynamic batch axis)."""
    import onnxruntime as ort  # an extra: only this check needs it
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    results = {}
    for size in sizes:
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            reference = model(x)
        results[size] = max(relative_errors(reference, session.run(None, {'image': x.numpy()})))
    return results


def export_torchscript(model: nn.Module, path: str, shape: Tuple[int, int]) -> None:
    set_attention_biases_for_export(model, shape, dynamic=False)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, *shape), check_trace=False)
    traced.save(path)


def verify_torchscript(model: nn.Module, path: str, sizes: Sequence[Tuple[int, int]]) -> Dict:
    loaded = torch.jit.load(path)
    results = {}
    for size in sizes:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            results[size] = max(relative_errors(model(x), [o.numpy() for o in loaded(x)]))
    return results


class ImageNetNormalize(nn.Module):
    """(x / 255 - mean) / std in front of the backbone, for CoreML ``ImageType`` inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


COREML_HELP = ('coremltools converts on Linux (prediction needs macOS). It was checked here with '
               'coremltools 9.0 and torch 2.13; install it with `pip install coremltools==9.0`.')


def coreml_package_path(path: str) -> str:
    """``path`` as coremltools saves it: an ``.mlpackage`` folder, named without the trailing
    '/' that shells complete (coremltools fails to save to such a name)."""
    stripped = path.rstrip('/') or path
    if not stripped.endswith('.mlpackage'):
        raise ValueError(f'CoreML export writes an ML program package: name {stripped!r} with '
                         f'the .mlpackage extension')
    return stripped


def export_coreml(model: nn.Module, path: str, shape: Tuple[int, int], image_input: bool) -> Dict:
    """Convert the traced model to an ``mlprogram`` ``.mlpackage``.

    ``image_input=True`` (default of the tool): an RGB ``ImageType`` of 0..255 pixels, with the
    ImageNet normalisation folded into the graph; otherwise a float ``TensorType`` that expects
    already-normalised input. Returns a summary of the spec (inputs, outputs, op types).
    """
    path = coreml_package_path(path)
    try:
        import coremltools as ct
    except ImportError as err:
        raise RuntimeError(f'coremltools is not installed. {COREML_HELP}') from err
    # Frozen at the size: coremltools cannot convert the bicubic resize that computes them.
    set_attention_biases_for_export(model, shape, dynamic=False)
    wrapped = ImageNetNormalize(model).eval() if image_input else model
    # torch.export (not jit.trace): coremltools cannot lower the traced size arithmetic.
    with torch.no_grad():
        program = torch.export.export(wrapped, (torch.rand(1, 3, *shape) * 255, ))
    program = program.run_decompositions({})
    names = output_names(model, shape)
    inputs = ([ct.ImageType(name='image', shape=(1, 3, *shape), color_layout=ct.colorlayout.RGB)]
              if image_input else [ct.TensorType(name='image', shape=(1, 3, *shape))])
    try:
        mlmodel = ct.convert(program, inputs=inputs,
                             outputs=[ct.TensorType(name=n) for n in names],
                             convert_to='mlprogram', minimum_deployment_target=ct.target.iOS16)
    except Exception as err:  # noqa: BLE001 - coremltools raises many types; report them all
        raise RuntimeError(f'coremltools {ct.__version__} could not convert this model with '
                           f'torch {torch.__version__}: {err}. {COREML_HELP}') from err
    mlmodel.save(path)
    return inspect_coreml(path)


def inspect_coreml(path: str) -> Dict:
    """What Linux can check of an ``.mlpackage``: its interface and the ops of its program."""
    import coremltools as ct  # an extra, as in export_coreml
    spec = ct.utils.load_spec(path)
    ops = set()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops.update(op.type for op in block.operations)
    return dict(inputs=[i.name for i in spec.description.input],
                outputs=[o.name for o in spec.description.output], ops=sorted(ops))
