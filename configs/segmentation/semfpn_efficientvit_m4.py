"""Semantic FPN 40k, EfficientViT-M4 (Microsoft, cascaded group attention) + EfficientViTFPN,
ADE20K. NO PUBLISHED NUMBER EXISTS for this combination: the EfficientViT paper reports COCO
detection only, so this is an mmeformer recipe (the EfficientFormer Semantic FPN schedule with
the EfficientViT optimiser settings: AdamW lr 2e-4, weight decay 0.05; batch 32 = 8 GPUs x 4).

The backbone has strides 16/32/64; EfficientViTFPN adds strides 8 and 4 with two transposed
convs, and the FPN head fuses all five levels (strides 4..64).
"""
_base_ = ['../_base_/mmeformer_backbones.py', './_base_/semfpn_adamw_40k.py']
model = dict(
    backbone=dict(_base_.efficientvit_backbone, _delete_=True),
    neck=dict(_base_.efficientvit_fpn, _delete_=True),
    decode_head=dict(
        in_channels=[256, 256, 256, 256, 256],
        in_index=[0, 1, 2, 3, 4],
        feature_strides=[4, 8, 16, 32, 64]))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05))
