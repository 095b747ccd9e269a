"""The training-speed report (benchmarks/training.py, tools/benchmark.py --train) and
tools/train.py --compile. The speeds themselves live in docs/benchmarks.md, not in tests."""
import os
import sys
from pathlib import Path

import torch

from benchmarks import training
from benchmarks.randomize import randomize_
from mmeformer.builder import build_model
from mmeformer.complexity import count_macs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))


def test_train_step_trains_the_model_in_each_dtype():
    """A step is forward, backward from the level gradients and an AdamW update: every weight
    moves (randomised: no zero-initialised scale switches a branch off); bfloat16 runs the
    forward under CPU autocast."""
    model = randomize_(build_model('efficientvit_m0')).train()
    x = torch.randn(2, 3, 64, 64)
    grads = training.level_gradients(model, x)
    assert [g.shape for g in grads] == [f.shape for f in model(x)]
    for dtype in training.TRAIN_DTYPES:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        training.train_step(model, x, grads, dtype)()
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert len(moved) == len(before), dtype
        with training.autocast(dtype):
            assert torch.is_autocast_enabled('cpu') == (dtype == 'bfloat16')
            assert model(x)[0].dtype == getattr(torch, dtype)


def test_training_report_times_mmeformer_against_its_reference():
    env, rows = training.run(['efficientformerv2_s0', 'efficientvit_m0'], [(64, 64)],
                             ['float32'], warmup=0, repeats=1, keep_memory=False,
                             progress=lambda line: None)
    assert [(r.variant, r.implementation) for r in rows] == [
        ('efficientformerv2_s0', 'mmeformer'), ('efficientformerv2_s0', training.OFFICIAL),
        ('efficientvit_m0', 'mmeformer'), ('efficientvit_m0', 'timm')]
    macs = count_macs(build_model('efficientvit_m0'), (64, 64))
    for r in rows:
        assert r.median_ms > 0 and r.batch == 2 and r.dtype == 'float32'
        if r.variant == 'efficientvit_m0':  # 3x the forward MACs of the batch, 2 FLOPs each
            assert abs(r.gflops_per_s - 6 * macs * 2 / r.median_ms * 1e-6) < 0.06
    found = {(v, s, d, fast, slow): ratio for v, s, d, fast, slow, ratio in training.ratios(rows)}
    by_key = {(r.variant, r.implementation): r.median_ms for r in rows}
    assert found[('efficientvit_m0', '64x64', 'float32', 'mmeformer', 'timm')] == (
        by_key[('efficientvit_m0', 'timm')] / by_key[('efficientvit_m0', 'mmeformer')])
    assert len(found) == 2
    text = training.to_markdown(env, rows)
    assert '| efficientformerv2_s0 | 64x64 | float32 | official (re-implemented) |' in text
    assert ' | mmeformer | official (re-implemented) |' in text.split('| speed-up |')[1]


def test_a_setting_whose_process_dies_is_reported_not_timed(monkeypatch):
    """Each setting runs in its own process, so one that the kernel kills (out of memory: L7
    at 800x1344 on a 24 GiB machine) costs only its rows, which say why."""
    assert training.in_fresh_process(training.reference_name, 'efficientvit_m0') == 'timm'
    assert training.in_fresh_process(os.abort) == 'its process was killed by SIGABRT'
    assert training.in_fresh_process(sys.exit, 3).startswith('its process failed (exit status 3')
    real = training.in_fresh_process
    monkeypatch.setattr(training, 'in_fresh_process', lambda fn, variant, *args: (
        real(os.abort) if variant == 'efficientvit_m0' else real(fn, variant, *args)))
    env, rows = training.run(['efficientvit_m0', 'efficientvit_m1'], [(64, 64)], ['float32'],
                             warmup=0, repeats=1, keep_memory=False, progress=lambda line: None)
    dead = [r for r in rows if r.variant == 'efficientvit_m0']
    assert [(r.implementation, r.median_ms, r.note) for r in dead] == [
        ('mmeformer', None, 'its process was killed by SIGABRT'),
        ('timm', None, 'its process was killed by SIGABRT')]
    assert all(r.median_ms > 0 for r in rows if r.variant == 'efficientvit_m1')
    assert [found[0] for found in training.ratios(rows)] == ['efficientvit_m1']
    text = training.to_markdown(env, rows)
    assert ('| efficientvit_m0 | 64x64 | float32 | timm | not timed: its process was killed by '
            'SIGABRT | - | - | - | - | - |') in text


def test_detector_iteration_ratio_swaps_the_backbone_time():
    row = training.DetectorBreakdown('c.py', 'efficientvit_m4', (2, 3, 320, 320), 1000., 200.,
                                     100., 700., 'timm', 300.)
    assert row.backbone_ratio == 1.5
    assert row.iteration_ratio == 1.1  # (1000 - 200 + 300) / 1000
    assert '| c.py | 2x3x320x320 | 1000 | 200 (20%) | 100 | 700 | timm | 300 | 1.50x | 1.10x |' \
        in training.detector_markdown(dict(cpu='cpu', threads=2, torch='2'), [row])


def test_train_compile_sets_mmengine_compile_and_leaves_the_update_eager(monkeypatch):
    import train as train_tool
    from mmengine.optim import OptimWrapper
    seen = {}
    monkeypatch.setattr(train_tool, 'train', lambda cfg: seen.setdefault('cfg', cfg))
    monkeypatch.setattr(OptimWrapper, 'update_params', OptimWrapper.update_params)
    config = str(REPO / 'configs/segmentation/toy/semfpn_efficientvit_m4.py')
    assert train_tool.main([config, '--work-dir', 'unused']) == 0
    assert not seen.pop('cfg').get('compile')
    assert not getattr(OptimWrapper.update_params, '_torchdynamo_disable', False)
    assert train_tool.main([config, '--work-dir', 'unused', '--compile']) == 0
    assert seen.pop('cfg').compile is True
    assert getattr(OptimWrapper.update_params, '_torchdynamo_disable', False)
    assert train_tool.main([config, '--work-dir', 'unused', '--compile', 'aot_eager']) == 0
    assert seen['cfg'].compile == dict(backend='aot_eager')
