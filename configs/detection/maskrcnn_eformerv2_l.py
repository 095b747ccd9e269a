"""Mask R-CNN 1x, EfficientFormerV2-L, COCO. Published: box AP 44.7 / mask AP 40.4.
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientformerv2.py; drop_path_rate as in
the ImageNet recipe of this size.)"""
_base_ = ['./_base_/maskrcnn_efficientformerv2.py']
model = dict(
    backbone=dict(
        arch='l',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_l_450.pth')),
    neck=dict(in_channels=[40, 80, 192, 384]))
