"""Semantic FPN (ADE20K, 40k) with an EfficientFormerV2 backbone. Per-arch files set ``arch``,
``drop_path_rate``, the ImageNet file and the FPN ``in_channels``."""
_base_ = ['../../_base_/mmeformer_backbones.py', './semfpn_adamw_40k.py']
model = dict(
    backbone=dict(_base_.efficientformerv2_backbone, _delete_=True),
    neck=dict(in_channels=[32, 48, 96, 176]))
