"""Backbone behaviour: any input size, train/eval, gradients, checkpointing, freezing, errors."""
import math
import subprocess
import sys

import pytest
import torch

from conftest import ALL_ARCHS, backbone_class
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT

SIZES = [(224, 224), (225, 331), (512, 512), (800, 1344), (37, 53)]


def expected_shapes(model, batch, h, w):
    return [(batch, c, math.ceil(h / s), math.ceil(w / s))
            for c, s in zip(model.out_channels, model.out_strides)]


@pytest.mark.parametrize('family,arch', ALL_ARCHS)
def test_any_size_train_and_eval(family, arch):
    model = backbone_class(family)(arch=arch)
    for mode in ('eval', 'train'):
        getattr(model, mode)()
        batch = 1 if mode == 'eval' else 2  # BN in train mode needs > 1 value per channel
        for h, w in SIZES:
            if mode == 'train' and (h, w) == (800, 1344):
                h, w = 480, 800  # keeps the suite quick; the shape logic is the same
            with torch.no_grad():
                outs = model(torch.randn(batch, 3, h, w))
            assert [tuple(o.shape) for o in outs] == expected_shapes(model, batch, h, w)
            assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('cls,arch', [(EfficientFormer, 'l1'), (EfficientFormerV2, 's0')])
@pytest.mark.parametrize('img', [800, 512])
def test_official_bias_mode_any_size(cls, arch, img):
    model = cls(arch=arch, bias_mode='official', bias_img_size=img).eval()
    for h, w in [(img, img), (225, 331), (37, 53), (800, 1216)]:
        with torch.no_grad():
            outs = model(torch.randn(1, 3, h, w))
        assert [tuple(o.shape) for o in outs] == expected_shapes(model, 1, h, w)


@pytest.mark.parametrize('family,arch', ALL_ARCHS)
def test_backward_reaches_every_parameter(family, arch):
    model = backbone_class(family)(arch=arch).train()
    outs = model(torch.randn(2, 3, 64, 96))
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize('cls,arch', [(EfficientFormer, 'l1'), (EfficientFormerV2, 's0'),
                                      (EfficientViT, 'm0')])
def test_with_cp_gives_same_outputs_and_gradients(cls, arch):
    plain = cls(arch=arch, drop_path_rate=0.).train()
    ckpt = cls(arch=arch, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 128)
    grads = []
    for model in (plain, ckpt):
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.outs = [o.detach() for o in outs]
    for a, b in zip(plain.outs, ckpt.outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('family,arch', [('EfficientFormer', 'l1'), ('EfficientFormerV2', 's0'),
                                         ('EfficientViT', 'm0')])
def test_frozen_stages_get_no_gradients_and_stay_in_eval(family, arch):
    model = backbone_class(family)(arch=arch, frozen_stages=2)
    assert model.train() is model and model.eval() is model
    model.train()
    frozen = [model.stem, model.stages[0], model.stages[1]]
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(m.training for m in model.stages[2].modules())
    stats_before = {k: v.clone() for k, v in model.stages[0].state_dict().items()}
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in outs).backward()
    for module in frozen:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(p.grad is not None for p in model.stages[2].parameters())
    after = model.stages[0].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats_before.items())


def test_norm_eval_keeps_batchnorm_in_eval():
    model = EfficientFormerV2('s0', norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.stages[0].training  # everything else trains


def test_out_indices_and_channels():
    model = EfficientViT('m4', out_indices=(-1, 0))
    assert model.out_indices == (0, 2)
    assert model.out_channels == [128, 384] and model.out_strides == [16, 64]
    assert model.channels == [128, 256, 384]
    outs = model.eval()(torch.randn(1, 3, 128, 160))
    assert [o.shape[1] for o in outs] == [128, 384]


def test_v1_output_norm_is_groupnorm_over_each_level():
    model = EfficientFormer('l1').eval()
    assert all(isinstance(n, torch.nn.GroupNorm) and n.num_groups == 1
               for n in model.out_norms.values())
    outs = model(torch.randn(1, 3, 96, 96))
    raw = model.forward_intermediates(torch.randn(1, 3, 96, 96))
    assert len(outs) == len(raw) == 4
    assert EfficientFormer('l1', out_norm_cfg=None).out_norms is None


@pytest.mark.parametrize('x,match', [
    (torch.randn(1, 1, 64, 64), '3 input channels'),
    (torch.randn(1, 3, 31, 64), 'at least 32x32'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 'floating-point'),
    (torch.randn(3, 64, 64), r'\(N, C, H, W\)'),
])
def test_bad_inputs_raise_value_errors(x, match):
    with pytest.raises(ValueError, match=match):
        EfficientFormerV2('s0')(x)


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match='unexpected keyword'):
        EfficientFormer('l1', depths=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"unknown EfficientViT arch 'm9'.*'m0'"):
        EfficientViT('m9')
    with pytest.raises(ValueError, match='out_indices entry 4 is out of range'):
        EfficientFormer('l1', out_indices=(0, 4))
    with pytest.raises(ValueError, match='frozen_stages=5 is out of range'):
        EfficientFormer('l1', frozen_stages=5)
    with pytest.raises(ValueError, match=r"missing keys \['num_vit'\]"):
        EfficientFormer(dict(depths=[1, 1, 1, 1], widths=[8, 16, 32, 64]))
    with pytest.raises(ValueError, match='bias_img_size'):
        EfficientFormerV2('s0', bias_mode='official')
    with pytest.raises(ValueError, match='bias_mode must be one of'):
        EfficientFormer('l1', bias_mode='interpolated')


def test_custom_arch_dict():
    model = EfficientFormer(dict(depths=[1, 1, 1, 2], widths=[16, 32, 48, 64], num_vit=1))
    outs = model.eval()(torch.randn(1, 3, 70, 90))
    assert [o.shape[1] for o in outs] == [16, 32, 48, 64]


def test_backbones_need_only_torch_and_mmengine():
    code = ('import sys\n'
            'for name in ("mmcv", "mmdet", "mmseg", "timm"): sys.modules[name] = None\n'
            'import torch\n'
            'from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT\n'
            'for m in (EfficientFormer(), EfficientFormerV2(), EfficientViT()):\n'
            '    m.eval()(torch.randn(1, 3, 64, 64))\n'
            'print("ok")\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr


def test_eval_batchnorm_folding_never_goes_stale():
    """Eval runs conv+BN pairs with cached folded weights; the cache must follow every change
    and equal the plain conv -> BN computation."""
    from mmeformer.models.layers import ConvNorm
    layer = ConvNorm(8, 16, 3).eval()
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.)
        layer.bn.weight.normal_()
    x = torch.randn(2, 8, 9, 11)

    def plain():
        return layer.bn(layer.conv(x))

    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(), rtol=1e-5, atol=1e-5)
        layer.bn.running_var.mul_(4.)  # in-place edit of a buffer
        torch.testing.assert_close(layer(x), plain(), rtol=1e-5, atol=1e-5)
        layer.load_state_dict({k: v + 1. if v.is_floating_point() else v
                               for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), plain(), rtol=1e-5, atol=1e-5)
        layer.double()
        assert layer(x.double()).dtype == torch.float64
        layer.float()
    out = layer(x)  # gradients wanted: the unfolded path, with a graph into the BN weight
    out.sum().backward()
    assert layer.bn.weight.grad is not None and layer.conv.weight.grad is not None


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_channels_last_layout_changes_no_numbers(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 100, 164)
    with torch.no_grad():
        fast = model(x)
        model.channels_last = False
        plain = model(x)
    for a, b in zip(fast, plain):
        assert a.is_contiguous()  # consumers such as mmcv's RoIAlign read raw NCHW memory
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_inplace_gelu_only_without_autograd():
    """GELU(inplace=True) overwrites its input only while autograd is off, so training graphs
    keep the input that GELU's backward needs."""
    from mmeformer.models.layers import GELU
    act = GELU(inplace=True)
    nchw = torch.randn(2, 5, 6, 7)
    for x in (nchw, nchw.to(memory_format=torch.channels_last)):
        expected = torch.nn.functional.gelu(x)
        kept = x.clone().requires_grad_()
        out = act(kept)
        out.sum().backward()  # would raise if the saved input had been overwritten
        torch.testing.assert_close(kept.detach(), x)
        with torch.no_grad():
            overwritten = x.clone()
            out = act(overwritten)
        assert out.data_ptr() == overwritten.data_ptr() and out.stride() == x.stride()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(overwritten, expected)


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_inference_equals_eval_with_autograd(cls):
    """The in-place activations, query chunks and caches of no-grad inference give the numbers
    of the plain eval graph, and leave the caller's input untouched."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(1, 3, 96, 160)
    x_before = x.clone()
    with torch.no_grad():
        fast = model(x)
    plain = model(x.requires_grad_())
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_torch_compile_captures_one_graph(cls):
    """Dynamo traces inference and training forwards without graph breaks: the eval caches
    (keyed on tensor storage) and query chunks step aside while compiling."""
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(1, 3, 96, 128)
    try:
        for train in (False, True):
            model.train(train)
            with torch.set_grad_enabled(train):
                explanation = torch._dynamo.explain(model)(x)
            assert explanation.graph_break_count == 0, [
                str(b.reason) for b in explanation.break_reasons]
            assert explanation.graph_count == 1
    finally:
        torch._dynamo.reset()
