"""Mask R-CNN 1x, EfficientFormer-L7, COCO. Published: box AP 42.6 / mask AP 39.0
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientformer.py)."""
_base_ = ['./_base_/maskrcnn_efficientformer.py']
model = dict(
    backbone=dict(
        arch='l7',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l7_300d.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
