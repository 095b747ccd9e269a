"""mmeformer.device_check and tools/device_check.py on CPU: bfloat16 (eager and deploy-fused) and
the float32 fused runtime agree with float32 eager within the stated tolerances, the caches give
the same outputs as the first forward, and a model that goes wrong in bfloat16 is reported."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from mmeformer import device_check
from mmeformer.cli import doc_parser, image_size
from mmeformer.export import build_model
from mmeformer.testing import randomize_

SIZE = (130, 170)  # odd: padded windows, resized biases


@pytest.mark.parametrize('variant', ['efficientformer_l1', 'efficientformerv2_s0',
                                     'efficientvit_m0'])
def test_bfloat16_and_fused_within_tolerance(variant):
    results = device_check.run([variant], [SIZE], 'cpu', ['float32', 'bfloat16'],
                               progress=lambda line: None)
    modes = ['table'] + ([] if variant.startswith('efficientvit_') else ['official'])
    expected = []
    for mode in modes:
        expected += [('float32', 'fused', 'inference'), ('float32', 'fused', 'inference, cached')]
        expected += [('bfloat16', runtime, step) for runtime in ('eager', 'fused')
                     for step in ('inference', 'inference, cached')]
        if mode == 'table':
            expected.append(('bfloat16', 'eager', 'training'))
    assert [(r.dtype, r.runtime, r.step) for r in results] == expected
    bad = [(r.bias_mode, r.dtype, r.runtime, r.step, r.errors, r.tolerances)
           for r in results if not r.ok]
    assert not bad
    for r in results:
        if r.dtype == 'float32':  # the folds of eager eval and deploy fusion are the same
            assert max(r.errors) < 1e-5
        elif r.step != 'training':
            assert 1e-4 < max(r.errors) < 3e-2  # bfloat16 rounding, and not more
        else:  # outputs of every stage, then the gradients
            assert len(r.errors) == len(build_model(variant).out_indices) + 1
    by_step = {(r.bias_mode, r.dtype, r.runtime, r.step): r.errors for r in results}
    for (mode, dtype, runtime, step), errors in by_step.items():
        if step == 'inference, cached':
            assert errors == by_step[(mode, dtype, runtime, 'inference')]


class _WrongInBFloat16(nn.Module):
    """A backbone whose last output is off by a fifth of its range in bfloat16 inference, or
    whose first output is scaled by 1.3 in training under autocast."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        outs = list(self.backbone(x))
        if x.dtype == torch.bfloat16:
            outs[-1] = outs[-1] + 0.2 * outs[-1].abs().max()
        if self.training and torch.is_autocast_enabled('cpu'):
            outs[0] = outs[0] * 1.3
        return outs


def test_a_wrong_model_is_reported():
    model = _WrongInBFloat16(randomize_(build_model('efficientformerv2_s0')))
    results = device_check.check_variant('efficientformerv2_s0', SIZE, 'cpu', ['bfloat16'],
                                         runtimes=['eager'], model=model)
    assert [(r.step, r.ok, r.worst) for r in results] == [
        ('inference', False, 3), ('inference, cached', False, 3), ('training', False, 0)]
    assert all(r.errors[r.worst] > 0.15 for r in results)
    markdown = device_check.to_markdown(results, dict(cpu='test CPU', torch=torch.__version__))
    assert markdown.count('**above**') == 3 and '0 of 3 checks within tolerance.' in markdown


def test_tool_writes_report_and_exit_status(tmp_path):
    cmd = [sys.executable, str(REPO / 'tools' / 'device_check.py'), '--device', 'cpu',
           '--variants', 'efficientvit_m0', '--sizes', '96x128', '--no-training',
           '--out', str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'device_check.json').read_text())
    assert [(r['dtype'], r['runtime'], r['step'], r['ok']) for r in report['results']] == [
        ('bfloat16', runtime, step, True) for runtime in ('eager', 'fused')
        for step in ('inference', 'inference, cached')]
    assert '4 of 4 checks within tolerance.' in (tmp_path / 'device_check.md').read_text()
    proc = subprocess.run(cmd[:3] + ['cuda'] + cmd[4:], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        assert proc.returncode == 2 and 'no CUDA device is available here' in proc.stderr


def test_tool_size_argument():
    parser = doc_parser('Summary line.\n\nDetails, printed after the options.')
    parser.add_argument('--sizes', nargs='+', type=image_size)
    assert parser.parse_args(['--sizes', '800x1344', '512']).sizes == [(800, 1344), (512, 512)]
    assert parser.description == 'Summary line.'
    assert 'Details, printed after the options.' in parser.format_help()
    for text, message in (('800y1344', 'write HxW'), ('0x512', 'must be positive')):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            image_size(text)
