"""Mask R-CNN 1x with a Microsoft EfficientViT (cascaded group attention) backbone and its
EfficientViTFPN neck: the Cream COCO recipe (AdamW lr 1e-4, weight decay 0.05, no decay on
``attention_biases``, 1x, (1333, 800), batch 16 = 8 GPUs x 2; every BatchNorm of the backbone in
eval mode). The backbone has strides 16/32/64; the neck adds stride 8 and 4 with two transposed
convs, so the standard RPN / RoI heads see strides 4..64. Per-arch files set ``arch``, the
ImageNet file and the neck ``in_channels``."""
_base_ = [
    '../../_base_/mmeformer_backbones.py',
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
    './schedule_adamw_1x.py'
]
model = dict(
    backbone=dict(_base_.efficientvit_backbone, _delete_=True),
    neck=dict(_base_.efficientvit_fpn, _delete_=True))
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=0.05))
