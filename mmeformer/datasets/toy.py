"""Deterministic toy datasets in the COCO 2017 and ADE20K layouts, for CPU smoke training.

The images are simple coloured shapes (rectangles and ellipses) on noisy backgrounds, something a
detector or segmentor can actually learn within minutes. The files follow the upstream layouts
exactly, so mmdet's stock ``CocoDataset`` + ``CocoMetric`` and mmseg's ``ADE20KDataset`` +
``IoUMetric`` read them unchanged:

* ``<root>/coco/annotations/instances_{train,val}2017.json`` and ``<root>/coco/{train,val}2017/``:
  all 80 COCO categories with their real ids are declared; objects use a few of them, each with a
  polygon mask, its box and its area.
* ``<root>/ade/ADEChallengeData2016/{images,annotations}/{training,validation}/``: JPEG images and
  single-channel PNG labels in ADE20K's 150-class encoding (0 = ignore, classes 1..150, which
  ``reduce_zero_label=True`` maps to 255 and 0..149).

Same arguments -> byte-identical files (a fixed numpy ``Generator`` drives everything).
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# The 80 COCO 2017 category ids, in the order of mmdet's CocoDataset classes.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90)

# (image width, image height) cycled over the images: several shapes and orientations.
IMAGE_SIZES = ((320, 240), (240, 320), (288, 288), (352, 256))


@dataclass(frozen=True)
class ToyClass:
    """One object kind: the real dataset class it stands for, its shape and its colour (RGB)."""
    name: str
    label: int  # COCO category id, or ADE20K label value (1..150)
    shape: str  # 'rectangle' or 'ellipse'
    aspect: float  # width / height of the shape
    color: Tuple[int, int, int]


COCO_TOY_CLASSES = (
    ToyClass('person', 1, 'ellipse', 0.5, (40, 80, 220)),
    ToyClass('car', 3, 'rectangle', 1.8, (220, 40, 40)),
    ToyClass('sports ball', 37, 'ellipse', 1.0, (235, 215, 30)),
)
ADE_BACKGROUND_LABEL = 1  # 'wall'
ADE_TOY_CLASSES = (
    ToyClass('bed', 8, 'rectangle', 1.6, (220, 40, 40)),
    ToyClass('person', 13, 'ellipse', 0.5, (40, 80, 220)),
    ToyClass('car', 21, 'rectangle', 0.7, (40, 200, 60)),
    ToyClass('lamp', 37, 'ellipse', 1.0, (235, 215, 30)),
)


def _check_arguments(seed, **counts):
    """Refuse bad arguments before anything is written."""
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')


def _noise_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = rng.integers(70, 150, size=3)
    noise = rng.normal(0., 18., size=(height, width, 3))
    return np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)


def _polygon(kind: ToyClass, cx: float, cy: float, w: float, h: float) -> List[float]:
    """Polygon (flat x, y list) of the shape; the mask is rasterised from this polygon."""
    if kind.shape == 'rectangle':
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    else:
        points = [(cx + w / 2 * math.cos(2 * math.pi * i / 32),
                   cy + h / 2 * math.sin(2 * math.pi * i / 32)) for i in range(32)]
    return [round(v, 2) for p in points for v in p]


def _place_objects(rng: np.random.Generator, width: int, height: int,
                   classes: Sequence[ToyClass], max_objects: int):
    """Non-overlapping boxes of random classes and sizes: list of (class, cx, cy, w, h)."""
    placed, boxes = [], []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(40 * wanted):
        if len(placed) == wanted:
            break
        kind = classes[int(rng.integers(len(classes)))]
        size = float(rng.uniform(0.22, 0.42)) * min(width, height)
        w = size * math.sqrt(kind.aspect)
        h = size / math.sqrt(kind.aspect)
        if w >= width - 8 or h >= height - 8:
            continue
        cx = float(rng.uniform(w / 2 + 2, width - w / 2 - 2))
        cy = float(rng.uniform(h / 2 + 2, height - h / 2 - 2))
        box = (cx - w / 2 - 3, cy - h / 2 - 3, cx + w / 2 + 3, cy + h / 2 + 3)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
               for b in boxes):
            continue
        boxes.append(box)
        placed.append((kind, cx, cy, w, h))
    return placed


def _jitter(rng: np.random.Generator, color: Tuple[int, int, int]) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in color)


def _draw_image(rng, width, height, objects, label_image=None):
    """Draw the objects; return (RGB array, one boolean mask per object)."""
    image = Image.fromarray(_noise_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    masks = []
    for kind, cx, cy, w, h in objects:
        polygon = _polygon(kind, cx, cy, w, h)
        points = list(zip(polygon[0::2], polygon[1::2]))
        draw.polygon(points, fill=_jitter(rng, kind.color))
        mask_image = Image.new('L', (width, height), 0)
        ImageDraw.Draw(mask_image).polygon(points, fill=1)
        masks.append((polygon, np.asarray(mask_image, dtype=bool)))
        if label_image is not None:
            ImageDraw.Draw(label_image).polygon(points, fill=kind.label)
    return np.asarray(image), masks


def make_toy_coco(out_dir: str, num_train: int = 48, num_val: int = 12, max_objects: int = 3,
                  seed: int = 0) -> Dict[str, str]:
    """Write a toy COCO 2017 instance-segmentation dataset under ``out_dir``.

    Returns the paths of the two annotation files.
    """
    _check_arguments(seed, num_train=num_train, num_val=num_val, max_objects=max_objects)
    from mmdet.datasets import CocoDataset  # the class names, in CocoDataset's order
    names = CocoDataset.METAINFO['classes']
    if len(names) != len(COCO_CATEGORY_IDS):
        raise RuntimeError(f'mmdet CocoDataset has {len(names)} classes, expected 80')
    categories = [dict(id=cid, name=name, supercategory='toy')
                  for cid, name in zip(COCO_CATEGORY_IDS, names)]
    unknown = [c.name for c in COCO_TOY_CLASSES if c.name not in names]
    if unknown:
        raise RuntimeError(f'toy classes {unknown} are not COCO classes')

    os.makedirs(os.path.join(out_dir, 'annotations'), exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    annotation_id = 1
    for split, count, first_id in (('train2017', num_train, 1), ('val2017', num_val, 100001)):
        image_dir = os.path.join(out_dir, split)
        os.makedirs(image_dir, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
            image_id = first_id + index
            file_name = f'{image_id:012d}.jpg'
            objects = _place_objects(rng, width, height, COCO_TOY_CLASSES, max_objects)
            pixels, masks = _draw_image(rng, width, height, objects)
            Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=95)
            images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
            for (kind, *_), (polygon, mask) in zip(objects, masks):
                ys, xs = np.nonzero(mask)
                x0, y0 = float(xs.min()), float(ys.min())
                bbox = [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]
                annotations.append(dict(
                    id=annotation_id, image_id=image_id, category_id=kind.label,
                    segmentation=[polygon], area=float(mask.sum()), bbox=bbox, iscrowd=0))
                annotation_id += 1
        path = os.path.join(out_dir, 'annotations', f'instances_{split}.json')
        with open(path, 'w') as f:
            json.dump(dict(info=dict(description='mmeformer toy COCO', version='1.0'),
                           licenses=[], images=images, annotations=annotations,
                           categories=categories), f)
        paths[split] = path
    return paths


def make_toy_ade(out_dir: str, num_train: int = 48, num_val: int = 12, max_objects: int = 4,
                 seed: int = 0) -> str:
    """Write a toy ADE20K (ADEChallengeData2016 layout) dataset under ``out_dir``.

    Labels: background ``wall`` (1), the objects of :data:`ADE_TOY_CLASSES`, and a 2-pixel
    border of 0 (ignored) to exercise ``reduce_zero_label``. Returns ``out_dir``.
    """
    _check_arguments(seed, num_train=num_train, num_val=num_val, max_objects=max_objects)
    rng = np.random.default_rng(seed + 1)
    for split, prefix, count in (('training', 'ADE_train', num_train),
                                 ('validation', 'ADE_val', num_val)):
        image_dir = os.path.join(out_dir, 'images', split)
        label_dir = os.path.join(out_dir, 'annotations', split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for index in range(count):
            width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
            objects = _place_objects(rng, width, height, ADE_TOY_CLASSES, max_objects)
            label_image = Image.new('L', (width, height), ADE_BACKGROUND_LABEL)
            pixels, _ = _draw_image(rng, width, height, objects, label_image)
            labels = np.asarray(label_image).copy()
            labels[:2, :] = labels[-2:, :] = labels[:, :2] = labels[:, -2:] = 0
            stem = f'{prefix}_{index + 1:08d}'
            Image.fromarray(pixels).save(os.path.join(image_dir, stem + '.jpg'), quality=95)
            Image.fromarray(labels).save(os.path.join(label_dir, stem + '.png'))
    return out_dir


def make_toy_data(out_root: str = 'data/toy', num_train: int = 48, num_val: int = 12,
                  seed: int = 0, tasks: Sequence[str] = ('coco', 'ade')) -> Dict[str, str]:
    """Write the toy datasets the toy configs read: ``<out_root>/coco`` and
    ``<out_root>/ade/ADEChallengeData2016``. Returns the dataset roots written."""
    unknown = sorted(set(tasks) - {'coco', 'ade'})
    if unknown:
        raise ValueError(f"unknown toy dataset(s) {unknown}; choose from 'coco' and 'ade'")
    roots = {}
    if 'coco' in tasks:
        roots['coco'] = os.path.join(out_root, 'coco')
        make_toy_coco(roots['coco'], num_train, num_val, seed=seed)
    if 'ade' in tasks:
        roots['ade'] = os.path.join(out_root, 'ade', 'ADEChallengeData2016')
        make_toy_ade(roots['ade'], num_train, num_val, seed=seed)
    return roots
