"""Semantic FPN 40k, EfficientFormer-L7, ADE20K. Published: mIoU 45.1
(batch 32 = 8 GPUs x 4; recipe in ./_base_/semfpn_adamw_40k.py)."""
_base_ = ['./_base_/semfpn_efficientformer.py']
model = dict(
    backbone=dict(
        arch='l7',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l7_300d.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
