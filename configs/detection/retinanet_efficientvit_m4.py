"""RetinaNet 1x, EfficientViT-M4 (Microsoft, cascaded group attention) + EfficientViTFPN, COCO.
Published: box AP 32.7. Batch 16 = 8 GPUs x 2. The optimiser follows the Cream EfficientViT-M4
Mask R-CNN recipe (AdamW lr 1e-4, weight decay 0.05, no decay on ``attention_biases``); the neck
adds one stride-8 level with a transposed conv and one stride-128 level with a conv on the last
input, giving RetinaNet's strides 8..128."""
_base_ = [
    '../_base_/mmeformer_backbones.py',
    'mmdet::_base_/models/retinanet_r50_fpn.py', 'mmdet::_base_/datasets/coco_detection.py',
    './_base_/schedule_adamw_1x.py'
]
model = dict(
    backbone=dict(_base_.efficientvit_backbone, _delete_=True),
    neck=dict(
        _base_.efficientvit_fpn, _delete_=True, num_extra_trans_convs=1,
        add_extra_convs='on_input'))
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=0.05))
