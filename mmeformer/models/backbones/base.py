"""Behaviour shared by the EfficientFormer, EfficientFormerV2 and EfficientViT backbones:
arch tables, ``out_indices``, ``frozen_stages``, ``norm_eval``, output norms, input checks and
``init_cfg=dict(type='Pretrained', ...)`` loading through :mod:`mmeformer.checkpoint`.
"""
import difflib
import inspect
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..deploy import fuse
from ..layers import (BIAS_MODES, RelativeBiasAttention, build_norm, forget_packed_weights,
                      is_tracing)

MIN_INPUT_SIZE = 32


def _check_finite_outputs(module: 'MobileBackbone', inputs, outputs):
    """Forward hook of ``check_finite=True``: a finite input must give finite features."""
    if is_tracing():
        return
    for index, feat in zip(module.out_indices, outputs):
        bad = ~torch.isfinite(feat)
        if bool(bad.any()):
            raise ValueError(
                f'{module.family} produced a non-finite output at stage {index} (stride '
                f'{module.strides[index]}): {int(torch.isnan(feat).sum())} NaN, '
                f'{int(torch.isinf(feat).sum())} Inf of {feat.numel()} values, from a finite '
                f'input. Overflow in low precision (try bfloat16 instead of float16), a too '
                f'large learning rate or non-finite weights (check the checkpoint) are the usual '
                f'causes; check_finite=True makes this check')


def _entry_problems(arch: dict, reference: dict) -> List[str]:
    """What is wrong with the number and type of a custom arch's entries, against a released
    arch of the family (``reference``); [] if nothing."""
    num_stages = len(reference['depths'])
    problems = []
    for key, example in reference.items():
        value = arch[key]
        if isinstance(example, int):
            if not _is_int(value) or value < 0:
                problems.append(f'{key} must be a non-negative int, got {value!r}')
        elif not isinstance(value, (list, tuple)) or not value:
            problems.append(f'{key} must be a non-empty list, got {value!r}')
        elif len(example) == num_stages and len(value) != num_stages:
            # The stage count is fixed by the strides the family is built for.
            problems.append(f'{key} must have one entry per stage ({num_stages}), got {value!r}')
        elif isinstance(example[0], int) and not all(_is_int(v) and v > 0 for v in value):
            problems.append(f'{key} entries must be positive ints, got {value!r}')
    return problems


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_indices(indices: Union[int, Sequence[int]], num_stages: int, family: str,
                      what: str) -> Tuple[int, ...]:
    """Sorted, unique stage indices in ``0..num_stages - 1`` (negative ones count from the
    end); a clear error otherwise."""
    if isinstance(indices, int):
        indices = [indices]
    normalized = []
    for index in indices:
        if not _is_int(index) or not -num_stages <= index < num_stages:
            raise ValueError(f'{what} entry {index!r} is out of range for {family} with '
                             f'{num_stages} stages; valid: 0..{num_stages - 1} (or negative '
                             f'from the end)')
        normalized.append(index % num_stages)
    if len(set(normalized)) != len(normalized) or not normalized:
        raise ValueError(f'{what} must be non-empty and unique, got {indices!r}')
    return tuple(sorted(normalized))


class MobileBackbone(BaseModule):
    """Base class. Subclasses build ``self.stem`` and ``self.stages`` then call
    :meth:`_setup_outputs`; stage ``i`` includes the downsampling that leads into it."""

    family = 'backbone'
    arch_settings: Dict[str, dict] = {}
    stem_divisor = 1  # the stem's first conv has widths[0] // stem_divisor channels

    def __new__(cls, *args, **kwargs):
        # Checked before __init__ so that a misspelt config key names the valid ones (Python's
        # own TypeError names only the bad key).
        valid = cls.valid_keywords()
        for key in kwargs:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f' (did you mean {close[0]!r}?)' if close else ''
                raise TypeError(f'{cls.__name__} got an unexpected keyword argument {key!r}'
                                f'{hint}; valid keywords: {", ".join(valid)}')
        return super().__new__(cls)

    @classmethod
    def valid_keywords(cls) -> List[str]:
        """The keyword arguments the constructor accepts, in signature order."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return [p.name for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def __init__(self, in_channels: int, out_indices: Sequence[int], frozen_stages: int,
                 norm_eval: bool, with_cp: bool, init_cfg: Optional[dict],
                 check_finite: bool = False, channels_last: bool = True):
        super().__init__(init_cfg=init_cfg)
        self.in_channels = in_channels
        self._requested_out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.channels_last = channels_last
        self.check_finite = check_finite
        if check_finite:
            self.register_forward_hook(_check_finite_outputs)

    @property
    def cache_biases(self) -> bool:
        """Whether inference caches the attention biases per input size (see the backbones'
        ``cache_biases`` argument)."""
        return all(m.cache_biases for m in self.modules() if isinstance(m, RelativeBiasAttention))

    @cache_biases.setter
    def cache_biases(self, enabled: bool):
        for module in self.modules():
            if isinstance(module, RelativeBiasAttention):
                module.cache_biases = bool(enabled)
                if not enabled:
                    module.drop_cached_biases()

    # -- construction helpers -----------------------------------------------------------------
    def _resolve_arch(self, arch: Union[str, dict]) -> dict:
        """A copy of the arch dict named by ``arch``, or ``arch`` itself once checked: its key
        names, the number and type of its entries, then the family's rules
        (:meth:`_arch_problems`)."""
        if isinstance(arch, str):
            name = arch.lower()
            if name not in self.arch_settings:
                raise ValueError(f'unknown {self.family} arch {arch!r}; choose one of '
                                 f'{sorted(self.arch_settings)} or pass a dict')
            return dict(self.arch_settings[name], name=name)
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        reference = next(iter(self.arch_settings.values()))
        missing = sorted(set(reference) - set(arch))
        unknown = sorted(set(arch) - set(reference) - {'name'})
        if missing or unknown:
            raise ValueError(f'custom {self.family} arch: missing keys {missing}, unknown keys '
                             f'{unknown}; expected exactly {sorted(reference)}')
        # The family's rules assume well-formed entries, so they run only on those.
        problems = _entry_problems(arch, reference) or self._arch_problems(arch)
        if problems:
            raise ValueError(f'custom {self.family} arch: ' + '; '.join(problems))
        return dict(arch, name=arch.get('name', 'custom'))

    def _arch_problems(self, arch: dict) -> List[str]:
        """What would make a custom arch (keys and entry types already checked) build a
        network other than the one described, or fail later in forward; [] if nothing.
        Families add their own checks to these."""
        if arch['widths'][0] % self.stem_divisor:
            return [f"widths[0] must be a multiple of {self.stem_divisor} (the stem's first conv "
                    f"has 1/{self.stem_divisor} of it), got {arch['widths'][0]}"]
        return []

    def _setup_outputs(self, channels: List[int], strides: List[int],
                       out_norm_cfg: Optional[dict]):
        num_stages = len(channels)
        self.channels = list(channels)
        self.strides = list(strides)
        self.out_indices = normalize_indices(self._requested_out_indices, num_stages,
                                             self.family, 'out_indices')
        if not -1 <= self.frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages={self.frozen_stages} is out of range; valid: -1 '
                             f'(nothing), 0 (stem), 1..{num_stages} (stem + first k stages)')
        self.out_channels = [channels[i] for i in self.out_indices]
        self.out_strides = [strides[i] for i in self.out_indices]
        self.feature_info = [dict(num_chs=c, reduction=s, module=f'stages.{i}')
                             for i, (c, s) in enumerate(zip(channels, strides))]
        # Coarsest map each stage computes: its stride, times 2 where a block attends at half
        # resolution (EfficientFormerV2's stride-2 attention); see _check_input.
        self._coarsest_strides = [
            stride * (2 if any(isinstance(m, nn.Conv2d) and max(m.stride) > 1
                               for m in getattr(stage, 'blocks', nn.Identity()).modules()) else 1)
            for stage, stride in zip(self.stages, strides)]
        self.out_norms = None
        if out_norm_cfg is not None:
            self.out_norms = nn.ModuleDict(
                {str(i): build_norm(out_norm_cfg, channels[i]) for i in self.out_indices})
        self._freeze_stages()

    def _set_bias_mode(self, bias_mode: str, bias_img_size: Optional[int]):
        if bias_mode not in BIAS_MODES:
            raise ValueError(f'bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}')
        if bias_mode == 'official' and bias_img_size is None:
            raise ValueError("bias_mode='official' needs bias_img_size: 800 for the released "
                             'COCO weights, 512 for the ADE20K ones')
        if bias_mode != 'official' and bias_img_size is not None:
            # Ignoring it would hide a config that meant to load the dense release.
            raise ValueError(f"bias_img_size={bias_img_size} applies only to "
                             f"bias_mode='official' (the released COCO / ADE20K weights); set "
                             f"bias_mode='official' or drop bias_img_size (set it to None)")
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
        weight = next(self.parameters(), None)
        if weight is not None and x.dtype != weight.dtype and (
                x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f'{self.family} has {weight.dtype} weights but got a {x.dtype} '
                             f'input; convert the input (x.to({weight.dtype})) or the model '
                             f'(model.to({x.dtype})), or run under torch.autocast')
        if self.training and x.shape[0] == 1:
            self._check_single_image_batch_norm(x)
        if self.check_finite:
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                samples = bad.flatten(1).any(1).nonzero().flatten().tolist()
                first = tuple(bad.nonzero()[0].tolist())
                raise ValueError(
                    f'{self.family} got a non-finite input ({int(torch.isnan(x).sum())} NaN, '
                    f'{int(torch.isinf(x).sum())} Inf of {x.numel()} values) in batch '
                    f'sample(s) {samples}, first at (n, c, y, x) = {first}. Look at those '
                    f"samples' images and their normalisation (a corrupt or blank file, a zero "
                    f'std) or at the module that produced the input; check_finite=True makes '
                    f'this check')

    def _to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last makes the 1x1 convs plain GEMMs and pooling / depthwise convs
        # vectorise over channels, on CPU, and it is what tensor cores want on GPU.
        if self.channels_last and not is_tracing():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _to_output(self, x: torch.Tensor) -> torch.Tensor:
        # Levels leave in the standard NCHW layout: some consumers read raw NCHW memory (mmcv's
        # RoIAlign does; with channels-last levels a Mask R-CNN's RoI head stops learning).
        return x.contiguous() if self.channels_last else x

    def _check_single_image_batch_norm(self, x: torch.Tensor):
        """A training-mode BatchNorm cannot normalise a 1x1 map of a single image (torch raises
        "Expected more than 1 value per channel" without saying why); say what to change."""
        stride = max(self._coarsest_strides[:self.out_indices[-1] + 1])
        h, w = x.shape[-2:]
        if -(-h // stride) * -(-w // stride) > 1:
            return
        if any(isinstance(m, _BatchNorm) and m.training for m in self.modules()):
            raise ValueError(
                f'{self.family} in training mode cannot take a batch of one {h}x{w} image: its '
                f'stride-{stride} feature map is 1x1, which leaves BatchNorm a single value per '
                f'channel. Use 2 or more images per batch, inputs larger than {stride} px on one '
                f'side, norm_eval=True, or eval mode')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return one (contiguous) NCHW feature map per entry of ``out_indices``."""
        self._check_input(x)
        x = self.stem(self._to_memory_format(x))
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self._to_output(
                    self.out_norms[str(i)](x) if self.out_norms is not None else x))
            if i == self.out_indices[-1]:
                break
        return tuple(outs)

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Raw stage outputs (before output norms) for ``indices`` (default: every stage), in
        stage order."""
        self._check_input(x)
        wanted = range(len(self.stages)) if indices is None else normalize_indices(
            indices, len(self.stages), self.family, 'indices')
        x = self.stem(self._to_memory_format(x))
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                feats.append(self._to_output(x))
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
        forget_packed_weights(self)  # like the eval caches (see FoldsBatchNorm)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # -- weights ------------------------------------------------------------------------------
    def init_weights(self):
        pretrained, others = self._split_init_cfg()
        if pretrained is None:
            super().init_weights()
            return
        unknown = sorted(set(pretrained) - {'type', 'checkpoint', 'prefix', 'strict',
                                            'map_location'})
        if unknown:
            raise ValueError(f'init_cfg Pretrained: unknown keys {unknown}; valid keys are '
                             f"'checkpoint', 'prefix', 'strict' and 'map_location' (accepted as "
                             f'in mmengine; files are always read on the CPU and copied onto '
                             f"the model's device)")
        if others:  # the other initialisers first; the checkpoint goes on top
            full_cfg, self.init_cfg = self.init_cfg, others
            try:
                super().init_weights()
            finally:
                self.init_cfg = full_cfg
        # Local: the loader sits above the models (the one import upwards, for init_cfg).
        from ...checkpoint import load_pretrained
        load_pretrained(self, pretrained['checkpoint'], prefix=pretrained.get('prefix'),
                        strict=pretrained.get('strict', True))
        self._is_init = True

    def _split_init_cfg(self) -> Tuple[Optional[dict], List[dict]]:
        """(the Pretrained entry of ``init_cfg`` or None, the other entries). A Pretrained entry
        is always loaded by mmeformer's converter, also inside a list (mmengine's own
        ``PretrainedInit`` would load an original release without converting it)."""
        cfg = self.init_cfg
        entries = [] if cfg is None else list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]
        pretrained = [c for c in entries if isinstance(c, dict) and c.get('type') == 'Pretrained']
        if len(pretrained) > 1:
            raise ValueError(f'init_cfg has {len(pretrained)} Pretrained entries; give one')
        others = [c for c in entries if not any(c is p for p in pretrained)]
        return (pretrained[0] if pretrained else None), others

    def switch_to_deploy(self, input_size: Optional[Tuple[int, int]] = None):
        """Fold BatchNorms, drop training-only paths, optionally freeze the attention biases of
        one input size; see :func:`mmeformer.models.fuse`. Returns ``self``."""
        return fuse(self, input_size)

    def arch_description(self) -> str:
        return f'{self.family} {self.arch["name"]}'
