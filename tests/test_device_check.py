"""benchmarks/device_check.py and tools/device_check.py on CPU: bfloat16 (eager and deploy-fused)
and
the float32 fused runtime agree with float32 eager within the stated tolerances, the caches give
the same outputs as the first forward, and a model that goes wrong in bfloat16 is reported."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from benchmarks import device_check
from mmeformer.cli import doc_parser, image_size
from mmeformer.builder import build_model
from benchmarks.randomize import randomize_

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
    assert max(t for r in results for t in r.tolerances) <= device_check.MAX_TOLERANCE
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


class _WrongUnderBFloat16(nn.Module):
    """A backbone whose coarsest output, where BatchNorm's batch statistics are the least
    stable, is multiplied by ``factor`` (3: too large; -1: the wrong sign) in bfloat16
    inference and in training under bfloat16 autocast."""

    def __init__(self, backbone, factor: float):
        super().__init__()
        self.backbone, self.factor = backbone, factor

    def forward(self, x):
        outs = list(self.backbone(x))
        if x.dtype == torch.bfloat16 or (self.training and torch.is_autocast_enabled('cpu')):
            outs[-1] = outs[-1] * self.factor
        return outs


@pytest.mark.parametrize('factor', [3., -1.])
@pytest.mark.parametrize('variant', ['efficientformer_l1', 'efficientformerv2_s0',
                                     'efficientvit_m0'])
def test_scaled_or_sign_flipped_outputs_fail_for_every_family(variant, factor):
    """The negative control of every family: no tolerance is loose enough to pass an output off
    by 3x or of the wrong sign (a relative difference of 2), also where BatchNorm's batch
    statistics make the training step chaotic (EfficientViT-M0 at this size)."""
    model = _WrongUnderBFloat16(randomize_(build_model(variant)), factor)
    results = device_check.check_variant(variant, SIZE, 'cpu', ['bfloat16'], runtimes=['eager'],
                                         model=model)
    assert [r.step for r in results] == ['inference', 'inference, cached', 'training']
    assert not any(r.ok for r in results)
    for r in results:
        last = len(build_model(variant).out_indices) - 1
        assert r.errors[last] > 1.9 and r.worst == last
        assert max(r.tolerances) <= device_check.MAX_TOLERANCE < 1.9


class _Scale(nn.Module):

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class _BeyondFloat16(nn.Module):
    """A backbone whose last output passes through values beyond float16's range (65504), as
    random weights give EfficientFormerV2 at 800x1344."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.up, self.down = backbone, _Scale(1e6), _Scale(1e-6)

    def forward(self, x):
        outs = list(self.backbone(x))
        outs[-1] = self.down(self.up(outs[-1]))
        return outs


def test_a_reference_beyond_the_dtype_range_is_not_compared():
    model = _BeyondFloat16(randomize_(build_model('efficientvit_m0')))
    results = device_check.check_variant('efficientvit_m0', SIZE, 'cpu', ['float16', 'bfloat16'],
                                         runtimes=['eager'], training=False, model=model)
    half, _, brain, _ = results
    assert not half.within_tolerance and half.ok and half.worst == 2
    assert half.reference_beyond_range > 65504 and half.verdict.startswith('not comparable')
    assert brain.within_tolerance and brain.reference_beyond_range is None  # bfloat16's range
    markdown = device_check.to_markdown(results, dict(cpu='test CPU', torch=torch.__version__))
    assert '2 of 4 checks within tolerance. 2 not comparable' in markdown
    # Without float16 the module outputs are not watched (no cost).
    assert device_check._reference_outputs(model, torch.zeros(1, 3, 64, 64), False)[1] is None


def test_a_nan_output_is_the_worst():
    result = device_check.ParityResult('v', 'table', 8, 8, 'cuda', 'float16', 'eager',
                                       'inference', [1e-2, float('nan'), 1e-3], [2e-2] * 3)
    assert result.worst == 1 and not result.ok and result.verdict == 'above'


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


def test_settings_that_check_nothing_are_refused():
    nothing = device_check.nothing_to_check
    assert 'float32 eager on CPU is the reference' in nothing('cpu', ['float32'], ['eager'])
    assert nothing('cpu', ['float32'], ['eager', 'fused']) is None
    assert nothing('cpu', ['float32', 'bfloat16'], ['eager']) is None
    assert nothing('cuda', ['float32'], ['eager']) is None
    with pytest.raises(ValueError, match='nothing to check'):
        device_check.check_variant('efficientvit_m0', (64, 64), 'cpu', ['float32'], ['eager'])
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'device_check.py'), '--device',
                           'cpu', '--dtypes', 'float32', '--runtimes', 'eager'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'add a dtype (bfloat16) or the fused runtime' in proc.stderr


def test_gpu_report_script(tmp_path):
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'gpu_report.sh'), str(tmp_path),
                           'efficientvit_m0'], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, env=dict(os.environ, PYTHON=sys.executable))
    if not torch.cuda.is_available():
        assert proc.returncode == 2 and 'no CUDA device is available' in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for report in ('latency_float16/latency.md', 'latency_bfloat16/latency.md',
                   'device_check_800x1344/device_check.md',
                   'device_check_250x330/device_check.md'):
        assert (tmp_path / report).is_file(), report
