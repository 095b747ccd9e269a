"""Plain building blocks: stochastic depth, layer scale, the exact GELU, residual forms and the
stage container with per-block activation checkpointing."""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fast_path import fast_paths_enabled, is_tracing, records_grad


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


def nhwc_view(x: torch.Tensor):
    """The NHWC view of a channels-last CPU map when the fast paths are on, else None: torch's
    CPU kernels for pointwise ops and GEMMs run faster on it than on the same memory seen as
    NCHW (on GPUs the extra views only add ops)."""
    if (x.dim() == 4 and x.device.type == 'cpu' and fast_paths_enabled() and not is_tracing()
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
        return x.permute(0, 2, 3, 1)
    return None


class GELU(nn.GELU):
    """Exact (erf) GELU; a fast path runs it on the NHWC view of a channels-last CPU map.

    ``inplace=True`` overwrites the input while autograd is not recording (and not while
    tracing): for callers whose input is a fresh conv output, as a fresh multi-MB result costs
    page faults under glibc's allocator.
    """

    def __init__(self, approximate: str = 'none', inplace: bool = False):
        super().__init__(approximate=approximate)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = nhwc_view(x)
        if view is not None:
            x = view
        if (self.inplace and not torch.is_grad_enabled() and not is_tracing()
                and fast_paths_enabled()):
            x = torch.ops.aten.gelu_(x, approximate=self.approximate)
        else:
            x = F.gelu(x, approximate=self.approximate)
        return x if view is None else x.permute(0, 3, 1, 2)


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
    stochastic depth is active, a graph is being exported (coremltools 9.0 converts neither
    ``addcmul`` nor ``lerp``) or the fast paths are off."""
    stochastic = isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0.
    return stochastic or is_tracing() or not fast_paths_enabled()


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

    def __init__(self, downsample, blocks, with_cp: bool):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.with_cp = with_cp

    def forward(self, x):
        return run_blocks(self.blocks, self.downsample(x), self.with_cp)
