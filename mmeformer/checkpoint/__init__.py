"""Checkpoint reading, conversion and loading for mmeformer backbones."""
from .convert import (FAMILIES, checkpoint_widths, convert_state_dict, detect_family,
                      detect_layout, guess_arch)
from .io import CheckpointError, extract_state_dict, read_checkpoint
from .loading import LoadReport, load_pretrained, read_backbone_state_dict
from ..safe_globals import allow_mmengine_checkpoint_globals, mmengine_checkpoint_globals

__all__ = [
    'CheckpointError', 'FAMILIES', 'LoadReport', 'allow_mmengine_checkpoint_globals',
    'checkpoint_widths', 'convert_state_dict', 'detect_family', 'detect_layout',
    'extract_state_dict', 'guess_arch', 'load_pretrained', 'mmengine_checkpoint_globals',
    'read_backbone_state_dict', 'read_checkpoint'
]
