"""Mask R-CNN 1x with an EfficientFormer (V1) backbone: the snap-research COCO recipe (AdamW
lr 2e-4, weight decay 1e-4, 1x, (1333, 800), batch 16 = 8 GPUs x 2). Per-arch files set
``arch``, the ImageNet file and the FPN ``in_channels``."""
_base_ = [
    '../../_base_/mmeformer_backbones.py',
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
    './schedule_adamw_1x.py'
]
model = dict(
    backbone=dict(_base_.efficientformer_backbone, _delete_=True),
    neck=dict(in_channels=[48, 96, 224, 448], out_channels=256, num_outs=5))
optim_wrapper = dict(optimizer=dict(lr=2e-4, weight_decay=1e-4))
