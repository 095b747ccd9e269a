"""timm as the independent implementation: random timm weights, converted into mmeformer, must give
timm's stage features (V1/V2 at 224; EfficientViT against timm built with img_size=512, whose
7x7 windows match the downstream semantics, at 512)."""
import pytest
import timm
import torch

from conftest import ALL_ARCHS, backbone_class
from mmeformer.checkpoint import load_pretrained
from benchmarks.randomize import randomize_
from test_official_reference import assert_gradients_match


TIMM_NAMES = {'EfficientFormer': 'efficientformer_{}', 'EfficientFormerV2': 'efficientformerv2_{}',
              'EfficientViT': 'efficientvit_{}'}


# Relative to each tensor's largest gradient, in float64 (measured: 5.5e-13).
FLOAT64_GRAD_TOL = 1e-9


@pytest.mark.parametrize('family,arch', ALL_ARCHS)
def test_stage_features_match_timm(family, arch, tmp_path):
    is_ev = family == 'EfficientViT'
    size = 512 if is_ev else 224
    reference = timm.create_model(TIMM_NAMES[family].format(arch),
                                  **(dict(img_size=512) if is_ev else {})).eval()
    randomize_(reference)
    path = tmp_path / 'timm.pth'
    torch.save(reference.state_dict(), path)

    model = backbone_class(family)(arch=arch).eval()
    report = load_pretrained(model, str(path), logger='silent')
    assert report.unused == []
    # Only the dense output norms (not part of timm's model) are new.
    assert all(k.startswith('out_norms.') for k in report.missing)

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        got = model.forward_intermediates(x)
        outs = model(x)
    assert len(got) == len(expected) == len(outs)
    for ref, out in zip(expected, got):
        assert out.shape == ref.shape
        scale = ref.abs().max().item()
        assert scale > 1e-3
        assert (out - ref).abs().max().item() <= 1e-5 * scale

    # Negative control: the comparison is sensitive to the attention biases (a random edit:
    # a constant shift would be a no-op under the softmax).
    module = [m for m in model.modules() if hasattr(m, 'attention_biases')][-1]
    with torch.no_grad():
        module.attention_biases.add_(torch.randn_like(module.attention_biases))
        changed = model.forward_intermediates(x)[-1]
    # At least 10x the parity tolerance: a wrong bias would fail the comparison above.
    assert (changed - expected[-1]).abs().max().item() > 1e-4 * expected[-1].abs().max().item()


def test_efficientvit_training_gradients_match_timm(tmp_path):
    """Train mode (batch statistics), forward + backward from dense level gradients at a size
    both pad the same way (448x576: every stage map at least one 7x7 window, the wider ones
    padded): every parameter gradient of mmeformer, loaded with timm's weights, equals timm's.

    In float64: this randomised network amplifies float32 rounding about 300 times from the
    levels to the stem's gradients (3e-5 -> 1e-2, measured), which would hide a real error;
    in float64 the largest difference is about 1e-12."""
    reference = randomize_(timm.create_model('efficientvit_m0', img_size=512)).train()
    path = tmp_path / 'timm.pth'
    torch.save(reference.state_dict(), path)
    model = backbone_class('EfficientViT')(arch='m0').train()
    load_pretrained(model, str(path), logger='silent')
    reference.double()
    model.double()

    x = torch.randn(2, 3, 448, 576, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    expected = reference.forward_intermediates(x, intermediates_only=True)
    got = model(x)
    for ref, out in zip(expected, got):
        assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in expected]
    sum((o * g).sum() for o, g in zip(expected, grads)).backward()
    sum((o * g).sum() for o, g in zip(got, grads)).backward()
    worst = assert_gradients_match(model, reference, tmp_path / 'grads.pth', FLOAT64_GRAD_TOL)
    print(f'EfficientViT m0: largest relative gradient error {worst:.1e}')

    # Negative control: a slightly wrong gradient of one attention-bias table fails it.
    table = [m for m in model.modules() if hasattr(m, 'attention_biases')][-1].attention_biases
    table.grad.mul_(1 + 10 * FLOAT64_GRAD_TOL)
    with pytest.raises(AssertionError):
        assert_gradients_match(model, reference, tmp_path / 'grads.pth', FLOAT64_GRAD_TOL)
