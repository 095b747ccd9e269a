"""Semantic FPN 40k, EfficientFormerV2-L, ADE20K. Published: mIoU 45.2.
(batch 32 = 8 GPUs x 4; recipe in ./_base_/semfpn_adamw_40k.py; drop_path_rate as in the
ImageNet recipe of this size.)"""
_base_ = ['./_base_/semfpn_efficientformerv2.py']
model = dict(
    backbone=dict(
        arch='l',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_l_450.pth')),
    neck=dict(in_channels=[40, 80, 192, 384]))
