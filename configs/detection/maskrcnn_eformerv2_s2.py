"""Mask R-CNN 1x, EfficientFormerV2-S2, COCO. Published: box AP 43.4 / mask AP 39.5.
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientformerv2.py; drop_path_rate as in
the ImageNet recipe of this size.)"""
_base_ = ['./_base_/maskrcnn_efficientformerv2.py']
model = dict(
    backbone=dict(
        arch='s2',
        drop_path_rate=0.02,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s2_450.pth')),
    neck=dict(in_channels=[32, 64, 144, 288]))
