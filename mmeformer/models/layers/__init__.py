"""Building blocks shared by the three backbone families, one concept per module:

* :mod:`.fast_path`: the switch of the inference fast paths (:class:`fast_paths`) and the
  states that make them step aside (tracing, torch.compile, autograd);
* :mod:`.norm`: norm layers from mmcv-style configs;
* :mod:`.blocks`: stochastic depth, layer scale, GELU, residual forms, stages;
* :mod:`.onednn`: CPU inference through oneDNN's fused kernels on packed weights;
* :mod:`.conv_bn`: conv + BatchNorm pairs, folded in inference;
* :mod:`.attention`: softmax attention, query-chunked in inference;
* :mod:`.attention_bias`: the (|dy|, |dx|) relative-position bias tables, ``bias_mode``, the
  gather and bicubic resize, the per-size cache;
* :mod:`.caches`: the bytes those caches hold.
"""
from .attention import query_chunks, query_rows, softmax_attention, softmax_last
from .attention_bias import (BIAS_MODES, RelativeBiasAttention, bicubic_taps, gather_offset_bias,
                             resize_bicubic)
from .blocks import (GELU, DropPath, LayerScale, Stage, drop_path_or_identity, run_blocks,
                     scaled_lerp, scaled_residual, stochastic_depth_rates)
from .caches import eval_cache_bytes
from .conv_bn import ConvActSequential, ConvNorm, FoldsBatchNorm, folded_conv_bn
from .fast_path import fast_paths, fast_paths_enabled, is_compiling, is_tracing, records_grad
from .norm import build_norm
from .onednn import conv2d, forget_packed_weights, linear

__all__ = [
    'BIAS_MODES', 'ConvActSequential', 'ConvNorm', 'DropPath', 'FoldsBatchNorm', 'GELU',
    'LayerScale', 'RelativeBiasAttention', 'Stage', 'bicubic_taps', 'build_norm', 'conv2d',
    'drop_path_or_identity', 'eval_cache_bytes', 'fast_paths', 'fast_paths_enabled',
    'folded_conv_bn', 'forget_packed_weights', 'gather_offset_bias', 'is_compiling', 'is_tracing',
    'linear', 'query_chunks', 'query_rows', 'records_grad', 'resize_bicubic', 'run_blocks',
    'scaled_lerp', 'scaled_residual', 'softmax_attention', 'softmax_last',
    'stochastic_depth_rates'
]
