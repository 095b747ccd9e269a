"""Attention biases against an independent, loop-based rendering of the reference recipes, and
the eval-time cache against staleness."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT
from benchmarks.randomize import randomize_


def first_appearance_index(query_grid, key_grid, step):
    """Offsets enumerated as the reference code does: a dict filled in first-appearance order over
    query points (outer loop) and key points (inner loop), both row-major."""
    offsets, idxs = {}, []
    q_points = list(itertools.product(range(query_grid), range(query_grid)))
    k_points = list(itertools.product(range(key_grid), range(key_grid)))
    for p1 in q_points:
        for p2 in k_points:
            off = (abs(p1[0] * step - p2[0]), abs(p1[1] * step - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    return torch.tensor(idxs).view(len(q_points), len(k_points))


def official_bias(table, ref_key, query_step, n_q, n_k):
    ref_q = math.ceil(ref_key / query_step)
    idx = first_appearance_index(ref_q, ref_key, math.ceil(ref_key / ref_q))
    bias = table[:, idx]
    return F.interpolate(bias.unsqueeze(0), size=(n_q, n_k), mode='bicubic',
                         align_corners=False).squeeze(0)


def first_attention(model):
    return next(m for m in model.modules() if hasattr(m, 'attention_biases'))


# The matrix resize runs as F.interpolate while autograd records and as banded GEMMs in CPU
# inference (see resize_bicubic): both are checked; they differ from ATen's kernel by rounding.
@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('hw', [(8, 8), (8, 13), (13, 8), (5, 5)])
def test_v1_official_bias_and_attention_match_reference(hw, grad):
    model = EfficientFormer('l1', bias_mode='official', bias_img_size=256).eval()  # R = 8
    attn = first_attention(model)
    torch.nn.init.normal_(attn.attention_biases)
    n = hw[0] * hw[1]
    expected = official_bias(attn.attention_biases.detach(), 8, 1, n, n)
    with torch.set_grad_enabled(grad):
        bias = attn.attention_bias(hw, hw)
    assert bias.requires_grad == grad
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6 if grad else 4e-6)

    # Whole attention written out plainly (softmax(q k^T * scale + bias) v).
    x = torch.randn(2, n, 448)
    with torch.no_grad():
        qkv = attn.qkv(x).view(2, n, 8, -1).transpose(1, 2)
        q, k, v = qkv.split([32, 32, 128], dim=-1)
        weights = ((q @ k.transpose(-2, -1)) * 32 ** -0.5 + expected).softmax(-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(2, n, -1))
        torch.testing.assert_close(attn(x, hw), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('key_hw', [(16, 16), (16, 25), (7, 9)])
def test_v2_downsample_official_bias_matches_reference(key_hw, grad):
    model = EfficientFormerV2('s0', bias_mode='official', bias_img_size=256).eval()
    attn = model.stages[3].downsample.attn  # key grid ceil(256 / 16) = 16, query grid 8
    torch.nn.init.normal_(attn.attention_biases)
    q_hw = tuple(math.ceil(s / 2) for s in key_hw)
    expected = official_bias(attn.attention_biases.detach(), 16, 2, q_hw[0] * q_hw[1],
                             key_hw[0] * key_hw[1])
    with torch.set_grad_enabled(grad):
        bias = attn.attention_bias(q_hw, key_hw)
    assert bias.requires_grad == grad
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6 if grad else 4e-6)


@pytest.mark.parametrize('shape, size', [
    ((8, 64, 256), (104, 420)),  # V2's downsample matrix at 128 px grown to 208x336
    ((3, 10, 17), (4, 30)),  # one axis shrinks, one grows
    ((2, 40, 40), (40, 13)),  # one axis unchanged
    ((2, 5, 7), (5, 7)),  # nothing to do
    ((1, 1, 3), (9, 2)),  # a single source row: every tap clamps to it
])
def test_banded_bicubic_resize_equals_interpolate(shape, size, monkeypatch):
    from mmeformer.models.layers import attention_bias
    x = torch.randn(shape) * 3
    expected = F.interpolate(x[None], size=size, mode='bicubic', align_corners=False)[0]

    def interpolate(*args, **kwargs):
        raise AssertionError('the banded resize should run in CPU inference')

    monkeypatch.setattr(attention_bias.F, 'interpolate', interpolate)
    with torch.no_grad():
        got = attention_bias.resize_bicubic(x, size)
    assert got.data_ptr() != x.data_ptr()
    # Rounding: a 16-term sum of values up to ~10 in float32, in another order than ATen's.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# The gather runs by advanced indexing while autograd records (its backward stays small) and
# by a gather from a broadcast view otherwise: both are checked.
@pytest.mark.parametrize('grad', [True, False])
def test_table_mode_at_224_is_the_classification_gather(grad):
    model = EfficientFormerV2('s0').eval()
    for attn, (q, k, step) in [(model.stages[3].blocks[2].token_mixer, (7, 7, 1)),
                               (model.stages[3].downsample.attn, (7, 14, 2))]:
        torch.nn.init.normal_(attn.attention_biases)
        idx = first_appearance_index(q, k, step)
        with torch.set_grad_enabled(grad):
            bias = attn.relative_bias((q, q), (k, k))
        assert bias.requires_grad == grad
        assert torch.equal(bias, attn.attention_biases.detach()[:, idx])


@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('query_hw, key_hw, step', [((4, 10), (4, 10), 1), ((3, 5), (5, 9), 2)])
def test_table_mode_resizes_the_table_to_the_grid(grad, query_hw, key_hw, step):
    model = EfficientFormer('l1').eval()
    attn = first_attention(model)
    torch.nn.init.normal_(attn.attention_biases)
    attn.query_step = step  # V2's downsample attention: queries on every other key point
    table = F.interpolate(attn.attention_biases.detach().view(1, 8, 7, 7), size=key_hw,
                          mode='bicubic', align_corners=False)[0]
    queries = list(itertools.product(range(query_hw[0]), range(query_hw[1])))
    keys = list(itertools.product(range(key_hw[0]), range(key_hw[1])))
    expected = torch.stack([
        torch.stack([table[:, abs(a[0] * step - b[0]), abs(a[1] * step - b[1])] for b in keys],
                    dim=-1) for a in queries], dim=1)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(attn.attention_bias(query_hw, key_hw), expected, rtol=0,
                                   atol=0)


def test_bias_cache_never_goes_stale():
    model = EfficientFormer('l1').eval()
    attn = first_attention(model)
    hw = (5, 6)
    with torch.no_grad():
        first = attn.attention_bias(hw, hw)
        assert attn.attention_bias(hw, hw) is first  # cached in eval
        model.double()
        assert attn.attention_bias(hw, hw).dtype == torch.float64
        model.float()
        state = model.state_dict()
        state['stages.3.blocks.4.token_mixer.attention_biases'] = torch.randn(8, 49)
        model.load_state_dict(state)
        after_load = attn.attention_bias(hw, hw)
        assert not torch.equal(after_load, first)
        attn.attention_biases.add_(1.)  # in-place edit
        torch.testing.assert_close(attn.attention_bias(hw, hw), after_load + 1.)
    model.train()
    assert attn._bias_cache == {}
    bias = attn.attention_bias(hw, hw)
    assert bias.requires_grad  # training: recomputed with gradient, not cached
    assert attn._bias_cache == {}


def test_bias_cache_keeps_the_most_recently_used_sizes_within_its_budget(monkeypatch):
    from mmeformer.models.layers import attention_bias
    attn = first_attention(EfficientFormer('l1').eval())
    bias_bytes = {n: 8 * (n * n) ** 2 * 4 for n in (4, 5, 6)}  # (heads, n * n, n * n) float32

    def cached():
        return [key[0] for key in attn._bias_cache]  # the query grids

    def bias(n):
        return attn.attention_bias((n, n), (n, n))

    monkeypatch.setattr(attention_bias, 'MAX_CACHED_BIASES', 2)
    with torch.no_grad():
        first = bias(4)
        bias(5)
        assert bias(4) is first and cached() == [(5, 5), (4, 4)]  # a hit is the most recent
        bias(6)
        assert cached() == [(4, 4), (6, 6)]  # the least recently used went
        monkeypatch.setattr(attention_bias, 'MAX_CACHED_BIASES', 8)
        monkeypatch.setattr(attention_bias, 'MAX_CACHED_BIAS_BYTES',
                            bias_bytes[4] + bias_bytes[5])
        bias(5)
        assert cached() == [(5, 5)]  # 4, 6 and 5 exceed the bytes, and so do 6 and 5
        bias(4)
        assert cached() == [(5, 5), (4, 4)]  # within the bytes
        bias(6)
        assert cached() == [(6, 6)]  # alone above the bytes: the newest is always kept


def test_model_built_under_inference_mode_runs():
    """Inference tensors have no version counter; the caches must still work with them."""
    reference = randomize_(EfficientFormerV2('s0')).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = EfficientFormerV2('s0').eval()
        model.load_state_dict(reference.state_dict())
        first, second = model(x), model(x)  # the second from the caches
    with torch.no_grad():
        expected = reference(x)
    for a, b, ref in zip(first, second, expected):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bias_mode', ['table', 'official'])
def test_talking_head_fold_equals_the_training_form(bias_mode):
    """Eval folds talking head 1 into the cached bias; with gradients it runs unfolded. Both
    must give the same attention, and the cached form must follow in-place weight edits."""
    model = EfficientFormerV2('s0', bias_mode=bias_mode,
                              bias_img_size=256 if bias_mode == 'official' else None).eval()
    attn = model.stages[2].blocks[4].token_mixer  # the stride-2 attention of stage 3
    torch.manual_seed(0)
    with torch.no_grad():
        attn.attention_biases.normal_()
        attn.talking_head1.weight.normal_()
        attn.talking_head1.bias.normal_()
    x = torch.randn(2, 96, 10, 14)
    unfolded = attn(x)  # gradients enabled: the training form
    assert unfolded.requires_grad
    with torch.no_grad():
        folded = attn(x)
        torch.testing.assert_close(folded, unfolded.detach(), rtol=1e-5, atol=1e-5)
        attn.talking_head1.weight.mul_(-1.)
        assert not torch.allclose(attn(x), folded, atol=1e-3)  # cache follows the edit


def test_gpu_inference_takes_few_query_chunks_and_plain_convs():
    """Query chunks and pointwise convs as GEMMs are CPU measures: on other devices, where a
    batch-1 forward is bound by kernel launches, a detection-size attention map is one chunk and
    a pointwise conv one conv."""
    from mmeformer.models.layers import attention as layers, onednn
    assert layers.query_chunks(1050, 8, 1050) == [None]  # gradients enabled: never chunked
    with torch.no_grad():  # EfficientFormerV2-S0's stage-3 attention at 800x1344
        assert len(layers.query_chunks(1050, 8, 1050)) == 9
        assert layers.query_chunks(1050, 8, 1050, 'cuda') == [None]
        assert len(layers.query_chunks(8192, 8, 8192, 'cuda')) == 16  # memory stays bounded
    conv = torch.nn.Conv2d(8, 16, 1)
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert onednn.gemm_rows(conv, x) is not None
    assert onednn.gemm_rows(conv, x.to('meta')) is None


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('per_head', [False, True])
def test_chunked_softmax_attention_equals_the_formula(per_head, batch, monkeypatch):
    """In inference, softmax_attention runs query chunks of all heads, or one head at a time
    when such chunks would have fewer than MIN_CHUNK_ROWS rows; both paths (with and without a
    bias, on a strided head view as EfficientFormer passes; the bias added by addmm, by baddbmm
    for one image's heads, or after the GEMM) equal the written-out formula."""
    from mmeformer.models.layers import attention as layers
    torch.manual_seed(0)
    q = torch.randn(batch, 50, 3, 8).transpose(1, 2)  # a (B, heads, N, d) strided view
    k, v = torch.randn(batch, 3, 70, 8), torch.randn(batch, 3, 70, 12)
    bias = torch.randn(3, 50, 70)
    logits = q @ k.transpose(-2, -1) * 0.3
    monkeypatch.setattr(layers, 'QUERY_CHUNK_ELEMENTS', 1)  # chunks of 13 query rows
    monkeypatch.setattr(layers, 'MIN_CHUNK_ROWS', 14 if per_head else 13)
    per_head_calls, per_head_attention = [], layers._per_head_attention
    monkeypatch.setattr(layers, '_per_head_attention',
                        lambda *args: per_head_calls.append(1) or per_head_attention(*args))
    with torch.no_grad():
        assert [c.stop - c.start for c in layers.query_chunks(50, 3, 70)] == [13, 13, 13, 11]
        with_bias = layers.softmax_attention(q, k, v, 0.3, bias)
        without_bias = layers.softmax_attention(q, k, v, 0.3)
    assert len(per_head_calls) == (2 if per_head else 0)
    torch.testing.assert_close(with_bias, (logits + bias).softmax(-1) @ v)
    torch.testing.assert_close(without_bias, logits.softmax(-1) @ v)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert layers.softmax_attention(q, k, v, 0.3, bias).dtype == torch.bfloat16


def test_v2_training_saves_no_bias_sized_tensors():
    """Training saves for backward only the attention maps the math needs (per talking-head
    attention: the logits for talking head 1's weight gradient, the softmax output and the map
    mixed by talking head 2; per downsample attention: its softmax output) and never a
    (heads, Nq, Nk) bias: the bias gather keeps only its small per-axis index."""
    model = EfficientFormerV2('s0').train()
    x = torch.randn(2, 3, 256, 320)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = model(x)
    n, heads, batch = 8 * 10, 8, 2  # n: tokens of the 1/32 grid
    bias_sizes = {heads * n * n, heads * n * 4 * n}  # a bias has no batch dim
    assert not [numel for numel, _, _ in saved if numel in bias_sizes]
    storages = {(ptr, nbytes) for _, ptr, nbytes in saved}
    talking_head_maps = [s for s in storages if s[1] == 4 * batch * heads * n * n]
    downsample_maps = [s for s in storages if s[1] == 4 * batch * heads * n * 4 * n]
    assert len(talking_head_maps) == 3 * 4  # 4 attention blocks in s0
    assert len(downsample_maps) == 1
    sum(o.mean() for o in outs).backward()


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2, EfficientViT])
def test_cache_biases_off_computes_the_bias_in_every_forward(cls):
    """``cache_biases=False``: the same outputs, each attention module computes its bias in every
    inference forward and holds none; switching it on again caches, off again drops them."""
    from benchmarks.size_stream import bias_cache_bytes
    from mmeformer.models.layers import RelativeBiasAttention
    torch.manual_seed(0)
    cached = randomize_(cls()).eval()
    uncached = cls(cache_biases=False).eval()
    uncached.load_state_dict(cached.state_dict())
    assert cached.cache_biases and not uncached.cache_biases
    calls = []
    attentions = [m for m in uncached.modules() if isinstance(m, RelativeBiasAttention)]
    for attn in attentions:
        attn._compute_bias = (lambda f: lambda *a: calls.append(1) or f(*a))(attn._compute_bias)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for _ in range(2):
            expected, got = cached(x), uncached(x)
            for a, b in zip(expected, got):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        assert len(calls) == 2 * len(attentions)
        assert bias_cache_bytes(uncached) == 0 < bias_cache_bytes(cached)
        uncached.cache_biases = True
        uncached(x)
        uncached(x)
        assert len(calls) == 3 * len(attentions) and bias_cache_bytes(uncached) > 0
    uncached.cache_biases = False
    assert bias_cache_bytes(uncached) == 0
