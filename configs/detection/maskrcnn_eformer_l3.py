"""Mask R-CNN 1x, EfficientFormer-L3, COCO. Published: box AP 41.4 / mask AP 38.1
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientformer.py)."""
_base_ = ['./_base_/maskrcnn_efficientformer.py']
model = dict(
    backbone=dict(
        arch='l3',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l3_300d.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
