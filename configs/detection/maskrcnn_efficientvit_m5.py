"""Mask R-CNN 1x, EfficientViT-M5 (Microsoft, cascaded group attention) + EfficientViTFPN,
COCO. No COCO number was published for this size.
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientvit.py)."""
_base_ = ['./_base_/maskrcnn_efficientvit.py']
model = dict(
    backbone=dict(
        arch='m5',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientvit_m5.pth')),
    neck=dict(in_channels=[192, 288, 384]))
