"""Calibration inputs for post-training int8 quantization: images resized to the export size
and normalised as the backbones expect (ImageNet mean / std, RGB, NCHW float32)."""
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from ..datasets.toy import make_toy_ade
from .common import IMAGENET_MEAN, IMAGENET_STD, ExportError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
DEFAULT_COUNT = 32


def image_files(folder: str) -> List[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f'calibration images: {folder!r} is not a folder of images')
    files = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f'calibration images: no {"/".join(IMAGE_SUFFIXES)} files under '
                          f'{folder!r}')
    return files


def normalize(image: Image.Image, shape: Tuple[int, int]) -> np.ndarray:
    """One RGB image as a (1, 3, H, W) float32 backbone input of ``shape``."""
    pixels = np.asarray(image.convert('RGB').resize(shape[::-1], Image.BILINEAR), np.float32)
    pixels = (pixels / 255. - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD,
                                                                               np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def calibration_inputs(shape: Tuple[int, int], folder: Optional[str] = None,
                       count: int = DEFAULT_COUNT) -> List[np.ndarray]:
    """``count`` backbone inputs of ``shape`` from the images of ``folder`` (sorted by name;
    fewer if the folder has fewer), or from generated toy training images when
    ``folder`` is None. Use images like those the model will see: the int8 ranges come from
    them."""
    if count < 1:
        raise ExportError(f'calibration count must be at least 1, got {count}')
    if folder is not None:
        return [normalize(Image.open(f), shape) for f in image_files(folder)[:count]]
    with tempfile.TemporaryDirectory() as tmp:
        # The toy ADE20K images: the same shapes as the toy COCO ones, without needing mmdet.
        make_toy_ade(tmp, num_train=count, num_val=1)
        return [normalize(Image.open(f), shape)
                for f in image_files(str(Path(tmp) / 'images' / 'training'))[:count]]
