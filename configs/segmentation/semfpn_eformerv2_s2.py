"""Semantic FPN 40k, EfficientFormerV2-S2, ADE20K. Published: mIoU 42.4.
(batch 32 = 8 GPUs x 4; recipe in ./_base_/semfpn_adamw_40k.py; drop_path_rate as in the
ImageNet recipe of this size.)"""
_base_ = ['./_base_/semfpn_efficientformerv2.py']
model = dict(
    backbone=dict(
        arch='s2',
        drop_path_rate=0.02,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s2_450.pth')),
    neck=dict(in_channels=[32, 64, 144, 288]))
