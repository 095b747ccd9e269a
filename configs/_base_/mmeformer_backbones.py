"""The mmeformer backbone (and EfficientViT neck) settings shared by the detection and
segmentation bases; they reference these as ``_base_.<name>``. Per-arch files set ``arch``, the
ImageNet file and the neck ``in_channels``.

New training uses the default bias_mode='table', which keeps the ImageNet attention biases.
Evaluating the released snap-research dense weights needs bias_mode='official' with
bias_img_size=800 (COCO) or 512 (ADE20K).
"""
efficientformer_backbone = dict(
    type='mmeformer.EfficientFormer',
    arch='l1',
    out_indices=(0, 1, 2, 3),
    bias_mode='table',
    out_norm_cfg=dict(type='GN', num_groups=1),  # norm0/2/4/6 of the dense release
    init_cfg=dict(type='Pretrained', checkpoint='weights/efficientformer_l1_300d.pth'))

efficientformerv2_backbone = dict(
    type='mmeformer.EfficientFormerV2',
    arch='s0',
    out_indices=(0, 1, 2, 3),
    bias_mode='table',
    drop_path_rate=0.,
    init_cfg=dict(type='Pretrained', checkpoint='weights/eformer_s0_450.pth'))

efficientvit_backbone = dict(
    type='mmeformer.EfficientViT',
    arch='m4',
    out_indices=(0, 1, 2),
    norm_eval=True,  # as in the official EfficientViT downstream training
    init_cfg=dict(type='Pretrained', checkpoint='weights/efficientvit_m4.pth'))

# Strides 16/32/64 in; two transposed convs add strides 8 and 4 (Mask R-CNN, Semantic FPN).
efficientvit_fpn = dict(
    type='mmeformer.EfficientViTFPN',
    in_channels=[128, 256, 384],
    out_channels=256,
    start_level=0,
    num_outs=5,
    num_extra_trans_convs=2)
