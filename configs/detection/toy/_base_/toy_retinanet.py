"""Toy RetinaNet settings: the toy COCO data (boxes only) plus no ImageNet file and a low test
score threshold (the focal-loss prior gives 0.01 scores before training)."""
_base_ = ['./toy_coco.py']
toy_model = dict(
    backbone=dict(init_cfg=None),
    test_cfg=dict(nms_pre=300, score_thr=0.001, max_per_img=50))
toy_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(320, 320), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
toy_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(320, 320), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
toy_train_dataloader = dict(dataset=dict(pipeline=toy_train_pipeline))
toy_val_dataloader = dict(dataset=dict(pipeline=toy_test_pipeline))
