"""Loading a converted checkpoint into a backbone: bias-table adaptation, exact shape checks and a
report of what was missing, unused, dropped or resized."""
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from .convert import convert_state_dict, detect_family, guess_arch
from .io import CheckpointError, extract_state_dict, read_checkpoint

TOP_LEVEL_PREFIXES = ('stem.', 'stages.', 'network.', 'patch_embed.', 'blocks1.', 'out_norms.')


@dataclass
class LoadReport:
    family: str
    layout: str
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    resized: List[str] = field(default_factory=list)
    outside_prefix: int = 0


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
    from ..models.layers import RelativeBiasAttention
    return {name: m for name, m in model.named_modules() if isinstance(m, RelativeBiasAttention)}


def _adapt_bias_tables(model, converted: dict, dropped: dict, path: str) -> List[str]:
    """Fit checkpoint bias tables to the model's bias mode; returns the keys resized."""
    resized = []
    modules = _bias_modules(model)
    sides = {}
    for name, module in modules.items():
        table = converted.get(f'{name}.attention_biases')
        if table is not None and table.dim() == 2:
            sides[name] = int(round(math.sqrt(table.shape[-1])))
    # Dense releases: the smallest table is the stride-32 grid, ceil(bias_img_size / 32).
    dense_size = 32 * min(sides.values()) if sides else None
    for name, module in modules.items():
        key = f'{name}.attention_biases'
        if key not in converted or converted[key].shape == module.attention_biases.shape:
            continue
        table, side = converted[key], sides.get(name, 0)
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


def load_pretrained(model, path: str, prefix: Optional[str] = None,
                    logger: str = 'current') -> LoadReport:
    """Load any supported checkpoint ``path`` into ``model`` (an mmeformer backbone).

    Raises :class:`CheckpointError` on a file of another family or arch (naming both) and
    never drops a tensor silently: missing, unused, dropped and resized keys are logged and
    returned.
    """
    state_dict, family, prefix, outside = read_backbone_state_dict(path, prefix)
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
        arch = guess_arch(converted, family)
        key, got, want = mismatched[0]
        hint = (f"; it looks like arch '{arch}': build {family}(arch='{arch}')"
                if arch and arch != model.arch['name'] else '')
        raise CheckpointError(
            f'{path!r} does not fit {model.arch_description()}: {len(mismatched)} tensors differ '
            f'in shape (first: {key} is {got} in the file, {want} in the model){hint}')

    missing = sorted(k for k in model_state if k not in converted)
    unused = sorted(k for k in converted if k not in model_state)
    model.load_state_dict({k: v for k, v in converted.items() if k in model_state},
                          strict=False)
    report = LoadReport(family, info['layout'], missing, unused, dropped, resized, outside)
    _log_report(report, path, prefix, logger)
    return report


def _log_report(report: LoadReport, path: str, prefix: str, logger: str):
    lines = [f'Loaded {report.family} weights from {path}'
             + (f" (keys under '{prefix}', {report.outside_prefix} other keys ignored)"
                if prefix else '') + f'; source layout: {report.layout}']
    for reason, count in sorted(Counter(report.dropped.values()).items()):
        lines.append(f'  dropped {count} key(s): {reason}')
    if report.resized:
        lines.append(f'  resized {len(report.resized)} bias table(s) to the window size')
    lines.append(f'  missing in checkpoint ({len(report.missing)}): {report.missing}')
    lines.append(f'  unused from checkpoint ({len(report.unused)}): {report.unused}')
    print_log('\n'.join(lines), logger=logger,
              level=30 if (report.missing or report.unused) else 20)
