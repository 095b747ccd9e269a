"""Semantic FPN 40k, EfficientFormerV2-S0, ADE20K. No ADE20K number was published for this size.
(batch 32 = 8 GPUs x 4; recipe in ./_base_/semfpn_adamw_40k.py; drop_path_rate as in the
ImageNet recipe of this size.)"""
_base_ = ['./_base_/semfpn_efficientformerv2.py']
model = dict(
    backbone=dict(
        arch='s0',
        drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s0_450.pth')),
    neck=dict(in_channels=[32, 48, 96, 176]))
