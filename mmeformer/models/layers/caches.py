"""What the inference caches of a model hold, in bytes."""
import torch.nn as nn

from .attention_bias import RelativeBiasAttention
from .conv_bn import FoldsBatchNorm
from .onednn import held_packed_weight


def eval_cache_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s inference caches: folded conv + BN weights (plain or packed),
    packed copies of its parameters and cached attention biases."""
    storages, bias_bytes = {}, 0
    for module in model.modules():
        if isinstance(module, RelativeBiasAttention):
            bias_bytes += module.cached_bias_bytes()
        # A packed fold made from a plain one shares its bias tensor: count storages once.
        held = module.cached_fold_tensors() if isinstance(module, FoldsBatchNorm) else []
        held += [held_packed_weight(p) for p in module.parameters(recurse=False)]
        for t in held:
            if t is None:
                continue
            if t.is_mkldnn:  # a packed weight: an opaque oneDNN tensor without a storage
                storages[('packed', id(t))] = t.numel() * t.element_size()
            else:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return bias_bytes + sum(storages.values())
