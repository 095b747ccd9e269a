"""Toy Mask R-CNN settings: the toy COCO data plus no ImageNet file and fewer proposals and
sampled RoIs (the RoI heads dominate the CPU step time). The low test score threshold keeps
detections in the very first evaluations, so the AP curve starts from a real number."""
_base_ = ['./toy_coco.py']
toy_model = dict(
    backbone=dict(init_cfg=None),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(score_thr=0.001, max_per_img=50)))
