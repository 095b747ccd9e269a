"""Toy COCO data and a short schedule for the detection toy configs (CPU, minutes).

Defines ``toy_*`` variables only; each toy config inherits its real config plus this file and
assigns them to the real keys, so everything else (model, optimiser) stays the real recipe.
Generate the data first: ``python tools/make_toy_data.py`` (writes data/toy/coco/).
"""
toy_data_root = 'data/toy/coco/'
toy_scale = (320, 320)
toy_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=toy_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
toy_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=toy_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
toy_train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=toy_data_root, pipeline=toy_train_pipeline))
toy_val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=toy_data_root, pipeline=toy_test_pipeline))
toy_val_evaluator = dict(ann_file=toy_data_root + 'annotations/instances_val2017.json')

# 48 training images / batch 2 = 24 iterations per epoch, about 1.5 minutes on a 2-core CPU.
toy_train_cfg = dict(max_epochs=4, val_interval=2)
toy_param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=20),
    dict(type='MultiStepLR', begin=0, end=4, by_epoch=True, milestones=[3], gamma=0.1)
]
toy_default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=2))
