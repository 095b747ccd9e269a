"""Mask R-CNN 1x with an EfficientFormerV2 backbone: the snap-research COCO recipe (AdamW
lr 2e-4, weight decay 0.05, 1x, (1333, 800), batch 16 = 8 GPUs x 2). Per-arch files set
``arch``, ``drop_path_rate``, the ImageNet file and the FPN ``in_channels``."""
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
    './schedule_adamw_1x.py'
]
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmeformer.EfficientFormerV2',
        arch='s0',
        out_indices=(0, 1, 2, 3),
        # New training: the default bias_mode='table' keeps the ImageNet attention biases.
        # Evaluating the released COCO weights needs bias_mode='official', bias_img_size=800.
        bias_mode='table',
        drop_path_rate=0.,
        init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s0_450.pth')),
    neck=dict(in_channels=[32, 48, 96, 176], out_channels=256, num_outs=5))
optim_wrapper = dict(optimizer=dict(lr=2e-4, weight_decay=0.05))
