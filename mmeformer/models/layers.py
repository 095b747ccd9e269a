"""Building blocks shared by the three backbone families.

Papers: EfficientFormer (Li et al., NeurIPS 2022, arXiv:2206.01191), EfficientFormerV2 (Li et al.,
ICCV 2023, arXiv:2212.08059) and EfficientViT with cascaded group attention (Liu et al., CVPR 2023,
arXiv:2305.07027). All three use a LeViT-style learned attention bias indexed by the absolute
offset (|dy|, |dx|) between a query and a key; :class:`RelativeBiasAttention` owns that table.
"""
import contextlib
import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

NORM_LAYERS = {
    'BN': nn.BatchNorm2d,
    'BN2d': nn.BatchNorm2d,
    'SyncBN': nn.SyncBatchNorm,
    'GN': nn.GroupNorm,
}


def build_norm(cfg: Optional[dict], num_channels: int) -> nn.Module:
    """Build a channels-first norm from an mmcv-style config (``BN``, ``SyncBN`` or ``GN``).

    Implemented here rather than through mmcv so that the backbones need only torch + mmengine.
    """
    if cfg is None:
        return nn.Identity()
    cfg = dict(cfg)
    norm_type = cfg.pop('type', None)
    if norm_type not in NORM_LAYERS:
        raise ValueError(f'norm type {norm_type!r} is not supported; use one of '
                         f'{sorted(NORM_LAYERS)} (or None for no norm)')
    requires_grad = cfg.pop('requires_grad', True)
    if norm_type == 'GN':
        if 'num_groups' not in cfg:
            raise ValueError("a 'GN' norm config needs num_groups, e.g. dict(type='GN', num_groups=1)")
        layer = nn.GroupNorm(num_channels=num_channels, **cfg)
    else:
        layer = NORM_LAYERS[norm_type](num_channels, **cfg)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016)."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1. - self.drop_prob
        mask = x.new_empty((x.shape[0], ) + (1, ) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


def drop_path_or_identity(drop_prob: float) -> nn.Module:
    return DropPath(drop_prob) if drop_prob > 0. else nn.Identity()


def stochastic_depth_rates(drop_path_rate: float, depths) -> list:
    """Linearly increasing drop-path rates over all blocks, split per stage."""
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for depth in depths:
        out.append(rates[start:start + depth])
        start += depth
    return out


class GELU(nn.GELU):
    """Exact (erf) GELU; on a channels-last CPU map it runs on the NHWC view, where torch's CPU
    kernel is about twice as fast as on the same memory seen as channels-last NCHW (on GPUs
    the two views cost two more ops per call and nothing else).

    ``inplace=True`` overwrites the input while autograd is not recording (and not while
    tracing): for callers whose input is a fresh conv output. A fresh multi-MB result costs
    page faults under glibc's allocator (measured 1.6x the GELU itself at 8 MB, 4x at 32 MB).
    """

    def __init__(self, approximate: str = 'none', inplace: bool = False):
        super().__init__(approximate=approximate)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc = (x.dim() == 4 and x.device.type == 'cpu' and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last))
        if nhwc:
            x = x.permute(0, 2, 3, 1)
        if self.inplace and not torch.is_grad_enabled() and not is_tracing():
            x = torch.ops.aten.gelu_(x, approximate=self.approximate)
        else:
            x = F.gelu(x, approximate=self.approximate)
        return x.permute(0, 3, 1, 2) if nhwc else x


class LayerScale(nn.Module):
    """Per-channel scale ``gamma``; ``channel_dim`` is 1 for NCHW maps and -1 for tokens."""

    def __init__(self, dim: int, init_value: float, channel_dim: int = 1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim, ), init_value))
        self.channel_dim = channel_dim

    def shaped_gamma(self, x: torch.Tensor) -> torch.Tensor:
        """``gamma`` shaped to broadcast over ``x``."""
        if self.channel_dim == 1:
            return self.gamma.view(1, -1, *([1] * (x.dim() - 2)))
        return self.gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.shaped_gamma(x)


def _plain_residual(drop_path: nn.Module) -> bool:
    """Whether a layer-scale residual must take its plain form instead of one fused op:
    stochastic depth is active, or a graph is being exported (coremltools 9.0 converts
    neither ``addcmul`` nor ``lerp``)."""
    stochastic = isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0.
    return stochastic or is_tracing()


def scaled_residual(x: torch.Tensor, branch: torch.Tensor, layer_scale: LayerScale,
                    drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(layer_scale(branch))``; one fused multiply-add unless
    :func:`_plain_residual`."""
    if _plain_residual(drop_path):
        return x + drop_path(layer_scale(branch))
    return torch.addcmul(x, layer_scale.shaped_gamma(branch), branch)


def scaled_lerp(x: torch.Tensor, target: torch.Tensor, layer_scale: LayerScale,
                drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(layer_scale(target - x))``; one ``lerp`` (three passes fewer over the
    map) unless :func:`_plain_residual` or the dtypes differ."""
    if _plain_residual(drop_path) or not x.dtype == target.dtype == layer_scale.gamma.dtype:
        # Mixed dtypes (autocast): lerp does not promote; the fp32 gamma keeps the residual
        # stream, and with it the norms that follow, in fp32.
        return x + drop_path(layer_scale(target - x))
    return torch.lerp(x, target, layer_scale.shaped_gamma(x))


def folded_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
                   bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the conv / linear layer equal to ``bn(layer(x))`` in eval."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    new_bias = shift if bias is None else bias * scale + shift
    return weight * scale.view((-1, ) + (1, ) * (weight.dim() - 1)), new_bias


def _tensor_state(t: Optional[torch.Tensor]) -> tuple:
    """(storage, in-place version) of ``t``: a cache keyed on it never outlives an in-place
    change made through ``t`` (see :class:`FoldsBatchNorm` for the changes it cannot see)."""
    if t is None:
        return ()
    # Inference tensors (made under torch.inference_mode) have no version counter.
    return (t.data_ptr(), 0 if t.is_inference() else t._version)


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd records an op on any of ``tensors`` (None entries ignored): the
    eval-only shortcuts (folded weights, cached biases, no-autograd kernels) must then step
    aside."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _apply_act(x: torch.Tensor, act: Optional[nn.Module]) -> torch.Tensor:
    return x if act is None else act(x)


def _onednn_post_op(act: Optional[nn.Module]) -> Optional[tuple]:
    """oneDNN post-op arguments (attr, scalars, algorithm) equal to ``act``; None if none is."""
    if act is None:
        return ('none', [], '')
    if type(act) is GELU:
        return ('gelu', [], act.approximate)
    if type(act) is nn.ReLU:
        return ('relu', [], '')
    return None


# Which GEMMs run through oneDNN in CPU inference, on a weight packed once (_onednn_weight):
# those of at least this many rows, and those with a wide, large weight, which MKL's sgemm
# re-packs on every call. On a 2-core AMD EPYC, against F.linear: 16-294-row GEMMs with such
# weights 1.13-1.64x; 1024-4704 rows 1.02-1.07x over oneDNN with the per-call weight reorder.
# A oneDNN call costs about 50 us whatever its size, so smaller weights (EfficientViT-M0's
# 128 -> 512 at 49 rows: 0.7x) and narrower outputs (96-192) stay on F.linear.
_ONEDNN_MIN_LINEAR_ROWS = 1024
_ONEDNN_MIN_OUT_FEATURES = 256
_ONEDNN_MIN_WEIGHT_ELEMENTS = 1 << 17
# bfloat16 only where the CPU has oneDNN's bfloat16 kernels (AVX512-BW/VL/DQ or AVX-NE-CONVERT):
# elsewhere the fused ops raise instead of falling back.
_ONEDNN_DTYPES = (torch.float32, ) + (
    (torch.bfloat16, ) if torch.backends.mkldnn.is_available()
    and getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)() else ())
_HAS_ONEDNN_POINTWISE = (torch.backends.mkldnn.is_available()
                         and hasattr(torch.ops.mkldnn, '_linear_pointwise')
                         and hasattr(torch.ops.mkldnn, '_convolution_pointwise'))


_onednn_fusion = {'enabled': True}


@contextlib.contextmanager
def onednn_fusion(enabled: bool):
    """Switch the fused oneDNN kernels of :func:`linear` / :func:`conv2d` on or off inside the
    block (e.g. for torch's FLOP counter, which counts aten ops only)."""
    previous = _onednn_fusion['enabled']
    _onednn_fusion['enabled'] = enabled
    try:
        yield
    finally:
        _onednn_fusion['enabled'] = previous


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's fused (conv / linear + bias + activation) CPU kernels: inference only (they have
    no autograd formula), eager only, and not under autocast (they do not cast)."""
    return (_HAS_ONEDNN_POINTWISE and _onednn_fusion['enabled'] and x.device.type == 'cpu'
            and x.dtype == weight.dtype
            and x.dtype in _ONEDNN_DTYPES and not torch.is_grad_enabled() and not is_tracing()
            and not is_compiling() and not torch.is_autocast_enabled('cpu'))


def _packed_gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in, 1, 1) or (out, in) in oneDNN's blocked GEMM layout: oneDNN
    otherwise reorders it on every call (the cost that kept small GEMMs on F.linear)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().flatten(1), None)


# Packed copies of parameters, keyed on the parameter itself: an entry dies with its tensor and
# is rebuilt when the tensor's storage or in-place version changes; MobileBackbone.train()
# drops those of its parameters. (Folded conv + BN weights keep theirs in their fold cache.)
_onednn_weights = WeakIdKeyDictionary()


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` packed for oneDNN (:func:`_packed_gemm_weight`) once."""
    state = _tensor_state(weight)
    entry = _onednn_weights.get(weight)
    if entry is None or entry[0] != state:
        entry = (state, _packed_gemm_weight(weight))
        _onednn_weights[weight] = entry
    return entry[1]


def forget_onednn_weights(module: nn.Module) -> None:
    """Drop the packed copies of ``module``'s parameters (after changes no version counter
    records: writes through ``.data``, edits of inference tensors)."""
    for param in module.parameters():
        _onednn_weights.pop(param, None)


def _onednn_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMM of ``x`` (rows x in) with ``weight`` goes through oneDNN (see
    ``_ONEDNN_MIN_LINEAR_ROWS``)."""
    wide_weight = (weight.shape[0] >= _ONEDNN_MIN_OUT_FEATURES
                   and weight.numel() >= _ONEDNN_MIN_WEIGHT_ELEMENTS)
    return ((wide_weight or x.numel() >= _ONEDNN_MIN_LINEAR_ROWS * x.shape[-1])
            and _onednn_applies(x, weight))


def linear(layer: nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` (``layer``'s parameters unless given; a 1x1 conv
    weight is taken as its matrix). In CPU inference one oneDNN call on a packed copy of the
    weight adds the bias and applies ``act`` inside the GEMM: torch's addmm first copies the
    bias over the whole output, and the activation is one more pass."""
    if weight is None:
        weight, bias = layer.weight, layer.bias
    post_op = _onednn_post_op(act)
    if post_op is not None and _onednn_gemm(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, _onednn_weight(weight), bias, *post_op)
    return _apply_act(F.linear(x, weight.flatten(1), bias), act)


def _gemm_rows(conv: nn.Conv2d, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The NHWC view of ``x`` when ``conv`` is a pointwise conv that runs on it as a GEMM (see
    :func:`conv2d`), else None. CPU only: the gain was measured there, and on GPUs, where a
    batch-1 forward is bound by kernel launches, the views and reshapes around the GEMM are
    more ops than the conv's one."""
    if (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1 and x.dim() == 4 and x.device.type == 'cpu' and not is_tracing()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return x.permute(0, 2, 3, 1)
    return None


def conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(conv(x))`` (with other ``weight`` / ``bias`` when given). On CPU a pointwise conv
    on a channels-last map runs as a GEMM on its NHWC view (up to 2x faster than the conv
    kernel on the small maps of the later stages); in CPU inference the activation is fused
    into the kernel (see :func:`linear`)."""
    if weight is None:
        weight, bias = conv.weight, conv.bias
    rows = _gemm_rows(conv, x)
    if rows is not None:
        return linear(conv, rows, weight, bias, act).permute(0, 3, 1, 2)
    post_op = _onednn_post_op(act)
    if (act is not None and post_op is not None and conv.padding_mode == 'zeros'
            and not isinstance(conv.padding, str) and _onednn_applies(x, weight)):
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, *post_op)
    return _apply_act(conv._conv_forward(x, weight, bias), act)


class FoldsBatchNorm(nn.Module):
    """Mixin running (conv, BatchNorm) pairs as one conv with folded weights in eval.

    Used when the BN is in eval mode, nothing is being traced and no gradient is wanted for the
    pair's parameters; the folded weights are cached and rebuilt when any parameter or buffer
    of the pair changes (storage, in-place version, device or dtype) or ``bn.eps`` does, and
    dropped on ``train()`` / ``eval()``, ``.to()`` and ``load_state_dict``. Saves a full pass
    over every BN output; outputs match the unfolded pair up to float rounding.
    :func:`mmeformer.deploy.fuse` does the same fold permanently.

    Two kinds of in-place change leave no trace that a cache could see: writes through
    ``.data`` and edits of inference tensors (a model built under ``torch.inference_mode``).
    Call ``model.eval()`` after such a change.
    """

    def _conv_bn(self, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor,
                 act: Optional[nn.Module] = None) -> torch.Tensor:
        """``act(bn(conv(x)))``, ``act`` optional (fused into the conv where possible)."""
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
                or not bn.track_running_stats or is_tracing()):
            return _apply_act(bn(conv2d(conv, x)), act)
        # num_batches_tracked: a training-mode forward updates the running statistics without
        # moving their version counters, but it increments this counter in place. Read from the
        # modules' dicts: nn.Module.__getattr__ took more than half of this check's time (the
        # check runs for every conv of every forward).
        params, bn_params, bn_buffers = conv._parameters, bn._parameters, bn._buffers
        tensors = (params['weight'], params.get('bias'), bn_params.get('weight'),
                   bn_params.get('bias'), bn_buffers['running_mean'], bn_buffers['running_var'],
                   bn_buffers.get('num_batches_tracked'))
        if records_grad(*tensors):
            return _apply_act(bn(conv2d(conv, x)), act)
        if is_compiling():
            return conv2d(conv, x, *folded_conv_bn(conv.weight, conv.bias, bn), act=act)
        key = (bn.eps, ) + tuple(_tensor_state(t) for t in tensors)
        rows, post_op = _gemm_rows(conv, x), _onednn_post_op(act)
        if rows is not None and post_op is not None and _onednn_gemm(rows, conv.weight):
            packed, bias = self._folded(conv, bn, key, packed=True)
            return torch.ops.mkldnn._linear_pointwise(rows, packed, bias,
                                                      *post_op).permute(0, 3, 1, 2)
        return conv2d(conv, x, *self._folded(conv, bn, key), act=act)

    def _folded(self, conv: nn.Conv2d, bn: nn.Module, key: tuple,
                packed: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The pair's folded (weight, bias), cached under ``key``; with ``packed`` the weight
        in oneDNN's GEMM layout, and then only that copy is kept: beside the parameters, a
        plain folded copy of every packed weight would be a third copy (efficientformerv2_l,
        RSS growth on its first inference at 224: +198 MB with it, +129 MB without, +97 MB
        for the model fused by mmeformer.deploy.fuse)."""
        cache = self.__dict__.setdefault('_fold_cache', {})
        entry = cache.get((id(conv), packed))
        if entry is None or entry[0] != key:
            plain = cache.get((id(conv), False))
            if plain is not None and plain[0] == key:
                weight, bias = plain[1:]
            else:
                with torch.no_grad():
                    weight, bias = folded_conv_bn(conv.weight, conv.bias, bn)
            entry = (key, _packed_gemm_weight(weight) if packed else weight, bias)
            cache[(id(conv), packed)] = entry
        return entry[1], entry[2]

    def train(self, mode: bool = True):
        self.__dict__['_fold_cache'] = {}
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__['_fold_cache'] = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__['_fold_cache'] = {}
        return super()._load_from_state_dict(*args, **kwargs)


class ConvNorm(FoldsBatchNorm, nn.Sequential):
    """Conv2d followed by BatchNorm, stored as ``.conv`` and ``.bn`` (folded in eval, see
    :class:`FoldsBatchNorm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bias: bool = True, bn_weight_init: float = 1.):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                           groups=groups, bias=bias),
            bn=nn.BatchNorm2d(out_channels)))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor, act: Optional[nn.Module] = None) -> torch.Tensor:
        """``act(bn(conv(x)))``; pass the activation that follows so that it can be fused."""
        return self._conv_bn(self.conv, self.bn, x, act)


class ConvActSequential(nn.Sequential):
    """``nn.Sequential`` of ConvNorms and activations that hands each activation to the ConvNorm
    before it, so that inference fuses the pair (same parameter names as the plain one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            if (isinstance(layers[i], ConvNorm) and i + 1 < len(layers)
                    and _onednn_post_op(layers[i + 1]) is not None):
                x, i = layers[i](x, layers[i + 1]), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x


@contextlib.contextmanager
def _running_stats_restored(module: nn.Module):
    """The running statistics (and ``num_batches_tracked``) of the BatchNorms inside are put
    back on exit. The normalisation itself is untouched: switching the update off instead
    would change which tensors autograd saves, which checkpointing refuses."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    kept = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, kept):
                buffer.copy_(value)


def run_blocks(blocks, x, with_cp: bool, *args):
    """Run ``blocks`` in order, with activation checkpointing per block when asked and useful.
    The backward pass re-runs each checkpointed block; that re-run must not update the
    BatchNorm running statistics a second time."""
    use_cp = with_cp and records_grad(x, *blocks.parameters())
    for block in blocks:
        if use_cp and block.training:
            x = checkpoint(block, x, *args, use_reentrant=False,
                           context_fn=lambda b=block: (contextlib.nullcontext(),
                                                       _running_stats_restored(b)))
        else:
            x = block(x, *args)
    return x


class Stage(nn.Module):
    """An optional downsampling followed by a sequence of blocks on NCHW maps."""

    def __init__(self, downsample: Optional[nn.Module], blocks, with_cp: bool):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.with_cp = with_cp

    def forward(self, x):
        return run_blocks(self.blocks, self.downsample(x), self.with_cp)


def axis_offsets(query_len: int, key_len: int, query_step: int = 1,
                 device=None) -> torch.Tensor:
    """(query_len, key_len) absolute offsets along one axis; query point i sits at key-grid
    coordinate ``i * query_step``."""
    return (torch.arange(query_len, device=device)[:, None] * query_step -
            torch.arange(key_len, device=device)[None, :]).abs()


def gather_offset_bias(grid: torch.Tensor, query_size: Tuple[int, int],
                       key_size: Tuple[int, int], query_step: int = 1) -> torch.Tensor:
    """(heads, Nq, Nk) bias ``grid[:, |dy|, |dx|]`` for every query/key pair of two row-major grids.

    ``grid`` is (heads, Gy, Gx) and indexed by the offsets along each axis. The index tensors are
    the two small per-axis offset tables, broadcast, so no (Nq, Nk) index is ever built: the
    output is the only tensor of that size.
    """
    (hq, wq), (hk, wk) = query_size, key_size
    heads = grid.shape[0]
    dy = axis_offsets(hq, hk, query_step, grid.device)
    dx = axis_offsets(wq, wk, query_step, grid.device)
    if is_tracing() or records_grad(grid):
        # Advanced indexing: its backward accumulates into the small grid.
        bias = grid[:, dy[:, None, :, None], dx[None, :, None, :]]  # (heads, hq, wq, hk, wk)
    else:
        # The rows at the y offsets (small), then one gather along x from a broadcast view:
        # 4-5x faster than advanced indexing (60 -> 12 ms for V2's downsample at 800x1344).
        rows = grid[:, dy]  # (heads, hq, hk, Gx)
        bias = rows[:, :, None].expand(heads, hq, wq, hk, rows.shape[-1]).gather(
            -1, dx[None, None, :, None].expand(heads, hq, wq, hk, wk))
    return bias.reshape(heads, hq * wq, hk * wk)


def bicubic_taps(in_len: int, out_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out_len, 4) source indices and weights of ``F.interpolate(mode='bicubic',
    align_corners=False)`` along one axis, computed as ATen computes them (a float scale times a
    double ``dst + 0.5``, rounded to float; cubic convolution with A = -0.75; indices clamped to
    the edges), so that the weights agree to float rounding."""
    scale = torch.tensor(in_len, dtype=torch.float32) / out_len
    src = (scale.double() * (torch.arange(out_len, dtype=torch.float64) + 0.5) - 0.5).float()
    base = src.floor()
    t = src - base
    a = -0.75

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)
    index = (base.long()[:, None] + torch.arange(-1, 3)).clamp_(0, in_len - 1)
    return index, weights


# Output rows / columns per dense block of the banded resize matrices (2-core EPYC: 32 / 64 were
# the fastest of 16-128 for the bias matrices of V2-S0 at 800x1344).
_RESIZE_ROW_BLOCK, _RESIZE_COL_BLOCK = 32, 64


def _banded_blocks(in_len: int, out_len: int, block: int) -> list:
    """The bicubic resize along one axis as a banded (out_len, in_len) matrix, in dense blocks
    of ``block`` output rows: (output slice, input slice, block weights)."""
    index, weights = bicubic_taps(in_len, out_len)
    blocks = []
    for start in range(0, out_len, block):
        idx, w = index[start:start + block], weights[start:start + block]
        first, last = int(idx.min()), int(idx.max())
        dense = torch.zeros(idx.shape[0], last + 1 - first).scatter_add_(1, idx - first, w)
        blocks.append((slice(start, start + idx.shape[0]), slice(first, last + 1), dense))
    return blocks


def resize_bicubic(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x[None], size, mode='bicubic', align_corners=False)[0]`` for a float32
    (C, H, W) tensor, equal to float rounding.

    In CPU inference the resize runs as two passes of small GEMMs over the dense blocks of the
    banded per-axis matrices (each output mixes 4 inputs per axis): about 3x faster than ATen's
    kernel for the (8, 625, 2500) -> (8, 1050, 4200) bias matrix of ``bias_mode='official'``
    (2-core EPYC: 134-145 -> 43-44 ms).
    Elsewhere (autograd, tracing, torch.compile, GPUs) it is ``F.interpolate`` itself.
    """
    out_h, out_w = size
    channels, in_h, in_w = x.shape
    if (x.device.type != 'cpu' or x.dtype != torch.float32 or is_tracing() or is_compiling()
            or records_grad(x)):
        return F.interpolate(x[None], size=size, mode='bicubic', align_corners=False)[0]
    # An axis whose size stays is an identity in ATen too (weights 0, 1, 0, 0).
    if in_w != out_w:
        flat, x = x.reshape(channels * in_h, in_w), x.new_empty(channels, in_h, out_w)
        for cols, taps, weight in _banded_blocks(in_w, out_w, _RESIZE_COL_BLOCK):
            torch.mm(flat[:, taps], weight.t(), out=x.view(-1, out_w)[:, cols])
    if in_h != out_h:
        source, x = x, x.new_empty(channels, out_h, out_w)
        for rows, taps, weight in _banded_blocks(in_h, out_h, _RESIZE_ROW_BLOCK):
            for c in range(channels):
                torch.mm(weight, source[c, taps], out=x[c, rows])
    return x if (in_h, in_w) != (out_h, out_w) else x.clone()


def is_tracing() -> bool:
    """True while torch.jit.trace / the TorchScript ONNX exporter or torch.export records the
    graph: shape branches must then be avoided so that one export serves every input size, and
    the eager-only speed paths (caches, channels-last, query chunks) stay out of the graph."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces: the eval caches, keyed on tensor storage and
    version, would break the graph, so their contents are computed in the graph instead (with
    ``torch._inductor.config.freezing`` they become constants)."""
    return torch.compiler.is_compiling()


# Elements (heads x query rows x keys) of one query chunk of an attention map in CPU inference:
# a few MB, so that the logits, the softmax and what follows stay in cache instead of streaming
# full (heads, Nq, Nk) maps through memory several times (2-2.5x faster at detection sizes).
QUERY_CHUNK_ELEMENTS = 1 << 20
# On GPUs a chunk only bounds memory (about 8 bytes per element: the logits, the float32
# softmax, its cast). Each chunk costs 6-8 kernel launches, and a batch-1 forward is bound by
# launches: CPU-sized chunks gave EfficientFormerV2-S0 at 800x1344 about 1500 aten ops per
# forward (581 at 64x64, where one chunk holds all), and H200 fp16 latency 1.7x the official
# code's.
ACCELERATOR_QUERY_CHUNK_ELEMENTS = 1 << 25


def query_chunks(num_queries: int, heads: int, num_keys: int,
                 device_type: str = 'cpu') -> List[Optional[slice]]:
    """Slices of the query axis for chunked inference on ``device_type``, of near-equal sizes;
    ``[None]`` (all queries at once) while autograd records (the full maps are saved for
    backward anyway), while tracing (shapes must stay symbolic), under torch.compile (inductor
    fuses the map's passes itself) or when one chunk holds them all."""
    budget = (QUERY_CHUNK_ELEMENTS if device_type == 'cpu'
              else ACCELERATOR_QUERY_CHUNK_ELEMENTS)
    rows = max(16, budget // max(1, heads * num_keys))
    if torch.is_grad_enabled() or is_tracing() or is_compiling() or rows >= num_queries:
        return [None]
    rows = math.ceil(num_queries / math.ceil(num_queries / rows))  # the same number, evened
    return [slice(start, min(start + rows, num_queries))
            for start in range(0, num_queries, rows)]


def query_rows(t: torch.Tensor, rows: Optional[slice]) -> torch.Tensor:
    """Rows ``rows`` of the second-to-last (query) axis of ``t``; all of ``t`` for None."""
    return t if rows is None else t[..., rows, :]


# Query rows below which a chunk's CPU GEMMs are dominated by packing the (Nk, d) key / value
# operand again for every chunk: (31 x 4200) @ (4200 x 64) ran at 63 GFLOP/s against 124 for
# 250 rows (2-core EPYC, V2's downsample attention at 800x1344). Not applied on GPUs, where
# one head at a time would mean 8x the kernel launches (not measured on a GPU).
MIN_CHUNK_ROWS = 128


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for (..., heads, N, d) inputs and a (heads, Nq, Nk)
    bias, query chunk by query chunk in inference (see :func:`query_chunks`); on CPU one head
    at a time when a chunk of all heads would have fewer than ``MIN_CHUNK_ROWS`` query rows.

    Written out rather than through ``scaled_dot_product_attention``: with key_dim != value_dim
    (all three families) the CPU fused kernels do not apply and the math fallback adds several
    full passes over the (Nq, Nk) map. The softmax runs in float32 under autocast.
    """
    # Contiguous (..., N, d) operands: bmm on the strided head views of channels-last maps is
    # 2-3x slower than the copies cost (measured on CPU for every attention size here).
    q, kt, v = (q * scale).contiguous(), k.contiguous().transpose(-2, -1), v.contiguous()
    heads = q.shape[-3] if q.dim() > 2 else 1
    chunks = query_chunks(q.shape[-2], heads, k.shape[-2], q.device.type)
    if (chunks[0] is not None and chunks[0].stop - chunks[0].start < MIN_CHUNK_ROWS
            and q.device.type == 'cpu'):
        return _per_head_attention(q, kt, v, bias)
    return _attend_in_chunks(q, kt, v, bias, chunks)


def _attend_in_chunks(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor,
                      bias: Optional[torch.Tensor],
                      chunks: List[Optional[slice]]) -> torch.Tensor:
    """``softmax(q kt + bias) v`` over the query ``chunks``, concatenated."""
    outs = []
    for rows in chunks:
        attn = _scores(query_rows(q, rows), kt,
                       None if bias is None else query_rows(bias, rows))
        outs.append(torch.matmul(attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _scores(q: torch.Tensor, kt: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``q kt + bias``; the bias added inside the GEMM (``addmm`` / ``baddbmm``) where its shape
    allows: faster than a GEMM and an add on CPU (2-core EPYC, fp32: one head of V2-S0's
    downsample, (210 x 16) @ (16 x 4200), 332 -> 264 us; (8 x 117 x 32) @ (32 x 1050), 450 ->
    437 us)."""
    if bias is None:
        return torch.matmul(q, kt)
    if q.dim() == 2 and bias.dim() == 2:
        return torch.addmm(bias, q, kt)
    # One image: its heads are the bias's batch. Not while tracing, where the batch size of the
    # example input would be baked into the graph's reshapes (dynamic-batch ONNX exports).
    if (q.dim() >= 3 and bias.dim() == 3 and q.shape[-3] == bias.shape[0]
            and math.prod(q.shape[:-3]) == 1 and not is_tracing()):
        scores = torch.baddbmm(bias, q.reshape(bias.shape[0], *q.shape[-2:]),
                               kt.reshape(bias.shape[0], *kt.shape[-2:]))
        return scores.view(*q.shape[:-1], kt.shape[-1])
    return torch.matmul(q, kt).add_(bias)  # in place: not needed for the backward


def _per_head_attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`softmax_attention` (inference) one (batch, head) at a time: with the whole chunk
    budget for one head, its GEMMs get several times more query rows."""
    chunks = query_chunks(q.shape[-2], 1, kt.shape[-1], q.device.type)
    heads = bias.shape[-3] if bias is not None else 1
    q_, kt_, v_ = (t.reshape((-1, ) + t.shape[-2:]) for t in (q, kt, v))
    outs = [_attend_in_chunks(q_[i], kt_[i], v_[i], None if bias is None else bias[i % heads],
                              chunks) for i in range(q_.shape[0])]
    return torch.stack(outs).view(q.shape[:-1] + v.shape[-1:])


BIAS_MODES = ('table', 'official')
# Per attention module: the most recently used biases, at most this many grid sizes and bytes
# (the newest is always kept: recomputing it made a fixed-size forward 3-5% slower, 14% in
# bias_mode='official'). One (heads, Nq, Nk) bias at 800x1344 takes 34-141 MB, so at detection
# sizes only the newest stays: on a stream of mmdet test sizes, keeping up to 8 sizes within 128
# MiB per module ended with 4x the memory (efficientformerv2_l: 1.49 GB against 0.35 GB) for no
# measurable gain, since such a stream rarely repeats a recent size. Small grids (segmentation
# crops, multi-scale tests at small sizes) still keep several sizes.
_MAX_CACHED_BIASES = 8
_MAX_CACHED_BIAS_BYTES = 32 << 20


class RelativeBiasAttention(nn.Module):
    """Base class of attention modules with a learned (|dy|, |dx|) bias table.

    ``attention_biases`` has shape (heads, R * R). Two ways to turn it into a (heads, Nq, Nk)
    bias for the actual token grids:

    * ``'table'``: the R x R table is resized (bicubic) to the key grid, then gathered at the
      real offsets. Geometrically correct at every size; identical to the classification model
      when the key grid is R x R (224 px input).
    * ``'official'``: the snap-research dense backbones. The table belongs to a reference grid of
      ``ref_key_size``; the full reference bias matrix is gathered, then the *matrix* is resized
      bicubically to (Nq, Nk). Needed only to reproduce the released COCO / ADE20K weights.

    In eval, when no gradient can flow into the bias, results are cached per (grid sizes,
    device, dtype, versions of the table and of any other input of the bias), the most recently
    used first, up to 8 grid sizes and 32 MiB per module (the newest always); the cache is
    dropped on ``train()`` / ``eval()``, ``_apply`` (``.to()``, ``.half()``, ...) and
    ``load_state_dict``. As with :class:`FoldsBatchNorm`, call ``model.eval()`` after writes
    through ``.data`` or edits of inference tensors, which no version counter records.
    """

    # False: compute the bias in every forward, holding nothing between forwards (set through
    # the backbone's ``cache_biases``).
    cache_biases = True

    def _init_bias_table(self, num_heads: int, table_size: int, query_step: int = 1,
                         bias_mode: str = 'table', ref_key_size: Optional[int] = None):
        if bias_mode not in BIAS_MODES:
            raise ValueError(f'bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}')
        self.bias_mode = bias_mode
        self.query_step = query_step
        self.classification_table_size = table_size
        if bias_mode == 'official':
            if ref_key_size is None:
                raise ValueError("bias_mode='official' needs a reference grid (bias_img_size)")
            table_size = ref_key_size
        self.table_size = table_size
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, table_size * table_size))
        self._bias_cache: Dict[tuple, torch.Tensor] = {}
        # Deploy: a bias frozen for one (query, key) grid (see mmeformer.deploy.fuse).
        self.frozen_sizes = None
        self.record_bias_sizes = False
        self.recorded_bias_sizes = None

    def freeze_bias(self, query_size: Tuple[int, int], key_size: Tuple[int, int]):
        """Keep the bias of these grids as a buffer (exported as a constant)."""
        with torch.no_grad():
            bias = self._compute_bias(tuple(query_size), tuple(key_size))
        self.register_buffer('frozen_attention_bias', bias, persistent=False)
        self.frozen_sizes = (tuple(query_size), tuple(key_size))

    def unfreeze_bias(self):
        self.frozen_sizes = None
        if 'frozen_attention_bias' in self._buffers:
            del self._buffers['frozen_attention_bias']

    # -- cache invalidation -------------------------------------------------------------------
    def drop_cached_biases(self):
        self._bias_cache = {}

    def train(self, mode: bool = True):
        self.drop_cached_biases()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.drop_cached_biases()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_cached_biases()
        self.unfreeze_bias()
        return super()._load_from_state_dict(*args, **kwargs)

    # -- bias computation ---------------------------------------------------------------------
    def attention_bias(self, query_size: Tuple[int, int],
                       key_size: Tuple[int, int]) -> torch.Tensor:
        """The (heads, Nq, Nk) additive bias that forward applies for these query and key grids
        (cached in eval); equal to :meth:`relative_bias` unless a subclass transforms it."""
        if self.frozen_sizes is not None:
            if is_tracing() or self.frozen_sizes == (tuple(query_size), tuple(key_size)):
                return self.frozen_attention_bias  # exported as a constant
        if self.record_bias_sizes:
            self.recorded_bias_sizes = (tuple(query_size), tuple(key_size))
        table = self.attention_biases
        if (not self.cache_biases or not self.bias_is_constant() or is_tracing()
                or is_compiling()):
            return self._compute_bias(tuple(query_size), tuple(key_size))
        key = (tuple(query_size), tuple(key_size), table.device, table.dtype,
               tuple(_tensor_state(t) for t in self._bias_inputs()))
        bias = self._bias_cache.pop(key, None)
        if bias is not None:
            self._bias_cache[key] = bias  # the least recently used come first
            return bias
        bias = self._compute_bias(tuple(query_size), tuple(key_size)).detach()
        self._bias_cache[key] = bias
        while len(self._bias_cache) > 1 and (len(self._bias_cache) > _MAX_CACHED_BIASES or
                                             self.cached_bias_bytes() > _MAX_CACHED_BIAS_BYTES):
            self._bias_cache.pop(next(iter(self._bias_cache)))
        return bias


    def cached_bias_bytes(self) -> int:
        """Bytes held by the eval bias cache."""
        return sum(b.numel() * b.element_size() for b in self._bias_cache.values())

    def bias_is_constant(self) -> bool:
        """True when the bias is frozen (deploy), or in eval when no gradient can flow into it:
        it may then be cached."""
        if self.frozen_sizes is not None:
            return True
        return not self.training and not records_grad(*self._bias_inputs())

    def _bias_inputs(self) -> Tuple[torch.Tensor, ...]:
        """Tensors the bias is computed from; a cached bias is valid while none changed."""
        return (self.attention_biases, )

    def relative_bias(self, query_size: Tuple[int, int],
                      key_size: Tuple[int, int]) -> torch.Tensor:
        """The (heads, Nq, Nk) relative-position bias gathered from the table (never cached)."""
        return self._relative_bias(tuple(query_size), tuple(key_size))

    def _compute_bias(self, query_size, key_size) -> torch.Tensor:
        """What :meth:`attention_bias` returns (and caches); subclasses that transform the
        bias before use (talking heads) override this and :meth:`_bias_inputs`."""
        return self._relative_bias(query_size, key_size)

    def _relative_bias(self, query_size, key_size,
                       head_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> torch.Tensor:
        """The bias for these grids, with ``head_map`` (an affine map across heads: talking
        head 1) applied to the small per-head table before its expansion to (Nq, Nk): gathering
        and resizing act on each head alone and keep constants, so the order does not matter."""
        table = self.attention_biases
        heads, side = table.shape[0], self.table_size
        head_map = head_map if head_map is not None else (lambda t: t)
        if self.bias_mode == 'table':
            grid = table.view(1, heads, side, side)
            if is_tracing() or tuple(key_size) != (side, side):
                grid = F.interpolate(grid.float(), size=key_size, mode='bicubic',
                                     align_corners=False).to(table.dtype)
            return gather_offset_bias(head_map(grid[0]), query_size, key_size, self.query_step)
        # 'official': gather the reference matrix, then resize the matrix itself.
        ref_q = math.ceil(side / self.query_step)
        step = math.ceil(side / ref_q)
        bias = head_map(gather_offset_bias(table.view(heads, side, side), (ref_q, ref_q),
                                           (side, side), step))
        n_q, n_k = query_size[0] * query_size[1], key_size[0] * key_size[1]
        return resize_bicubic(bias.float(), (n_q, n_k)).to(table.dtype)


def eval_cache_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s inference caches: folded conv + BN weights (plain or packed),
    packed copies of its parameters and cached attention biases."""
    storages, bias_bytes = {}, 0
    for module in model.modules():
        if isinstance(module, RelativeBiasAttention):
            bias_bytes += module.cached_bias_bytes()
        # A packed fold made from a plain one shares its bias tensor: count storages once.
        held = [t for entry in module.__dict__.get('_fold_cache', {}).values() for t in entry[1:]]
        held += [_onednn_weights[p][1] for p in module.parameters(recurse=False)
                 if p in _onednn_weights]
        for t in held:
            if t is None:
                continue
            if t.is_mkldnn:  # a packed weight: an opaque oneDNN tensor without a storage
                storages[('packed', id(t))] = t.numel() * t.element_size()
            else:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return bias_bytes + sum(storages.values())
