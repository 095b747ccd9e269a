"""Accuracy published by the papers and the official repositories, not measured here: the y
axes of the latency figure and the numbers of the README's model zoo.

ImageNet-1k top-1 (224 px) from the ImageNet tables of EfficientFormer (NeurIPS 2022),
EfficientFormerV2 (ICCV 2023) and EfficientViT (CVPR 2023); COCO Mask R-CNN 1x box / mask AP and
ADE20K Semantic FPN mIoU from the same papers' dense-prediction tables and the official
repositories that ship those checkpoints. V2-S0 / S1 dense numbers were never published;
EfficientViT's detectors exist for M4 only.
"""
from typing import Dict

IMAGENET_TOP1: Dict[str, float] = {
    'efficientformer_l1': 79.2, 'efficientformer_l3': 82.4, 'efficientformer_l7': 83.3,
    'efficientformerv2_s0': 75.7, 'efficientformerv2_s1': 79.0, 'efficientformerv2_s2': 82.0,
    'efficientformerv2_l': 83.5,
    'efficientvit_m0': 63.2, 'efficientvit_m1': 68.4, 'efficientvit_m2': 70.8,
    'efficientvit_m3': 73.4, 'efficientvit_m4': 74.3, 'efficientvit_m5': 77.1,
}
COCO_BOX_AP: Dict[str, float] = {  # Mask R-CNN 1x
    'efficientformer_l1': 37.9, 'efficientformer_l3': 41.4, 'efficientformer_l7': 42.6,
    'efficientformerv2_s2': 43.4, 'efficientformerv2_l': 44.7,
}
COCO_MASK_AP: Dict[str, float] = {  # Mask R-CNN 1x
    'efficientformer_l1': 35.4, 'efficientformer_l3': 38.1, 'efficientformer_l7': 39.0,
    'efficientformerv2_s2': 39.5, 'efficientformerv2_l': 40.4, 'efficientvit_m4': 31.0,
}
COCO_RETINANET_BOX_AP: Dict[str, float] = {'efficientvit_m4': 32.7}
ADE20K_MIOU: Dict[str, float] = {  # Semantic FPN
    'efficientformer_l1': 38.9, 'efficientformer_l3': 43.5, 'efficientformer_l7': 45.1,
    'efficientformerv2_s2': 42.4, 'efficientformerv2_l': 45.2,
}
