"""The plain re-implementation of the official dense backbones (benchmarks/official_reference.py):
its checkpoint layout against the released key tables, its bias index against a loop-based
rendering of the recipe, and mmeformer's ``bias_mode='official'`` against it (outputs, and the
parameter gradients of a training step), loaded from the same dense checkpoint through the normal
loader."""
import copy
import itertools
import json

import pytest
import torch

from conftest import ARCHS, FIXTURES, backbone_class
from mmeformer.checkpoint import load_pretrained
from benchmarks.official_reference import build_official_reference, first_appearance_bias_index
from benchmarks.randomize import gradients_as_state_dict, randomize_

TAGS = {'EfficientFormer': 'v1', 'EfficientFormerV2': 'v2'}
BIAS_IMG_SIZE = {'det': 800, 'seg': 512}
DENSE = [(family, arch, kind) for family in TAGS for arch in ARCHS[family]
         for kind in BIAS_IMG_SIZE]

# Relative to the feature scale (max |x| of each returned level). Measured: <= 2e-6.
TOL = 2e-5
# Training gradients, float32: relative to each tensor's largest gradient; train-mode BatchNorm
# divides by batch statistics, which amplifies float rounding more than the forward. Measured:
# 1.3e-5 (L1), 1.0e-5 (V2-S0).
GRAD_TOL = 1e-4
ZERO_GRAD = 1e-5


def _id(params):
    family, arch, kind = params
    return f'{TAGS[family]}_{arch}_{kind}'


@pytest.mark.parametrize('family,arch,kind', DENSE, ids=[_id(p) for p in DENSE])
def test_state_dict_is_the_release_layout(family, arch, kind):
    spec = json.loads((FIXTURES / f'dense_{kind}_{TAGS[family]}_{arch}.json').read_text())
    expected = {k[len('backbone.'):]: (tuple(v['shape']), v['dtype'], v['kind'])
                for k, v in spec['keys'].items() if k.startswith('backbone.')}
    model = build_official_reference(family, arch, BIAS_IMG_SIZE[kind])
    params = dict(model.named_parameters())
    got = {k: (tuple(v.shape), str(v.dtype).replace('torch.', ''),
               'param' if k in params else 'buffer') for k, v in model.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # also the order of the released files


def loop_index(query_grid, key_grid, step):
    """The recipe of docs/checkpoints.md written as loops: offsets numbered by first appearance over
    query points (outer) and key points (inner), both row-major."""
    offsets, idxs = {}, []
    for p1 in itertools.product(range(query_grid), repeat=2):
        for p2 in itertools.product(range(key_grid), repeat=2):
            off = (abs(p1[0] * step - p2[0]), abs(p1[1] * step - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.tensor(idxs).view(query_grid ** 2, key_grid ** 2)


@pytest.mark.parametrize('query_grid,key_grid,step', [(7, 7, 1), (7, 14, 2), (5, 9, 2), (4, 4, 1)])
def test_bias_index_is_the_first_appearance_enumeration(query_grid, key_grid, step):
    assert torch.equal(first_appearance_bias_index(query_grid, key_grid, step),
                       loop_index(query_grid, key_grid, step))


@pytest.mark.parametrize('query_grid,key_grid,step', [(25, 25, 1), (25, 50, 2), (16, 32, 2)])
def test_bias_index_of_square_grids_is_dy_times_r_plus_dx(query_grid, key_grid, step):
    q, k = torch.arange(query_grid) * step, torch.arange(key_grid)
    dy = (q[:, None, None, None] - k[None, None, :, None]).abs()
    dx = (q[None, :, None, None] - k[None, None, None, :]).abs()
    expected = (dy * key_grid + dx).reshape(query_grid ** 2, key_grid ** 2)
    assert torch.equal(first_appearance_bias_index(query_grid, key_grid, step), expected)


def realistic_(reference, seed=0):
    """``randomize_`` plus what makes the attention biases matter: unit-variance ``*_seg``
    tables (``randomize_`` scales them as fan-in weights), layer scales around 0.3 and talking
    heads near the identity."""
    randomize_(reference, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith('attention_biases_seg'):
                param.copy_(noise)
            elif 'layer_scale' in name:
                param.copy_(0.3 + 0.1 * noise)
            elif name.endswith(('talking_head1.weight', 'talking_head2.weight')):
                param.copy_(torch.eye(param.shape[0])[:, :, None, None] + 0.2 * noise)
    return reference


def relative_errors(outputs, references):
    return [((out - ref).abs().max() / ref.abs().max()).item()
            for out, ref in zip(outputs, references)]


PARITY = [('EfficientFormer', 'l1', 'det'), ('EfficientFormerV2', 's0', 'det'),
          ('EfficientFormer', 'l1', 'seg'), ('EfficientFormerV2', 's0', 'seg')]


@pytest.mark.parametrize('family,arch,kind', PARITY, ids=[_id(p) for p in PARITY])
def test_official_bias_mode_matches_the_reference(family, arch, kind, tmp_path):
    size = BIAS_IMG_SIZE[kind]
    reference = realistic_(build_official_reference(family, arch, size)).eval()
    path = tmp_path / 'dense.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in reference.state_dict().items()},
                'meta': {}}, path)
    model = backbone_class(family)(arch, bias_mode='official', bias_img_size=size).eval()
    report = load_pretrained(model, str(path), prefix='backbone.', logger='silent')
    assert report.missing == [] and report.unused == []
    assert all('attention_bias_idxs' in k or k.endswith('.attention_biases')
               for k in report.dropped)

    # Inputs the official arithmetic supports (V2: ceil(H / 16), ceil(W / 16) even), landscape
    # and portrait, so that a swapped H / W in the flattened token order would show.
    for hw in [(128, 192), (192, 128), (256, 256)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            expected, got = reference(x), model(x)
        assert [o.shape for o in got] == [o.shape for o in expected]
        errors = relative_errors(got, expected)
        assert max(errors) < TOL, (hw, errors)

    # Negative control: moving a single table entry by three table stds (the most influential
    # entry at this size, found by gradient) must break the parity by far more than the
    # tolerance; one attention of each kind (V2: stride-2, downsampling, plain).
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        expected = model(x)
    outputs = reference(x)
    loss = sum((o * torch.randn_like(o)).sum() / o.detach().abs().max() for o in outputs)
    loss.backward()
    names = {'EfficientFormer': ['network.6.4.token_mixer'],
             'EfficientFormerV2': ['network.4.4.token_mixer', 'network.5.attn',
                                   'network.6.3.token_mixer']}[family]
    for name in names:
        table = reference.get_submodule(name).attention_biases_seg
        head, entry = divmod(table.grad.abs().argmax().item(), table.shape[1])
        with torch.no_grad():
            table[head, entry] += 3.
            perturbed = reference(x)
            table[head, entry] -= 3.
        assert max(relative_errors(perturbed, expected)) > 20 * TOL


def assert_gradients_match(model, reference, path, tol, prefix=None):
    """Every parameter gradient of ``model`` equals the gradient of the same parameter of
    ``reference`` (converted into mmeformer's layout by the checkpoint loader), up to ``tol``
    of the largest gradient of that tensor. Returns the largest relative error."""
    torch.save(gradients_as_state_dict(reference) if prefix is None else
               {'state_dict': {f'{prefix}{k}': v
                               for k, v in gradients_as_state_dict(reference).items()},
                'meta': {}}, path)
    holder = copy.deepcopy(model)
    report = load_pretrained(holder, str(path), prefix=prefix, logger='silent')
    assert report.resized == [] and report.unused == []
    expected = {name: param for name, param in holder.named_parameters()
                if name not in report.missing}
    # Biases of convs that feed a training-mode BatchNorm get zero gradient up to rounding
    # (the batch mean removes them; measured below 1e-5 of the largest gradient): those are
    # compared on the scale of the largest gradient, every other tensor on its own.
    largest = max(p.abs().max().item() for p in expected.values())
    worst = 0.
    for name, param in model.named_parameters():
        if name not in expected:
            continue
        assert param.grad is not None, name
        scale = expected[name].abs().max().item()
        if scale < ZERO_GRAD * largest:
            scale = largest
        error = (param.grad - expected[name]).abs().max().item() / scale
        assert error < tol, (name, error, scale)
        worst = max(worst, error)
    return worst


@pytest.mark.parametrize('family,arch', [('EfficientFormer', 'l1'), ('EfficientFormerV2', 's0')])
def test_training_gradients_match_the_reference(family, arch, tmp_path):
    """Train mode (batch statistics), forward + backward from dense level gradients: every
    parameter gradient of mmeformer (``bias_mode='official'``, the reference's weights) equals
    the official re-implementation's."""
    reference = realistic_(build_official_reference(family, arch, 800)).train()
    path = tmp_path / 'dense.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in reference.state_dict().items()},
                'meta': {}}, path)
    model = backbone_class(family)(arch, bias_mode='official', bias_img_size=800).train()
    load_pretrained(model, str(path), prefix='backbone.', logger='silent')

    x = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    expected, got = reference(x), model(x)
    assert max(relative_errors([o.detach() for o in got], [o.detach() for o in expected])) < TOL
    grads = [torch.randn(o.shape) for o in expected]
    sum((o * g).sum() for o, g in zip(expected, grads)).backward()
    sum((o * g).sum() for o, g in zip(got, grads)).backward()
    worst = assert_gradients_match(model, reference, tmp_path / 'grads.pth', GRAD_TOL,
                                   prefix='backbone.')
    print(f'{family} {arch}: largest relative gradient error {worst:.1e}')

    # Negative control: a wrong gradient of a single tensor (here the layer scales of the last
    # block, the smallest effect a bug in a training path could have) fails the comparison.
    last_scale = [p for n, p in model.named_parameters() if n.endswith('.gamma')][-1]
    last_scale.grad.mul_(1 + 10 * GRAD_TOL)
    with pytest.raises(AssertionError):
        assert_gradients_match(model, reference, tmp_path / 'grads.pth', GRAD_TOL,
                               prefix='backbone.')


def test_v2_reference_keeps_the_official_even_size_requirement():
    v2 = build_official_reference('EfficientFormerV2', 's0', 512).eval()
    v1 = build_official_reference('EfficientFormer', 'l1', 512).eval()
    x = torch.randn(1, 3, 96, 240)  # stride-16 map 6 x 15: the official V2 code crashes
    with torch.no_grad():
        with pytest.raises(ValueError, match='even stride-16 map'):
            v2(x)
        assert [tuple(o.shape[-2:]) for o in v1(x)] == [(24, 60), (12, 30), (6, 15), (3, 8)]


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match='family'):
        build_official_reference('EfficientViT', 'm4', 800)
    with pytest.raises(ValueError, match='arch'):
        build_official_reference('EfficientFormer', 's0', 800)
