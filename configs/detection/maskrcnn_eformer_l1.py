"""Mask R-CNN 1x, EfficientFormer-L1, COCO. Published: box AP 37.9 / mask AP 35.4
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientformer.py)."""
_base_ = ['./_base_/maskrcnn_efficientformer.py']
model = dict(
    backbone=dict(
        arch='l1',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l1_300d.pth')),
    neck=dict(in_channels=[48, 96, 224, 448]))
