"""Mixed-precision training on CPU.

mmengine's ``AmpOptimWrapper`` needs a GPU (it asserts CUDA / NPU / MLU / MUSA) and its
``autocast`` allows only bfloat16 on CPU. :class:`CPUAmpOptimWrapper` runs the forward pass
under ``torch.autocast('cpu', dtype)`` with float16 or bfloat16 and, for float16, scales the
loss with ``torch.amp.GradScaler('cpu')`` (dynamic: steps whose gradients overflow are skipped
and the scale is lowered). bfloat16 has the exponent range of float32 and needs no scaling.

``tools/train.py --amp [--amp-dtype float16|bfloat16]`` picks mmengine's ``AmpOptimWrapper`` on a
GPU and this wrapper on CPU (:func:`mmeformer.engine.runner.load_config`). What runs in which
precision under CPU autocast (torch 2.13) is measured in ``tests/test_reliability_amp.py``:
convolutions and matrix products in the low dtype; the softmax inside
``F.scaled_dot_product_attention`` in float32; plain ``softmax``, ``layer_norm`` and
``group_norm`` in whatever dtype their input has (CPU autocast does not promote them).
"""
from contextlib import contextmanager
from typing import Union

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper

from ..registry import OPTIM_WRAPPERS

AMP_DTYPES = ('float16', 'bfloat16')


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` with CPU autocast and, for float16, dynamic loss scaling.

    Args:
        dtype: ``'float16'`` (default) or ``'bfloat16'``.
        loss_scale: float16 only: ``'dynamic'`` (default), a fixed initial scale (float) or a
            dict of ``torch.amp.GradScaler`` arguments.
        **kwargs: arguments of :class:`mmengine.optim.OptimWrapper` (``optimizer``,
            ``clip_grad``, ``accumulative_counts``).
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'float16',
                 loss_scale: Union[str, float, dict] = 'dynamic', **kwargs):
        super().__init__(**kwargs)
        name = str(dtype).replace('torch.', '')
        if name not in AMP_DTYPES:
            raise ValueError(f'CPUAmpOptimWrapper: dtype must be one of {AMP_DTYPES}, got '
                             f'{dtype!r}')
        self.cast_dtype = getattr(torch, name)
        self._fixed_scale = None
        self.loss_scaler = None
        if self.cast_dtype is torch.float16:
            if loss_scale == 'dynamic':
                scaler_args = {}
            elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
                self._fixed_scale = float(loss_scale)
                scaler_args = dict(init_scale=float(loss_scale))
            elif isinstance(loss_scale, dict):
                scaler_args = dict(loss_scale)
            else:
                raise TypeError(f"loss_scale must be 'dynamic', a number or a dict of "
                                f'GradScaler arguments, got {loss_scale!r}')
            self.loss_scaler = torch.amp.GradScaler('cpu', **scaler_args)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.loss_scaler is not None:
            loss = self.loss_scaler.scale(loss)
        loss.backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        if self.loss_scaler is None:
            super().step(**kwargs)
            return
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)  # clip the true gradients
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._fixed_scale)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.loss_scaler is not None:
            state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler_state = state_dict.pop('loss_scaler', None)
        if scaler_state is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler_state)
        super().load_state_dict(state_dict)

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
