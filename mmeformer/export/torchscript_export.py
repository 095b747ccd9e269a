"""TorchScript: a traced fixed-size module (biases frozen), run with ``torch.jit.load``."""
from typing import Callable, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from .common import set_attention_biases_for_export


def export_torchscript(model: nn.Module, path: str, shape: Tuple[int, int]) -> None:
    set_attention_biases_for_export(model, shape, dynamic=False)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, *shape), check_trace=False)
    traced.save(path)


def torchscript_model(path: str, threads: int) -> Callable[[np.ndarray], List[np.ndarray]]:
    del threads  # TorchScript runs on torch's own thread pool
    loaded = torch.jit.load(path)

    def run(x):
        with torch.no_grad():
            return [o.numpy() for o in loaded(torch.from_numpy(x))]
    return run
