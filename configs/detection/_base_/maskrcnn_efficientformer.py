"""Mask R-CNN 1x with an EfficientFormer (V1) backbone: the snap-research COCO recipe (AdamW
lr 2e-4, weight decay 1e-4, 1x, (1333, 800), batch 16 = 8 GPUs x 2). Per-arch files set
``arch``, the ImageNet file and the FPN ``in_channels``."""
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
    './schedule_adamw_1x.py'
]
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmeformer.EfficientFormer',
        arch='l1',
        out_indices=(0, 1, 2, 3),
        # New training: the default bias_mode='table' keeps the ImageNet attention biases.
        # Evaluating the released COCO weights needs bias_mode='official', bias_img_size=800.
        bias_mode='table',
        out_norm_cfg=dict(type='GN', num_groups=1),  # norm0/2/4/6 of the dense release
        init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l1_300d.pth')),
    neck=dict(in_channels=[48, 96, 224, 448], out_channels=256, num_outs=5))
optim_wrapper = dict(optimizer=dict(lr=2e-4, weight_decay=1e-4))
