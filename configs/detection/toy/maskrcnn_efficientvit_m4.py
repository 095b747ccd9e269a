"""Toy counterpart of ../maskrcnn_efficientvit_m4.py: toy COCO data, 320 px, 4 epochs,
no ImageNet file (settings in ./_base_/toy_maskrcnn.py)."""
_base_ = ['../maskrcnn_efficientvit_m4.py', './_base_/toy_maskrcnn.py']
model = _base_.toy_model
train_dataloader = _base_.toy_train_dataloader
val_dataloader = test_dataloader = _base_.toy_val_dataloader
val_evaluator = test_evaluator = _base_.toy_val_evaluator
train_cfg = _base_.toy_train_cfg
param_scheduler = _base_.toy_param_scheduler
default_hooks = _base_.toy_default_hooks
