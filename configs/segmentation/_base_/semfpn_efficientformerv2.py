"""Semantic FPN (ADE20K, 40k) with an EfficientFormerV2 backbone. Per-arch files set ``arch``,
``drop_path_rate``, the ImageNet file and the FPN ``in_channels``."""
_base_ = ['./semfpn_adamw_40k.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmeformer.EfficientFormerV2',
        arch='s0',
        out_indices=(0, 1, 2, 3),
        # New training: the default bias_mode='table' keeps the ImageNet attention biases.
        # Evaluating the released ADE20K weights needs bias_mode='official', bias_img_size=512.
        bias_mode='table',
        drop_path_rate=0.,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s0_450.pth')),
    neck=dict(in_channels=[32, 48, 96, 176]))
