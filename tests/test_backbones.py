"""Backbone behaviour: any input size, train/eval, gradients, checkpointing, freezing, errors."""
import math
import subprocess
import sys

import pytest
import torch

from conftest import ALL_ARCHS, backbone_class
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT
from benchmarks.randomize import randomize_

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


@pytest.mark.parametrize('cls,arch', [(EfficientFormer, 'l1'), (EfficientFormerV2, 's0'),
                                      (EfficientViT, 'm0')])
def test_training_step_at_odd_sizes(cls, arch):
    """The autograd path (no caches, no fused kernels) at sizes whose stride-16 grid is odd,
    where the official V2 code crashes."""
    model = cls(arch=arch).train()
    for h, w in [(225, 331), (37, 53)]:
        model.zero_grad()
        outs = model(torch.randn(2, 3, h, w))
        assert [tuple(o.shape) for o in outs] == expected_shapes(model, 2, h, w)
        sum(o.square().mean() for o in outs).backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


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
    """Same outputs, gradients and BatchNorm statistics after a step, with far fewer tensors
    kept for backward (the blocks really are checkpointed)."""
    plain = cls(arch=arch, drop_path_rate=0.).train()
    ckpt = cls(arch=arch, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 128)
    grads, saved_bytes = [], []
    for model in (plain, ckpt):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = model(x)
        saved_bytes.append(sum(saved))
        sum(o.square().mean() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.outs = [o.detach() for o in outs]
    for a, b in zip(plain.outs, ckpt.outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)
    # The backward re-run of each block must not update the running statistics again.
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert saved_bytes[1] < saved_bytes[0] / 3, saved_bytes


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
    randomize_(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        outs = model(x)
        raw = model.forward_intermediates(x)
    assert len(outs) == len(raw) == 4
    for out, level, norm in zip(outs, raw, model.out_norms.values()):
        expected = torch.nn.functional.group_norm(level, 1, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, level, atol=1e-2)
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
    with pytest.raises(ValueError, match='bias_mode must be one of'):  # also without attention
        EfficientFormer(dict(depths=[1, 1, 1, 1], widths=[8, 16, 32, 64], num_vit=0),
                        bias_mode='interpolated')
    with pytest.raises(ValueError, match=r"bias_img_size=800 applies only to "
                                         r"bias_mode='official'"):
        EfficientFormerV2('s0', bias_img_size=800)


V1_SMALL = dict(depths=[1, 1, 1, 2], widths=[16, 32, 48, 64], num_vit=1)
V2_SMALL = dict(depths=[1, 1, 2, 2], widths=[16, 32, 48, 64], num_vit=1,
                mlp_ratios=[[4], [4], [4, 4], [3, 3]])
VIT_SMALL = dict(widths=[64, 96, 128], depths=[1, 1, 1], num_heads=[2, 3, 4], kernels=[5, 5, 3, 3])


@pytest.mark.parametrize('cls, arch, match', [
    # A per-stage list of the wrong length used to build fewer stages than out_indices named.
    (EfficientFormer, dict(V1_SMALL, depths=[1, 1, 2]), r'depths must have one entry per stage'),
    (EfficientViT, dict(VIT_SMALL, num_heads=[2, 3]), r'num_heads must have one entry per stage'),
    (EfficientFormerV2, dict(V2_SMALL, mlp_ratios=[[4], [4], [4, 4]]),
     r'mlp_ratios must have one entry per stage'),
    (EfficientFormerV2, dict(V2_SMALL, mlp_ratios=[[4], [4], [4], [3, 3]]),
     r'mlp_ratios\[2\] must give one positive ratio per block \(2\)'),
    (EfficientFormer, dict(V1_SMALL, depths=[1, 0, 1, 2]), r'depths entries must be positive'),
    (EfficientFormer, dict(V1_SMALL, num_vit=3), r"num_vit=3 exceeds the last stage's depth 2"),
    (EfficientFormerV2, dict(V2_SMALL, num_vit=3), r'num_vit=3 exceeds the depth of stage 3 or 4'),
    (EfficientViT, dict(VIT_SMALL, num_heads=[2, 3, 3]), r'width 128 is not divisible by its 3'),
    (EfficientViT, dict(VIT_SMALL, num_heads=[2, 3, 8], widths=[64, 96, 128]),
     r'kernels gives 4 q kernels .* for up to 8 heads'),
    (EfficientViT, dict(VIT_SMALL, kernels=[5, 4, 3, 3]), r'kernels must be odd'),
    (EfficientViT, dict(VIT_SMALL, widths=[60, 96, 128]), r'widths\[0\] must be a multiple of 8'),
    (EfficientFormerV2, dict(V2_SMALL, widths=[15, 32, 48, 64]),
     r'widths\[0\] must be a multiple of 2'),
])
def test_custom_arch_contents_are_checked(cls, arch, match):
    with pytest.raises(ValueError, match=match):
        cls(arch)


def test_forward_intermediates_checks_indices():
    model = EfficientFormer(V1_SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [f.shape[1] for f in model.forward_intermediates(x, [-1, 1])] == [32, 64]
        with pytest.raises(ValueError, match='indices entry 7 is out of range'):
            model.forward_intermediates(x, [7])
        with pytest.raises(ValueError, match='indices must be non-empty'):
            model.forward_intermediates(x, [])


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_stochastic_depth_is_random_in_training_only(cls):
    from mmeformer.models import fuse
    from mmeformer.models.layers import DropPath
    model = cls(drop_path_rate=0.5, with_cp=True, norm_eval=True)
    randomize_(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, second = model.train()(x)[-1], model(x)[-1]
        assert not torch.allclose(first, second)  # different blocks dropped
        torch.testing.assert_close(model.eval()(x)[-1], model(x)[-1])
        reference = model(x)
        fused = fuse(model)
        assert not any(isinstance(m, DropPath) for m in fused.modules())
        assert not any(getattr(m, 'with_cp', False) for m in fused.modules())
        for a, b in zip(fused(x), reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_list_init_cfg_loads_through_the_converter(tmp_path):
    """A Pretrained entry inside an init_cfg list is loaded by mmeformer's converter (mmengine's
    PretrainedInit would find none of the original release's keys), after the other entries."""
    from conftest import FIXTURES, random_checkpoint
    path = tmp_path / 'eformer_s0.pth'
    random_checkpoint(FIXTURES / 'imagenet_v2_s0.json', path)
    model = EfficientFormerV2('s0', init_cfg=[
        dict(type='Constant', layer='Conv2d', val=0.5),
        dict(type='Pretrained', checkpoint=str(path))])
    model.init_weights()
    raw = torch.load(path, weights_only=True)['model']
    assert torch.equal(model.stem.conv1.conv.weight, raw['patch_embed.0.weight'])
    assert torch.equal(model.stages[3].blocks[3].mlp.fc2.conv.weight,
                       raw['network.6.3.mlp.fc2.weight'])
    with pytest.raises(ValueError, match='2 Pretrained entries'):
        EfficientFormerV2('s0', init_cfg=[dict(type='Pretrained', checkpoint=str(path))] * 2
                          ).init_weights()


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
        layer.bn.eps = 0.5  # a plain attribute, part of the fold
        torch.testing.assert_close(layer(x), plain(), rtol=1e-5, atol=1e-5)
        # A training forward of the BN alone updates its running statistics without moving
        # their version counters (only num_batches_tracked's).
        before = layer(x)
        layer.bn.train()
        layer.bn(torch.randn(4, 16, 5, 5) * 3 + 2)
        layer.bn.eval()
        assert not torch.allclose(plain(), before, atol=1e-3)
        torch.testing.assert_close(layer(x), plain(), rtol=1e-5, atol=1e-5)
    out = layer(x)  # gradients wanted: the unfolded path, with a graph into the BN weight
    out.sum().backward()
    assert layer.bn.weight.grad is not None and layer.conv.weight.grad is not None


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_channels_last_layout_changes_no_numbers(cls):
    torch.manual_seed(0)
    # Random weights: freshly initialised, EfficientViT's attention and FFN branches end in
    # zero-initialised BNs and would add nothing, whatever their layout path computed.
    model = randomize_(cls()).eval()
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


# (family, attention path forced in inference): 'default' runs the sizes as they are (one query
# chunk at this size); 'chunks' forces query chunks of 16 rows over all heads, 'per_head' the
# one-head-at-a-time path. EfficientViT attends inside 7x7 windows, which are never chunked.
FAST_PATH_CASES = [(cls, path) for cls in (EfficientFormer, EfficientFormerV2)
                   for path in ('default', 'chunks', 'per_head')] + [(EfficientViT, 'default')]


@pytest.mark.parametrize('cls,path', FAST_PATH_CASES,
                         ids=[f'{c.__name__}-{p}' for c, p in FAST_PATH_CASES])
def test_inference_fast_paths_equal_the_autograd_forward(cls, path, monkeypatch):
    """No-grad inference (folded BatchNorms, oneDNN fused kernels, cached biases, in-place
    activations, query-chunked or per-head attention, fused residuals) gives the numbers of
    the plain eval graph that autograd records, and leaves the caller's input untouched. With
    randomized weights: at initialisation, layer scales of 1e-5 and zero-initialised BN scales
    switch the branches off, so a wrong branch would still match."""
    from mmeformer.models.layers import attention as layers, onednn
    calls = {'chunks': [], 'per_head': 0}
    query_chunks, per_head = layers.query_chunks, layers._per_head_attention

    def counted_chunks(*args, **kwargs):
        chunks = query_chunks(*args, **kwargs)
        calls['chunks'].append(len(chunks))
        return chunks

    def counted_per_head(*args):
        calls['per_head'] += 1
        return per_head(*args)

    monkeypatch.setattr(layers, 'query_chunks', counted_chunks)
    monkeypatch.setattr(layers, '_per_head_attention', counted_per_head)
    if path != 'default':
        monkeypatch.setattr(layers, 'QUERY_CHUNK_ELEMENTS', 1)  # chunks of 16 query rows
        monkeypatch.setattr(layers, 'MIN_CHUNK_ROWS', 1 if path == 'chunks' else 10 ** 6)
    if cls is EfficientFormerV2:  # its talking-head attention calls query_chunks by its name
        from mmeformer.models.backbones import efficientformer_v2
        monkeypatch.setattr(efficientformer_v2, 'query_chunks', counted_chunks)
    model = randomize_(cls()).eval()
    x = torch.randn(1, 3, 128, 192)
    x_before = x.clone()
    with torch.no_grad():
        fast, ran = ops_that_ran(lambda: model(x))
    fast_calls = dict(calls, chunks=list(calls['chunks']))
    plain = model(x.requires_grad_())
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)
    for a, b in zip(fast, plain):
        assert b.abs().max() > 1e-2  # the branches reach the output
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4 * b.abs().max().item())
    # Each path actually ran in the fast forward.
    if onednn.HAS_ONEDNN_POINTWISE:
        assert {'mkldnn::_linear_pointwise', 'mkldnn::_convolution_pointwise'} & ran
    if path == 'chunks':
        assert max(fast_calls['chunks']) > 1 and fast_calls['per_head'] == 0
    elif path == 'per_head':
        assert fast_calls['per_head'] > 0
    else:
        assert fast_calls['per_head'] == 0


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


def ops_that_ran(call):
    """``call()``'s result and the names of the ops it ran (torch.profiler)."""
    from torch.profiler import profile
    with profile() as prof:
        result = call()
    return result, {event.key for event in prof.key_averages()}


@pytest.mark.parametrize('act', [None, 'gelu', 'gelu_tanh', 'relu'])
def test_fused_onednn_kernels_equal_the_plain_ops(act):
    """CPU inference runs GEMMs of enough rows and convs followed by an activation through
    oneDNN's fused kernels; they give the plain ops' numbers, activation variant included."""
    import torch.nn as nn

    from mmeformer.models.layers import GELU, conv2d, fast_paths, linear
    from mmeformer.models.layers.onednn import HAS_ONEDNN_POINTWISE, ONEDNN_MIN_LINEAR_ROWS
    if not HAS_ONEDNN_POINTWISE:
        pytest.skip('this torch build has no oneDNN fused kernels')
    act_module = {None: None, 'gelu': GELU(), 'gelu_tanh': GELU(approximate='tanh'),
                  'relu': nn.ReLU()}[act]
    torch.manual_seed(0)
    pointwise, dense = nn.Conv2d(16, 24, 1), nn.Conv2d(16, 24, 3, padding=1)
    side = math.isqrt(ONEDNN_MIN_LINEAR_ROWS) + 1
    x = torch.randn(1, 16, side, side).to(memory_format=torch.channels_last)
    calls = [lambda: conv2d(pointwise, x, act=act_module),  # a GEMM on the NHWC view
             lambda: linear(pointwise, x.permute(0, 2, 3, 1), act=act_module)]
    if act is not None:  # a conv with nothing to fuse keeps torch's own kernel
        calls.append(lambda: conv2d(dense, x, act=act_module))
    with torch.no_grad():
        fused, ran = ops_that_ran(lambda: [call() for call in calls])
        with fast_paths(False):
            plain = [call() for call in calls]
    assert 'mkldnn::_linear_pointwise' in ran
    assert (act is not None) == ('mkldnn::_convolution_pointwise' in ran)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_wide_gemm_weights_are_packed_once_and_follow_changes():
    """A GEMM of few rows with a wide, large weight runs through oneDNN on a copy of the weight
    packed once; the copy follows in-place changes, and a narrower weight stays on F.linear."""
    import torch.nn as nn
    import torch.nn.functional as F

    from mmeformer.models import layers
    from mmeformer.models.layers import onednn
    if not onednn.HAS_ONEDNN_POINTWISE:
        pytest.skip('this torch build has no oneDNN fused kernels')
    torch.manual_seed(0)
    wide = nn.Linear(512, onednn.ONEDNN_MIN_WEIGHT_ELEMENTS // 512)
    narrow = nn.Linear(512, onednn.ONEDNN_MIN_OUT_FEATURES - 64)
    x = torch.randn(1, 49, 512)  # far fewer rows than ONEDNN_MIN_LINEAR_ROWS
    with torch.no_grad():
        out, ran = ops_that_ran(lambda: layers.linear(wide, x))
        assert 'mkldnn::_linear_pointwise' in ran
        torch.testing.assert_close(out, F.linear(x, wide.weight, wide.bias))
        packed = onednn._packed_weights[wide.weight][1]
        layers.linear(wide, x)
        assert onednn._packed_weights[wide.weight][1] is packed  # packed once
        wide.weight.mul_(-2.)
        torch.testing.assert_close(layers.linear(wide, x), F.linear(x, wide.weight, wide.bias))
        _, ran = ops_that_ran(lambda: layers.linear(narrow, x))
        assert 'mkldnn::_linear_pointwise' not in ran
        assert narrow.weight not in onednn._packed_weights


def test_folded_gemm_weights_keep_only_their_packed_copy():
    """A pointwise conv + BN that runs through oneDNN in CPU inference keeps its folded weight
    only in oneDNN's packed layout (no third copy of the weight beside the parameters); the
    packed copy follows changes of the BN, and a call that cannot use oneDNN folds a plain
    copy, with the same numbers."""
    import torch.nn.functional as F

    from mmeformer.models import layers
    from mmeformer.models.layers import onednn
    if not onednn.HAS_ONEDNN_POINTWISE:
        pytest.skip('this torch build has no oneDNN fused kernels')
    torch.manual_seed(0)
    pair = layers.ConvNorm(64, onednn.ONEDNN_MIN_WEIGHT_ELEMENTS // 64)
    with torch.no_grad():
        pair.bn.running_mean.normal_()
        pair.bn.running_var.uniform_(0.5, 2.)
        pair.bn.weight.normal_()
    pair.eval()
    x = torch.randn(1, 64, 7, 9).contiguous(memory_format=torch.channels_last)
    conv_key = id(pair.conv)

    def expected():
        return pair.bn(F.conv2d(x, pair.conv.weight, pair.conv.bias))

    with torch.no_grad():
        out, ran = ops_that_ran(lambda: pair(x))
        assert 'mkldnn::_linear_pointwise' in ran
        torch.testing.assert_close(out, expected(), rtol=1e-5, atol=1e-5)
        assert set(pair._fold_cache) == {(conv_key, True)}
        packed = pair._fold_cache[(conv_key, True)][1]
        pair(x)
        assert pair._fold_cache[(conv_key, True)][1] is packed  # packed once
        pair.bn.weight.mul_(-2.)
        torch.testing.assert_close(pair(x), expected(), rtol=1e-5, atol=1e-5)
        assert pair._fold_cache[(conv_key, True)][1] is not packed
        with pytest.MonkeyPatch.context() as patch:  # a CPU without the fused kernels
            patch.setattr(onednn, 'HAS_ONEDNN_POINTWISE', False)
            out, ran = ops_that_ran(lambda: pair(x))
        assert 'mkldnn::_linear_pointwise' not in ran
        torch.testing.assert_close(out, expected(), rtol=1e-5, atol=1e-5)
        assert set(pair._fold_cache) == {(conv_key, True), (conv_key, False)}
    pair.eval()
    assert not pair._fold_cache


def test_packed_gemm_weights_are_dropped_with_the_eval_caches():
    """Packed weights die with their fold caches, and ``eval()`` drops those of the
    parameters: after a write through ``.data`` (which no version counter sees) the model
    computes with the new values."""
    import gc

    from mmeformer.models import layers
    from mmeformer.models.layers import onednn
    if not onednn.HAS_ONEDNN_POINTWISE:
        pytest.skip('this torch build has no oneDNN fused kernels')
    torch.manual_seed(0)
    model = randomize_(EfficientFormer(arch='l1')).eval()
    x = torch.randn(1, 3, 224, 224)
    gc.collect()  # earlier tests' models, so that only this one's entries come and go
    before = len(onednn._packed_weights)
    with torch.no_grad():
        model(x)
        mlp_weight = model.stages[3].blocks[-1].mlp.fc1.weight  # a parameter, packed
        assert mlp_weight in onednn._packed_weights
        pool_mlp = model.stages[0].blocks[0].mlp  # 1x1 convs + BN: packed in its fold cache
        assert (id(pool_mlp.fc1), True) in pool_mlp._fold_cache
        mlp_weight.data.mul_(-1.)
        stale = model(x)
        model.eval()
        gc.collect()
        assert len(onednn._packed_weights) == before
        fresh = model(x)
        with layers.fast_paths(False):
            plain = model(x)
    torch.testing.assert_close(fresh, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stale[-1], plain[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_fast_paths_switch_off_in_one_call_with_equal_outputs(cls, monkeypatch):
    """``fast_paths(False)`` runs the plain inference graph (no folded BatchNorms, no oneDNN
    kernels, no cached biases, no query chunks) with the outputs of the fast one; as a context
    manager it restores the previous setting."""
    from mmeformer.models import fast_paths
    from mmeformer.models.layers import attention, eval_cache_bytes, fast_paths_enabled
    from mmeformer.models.layers.onednn import HAS_ONEDNN_POINTWISE
    monkeypatch.setattr(attention, 'QUERY_CHUNK_ELEMENTS', 1)  # chunks wherever there are any
    model = randomize_(cls(), seed=1).eval()
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        fast, fast_ops = ops_that_ran(lambda: model(x))
        held = eval_cache_bytes(model)
        model.eval()  # drops the caches
        fast_paths(False)
        try:
            assert not fast_paths_enabled()
            plain, plain_ops = ops_that_ran(lambda: model(x))
            assert attention.query_chunks(400, 8, 400) == [None]
            assert eval_cache_bytes(model) == 0
        finally:
            fast_paths(True)
        with fast_paths(False):
            assert not fast_paths_enabled()
        assert fast_paths_enabled()
    assert held > 0
    assert not {op for op in plain_ops if op.startswith('mkldnn::')}
    if HAS_ONEDNN_POINTWISE:
        assert {op for op in fast_ops if op.startswith('mkldnn::')}
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
