"""Build-time checks of a detection / segmentation config's model.

A neck whose ``in_channels`` do not match the backbone builds without complaint and fails only
at the first forward, deep inside a convolution ("expected input[2, 224, 25, 25] to have 320
channels"). :func:`check_model_config` builds the mmeformer backbone of a config on the meta
device (no memory, no weights: a fraction of a second even for L7) and compares what it returns
with the neck's ``in_channels`` (mmdet / mmseg ``FPN``, ``EfficientViTFPN``, any neck with a
list of ``in_channels``) or, without a neck, with the decode head's ``in_channels`` /
``in_index`` (mmseg). Backbone argument errors (unknown keywords, ``out_indices`` or
``frozen_stages`` out of range) surface here too, prefixed with the config key.

:func:`mmeformer.engine.build_runner` (``tools/train.py``, ``tools/test.py``) and
:func:`mmeformer.builder.build_model` (``tools/export.py --with-neck``) run it.
"""
from typing import List, Optional

import torch
from mmengine.registry import MODELS

from ..models.backbones.base import MobileBackbone
from .errors import ConfigError


def _model_cfg(cfg):
    return cfg.get('model', cfg) if hasattr(cfg, 'get') else cfg


def _mobile_backbone_class(backbone_cfg, scope: Optional[str]):
    """The class ``backbone_cfg`` builds when it is an mmeformer backbone, else None."""
    obj_type = backbone_cfg.get('type')
    cls = None
    if isinstance(obj_type, type):
        cls = obj_type
    elif isinstance(obj_type, str):
        with MODELS.switch_scope_and_registry(scope) as registry:
            cls = registry.get(obj_type)
    return cls if isinstance(cls, type) and issubclass(cls, MobileBackbone) else None


def backbone_out_channels(cfg) -> Optional[List[int]]:
    """Channels of the levels the config's backbone returns (None if it is not an mmeformer
    backbone). Builds it on the meta device; raises :class:`ConfigError` for bad arguments."""
    model = _model_cfg(cfg)
    backbone_cfg = model.get('backbone') if model is not None else None
    if not backbone_cfg:
        return None
    scope = cfg.get('default_scope') if hasattr(cfg, 'get') else None
    cls = _mobile_backbone_class(backbone_cfg, scope)
    if cls is None:
        return None
    args = {k: v for k, v in dict(backbone_cfg).items() if k not in ('type', 'init_cfg')}
    try:
        with torch.device('meta'):
            backbone = cls(**args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'model.backbone: {err}') from err
    return list(backbone.out_channels)


def _mismatch(key: str, given, expected, backbone_cfg, out_channels, in_index=None):
    given = list(given) if isinstance(given, (list, tuple)) else given
    selection = '' if in_index is None else f'; in_index={in_index} selects {expected}'
    return ConfigError(
        f"{key}={given} does not match the backbone: {backbone_cfg.get('type')} "
        f"arch={backbone_cfg.get('arch', 'default')!r} with "
        f"out_indices={tuple(backbone_cfg.get('out_indices', ())) or 'default'} returns "
        f'out_channels {out_channels}{selection}. Set {key}={expected} (or change the '
        f'backbone arch / out_indices)')


def check_model_config(cfg) -> Optional[List[int]]:
    """Check ``cfg.model`` (a Config, or a model dict) before anything is built.

    Raises :class:`ConfigError` when the backbone arguments are invalid or the neck's
    ``in_channels`` (without a neck: the decode head's ``in_channels`` at its ``in_index``) do
    not match the backbone's ``out_channels``. Returns those out_channels (None for backbones
    that are not mmeformer's, which are left alone).
    """
    model = _model_cfg(cfg)
    out_channels = backbone_out_channels(cfg)
    if out_channels is None:
        return None
    backbone_cfg = model['backbone']
    neck = model.get('neck')
    if neck:
        key = 'model.neck.in_channels'
        if isinstance(neck, (list, tuple)):  # mmdet: a sequence of necks
            neck, key = neck[0], 'model.neck[0].in_channels'
        given = neck.get('in_channels')
        if isinstance(given, (list, tuple)) and list(given) != out_channels:
            raise _mismatch(key, given, out_channels, backbone_cfg, out_channels)
        return out_channels
    head = model.get('decode_head')
    if isinstance(head, dict) and 'in_channels' in head:
        in_index = head.get('in_index', -1)
        given = head['in_channels']
        indices = list(in_index) if isinstance(in_index, (list, tuple)) else [in_index]
        bad = [i for i in indices if not -len(out_channels) <= i < len(out_channels)]
        if bad:
            raise ConfigError(
                f'model.decode_head.in_index={in_index} is out of range for the '
                f'{len(out_channels)} backbone levels; valid: 0..{len(out_channels) - 1}')
        expected = [out_channels[i] for i in indices]
        if not isinstance(in_index, (list, tuple)):
            expected = expected[0]
        if (list(given) if isinstance(given, (list, tuple)) else given) != expected:
            raise _mismatch('model.decode_head.in_channels', given, expected, backbone_cfg,
                            out_channels, in_index)
    return out_channels
