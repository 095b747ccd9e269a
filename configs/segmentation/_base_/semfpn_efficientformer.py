"""Semantic FPN (ADE20K, 40k) with an EfficientFormer (V1) backbone. Per-arch files set
``arch``, the ImageNet file and the FPN ``in_channels``."""
_base_ = ['../../_base_/mmeformer_backbones.py', './semfpn_adamw_40k.py']
model = dict(
    backbone=dict(_base_.efficientformer_backbone, _delete_=True),
    neck=dict(in_channels=[48, 96, 224, 448]))
