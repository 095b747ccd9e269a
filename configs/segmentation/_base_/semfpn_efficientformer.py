"""Semantic FPN (ADE20K, 40k) with an EfficientFormer (V1) backbone. Per-arch files set
``arch``, the ImageNet file and the FPN ``in_channels``."""
_base_ = ['./semfpn_adamw_40k.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmeformer.EfficientFormer',
        arch='l1',
        out_indices=(0, 1, 2, 3),
        # New training: the default bias_mode='table' keeps the ImageNet attention biases.
        # Evaluating the released ADE20K weights needs bias_mode='official', bias_img_size=512.
        bias_mode='table',
        out_norm_cfg=dict(type='GN', num_groups=1),  # norm0/2/4/6 of the dense release
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l1_300d.pth')),
    neck=dict(in_channels=[48, 96, 224, 448]))
