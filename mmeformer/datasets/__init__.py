"""Dataset helpers of mmeformer: generated toy datasets in the COCO and ADE20K layouts."""
from .toy import make_toy_ade, make_toy_coco, make_toy_data

__all__ = ['make_toy_ade', 'make_toy_coco', 'make_toy_data']
