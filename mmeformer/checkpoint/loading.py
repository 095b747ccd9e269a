"""Loading a converted checkpoint into a backbone: bias-table adaptation, exact shape checks, a
strict check of the key sets and a report of what was missing, unused, dropped or resized."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from ..models.archs import FAMILIES as ARCHS
from ..models.archs import variant_name
from ..models.factory import create_backbone
from ..models.layers import RelativeBiasAttention
from .convert import (checkpoint_widths, convert_state_dict, dense_bias_img_size, detect_family,
                      guess_arch, table_side)
from .io import CheckpointError, extract_state_dict, read_checkpoint

TOP_LEVEL_PREFIXES = ('stem.', 'stages.', 'network.', 'patch_embed.', 'blocks1.', 'out_norms.')
OUT_NORM_REASON = ('output norms for dense prediction, new on top of a checkpoint without any '
                   '(ImageNet / timm release): they keep their initialisation')
DROPPED_OUT_NORM_REASON = ('output norm of a level this backbone does not return or normalise '
                           '(out_indices / out_norm_cfg)')
SHOWN_KEYS = 3


@dataclass
class LoadReport:
    family: str
    layout: str
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    resized: List[str] = field(default_factory=list)
    outside_prefix: int = 0
    # The missing keys the design expects (they keep their initialisation), with the reason.
    expected: Dict[str, str] = field(default_factory=dict)

    @property
    def unexpected_missing(self) -> List[str]:
        return [k for k in self.missing if k not in self.expected]


def _select_prefix(state_dict, prefix: Optional[str], path: str) -> Tuple[dict, str, int]:
    if prefix is None:
        if any(k.startswith(TOP_LEVEL_PREFIXES) for k in state_dict):
            return state_dict, '', 0
        if any(k.startswith('backbone.') for k in state_dict):
            prefix = 'backbone.'  # a full detector / segmentor file: take its backbone
        else:
            return state_dict, '', 0
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(f'no key of {path!r} starts with prefix {prefix!r}; its keys look '
                              f'like {sorted(state_dict)[:3]}. Pass prefix=None or the right '
                              f'prefix')
    return selected, prefix, len(state_dict) - len(selected)


def read_backbone_state_dict(path: str, prefix: Optional[str] = None):
    """Read ``path`` and return (backbone state dict in its own layout, family, prefix used,
    number of keys outside the prefix)."""
    state_dict, _ = extract_state_dict(read_checkpoint(path), path)
    state_dict, prefix, outside = _select_prefix(state_dict, prefix, path)
    family = detect_family(state_dict)
    if family is None:
        raise CheckpointError(f'{path!r} is not a checkpoint of EfficientFormer, '
                              f'EfficientFormerV2 or EfficientViT (keys look like '
                              f'{sorted(state_dict)[:3]})')
    return state_dict, family, prefix, outside


def _bias_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, RelativeBiasAttention)}


def _adapt_bias_tables(model, converted: dict, dropped: dict, path: str) -> List[str]:
    """Fit checkpoint bias tables to the model's bias mode; returns the keys resized."""
    resized = []
    dense_size = dense_bias_img_size(converted)
    for name, module in _bias_modules(model).items():
        key = f'{name}.attention_biases'
        if key not in converted or converted[key].shape == module.attention_biases.shape:
            continue
        table = converted[key]
        side = table_side(table)
        heads = table.shape[0]
        if heads != module.attention_biases.shape[0] or side * side != table.shape[-1]:
            continue  # a different arch: reported by the shape check
        if model.family == 'EfficientViT':
            # Downstream windows are 7x7 everywhere; ImageNet stage-3 tables are 4x4 (Cream's
            # loader does the same bicubic resize).
            grid = table.view(1, heads, side, side).float()
            converted[key] = F.interpolate(
                grid, size=(module.table_size, module.table_size), mode='bicubic',
                align_corners=False).reshape(heads, -1).to(table.dtype)
            resized.append(key)
        elif module.bias_mode == 'table':
            raise CheckpointError(
                f'{path!r} holds the official dense attention biases ({key} is a {side}x{side} '
                f'table, not the {module.table_size}x{module.table_size} ImageNet one); build the '
                f"backbone with bias_mode='official', bias_img_size={dense_size} to use them")
        elif side == module.classification_table_size:
            dropped[key] = ("ImageNet attention bias: bias_mode='official' trains its own "
                            'reference-grid tables from zero, as the dense release did')
            del converted[key]
        else:
            raise CheckpointError(
                f'{path!r} holds dense attention biases for bias_img_size={dense_size} but the '
                f'backbone was built with bias_img_size={model.bias_img_size}; use '
                f'bias_img_size={dense_size}')
    return resized


def _arch_hint(converted: dict, family: str, model) -> Optional[str]:
    arch = guess_arch(converted, family)
    if arch and arch != model.arch['name']:
        return f"it looks like arch '{arch}': build {family}(arch='{arch}')"
    return None


def _lead_prefix(state_dict: dict, keys: List[str]) -> Optional[Tuple[str, dict]]:
    """(prefix, backbone state dict below it) for the leading key component most of ``keys``
    share, e.g. 'module.' of a DDP file ('module.backbone.' when a whole model is below it)."""
    leads = Counter(k.split('.', 1)[0] for k in keys if '.' in k)
    if not leads:
        return None
    lead = leads.most_common(1)[0][0] + '.'
    below = {k[len(lead):]: v for k, v in state_dict.items() if k.startswith(lead)}
    if not below:
        return None
    below, inner, _ = _select_prefix(below, None, '')
    return lead + inner, below


def _prefix_hint(state_dict: dict, family: str, keys: List[str], fits,
                 outer_prefix: str = '') -> Optional[str]:
    """Name the prefix whose removal makes the checkpoint fit (``fits(converted)``);
    ``outer_prefix``: the one already taken off ``state_dict``."""
    candidate = _lead_prefix(state_dict, keys)
    if candidate is None:
        return None
    prefix, below = outer_prefix + candidate[0], candidate[1]
    try:
        converted, _, _ = convert_state_dict(below, family)
    except CheckpointError:
        return None
    if not fits(converted):
        return None
    return (f"its keys carry the prefix {prefix!r}: pass prefix={prefix!r} "
            f"(init_cfg=dict(type='Pretrained', checkpoint=..., prefix={prefix!r}); "
            f'tools/convert_checkpoint.py --prefix {prefix})')


def _keys_summary(keys: List[str]) -> str:
    return f'{len(keys)} (first: {", ".join(keys[:SHOWN_KEYS])})'


def _strict_error(path: str, model, report: LoadReport, state_dict: dict, converted: dict,
                  prefix: str, loadable: int) -> CheckpointError:
    model_keys = set(model.state_dict())
    missing = report.unexpected_missing
    problems = []
    if missing:
        problems.append(f'model tensors missing from the file: {_keys_summary(missing)}')
    if report.unused:
        problems.append(f'file tensors the model does not have: {_keys_summary(report.unused)}')
    hints = [h for h in (_prefix_hint(state_dict, report.family, report.unused,
                                      lambda c: sum(k in model_keys for k in c) > loadable,
                                      prefix),
                         _arch_hint(converted, report.family, model)) if h]
    return CheckpointError(
        f'{path!r} does not match {model.arch_description()} '
        f'({loadable} of {len(model_keys)} model tensors found): ' + '; '.join(problems) + '. '
        + ''.join(f'Likely fix: {h}. ' for h in hints)
        + f"To load only the {loadable} matching tensors and keep the rest as initialised, pass "
        f"strict=False (init_cfg=dict(type='Pretrained', checkpoint=..., strict=False))")


def fit_state_dict(model, state_dict: dict, family: str, path: str, prefix: str = '',
                   strict: bool = True) -> Tuple[dict, LoadReport]:
    """Convert ``state_dict`` (a backbone in any supported layout) for ``model`` and check that
    it fits: the checks of :func:`load_pretrained`, shared with tools/convert_checkpoint.py.
    Returns (the tensors to load, report); the model is not touched."""
    converted, dropped, info = convert_state_dict(state_dict, family)
    if family != model.family:
        arch = guess_arch(converted, family)
        raise CheckpointError(
            f'{path!r} is a {family} checkpoint' + (f" (arch '{arch}')" if arch else '') +
            f' but the model is {model.arch_description()}; build {family}'
            + (f"(arch='{arch}')" if arch else '') + ' to load it')
    resized = _adapt_bias_tables(model, converted, dropped, path)

    model_state = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape))
                  for k, v in converted.items() if k in model_state
                  and v.shape != model_state[k].shape]
    if mismatched:
        key, got, want = mismatched[0]
        hint = _arch_hint(converted, family, model)
        raise CheckpointError(
            f'{path!r} does not fit {model.arch_description()}: {len(mismatched)} tensors differ '
            f'in shape (first: {key} is {got} in the file, {want} in the model)'
            + (f'; {hint}' if hint else ''))

    loadable = {k: v for k, v in converted.items() if k in model_state}
    missing = sorted(k for k in model_state if k not in converted)
    unused = sorted(k for k in converted if k not in model_state)
    for key in [k for k in unused if k.startswith('out_norms.')]:
        dropped[key] = DROPPED_OUT_NORM_REASON  # e.g. dense V1 weights for a RetinaNet's levels
        unused.remove(key)
    has_out_norms = any(k.startswith('out_norms.') for k in converted)
    expected = {k: dropped[k] if k in dropped else OUT_NORM_REASON for k in missing
                if k in dropped or (k.startswith('out_norms.') and not has_out_norms)}
    report = LoadReport(family, info['layout'], missing, unused, dropped, resized,
                        expected=expected)
    if strict and (report.unexpected_missing or unused):
        raise _strict_error(path, model, report, state_dict, converted, prefix, len(loadable))
    return loadable, report


def load_pretrained(model, path: str, prefix: Optional[str] = None, strict: bool = True,
                    logger: str = 'current') -> LoadReport:
    """Load any supported checkpoint ``path`` into ``model`` (an mmeformer backbone).

    Raises :class:`CheckpointError` on a file of another family or arch (naming both) and, with
    ``strict``, on missing or unused keys other than the gaps the design expects (new output
    norms, ImageNet bias tables in official mode), naming the likely fix. Never drops a tensor
    silently: missing, unused, dropped and resized keys are logged and returned.
    """
    state_dict, family, prefix, outside = read_backbone_state_dict(path, prefix)
    loadable, report = fit_state_dict(model, state_dict, family, path, prefix, strict)
    model.load_state_dict(loadable, strict=False)
    report.outside_prefix = outside
    _log_report(report, path, prefix, logger)
    return report


def convert_and_verify(state_dict: dict, family: str, path: str, prefix: str = ''
                       ) -> Tuple[dict, dict, dict, str]:
    """Convert a backbone state dict for writing and check, by building the released arch it
    comes from (in the bias mode of the file), that it loads with ``strict=True``: the converter
    must never write a file that fails or half-loads later. Returns
    ``(converted, dropped, info, arch)`` as :func:`convert_state_dict` plus the arch name."""
    converted, dropped, info = convert_state_dict(state_dict, family)
    arch = guess_arch(converted, family)
    if arch is None:
        hint = _prefix_hint(converted, family, list(converted),
                            lambda c: guess_arch(c, family) is not None, prefix)
        widths = checkpoint_widths(converted, family)
        found = (f'its stage widths {widths} match none of them' if widths else
                 f'its keys look like {sorted(converted)[:SHOWN_KEYS]}')
        raise CheckpointError(
            f'{path!r}: cannot tell which released {family} arch '
            f'({", ".join(ARCHS[family][1])}) it is: {found}. '
            + (f'Likely fix: {hint}. ' if hint else '')
            + "A custom arch loads directly with init_cfg=dict(type='Pretrained', "
            'checkpoint=...), which checks the file against the model you build')
    kwargs = {}
    if info['dense']:
        kwargs = dict(bias_mode='official', bias_img_size=dense_bias_img_size(converted))
    # Only key names and shapes are compared: a model on the meta device has them without
    # allocating or initialising weights (1.2 s for L7 on the CPU). Converting the converted
    # dict again is deliberate: it is what loading the written file will do.
    with torch.device('meta'):
        reference = create_backbone(variant_name(family, arch), **kwargs)
    fit_state_dict(reference, converted, family, path, prefix)
    return converted, dropped, info, arch


def _log_report(report: LoadReport, path: str, prefix: str, logger: str):
    lines = [f'Loaded {report.family} weights from {path}'
             + (f" (keys under '{prefix}', {report.outside_prefix} other keys ignored)"
                if prefix else '') + f'; source layout: {report.layout}']
    for reason, count in sorted(Counter(report.dropped.values()).items()):
        lines.append(f'  dropped {count} key(s): {reason}')
    if report.resized:
        lines.append(f'  resized {len(report.resized)} bias table(s) to the window size')
    new = Counter(r for k, r in report.expected.items() if k not in report.dropped)
    for reason, count in sorted(new.items()):
        lines.append(f'  left initialised {count} key(s): {reason}')
    missing = report.unexpected_missing
    if missing or report.unused:  # only with strict=False
        lines.append(f'  missing in checkpoint ({len(missing)}): {missing}')
        lines.append(f'  unused from checkpoint ({len(report.unused)}): {report.unused}')
    print_log('\n'.join(lines), logger=logger,
              level=30 if (missing or report.unused) else 20)
