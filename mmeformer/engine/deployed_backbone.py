"""The deployed backbone evaluated where it matters, inside the detector / segmentor: at test
time the backbone's input goes through an exported copy of it in a deployment runtime (ONNX
Runtime, OpenVINO, LiteRT; float32 or int8) and its outputs come back to the PyTorch neck and
heads, so the test loop's metric is the deployed model's metric.

    cfg.custom_hooks.append(dict(type='mmeformer.DeployedBackboneHook', runtime='openvino'))
"""
import copy
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dataset import Compose, pseudo_collate
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS

from ..export import FORMATS, export_backbone, load_runtime
from ..export.calibration import DEFAULT_COUNT, image_files
from ..models import fuse
from ..registry import HOOKS

# The runtime names users know, and the export format each runs.
RUNTIME_FORMATS = {'onnxruntime': 'onnx', 'openvino': 'openvino', 'litert': 'litert'}


class RuntimeBackbone(nn.Module):
    """Computes a backbone with one of :data:`RUNTIME_FORMATS`, in place of the module.

    Each distinct input size gets its own fixed-size export of the fused backbone (made on first
    sight, then reused): fixed-size graphs are the fastest (attention biases are constants) and
    LiteRT has no other kind. A batch runs image by image through the batch-1 export.

    Args:
        backbone (nn.Module): the trained backbone (copied, fused; the original is untouched).
        runtime (str): ``onnxruntime``, ``openvino`` or ``litert``.
        work_dir (str): where the exported files go (``<runtime>[_int8]_<H>x<W>.<suffix>``).
        calibration (list[torch.Tensor], optional): backbone inputs (N, 3, H, W) of any size, for
            int8; each export's calibration set is these resized to its size. None: float32.
        progress (callable): told about each new export. Defaults to print.
    """

    def __init__(self, backbone: nn.Module, runtime: str, work_dir: str,
                 calibration: Optional[Sequence[torch.Tensor]] = None,
                 progress: Callable[[str], None] = print):
        super().__init__()
        if runtime not in RUNTIME_FORMATS:
            raise ValueError(f'unknown backbone runtime {runtime!r}; choose from '
                             f'{", ".join(RUNTIME_FORMATS)}')
        self.runtime, self.work_dir, self.progress = runtime, work_dir, progress
        self.calibration = calibration
        self.fused = fuse(copy.deepcopy(backbone).cpu().eval())
        self._runs: Dict[Tuple[int, int], Callable] = {}

    def _run_for(self, size: Tuple[int, int]) -> Callable:
        if size not in self._runs:
            fmt = RUNTIME_FORMATS[self.runtime]
            int8 = self.calibration is not None
            suffix = FORMATS[fmt].suffix
            path = os.path.join(self.work_dir, f'{self.runtime}{"_int8" if int8 else ""}_'
                                f'{size[0]}x{size[1]}{suffix}')
            os.makedirs(self.work_dir, exist_ok=True)
            calibration = ([F.interpolate(x.float().cpu(), size=size, mode='bilinear',
                                          align_corners=False).numpy()
                            for x in self.calibration] if int8 else None)
            export_backbone(self.fused, fmt, path, size, int8=int8, calibration=calibration)
            self.progress(f'backbone exported for {size[0]}x{size[1]} inputs: {path}')
            self._runs[size] = load_runtime(fmt, path)
        return self._runs[size]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        run = self._run_for(tuple(x.shape[2:]))
        per_image = [run(np.ascontiguousarray(image[None].float().cpu().numpy()))
                     for image in x]
        return tuple(torch.from_numpy(np.concatenate(level)).to(x.device, x.dtype)
                     for level in zip(*per_image))


def calibration_batches(cfg, model: nn.Module, folder: Optional[str],
                        count: int) -> List[torch.Tensor]:
    """``count`` backbone inputs made exactly as at test time (the test pipeline, then the
    model's data preprocessor): from the images of ``folder``, or by default from the first
    images of the config's training set (never the test set the metric is computed on)."""
    pipeline_cfg = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    if folder is None:
        dataset_cfg = copy.deepcopy(cfg.train_dataloader.dataset)
        dataset_cfg.pipeline = pipeline_cfg
        dataset_cfg.pop('indices', None)
        dataset = DATASETS.build(dataset_cfg)
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
    else:
        # Images alone: the pipeline without its annotation loading.
        pipeline = Compose([t for t in pipeline_cfg if 'Annotations' not in t['type']])
        samples = [pipeline(dict(img_path=str(path), img_id=index))
                   for index, path in enumerate(image_files(folder)[:count])]
    with torch.no_grad():
        return [model.data_preprocessor(pseudo_collate([sample]), False)['inputs']
                for sample in samples]


@HOOKS.register_module()
class DeployedBackboneHook(Hook):
    """Before the test loop (after the checkpoint is loaded), replace the model's backbone by a
    :class:`RuntimeBackbone`, so that the loop's metrics are the deployed model's.

    Args:
        runtime (str): ``onnxruntime``, ``openvino`` or ``litert``.
        int8 (bool): post-training int8 quantization of each export. Defaults to False.
        calib_images (str, optional): folder of calibration images for int8; default: the first
            images of the config's training set.
        calib_count (int): calibration images. Defaults to 32.
    """
    priority = 'VERY_LOW'

    def __init__(self, runtime: str, int8: bool = False, calib_images: Optional[str] = None,
                 calib_count: int = DEFAULT_COUNT):
        if runtime not in RUNTIME_FORMATS:
            raise ValueError(f'unknown backbone runtime {runtime!r}; choose from '
                             f'{", ".join(RUNTIME_FORMATS)}')
        self.runtime, self.int8 = runtime, int8
        self.calib_images, self.calib_count = calib_images, calib_count

    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        calibration = (calibration_batches(runner.cfg, model, self.calib_images,
                                           self.calib_count) if self.int8 else None)
        model.backbone = RuntimeBackbone(
            model.backbone, self.runtime, os.path.join(runner.work_dir, 'deployed_backbone'),
            calibration, progress=runner.logger.info)
        runner.logger.info(f'backbone computed by {self.runtime}'
                           f'{" int8" if self.int8 else ""}; neck and heads by PyTorch')
