"""CoreML: an ML program package converted on Linux; prediction needs macOS, so the check
here inspects the spec."""
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .common import ImageNetNormalize, output_names, set_attention_biases_for_export


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
