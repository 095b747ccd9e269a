"""1x schedule (12 epochs, LR steps at epochs 8 and 11, 500-iteration linear warm-up) with AdamW,
as in the EfficientFormer / EfficientFormerV2 / EfficientViT COCO releases.

Total batch size of the published runs: 16 images = 8 GPUs x 2 images per GPU
(``train_dataloader.batch_size`` below is per GPU). With another number of GPUs pass
``--auto-scale-lr`` to tools/train.py: the LR is scaled by (GPUs x 2) / 16.
"""
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py']

custom_imports = dict(imports=['mmeformer.models'], allow_failed_imports=False)

# train_dataloader.batch_size stays 2 (per GPU) as in mmdet's COCO bases: 8 GPUs -> 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)

# The families' bases set lr / weight_decay; attention bias tables never get weight decay.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={'attention_biases': dict(decay_mult=0.)}))
