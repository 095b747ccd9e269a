"""The switch of mmeformer's inference fast paths, and the states that make them step aside.

Every shortcut that eager CPU / GPU inference takes over the plain eval graph (folded
BatchNorms, oneDNN fused kernels, cached attention biases, query-chunked attention, the
banded bicubic resize, in-place activations, fused residual ops) asks
:func:`fast_paths_enabled` first, so ``fast_paths(False)`` runs the textbook forward for
debugging. The outputs are equal either way up to float rounding (tested).
"""
from typing import Optional

import torch

_state = {'enabled': True}


class fast_paths:  # noqa: N801 - used like a function: fast_paths(False)
    """Switch all inference fast paths on or off for the whole process.

    ``fast_paths(False)`` switches them off until ``fast_paths(True)``; used as a context
    manager (``with fast_paths(False): ...``) it restores the previous setting on exit.

    Example:
        >>> import torch
        >>> from mmeformer.models import EfficientFormerV2, fast_paths
        >>> model = EfficientFormerV2('s0').eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> with torch.no_grad():
        ...     fast = model(x)
        ...     with fast_paths(False):
        ...         plain = model(x)
        >>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, plain))
        True
    """

    def __init__(self, enabled: bool):
        self._previous = _state['enabled']
        _state['enabled'] = bool(enabled)

    def __enter__(self) -> 'fast_paths':
        return self

    def __exit__(self, *exc) -> None:
        _state['enabled'] = self._previous


def fast_paths_enabled() -> bool:
    """Whether the inference fast paths may run (see :class:`fast_paths`)."""
    return _state['enabled']


def is_tracing() -> bool:
    """True while torch.jit.trace / the TorchScript ONNX exporter or torch.export records the
    graph: shape branches must then be avoided so that one export serves every input size, and
    the eager-only paths (caches, channels-last views, query chunks) stay out of the graph."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces: the eval caches, keyed on tensor storage and
    version, would break the graph, so their contents are computed in the graph instead."""
    return torch.compiler.is_compiling()


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd records an op on any of ``tensors`` (None entries ignored): the
    eval-only shortcuts (folded weights, cached biases, no-autograd kernels) must then step
    aside."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_fast_path() -> bool:
    """The fast paths are on and nothing records a graph (tracing, export, torch.compile)."""
    return _state['enabled'] and not is_tracing() and not is_compiling()


def tensor_state(t: Optional[torch.Tensor]) -> tuple:
    """(storage, in-place version) of ``t``: a cache keyed on it never outlives an in-place
    change made through ``t`` (writes through ``.data`` and edits of inference tensors leave no
    trace; call ``model.eval()`` after those)."""
    if t is None:
        return ()
    # Inference tensors (made under torch.inference_mode) have no version counter.
    return (t.data_ptr(), 0 if t.is_inference() else t._version)
