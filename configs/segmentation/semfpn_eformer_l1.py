"""Semantic FPN 40k, EfficientFormer-L1, ADE20K. Published: mIoU 38.9
(batch 32 = 8 GPUs x 4; recipe in ./_base_/semfpn_adamw_40k.py)."""
_base_ = ['./_base_/semfpn_efficientformer.py']
model = dict(
    backbone=dict(
        arch='l1',
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l1_300d.pth')),
    neck=dict(in_channels=[48, 96, 224, 448]))
