"""Mixed precision: under CPU autocast (float16 and bfloat16) every softmax, LayerNorm and
GroupNorm of the backbones runs in float32, forward and backward, and nothing turns NaN;
``tools/train.py --amp`` trains the toy models on CPU with finite losses.

Precision is observed with a ``TorchDispatchMode``, which sees every ATen op below autocast,
i.e. with the dtypes autocast actually chose."""
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import train_command
from torch.utils._python_dispatch import TorchDispatchMode

from mmeformer.datasets import make_toy_data
from mmeformer.engine import LaunchError, build_runner, load_config
from mmeformer.engine.amp import AMP_DTYPES
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT

REPO = Path(__file__).resolve().parents[1]
LOW = (torch.float16, torch.bfloat16)
NORMALISING_OPS = ('_softmax', '_safe_softmax', '_softmax_backward_data', 'native_layer_norm',
                   'native_layer_norm_backward', 'native_group_norm', 'native_group_norm_backward')
# Fused attention kernels: their softmax accumulates in float32 for half inputs.
FUSED_ATTENTION_OPS = ('_scaled_dot_product_flash_attention_for_cpu',
                       '_scaled_dot_product_flash_attention_for_cpu_backward')
LOW_PRECISION_OPS = ('convolution', 'mm', 'addmm', 'bmm', 'baddbmm')


class PrecisionRecorder(TorchDispatchMode):
    """Records the input dtypes of softmax / layer norm / group norm ops, and how many matrix
    products and convolutions ran in a low precision (to prove autocast was on)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.fused_attention = 0
        self.low_precision_products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        if name in NORMALISING_OPS:
            self.calls.append((name, dtypes))
        elif name in FUSED_ATTENTION_OPS:
            self.fused_attention += 1
        elif name in LOW_PRECISION_OPS and dtypes and dtypes[0] in LOW:
            self.low_precision_products += 1
        return func(*args, **(kwargs or {}))

    def not_float32(self):
        return sorted({(name, str(dtypes[0])) for name, dtypes in self.calls
                       if dtypes[0] != torch.float32})

    def count(self, *prefixes):
        return sum(name.startswith(prefixes) for name, _ in self.calls)


def test_recorder_sees_a_low_precision_softmax():
    """Control: the check below would catch a softmax or LayerNorm left in half precision."""
    x = torch.randn(2, 8, 16)
    with torch.autocast('cpu', dtype=torch.float16), PrecisionRecorder() as rec:
        y = torch.nn.functional.linear(x, torch.randn(16, 16))  # autocast: float16 out
        y.softmax(-1)
        torch.nn.functional.layer_norm(y, (16, ))
    assert rec.not_float32() == [('_softmax', 'torch.float16'),
                                 ('native_layer_norm', 'torch.float16')]


FAMILY_MODELS = {'EfficientFormer': (EfficientFormer, 'l1'),
                 'EfficientFormerV2': (EfficientFormerV2, 's0'),
                 'EfficientViT': (EfficientViT, 'm0')}


@pytest.mark.parametrize('dtype', LOW, ids=str)
@pytest.mark.parametrize('family', list(FAMILY_MODELS))
def test_autocast_keeps_softmax_and_norms_in_float32(family, dtype):
    cls, arch = FAMILY_MODELS[family]
    model = cls(arch=arch, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 96)
    with torch.autocast('cpu', dtype=dtype), PrecisionRecorder() as rec:
        outs = model(x)
        loss = sum(o.float().square().mean() for o in outs)
    with PrecisionRecorder() as rec_backward:
        loss.backward()
    assert rec.low_precision_products > 0  # autocast did run the products in `dtype`
    assert rec.count('_softmax', '_safe_softmax') + rec.fused_attention > 0
    if family == 'EfficientFormer':  # LayerNorm in the attention blocks, GroupNorm out norms
        assert rec.count('native_layer_norm') > 0 and rec.count('native_group_norm') > 0
    assert rec.not_float32() == [], f'ran in low precision under autocast: {rec.not_float32()}'
    assert rec_backward.not_float32() == [], rec_backward.not_float32()
    assert all(torch.isfinite(o).all() for o in outs)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope='module')
def toy_ade(tmp_path_factory):
    root = tmp_path_factory.mktemp('amp_toy')
    make_toy_data(str(root / 'data' / 'toy'), num_train=4, num_val=2, tasks=('ade', ))
    return root


def _finite_history(runner, key):
    values = runner.message_hub.get_scalar(key).data[0]
    return [float(v) for v in values]


def _shrink_segmentation(cfg, size=64):
    """64 px crops instead of the toy 160 (CPU float16 convolutions are slow)."""
    cfg.model.data_preprocessor.size = (size, size)
    for step in cfg.train_dataloader.dataset.pipeline:
        if step.type == 'RandomResize':
            step.scale = (2 * size, size)
        elif step.type == 'RandomCrop':
            step.crop_size = (size, size)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_amp_training_on_toy_data(dtype, toy_ade, tmp_path, monkeypatch):
    """Toy Semantic FPN + EfficientFormer-L1 (attention, LayerNorm, GroupNorm), 3 iterations
    under ``--amp``: the CPU wrapper is used, softmax / norms stay float32, losses and weights
    stay finite, and the float16 loss scale is saved with the optimizer."""
    monkeypatch.chdir(toy_ade)
    config = REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_eformer_l1.py'
    cfg = load_config(str(config), work_dir=str(tmp_path / 'work'), amp=dtype, cfg_options={
        'train_cfg.max_iters': 3, 'train_cfg.val_interval': 100,
        'default_hooks.checkpoint.interval': 3, 'default_hooks.logger.interval': 1,
        'train_dataloader.batch_size': 2})
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.experiment_name = f'amp_{dtype}'
    _shrink_segmentation(cfg)
    runner = build_runner(cfg)
    with PrecisionRecorder() as rec:
        runner.train()
    assert type(runner.optim_wrapper).__name__ == 'CPUAmpOptimWrapper'
    assert runner.optim_wrapper.cast_dtype is getattr(torch, dtype)
    assert rec.low_precision_products > 0
    assert rec.count('native_layer_norm') > 0 and rec.count('_softmax', '_safe_softmax') > 0
    assert rec.not_float32() == [], rec.not_float32()
    losses = _finite_history(runner, 'train/loss')
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in runner.model.parameters())
    checkpoint = torch.load(str(tmp_path / 'work' / 'iter_3.pth'), map_location='cpu',
                            weights_only=True)
    if dtype == 'float16':
        assert checkpoint['optimizer']['loss_scaler']['scale'] > 0
    else:
        assert 'loss_scaler' not in checkpoint['optimizer']


def test_train_tool_amp_option_on_cpu(toy_ade, tmp_path):
    """``tools/train.py --amp-dtype bfloat16`` (CLI path) trains on CPU with finite losses."""
    config = REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_efficientvit_m4.py'
    proc = subprocess.run(
        train_command(config, tmp_path / 'work', '--amp-dtype', 'bfloat16', '--cfg-options',
                      'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
                      'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
                      'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=2',
                      'train_dataloader.batch_size=2'),
        cwd=toy_ade, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'mixed precision: mmeformer.CPUAmpOptimWrapper with dtype bfloat16' in log
    losses = [float(v) for v in re.findall(r'Iter\(train\) \[\s*\d+/2\].*? loss: (\S+)', log)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), log[-3000:]


def test_float16_dynamic_loss_scale_skips_overflowing_steps():
    """float16 on CPU with dynamic loss scaling: a step whose gradients overflow is skipped and
    the scale halved; a finite step updates the weights; the scale survives a state round trip."""
    from mmeformer.engine import CPUAmpOptimWrapper
    param = torch.nn.Parameter(torch.ones(4))
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD([param], lr=0.1))
    scale = wrapper.loss_scaler.get_scale()
    wrapper.update_params((param * float('inf')).sum())  # overflowing gradients
    assert torch.equal(param.detach(), torch.ones(4))
    assert wrapper.loss_scaler.get_scale() == scale / 2
    wrapper.update_params((param * 2.).sum())  # gradient 2 per entry
    torch.testing.assert_close(param.detach(), torch.full((4, ), 0.8))
    restored = CPUAmpOptimWrapper(optimizer=torch.optim.SGD([param], lr=0.1))
    restored.load_state_dict(wrapper.state_dict())
    assert restored.loss_scaler.get_scale() == scale / 2



def test_cpu_amp_refuses_a_two_stage_detector_with_the_fix():
    """The RPN's nms (mmcv, CPU) takes float32 only: --amp on CPU would fail in the first
    iteration deep inside mmcv, so the launch is refused with the fix instead."""
    config = REPO / 'configs' / 'detection' / 'toy' / 'maskrcnn_eformer_l1.py'
    for dtype in AMP_DTYPES:
        with pytest.raises(LaunchError, match='two-stage detector.*drop --amp'):
            load_config(str(config), amp=dtype)
