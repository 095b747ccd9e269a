"""Behaviour shared by the EfficientFormer, EfficientFormerV2 and EfficientViT backbones:
arch tables, ``out_indices``, ``frozen_stages``, ``norm_eval``, output norms, input checks and
``init_cfg=dict(type='Pretrained', ...)`` loading through :mod:`mmeformer.checkpoint`.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import build_norm, is_tracing

MIN_INPUT_SIZE = 32


def resolve_arch(arch: Union[str, dict], arch_settings: Dict[str, dict], family: str) -> dict:
    """Return a copy of the arch dict named by ``arch`` (or ``arch`` itself, checked)."""
    if isinstance(arch, str):
        name = arch.lower()
        if name not in arch_settings:
            raise ValueError(f'unknown {family} arch {arch!r}; choose one of '
                             f'{sorted(arch_settings)} or pass a dict')
        return dict(arch_settings[name], name=name)
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
    reference = next(iter(arch_settings.values()))
    missing = sorted(set(reference) - set(arch))
    unknown = sorted(set(arch) - set(reference) - {'name'})
    if missing or unknown:
        raise ValueError(f'custom {family} arch: missing keys {missing}, unknown keys {unknown}; '
                         f'expected exactly {sorted(reference)}')
    return dict(arch, name=arch.get('name', 'custom'))


class MobileBackbone(BaseModule):
    """Base class. Subclasses build ``self.stem`` and ``self.stages`` then call
    :meth:`_setup_outputs`; stage ``i`` includes the downsampling that leads into it."""

    family = 'backbone'
    arch_settings: Dict[str, dict] = {}

    def __init__(self, in_channels: int, out_indices: Sequence[int], frozen_stages: int,
                 norm_eval: bool, with_cp: bool, init_cfg: Optional[dict]):
        super().__init__(init_cfg=init_cfg)
        self.in_channels = in_channels
        self._requested_out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

    # -- construction helpers -----------------------------------------------------------------
    def _setup_outputs(self, channels: List[int], strides: List[int],
                       out_norm_cfg: Optional[dict]):
        num_stages = len(channels)
        self.channels = list(channels)
        self.strides = list(strides)
        indices = self._requested_out_indices
        if isinstance(indices, int):
            indices = [indices]
        normalized = []
        for index in indices:
            if not isinstance(index, int) or not -num_stages <= index < num_stages:
                raise ValueError(f'out_indices entry {index!r} is out of range for {self.family} '
                                 f'with {num_stages} stages; valid: 0..{num_stages - 1} '
                                 f'(or negative from the end)')
            normalized.append(index % num_stages)
        if len(set(normalized)) != len(normalized) or not normalized:
            raise ValueError(f'out_indices must be non-empty and unique, got {indices!r}')
        self.out_indices = tuple(sorted(normalized))
        if not -1 <= self.frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages={self.frozen_stages} is out of range; valid: -1 '
                             f'(nothing), 0 (stem), 1..{num_stages} (stem + first k stages)')
        self.out_channels = [channels[i] for i in self.out_indices]
        self.out_strides = [strides[i] for i in self.out_indices]
        self.feature_info = [dict(num_chs=c, reduction=s, module=f'stages.{i}')
                             for i, (c, s) in enumerate(zip(channels, strides))]
        self.out_norms = None
        if out_norm_cfg is not None:
            self.out_norms = nn.ModuleDict(
                {str(i): build_norm(out_norm_cfg, channels[i]) for i in self.out_indices})
        self._freeze_stages()

    def _set_bias_mode(self, bias_mode: str, bias_img_size: Optional[int]):
        if bias_mode == 'official' and bias_img_size is None:
            raise ValueError("bias_mode='official' needs bias_img_size: 800 for the released "
                             'COCO weights, 512 for the ADE20K ones')
        self.bias_mode, self.bias_img_size = bias_mode, bias_img_size

    # -- forward ------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        if is_tracing():
            return  # checked eagerly; shape comparisons would be frozen into a traced graph
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{self.family} expects an (N, C, H, W) tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{self.family} expects {self.in_channels} input channels, got '
                             f'{x.shape[1]} (input shape {tuple(x.shape)})')
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f'{self.family} needs inputs of at least {MIN_INPUT_SIZE}x'
                             f'{MIN_INPUT_SIZE} pixels, got {x.shape[-2]}x{x.shape[-1]}; '
                             f'resize or pad the image')
        if not x.is_floating_point():
            raise ValueError(f'{self.family} expects a floating-point input, got {x.dtype}; '
                             f'convert with x.float() and normalise it first')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return one NCHW feature map per entry of ``out_indices``."""
        self._check_input(x)
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self.out_norms[str(i)](x) if self.out_norms is not None else x)
            if i == self.out_indices[-1]:
                break
        return tuple(outs)

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Raw stage outputs (before output norms) for ``indices`` (default: every stage)."""
        self._check_input(x)
        wanted = range(len(self.stages)) if indices is None else [
            i % len(self.stages) for i in indices]
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                feats.append(x)
            if i == max(wanted):
                break
        return feats

    # -- training state -----------------------------------------------------------------------
    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.stem]
        for i in range(self.frozen_stages):
            modules.append(self.stages[i])
            if self.out_norms is not None and str(i) in self.out_norms:
                modules.append(self.out_norms[str(i)])
        return modules

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # -- weights ------------------------------------------------------------------------------
    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from ...checkpoint import load_pretrained  # local: keeps model import light
            unknown = sorted(set(cfg) - {'type', 'checkpoint', 'prefix', 'map_location'})
            if unknown:
                raise ValueError(f'init_cfg Pretrained: unknown keys {unknown}; valid keys are '
                                 f"'checkpoint' and 'prefix'")
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()

    def switch_to_deploy(self, input_size: Optional[Tuple[int, int]] = None):
        """Fold BatchNorms, drop training-only paths, optionally freeze the attention biases of
        one input size; see :func:`mmeformer.deploy.fuse`. Returns ``self``."""
        from ...deploy import fuse
        return fuse(self, input_size)

    def arch_description(self) -> str:
        return f'{self.family} {self.arch["name"]}'
