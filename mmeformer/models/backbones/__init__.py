from .efficientformer import EfficientFormer
from .efficientformer_v2 import EfficientFormerV2
from .efficientvit import EfficientViT

__all__ = ['EfficientFormer', 'EfficientFormerV2', 'EfficientViT']
