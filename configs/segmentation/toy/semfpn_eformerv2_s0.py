"""Toy counterpart of ../semfpn_eformerv2_s0.py: toy ADE20K data, 160x160 crops, 200 iterations,
no ImageNet file (settings in ./_base_/toy_ade.py)."""
_base_ = ['../semfpn_eformerv2_s0.py', './_base_/toy_ade.py']
model = _base_.toy_model
train_dataloader = _base_.toy_train_dataloader
val_dataloader = test_dataloader = _base_.toy_val_dataloader
val_evaluator = test_evaluator = _base_.toy_val_evaluator
train_cfg = _base_.toy_train_cfg
param_scheduler = _base_.toy_param_scheduler
default_hooks = _base_.toy_default_hooks
