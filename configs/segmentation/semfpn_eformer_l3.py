"""Semantic FPN 40k, EfficientFormer-L3, ADE20K. Published: mIoU 43.5
(batch 32 = 8 GPUs x 4; recipe in ./_base_/semfpn_adamw_40k.py)."""
_base_ = ['./_base_/semfpn_efficientformer.py']
model = dict(
    backbone=dict(
        arch='l3',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l3_300d.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
