"""Semantic FPN on ADE20K with AdamW, as in the EfficientFormer / EfficientFormerV2 releases:
AdamW lr 2e-4, weight decay 1e-4 (none on ``attention_biases``), poly decay (power 0.9, to 0)
over 40k iterations, 512x512 crops.

Total batch size of the published runs: 32 images = 8 GPUs x 4 images per GPU
(``train_dataloader.batch_size`` is per GPU). With another number of GPUs pass
``--auto-scale-lr`` to tools/train.py: the LR is scaled by (GPUs x 4) / 32.
"""
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_40k.py'
]
custom_imports = dict(imports=['mmeformer.models'], allow_failed_imports=False)

crop_size = (512, 512)
model = dict(
    pretrained=None,  # the backbone's init_cfg loads the ImageNet file
    data_preprocessor=dict(size=crop_size),
    neck=dict(out_channels=256, num_outs=4),
    decode_head=dict(num_classes=150))

train_dataloader = dict(batch_size=4)  # per GPU; 8 GPUs -> 32
auto_scale_lr = dict(enable=False, base_batch_size=32)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={'attention_biases': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0., begin=0, end=40000, by_epoch=False)
]
