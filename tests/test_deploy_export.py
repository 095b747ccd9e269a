"""Deploy fusion, export with numerical checks, complexity and the latency report."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from mmeformer.complexity import count_macs
from mmeformer.models import fuse
from mmeformer.builder import build_model
from mmeformer.export import export_coreml, export_onnx, export_torchscript, verify_export
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT
from benchmarks.randomize import randomize_

ONE_PER_FAMILY = [(EfficientFormer, 'l1'), (EfficientFormerV2, 's0'), (EfficientViT, 'm0')]


@pytest.mark.parametrize('cls,arch', ONE_PER_FAMILY)
def test_fused_model_matches_unfused(cls, arch):
    model = randomize_(cls(arch=arch)).eval()
    fused = copy.deepcopy(model).switch_to_deploy(input_size=(96, 128))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    for size in [(96, 128), (224, 224), (65, 97)]:  # the frozen size and two others
        x = torch.randn(1, 3, *size)
        # With gradients enabled the eval model runs the plain conv -> BatchNorm graph and
        # computes its biases afresh (no folding, no cache): an independent reference.
        reference = [r.detach() for r in model(x)]
        with torch.no_grad():
            outputs = fused(x)
        assert len(outputs) == len(reference)
        for ref, out in zip(reference, outputs):
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize('cls,arch', ONE_PER_FAMILY)
def test_static_fused_onnx_has_no_batchnorm_bias_gather_or_bicubic_resize(cls, arch, tmp_path):
    """What fusion is for: the exported graph holds folded convs and constant biases. Its only
    Gathers read tensor shapes, its only resizes are V2's bilinear upsample."""
    import onnx
    path = str(tmp_path / 'm.onnx')
    # Fused without a size: a fixed-size export freezes the biases of its size itself.
    export_onnx(fuse(cls(arch=arch)), path, (96, 128), dynamic=False)
    graph = onnx.load(path).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    ops = [node.op_type for node in graph.node]
    assert 'BatchNormalization' not in ops
    assert all(producer.get(node.input[0]) == 'Shape' for node in graph.node
               if node.op_type == 'Gather')
    modes = [attr.s for node in graph.node if node.op_type == 'Resize'
             for attr in node.attribute if attr.name == 'mode']
    assert set(modes) <= {b'linear'}
    assert ops.count('Resize') == (2 if cls is EfficientFormerV2 else 0)


@pytest.mark.parametrize('cls,arch', ONE_PER_FAMILY)
def test_dynamic_onnx_export_runs_at_other_sizes(cls, arch, tmp_path):
    # Biases frozen at one size would be graph constants: a dynamic export unfreezes them.
    model = fuse(randomize_(cls(arch=arch)), input_size=(96, 128))
    names = export_onnx(model, str(tmp_path / 'm.onnx'), (64, 96), dynamic=True)
    assert names == [f'stride{s}' for s in model.out_strides]
    for batch in (1, 2):  # the batch axis is dynamic too
        errors = verify_export(model, 'onnx', str(tmp_path / 'm.onnx'), [(96, 128), (65, 97)],
                               batch)
        assert max(max(e['relative']) for e in errors.values()) <= 1e-4, (batch, errors)


def test_torchscript_export_matches(tmp_path):
    model = fuse(randomize_(EfficientFormerV2('s0')), input_size=(96, 128))
    export_torchscript(model, str(tmp_path / 'm.pt'), (96, 128))
    errors = verify_export(model, 'torchscript', str(tmp_path / 'm.pt'), [(96, 128)])
    assert max(errors[(96, 128)]['relative']) <= 1e-4


def test_export_tool_exit_status(tmp_path):
    out = tmp_path / 'm4.onnx'
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'export.py'), 'efficientvit_m4',
                           '--dynamic', '--shape', '96', '128', '--out', str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and 'OK: largest difference' in proc.stdout, proc.stderr
    assert proc.stdout.count(', batch 2: relative difference per level') == 3, proc.stdout


# One variant per family: each family has its own blocks, and so its own ops to convert.
@pytest.mark.parametrize('name,flags,outputs,resizes', [
    ('efficientformer_l1', [], "['stride4', 'stride8', 'stride16', 'stride32']", 'none'),
    # V2's stage-3 attention upsamples its half-resolution output: architecture, not bias.
    ('efficientformerv2_s0', [], "['stride4', 'stride8', 'stride16', 'stride32']",
     "['upsample_bilinear']"),
    # 112: a map of whole windows at stride 16 (no padding), one window padded at 32 and 64.
    ('efficientvit_m0', ['--shape', '112', '112'], "['stride16', 'stride32', 'stride64']",
     'none'),
    # Unfused, the BatchNorms stay, but the attention biases are still frozen at the size.
    ('efficientformerv2_s0', ['--no-fuse'], "['stride4', 'stride8', 'stride16', 'stride32']",
     "['upsample_bilinear']"),
])
def test_coreml_export_tool(tmp_path, name, flags, outputs, resizes):
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'export.py'), name,
                           '--format', 'coreml', '--shape', '64', '64', *flags, '--out',
                           # trailing '/': a package is a folder, and shells complete it so
                           f'{tmp_path / name}.mlpackage/'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'outputs {outputs}' in proc.stdout
    # A fixed-size export holds no bicubic bias resize.
    assert f'resize/upsample ops: {resizes}' in proc.stdout


def test_export_coreml_freezes_the_attention_biases_of_its_own_size(tmp_path):
    """A library caller's model, fused (biases frozen) at another size than the export's:
    traced as it is, its stage-3/4 attentions would add 96x128 biases to 64x64 maps."""
    model = fuse(build_model('efficientformerv2_s0'), input_size=(96, 128))
    summary = export_coreml(model, str(tmp_path / 's0.mlpackage'), (64, 64), image_input=False)
    assert summary['inputs'] == ['image']
    assert summary['outputs'] == ['stride4', 'stride8', 'stride16', 'stride32']
    with pytest.raises(ValueError, match="name '.*s0.coreml' with the .mlpackage extension"):
        export_coreml(model, str(tmp_path / 's0.coreml'), (64, 64), image_input=False)


def test_build_model_bias_mode_for_arch_names():
    model = build_model('efficientformer_l1', bias_mode='official', bias_img_size=512)
    assert (model.bias_mode, model.bias_img_size) == ('official', 512)
    assert build_model('efficientformerv2_s0').bias_mode == 'table'
    with pytest.raises(ValueError, match='efficientvit_m0 has no bias_mode'):
        build_model('efficientvit_m0', bias_mode='official')
    config = str(REPO / 'configs' / 'segmentation' / 'toy' / 'semfpn_efficientvit_m4.py')
    with pytest.raises(ValueError, match='with a config, set bias_mode'):
        build_model(config, bias_img_size=512)


# MACs at 224 counted with torch's FLOP counter (docs/backbones.md): V1 / V2 as the
# classification models; EfficientViT with the downstream 7x7 windows.
PUBLISHED_GMACS = {
    'efficientformer_l1': 1.2904, 'efficientformer_l3': 3.9055, 'efficientformer_l7': 10.1178,
    'efficientformerv2_s0': 0.3955, 'efficientformerv2_s1': 0.6515, 'efficientformerv2_s2': 1.2463,
    'efficientformerv2_l': 2.5518, 'efficientvit_m0': 0.0860, 'efficientvit_m1': 0.1740,
    'efficientvit_m2': 0.2107, 'efficientvit_m3': 0.2787, 'efficientvit_m4': 0.3214,
    'efficientvit_m5': 0.5512,
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_GMACS))
def test_macs_at_224_match_the_published_table(name):
    macs = count_macs(build_model(name), (224, 224)) / 1e9
    # The table has 4 decimals; V2-S0 is 0.17% off it (its talking heads are counted).
    assert abs(macs - PUBLISHED_GMACS[name]) <= 2e-3 * PUBLISHED_GMACS[name]


def test_get_flops_json():
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'get_flops.py'), 'efficientvit_m4',
                           '--shape', '512', '512', '--json'], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(result['macs'] / 1e6 - 1594.4) <= 1e-4 * 1594.4  # the downstream M4 at 512x512
    assert result['params'] == sum(p.numel() for p in EfficientViT('m4').parameters())


def test_get_flops_of_a_whole_segmentor_config():
    """A config counts backbone, neck and head: the whole model's parameters, and MACs well
    above the backbone's at the same size (the 256-channel FPN and head: 1.81 against 0.16 G
    at 128x160 when written)."""
    config = str(REPO / 'configs' / 'segmentation' / 'semfpn_eformerv2_s0.py')
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'get_flops.py'), config,
                           '--shape', '128', '160', '--json'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    cfg.model.backbone.init_cfg = None
    assert result['params'] == sum(p.numel() for p in MODELS.build(cfg.model).parameters())
    backbone_macs = count_macs(build_model('efficientformerv2_s0'), (128, 160))
    assert result['macs'] > 5 * backbone_macs


def test_benchmark_quick_writes_its_report(tmp_path):
    # The quick preset's runtimes (eager/fused/ONNX Runtime), one variant per family at small
    # sizes to keep CI short.
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--quick',
                           '--variants', 'efficientformer_l1', 'efficientformerv2_s0',
                           'efficientvit_m4', '--sizes', '64x64', '96x128', '--repeats', '2',
                           '--out', str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / 'latency.json').read_text())
    assert report['matmul_gflops'] > 0 and report['environment']['threads'] == 2
    # Latency runs keep freed memory in glibc's heap, for every implementation alike.
    assert 'freed memory kept' in report['environment']['allocator']
    runs = {(m['variant'], m['runtime'], m['height']) for m in report['measurements']}
    assert len(runs) == 3 * 3 * 2  # 3 variants x (eager, fused, onnxruntime) x 2 sizes
    assert all(m['median_ms'] > 0 and m['gmacs'] > 0 for m in report['measurements'])
    # The share of matmul speed is against the matmul timed in the same rounds as the setting.
    for m in report['measurements']:
        assert m['matmul_gflops'] > 0
        achieved = 2 * m['gmacs'] * m['batch'] / (m['median_ms'] / 1e3)  # GFLOP/s, unrounded
        # Shares and GMACs keep 4 significant digits (at these sizes shares are about 0.1%);
        # the 2% is the rounding of median_ms and matmul_gflops.
        assert m['matmul_fraction'] == pytest.approx(achieved / m['matmul_gflops'], rel=0.02)
    assert len({m['matmul_gflops'] for m in report['measurements']}) >= 2  # one per setting
    assert '| efficientvit_m4 | mmeformer | onnxruntime | 96x128 |' in \
        (tmp_path / 'latency.md').read_text()
    assert (tmp_path / 'latency.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_benchmark_profile_splits_attention_from_the_rest(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--profile',
                           '--compare', '--variants', 'efficientformerv2_s0', '--sizes', '128x128',
                           '--warmup', '1', '--repeats', '2', '--out', str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r['implementation']: r for r in json.loads((tmp_path / 'profile.json').read_text())}
    assert set(rows) == {'mmeformer', 'mmeformer official-bias', 'official (re-implemented)'}
    for row in rows.values():
        # Two attention blocks in each of stages 3 and 4, plus the attention downsample.
        assert row['attention_modules'] == 5
        assert 0 < row['attention_ms'] < row['total_ms']
        assert row['ops_ms'] and all(ms >= 0 for ms in row['ops_ms'].values())
    # The stand-in resizes its bias matrices on every forward; mmeformer's eval caches them.
    assert rows['official (re-implemented)']['ops_ms']['upsample_bicubic2d'] > 0
    assert 'upsample_bicubic2d' not in rows['mmeformer']['ops_ms']
    assert 'upsample_bicubic2d' not in rows['mmeformer official-bias']['ops_ms']
    # The work of the matrix ops, counted per op call, is twice the network's MACs as torch's
    # FLOP counter gives them (mmeformer.complexity); mmeformer's cached talking-head bias is
    # made in the counted forward only (0.05% here).
    expected = 2 * count_macs(build_model('efficientformerv2_s0'), (128, 128)) / 1e9
    for row in rows.values():
        assert sum(row['ops_gflop'].values()) == pytest.approx(expected, rel=1e-3)
        assert set(row['ops_gflop']) <= set(row['ops_ms']) and row['matmul_gflops'] > 0
    assert set(rows['official (re-implemented)']['ops_gflop']) == {'conv2d', 'matmul'}
    table = (tmp_path / 'profile.md').read_text()
    assert '| efficientformerv2_s0 | 128x128 | mmeformer |' in table and 'GFLOP/s]' in table


def test_benchmark_times_candidates_in_interleaved_rounds():
    from benchmarks.timing import time_interleaved
    calls = []
    results = time_interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                               warmup=2, repeats=3, device='cpu')
    # Warm-up per candidate, then one call of each per round, so that a machine whose speed
    # drifts slows every candidate alike.
    assert calls == ['a', 'a', 'b', 'b'] + ['a', 'b'] * 3
    assert set(results) == {'a', 'b'}
    assert all(0 <= median <= p90 for median, p90 in results.values())


def test_detection_test_sizes_are_what_a_keep_ratio_test_pipeline_feeds():
    from benchmarks.size_stream import detection_test_sizes
    sizes = detection_test_sizes(200)
    assert sizes == detection_test_sizes(200)  # seeded: every run times the same stream
    assert (800, 1088) in sizes  # a 480x640 photo: x5/3 -> 800x1067, padded to 32
    for h, w in sizes:
        assert h % 32 == 0 and w % 32 == 0
        assert min(h, w) <= 800 and max(h, w) <= 1344  # within 1333x800 before the padding
        assert min(h, w) == 800 or max(h, w) == 1344  # and touching one of its sides
    assert 20 < len(set(sizes)) < 100 and any(h > w for h, w in sizes)


def test_eval_cache_bytes_counts_packed_folded_weights_and_biases():
    from mmeformer.models import layers
    from mmeformer.models.layers.onednn import HAS_ONEDNN_POINTWISE
    if not HAS_ONEDNN_POINTWISE:
        pytest.skip('this torch build has no oneDNN fused kernels')
    pair = layers.ConvNorm(64, 2048).eval()
    x = torch.randn(1, 64, 7, 9).contiguous(memory_format=torch.channels_last)
    attn = next(m for m in EfficientFormer('l1').eval().modules()
                if isinstance(m, layers.RelativeBiasAttention))
    assert layers.eval_cache_bytes(pair) == layers.eval_cache_bytes(attn) == 0
    with torch.no_grad():
        pair(x)  # a wide GEMM: its folded weight packed, and the folded bias
        attn.attention_bias((7, 7), (7, 7))
        attn.attention_bias((5, 6), (5, 6))
    assert layers.eval_cache_bytes(pair) == (2048 * 64 + 2048) * 4
    assert layers.eval_cache_bytes(attn) == 8 * (49 ** 2 + 30 ** 2) * 4
    pair.eval()
    assert layers.eval_cache_bytes(pair) == 0


def test_benchmark_memory_reports_run_each_measurement_in_a_fresh_process(tmp_path):
    """--eval-memory: eager, fused and (--compare) timm rows, with mmeformer's caches counted
    and resident; --train-memory: the training step's peak."""
    tool = str(REPO / 'tools' / 'benchmark.py')
    proc = subprocess.run([sys.executable, tool, '--eval-memory', '--compare', '--variants',
                           'efficientformer_l1', '--sizes', '224x224', '--out', str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split(' | ') for line in (tmp_path / 'eval_memory.md').read_text().splitlines()
            if line.startswith('| efficientformer_l1 |')]
    assert [(r[2], r[3]) for r in rows] == [('mmeformer', 'eager'), ('mmeformer', 'fused'),
                                            ('timm', 'eager')]
    params, peak, held, caches = ([float(r[i]) for r in rows] for i in (4, 5, 6, 7))
    assert 42 < params[0] < 45 and params[2] == params[0]  # 11.4 M float32 parameters
    # mmeformer's eager caches hold every GEMM weight once more (packed or folded) and the
    # 7x7 grid's (8, 49, 49) bias; timm caches nothing. The caches stay resident.
    assert params[0] * 0.9 < caches[0] < params[0] * 1.1 and caches[2] == 0
    assert held[0] > caches[0] * 0.9 and peak[0] >= held[0] * 0.9
    proc = subprocess.run([sys.executable, tool, '--train-memory', '--variants',
                           'efficientvit_m0', '--sizes', '128x128', '--out', str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = next(line for line in (tmp_path / 'train_memory.md').read_text().splitlines()
               if line.startswith('| efficientvit_m0 | mmeformer |'))
    assert float(row.split(' | ')[2]) > 0
    rejected = subprocess.run([sys.executable, tool, '--eval-memory', '--runtimes', 'compile'],
                              capture_output=True, text=True)
    assert rejected.returncode == 2 and 'eager and fused runtimes only' in rejected.stderr


def test_benchmark_size_stream_reports_time_per_image_and_cached_biases(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--size-stream',
                           '3', '--variants', 'efficientformerv2_s0', '--runtimes', 'eager',
                           'fused', '--out', str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / 'size_stream.json').read_text())['results']
    assert [(r['implementation'], r['runtime']) for r in results] == [
        ('mmeformer', 'eager'), ('mmeformer', 'fused')]
    for r in results:
        assert r['images'] == 3 and r['distinct_sizes'] == 3
        assert 0 < r['median_ms'] <= r['p90_ms'] and r['mean_ms'] > 0
        # Five attention modules, each keeping its newest bias and older ones within 32 MiB: at
        # these sizes 4 x (8, Nq, Nq) and the downsample's (8, Nq, 4 Nq), Nq <= 25 * 42.
        bound = (4 * 8 * 1050 ** 2 + 8 * 1050 * 4200) * 4 / 2 ** 20 + 5 * 32
        assert 0 < r['bias_cache_mb'] <= bound
    assert '| efficientformerv2_s0 | mmeformer | fused | 3 (3) |' in \
        (tmp_path / 'size_stream.md').read_text()
    rejected = subprocess.run([sys.executable, str(REPO / 'tools' / 'benchmark.py'),
                               '--size-stream', '3', '--runtimes', 'onnxruntime'],
                              capture_output=True, text=True)
    assert rejected.returncode == 2 and 'eager and fused runtimes only' in rejected.stderr


def test_the_figure_has_a_published_accuracy_for_every_variant():
    """The latency figure's ImageNet panel draws every released variant (a missing entry once
    left EfficientFormerV2-S0 out of it); the COCO panel only variants of the model zoo."""
    from benchmarks.published import COCO_BOX_AP, IMAGENET_TOP1
    from mmeformer.models import arch_names
    assert set(IMAGENET_TOP1) == set(arch_names())
    assert set(COCO_BOX_AP) < set(arch_names())
