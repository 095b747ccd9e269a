"""The learned relative-position attention bias of all three families: a (heads, R * R) table
indexed by the absolute offset (|dy|, |dx|) between a query and a key (LeViT-style), its two
ways of reaching the actual token grids (``bias_mode``), the gather and bicubic resize that do
it, and the per-size cache of the result in inference."""
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast_path import eager_fast_path, fast_paths_enabled, is_tracing, records_grad, tensor_state

BIAS_MODES = ('table', 'official')
# Per attention module: the most recently used biases, at most this many grid sizes and bytes.
# The newest is always kept (recomputing it before every forward costs a fixed-size stream a few
# percent); at detection sizes one bias takes tens of MB, so only the newest stays, while small
# grids (segmentation crops) keep several sizes.
MAX_CACHED_BIASES = 8
MAX_CACHED_BIAS_BYTES = 32 << 20


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
    used first, up to ``MAX_CACHED_BIASES`` grid sizes and ``MAX_CACHED_BIAS_BYTES`` per module
    (the newest always); the cache is dropped on ``train()`` / ``eval()``, ``_apply`` (``.to()``,
    ``.half()``, ...) and ``load_state_dict``. As with
    :class:`~mmeformer.models.layers.FoldsBatchNorm`, call ``model.eval()`` after writes through
    ``.data`` or edits of inference tensors, which no version counter records.
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
        # Deploy: a bias frozen for one (query, key) grid (see mmeformer.models.fuse).
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
        if not self.cache_biases or not self.bias_is_constant() or not eager_fast_path():
            return self._compute_bias(tuple(query_size), tuple(key_size))
        key = (tuple(query_size), tuple(key_size), table.device, table.dtype,
               tuple(tensor_state(t) for t in self._bias_inputs()))
        bias = self._bias_cache.pop(key, None)
        if bias is not None:
            self._bias_cache[key] = bias  # the least recently used come first
            return bias
        bias = self._compute_bias(tuple(query_size), tuple(key_size)).detach()
        self._bias_cache[key] = bias
        while len(self._bias_cache) > 1 and (len(self._bias_cache) > MAX_CACHED_BIASES or
                                             self.cached_bias_bytes() > MAX_CACHED_BIAS_BYTES):
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
    if is_tracing() or records_grad(grid) or not fast_paths_enabled():
        # Advanced indexing: its backward accumulates into the small grid.
        bias = grid[:, dy[:, None, :, None], dx[None, :, None, :]]  # (heads, hq, wq, hk, wk)
    else:
        # The rows at the y offsets (small), then one gather along x from a broadcast view:
        # several times faster than advanced indexing at detection sizes.
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


# Output rows / columns per dense block of the banded resize matrices (the fastest of 16-128 for
# the bias matrices of V2-S0 at 800x1344 on a 2-core CPU).
RESIZE_ROW_BLOCK, RESIZE_COL_BLOCK = 32, 64


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
    banded per-axis matrices (each output mixes 4 inputs per axis): several times faster than
    ATen's kernel for the bias matrices of ``bias_mode='official'``. Elsewhere (autograd,
    tracing, torch.compile, GPUs, fast paths off) it is ``F.interpolate`` itself.
    """
    out_h, out_w = size
    channels, in_h, in_w = x.shape
    if (x.device.type != 'cpu' or x.dtype != torch.float32 or not eager_fast_path()
            or records_grad(x)):
        return F.interpolate(x[None], size=size, mode='bicubic', align_corners=False)[0]
    # An axis whose size stays is an identity in ATen too (weights 0, 1, 0, 0).
    if in_w != out_w:
        flat, x = x.reshape(channels * in_h, in_w), x.new_empty(channels, in_h, out_w)
        for cols, taps, weight in _banded_blocks(in_w, out_w, RESIZE_COL_BLOCK):
            torch.mm(flat[:, taps], weight.t(), out=x.view(-1, out_w)[:, cols])
    if in_h != out_h:
        source, x = x, x.new_empty(channels, out_h, out_w)
        for rows, taps, weight in _banded_blocks(in_h, out_h, RESIZE_ROW_BLOCK):
            for c in range(channels):
                torch.mm(weight, source[c, taps], out=x[c, rows])
    return x if (in_h, in_w) != (out_h, out_w) else x.clone()
