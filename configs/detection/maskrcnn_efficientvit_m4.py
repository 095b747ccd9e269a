"""Mask R-CNN 1x, EfficientViT-M4 (Microsoft, cascaded group attention) + EfficientViTFPN,
COCO. Published: mask AP 31.0.
(batch 16 = 8 GPUs x 2; recipe in ./_base_/maskrcnn_efficientvit.py)."""
_base_ = ['./_base_/maskrcnn_efficientvit.py']
model = dict(
    backbone=dict(
        arch='m4',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientvit_m4.pth')),
    neck=dict(in_channels=[128, 256, 384]))
