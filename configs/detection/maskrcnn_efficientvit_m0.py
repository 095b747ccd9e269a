"""Mask R-CNN 1x, EfficientViT-M0 (Microsoft, cascaded group attention) + EfficientViTFPN,
COCO. No COCO number was published for this size.
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientvit.py)."""
_base_ = ['./_base_/maskrcnn_efficientvit.py']
model = dict(
    backbone=dict(
        arch='m0',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientvit_m0.pth')),
    neck=dict(in_channels=[64, 128, 192]))
