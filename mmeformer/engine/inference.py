"""Predictions on images through the ecosystem's own inferencers: mmdet's ``DetInferencer`` for a
detector config, mmseg's ``MMSegInferencer`` for a segmentor config (the task follows from the
config's ``default_scope``), drawn as images and written as JSON.

For each input image ``NAME.EXT`` :func:`infer` writes, under ``out_dir``:

* ``vis/NAME.EXT``: the drawn predictions (boxes and masks above ``score_thr``, or the
  segmentation overlay);
* ``preds/NAME.json``: the raw predictions. Detection: mmdet's own format (``labels``,
  ``scores``, ``bboxes`` as x1, y1, x2, y2, ``masks`` as COCO RLE; all predictions, whatever
  their score) plus ``label_names`` and ``image``. Segmentation: ``image``, ``height``,
  ``width``, ``label_map`` (the file name of the per-pixel class index map, ``preds/NAME.png``)
  and ``pixels_per_class`` (class name: pixel count, for the classes present).

The checkpoint is checked first, as ``tools/test.py`` checks it: a file that is no checkpoint,
a pickle that would run code, a released checkpoint that was never converted, or one that needs
``bias_mode='official'`` is refused with the fix.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch
from rich.progress import track

from .config_check import check_model_config
from .errors import LaunchError
from .runner import check_checkpoint_for, load_config

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(path: str) -> List[str]:
    """``path`` itself when it is an image file, else the images directly inside the folder
    ``path``, sorted."""
    if osp.isfile(path):
        if not path.lower().endswith(IMAGE_SUFFIXES):
            raise LaunchError(f'{path!r} is not an image ({", ".join(IMAGE_SUFFIXES)}); pass an '
                              f'image or a folder of images')
        return [path]
    if not osp.isdir(path):
        raise LaunchError(f'{path!r} does not exist; pass an image or a folder of images')
    images = sorted(osp.join(path, name) for name in os.listdir(path)
                    if name.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise LaunchError(f'no images ({", ".join(IMAGE_SUFFIXES)}) directly inside {path!r}')
    return images


def _write_json(path: str, record: dict) -> None:
    with open(path, 'w') as f:
        json.dump(record, f)


def _detect(inferencer, image: str, out_dir: str, score_thr: float) -> str:
    """One image through ``DetInferencer``, which draws ``vis/`` and writes ``preds/`` itself;
    the class names are added to its JSON."""
    inferencer(image, out_dir=out_dir, pred_score_thr=score_thr, no_save_pred=False,
               return_vis=False, print_result=False)
    pred_path = osp.join(out_dir, 'preds', osp.splitext(osp.basename(image))[0] + '.json')
    with open(pred_path) as f:
        record = json.load(f)
    classes = inferencer.model.dataset_meta['classes']
    record.update(image=image, label_names=[classes[label] for label in record['labels']])
    _write_json(pred_path, record)
    return pred_path


def _segment(inferencer, image: str, out_dir: str) -> str:
    """One image through ``MMSegInferencer``, which draws ``vis/``; the label map and its JSON
    are written here (mmseg names its own files by a counter, not by the image)."""
    sample = inferencer(image, out_dir=out_dir, return_datasamples=True)
    label_map = sample.pred_sem_seg.data[0].cpu().numpy()
    stem = osp.splitext(osp.basename(image))[0]
    preds = osp.join(out_dir, 'preds')
    os.makedirs(preds, exist_ok=True)
    cv2.imwrite(osp.join(preds, stem + '.png'),
                label_map.astype(np.uint8 if label_map.max() < 256 else np.uint16))
    classes = inferencer.model.dataset_meta['classes']
    ids, counts = np.unique(label_map, return_counts=True)
    record = dict(image=image, height=int(label_map.shape[0]), width=int(label_map.shape[1]),
                  label_map=stem + '.png',
                  pixels_per_class={classes[i]: int(n) for i, n in zip(ids, counts)})
    pred_path = osp.join(preds, stem + '.json')
    _write_json(pred_path, record)
    return pred_path


def infer(config: str,
          checkpoint: str,
          inputs: str,
          out_dir: str,
          score_thr: float = 0.3,
          device: Optional[str] = None,
          cfg_options: Optional[dict] = None) -> List[Dict[str, str]]:
    """Predict on ``inputs`` (an image or a folder of images) with ``config`` and
    ``checkpoint`` (written by ``tools/train.py`` or ``tools/convert_checkpoint.py --full``) and
    write the drawn and raw predictions under ``out_dir`` (see the module docstring).

    Args:
        config (str): A detector (mmdet) or segmentor (mmseg) config.
        checkpoint (str): The checkpoint file.
        inputs (str): An image file or a folder of images (not searched recursively).
        out_dir (str): Where ``vis/`` and ``preds/`` are written.
        score_thr (float): Lowest score of a drawn detection (the JSON keeps all of them);
            unused for segmentation. Defaults to 0.3.
        device (str, optional): ``'cpu'``, ``'cuda:0'``...; the first GPU when there is one,
            else the CPU. Defaults to None.
        cfg_options (dict, optional): Config overrides, e.g. the bias mode of a converted
            release. Defaults to None.

    Returns:
        list[dict]: per image, ``image``, ``vis`` (drawn) and ``pred`` (JSON) paths.
    """
    images = list_images(inputs)
    cfg = load_config(config, cfg_options=cfg_options)
    check_model_config(cfg)
    check_checkpoint_for(cfg, checkpoint)
    device = device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    if cfg.default_scope == 'mmdet':
        from mmdet.apis import DetInferencer  # optional: only detector configs need mmdet
        inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device,
                                   show_progress=False)

        def predict(image):
            return _detect(inferencer, image, out_dir, score_thr)
    elif cfg.default_scope == 'mmseg':
        from mmseg.apis import MMSegInferencer  # optional: only segmentor configs need mmseg
        inferencer = MMSegInferencer(model=cfg, weights=checkpoint, device=device)
        inferencer.show_progress = False  # the progress bar below covers the whole folder

        def predict(image):
            return _segment(inferencer, image, out_dir)
    else:
        raise LaunchError(f'{config}: default_scope {cfg.default_scope!r} is neither mmdet nor '
                          f'mmseg, so there is no inferencer for it')
    results = []
    for image in track(images, description='Inference'):
        pred = predict(image)
        results.append(dict(image=image, vis=osp.join(out_dir, 'vis', osp.basename(image)),
                            pred=pred))
    return results
