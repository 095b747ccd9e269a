"""Toy ADE20K data and a short schedule for the segmentation toy configs (CPU, minutes).

Defines ``toy_*`` variables only; each toy config inherits its real config plus this file and
assigns them to the real keys, so everything else (model, optimiser) stays the real recipe.
Generate the data first: ``python tools/make_toy_data.py`` (writes
data/toy/ade/ADEChallengeData2016/).
"""
toy_data_root = 'data/toy/ade/ADEChallengeData2016'
toy_crop_size = (160, 160)
toy_scale = (320, 256)
toy_model = dict(data_preprocessor=dict(size=toy_crop_size), backbone=dict(init_cfg=None))
toy_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=toy_scale, ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=toy_crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
toy_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=toy_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
toy_train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=toy_data_root, pipeline=toy_train_pipeline))
toy_val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=toy_data_root, pipeline=toy_test_pipeline))
toy_val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])

toy_train_cfg = dict(max_iters=200, val_interval=100)
toy_param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0., begin=0, end=200, by_epoch=False)
]
toy_default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=100))
