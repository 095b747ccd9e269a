"""``softmax(q k^T * scale + bias) v`` as the three families compute it, and the query chunks
that inference splits an attention map into.

In inference (nothing recording a graph, fast paths on) the map is computed a chunk of query
rows at a time, a few MB on CPU, so that the logits, the softmax and what follows stay in cache
instead of streaming full (heads, Nq, Nk) maps through memory several times; on CPU one head at
a time when a chunk of all heads would have too few rows for efficient GEMMs. On GPUs a chunk
only bounds memory: each chunk costs several kernel launches, which a batch-1 forward is bound
by. docs/benchmarks.md has the measurements behind these sizes.
"""
import math
from typing import List, Optional

import torch

from .fast_path import eager_fast_path, fast_paths_enabled, is_tracing

# Elements (heads x query rows x keys) of one query chunk of an attention map in CPU inference.
QUERY_CHUNK_ELEMENTS = 1 << 20
# On other devices (about 8 bytes per element: the logits, the float32 softmax, its cast).
ACCELERATOR_QUERY_CHUNK_ELEMENTS = 1 << 25
# Query rows below which a chunk's CPU GEMMs are dominated by packing the (Nk, d) key / value
# operand again for every chunk: such maps are computed one head at a time.
MIN_CHUNK_ROWS = 128


def query_chunks(num_queries: int, heads: int, num_keys: int,
                 device_type: str = 'cpu') -> List[Optional[slice]]:
    """Slices of the query axis for chunked inference on ``device_type``, of near-equal sizes;
    ``[None]`` (all queries at once) while autograd records (the full maps are saved for
    backward anyway), while tracing (shapes must stay symbolic), under torch.compile (inductor
    fuses the map's passes itself), with the fast paths off, or when one chunk holds them all."""
    budget = (QUERY_CHUNK_ELEMENTS if device_type == 'cpu'
              else ACCELERATOR_QUERY_CHUNK_ELEMENTS)
    rows = max(16, budget // max(1, heads * num_keys))
    if torch.is_grad_enabled() or not eager_fast_path() or rows >= num_queries:
        return [None]
    rows = math.ceil(num_queries / math.ceil(num_queries / rows))  # the same number, evened
    return [slice(start, min(start + rows, num_queries))
            for start in range(0, num_queries, rows)]


def softmax_last(attn: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in at least float32: low-precision maps (autocast) are upcast,
    float64 ones (gradient checks) keep their precision."""
    return attn.softmax(dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32))


def query_rows(t: torch.Tensor, rows: Optional[slice]) -> torch.Tensor:
    """Rows ``rows`` of the second-to-last (query) axis of ``t``; all of ``t`` for None."""
    return t if rows is None else t[..., rows, :]


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
    # slower than the copies cost.
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
        outs.append(torch.matmul(softmax_last(attn).to(v.dtype), v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _scores(q: torch.Tensor, kt: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``q kt + bias``; in inference the bias is added inside the GEMM (``addmm`` /
    ``baddbmm``) where its shape allows, which saves a pass over the map."""
    if bias is None:
        return torch.matmul(q, kt)
    if not fast_paths_enabled():
        return torch.matmul(q, kt) + bias
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
