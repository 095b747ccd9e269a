"""Mask R-CNN 1x, EfficientFormerV2-S1, COCO. No COCO number was published for this size.
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientformerv2.py; drop_path_rate as in
the ImageNet recipe of this size.)"""
_base_ = ['./_base_/maskrcnn_efficientformerv2.py']
model = dict(
    backbone=dict(
        arch='s1',
        drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s1_450.pth')),
    neck=dict(in_channels=[32, 48, 120, 224]))
