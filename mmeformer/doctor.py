"""``python -m mmeformer.doctor``: print the versions found and say exactly what is wrong with the
environment and how to fix it. Exit status 1 when a problem was found."""
import importlib
import sys
from importlib import metadata

PINNED = {'torch': '2.13.0', 'torchvision': '0.28.0', 'mmcv': '2.1.0', 'mmengine': '0.10.7',
          'mmdet': '3.3.0', 'mmsegmentation': '1.2.2', 'timm': '1.0.31'}
REPORTED = ['torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation', 'timm',
            'setuptools', 'numpy', 'onnx', 'onnxruntime', 'coremltools', 'safetensors']
# The deployment runtimes: (what tools/export.py --format / tools/test.py --backbone-runtime
# call it, the distributions it needs, the module whose import proves it usable).
RUNTIMES = [
    ('onnxruntime', ['onnx', 'onnxruntime'], 'onnxruntime.quantization'),
    ('openvino', ['openvino', 'nncf'], 'nncf'),
    ('litert', ['litert-torch', 'ai-edge-litert'], 'ai_edge_litert.interpreter'),
    ('coreml', ['coremltools'], None),  # importing it prints lines about its missing macOS libs
]


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _release(version):
    parts = []
    for piece in version.split('+')[0].split('.')[:3]:
        digits = ''.join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def diagnose():
    """Return (versions, problems, notes); each problem says how to fix it."""
    versions = {name: _version(name) for name in REPORTED}
    problems, notes = [], []
    fix_all = 'run `make setup` (it installs the pinned stack into .venv)'

    torch_v = versions['torch']
    if torch_v is None:
        problems.append(f"torch is not installed: {fix_all}")
        return versions, problems, notes
    import torch
    if '+cpu' in torch_v:
        problems.append(f'torch {torch_v} is a local +cpu build on which torchvision\'s ops do '
                        "not load: pip install 'torch===2.13.0' (three '=' skip the local wheel)")
    elif torch_v != PINNED['torch']:
        notes.append(f'torch {torch_v} is not the tested {PINNED["torch"]}; mmcv 2.1.0 does not '
                     'compile against torch >= 2.14 (C++20 headers)')
    notes.append(f'CUDA available: {torch.cuda.is_available()}'
                 + (f' ({torch.cuda.get_device_name(0)})' if torch.cuda.is_available() else ''))
    if versions['torchvision']:
        try:
            import torchvision.ops  # noqa: F401
            torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        except Exception as err:  # noqa: BLE001 - any failure here is the same diagnosis
            problems.append(f"torchvision's compiled ops do not load on this torch ({err}); "
                            f"install matching builds: pip install 'torch===2.13.0' "
                            f"torchvision==0.28.0")
    setuptools_v = versions['setuptools']
    if setuptools_v and _release(setuptools_v) >= (81, ):
        problems.append(f"setuptools {setuptools_v} has no pkg_resources, which mmengine needs "
                        f"to resolve mmdet::/mmseg:: base configs: pip install "
                        f"'setuptools>=77.0.3,<81'")
    mmcv_v = versions['mmcv']
    if mmcv_v is None:
        if _version('mmcv-lite'):
            problems.append('mmcv-lite has no compiled ops (RoIAlign, NMS): uninstall it and '
                            f'{fix_all}')
        else:
            notes.append(f'mmcv is not installed: the backbones work, Mask R-CNN / Semantic FPN '
                         f'do not; {fix_all}')
    else:
        if versions['mmdet'] and _release(mmcv_v) >= (2, 2):
            problems.append(f'mmcv {mmcv_v} is too new for mmdet {versions["mmdet"]} (it asserts '
                            f'mmcv < 2.2.0): {fix_all}, which builds mmcv 2.1.0 with ops')
        try:
            importlib.import_module('mmcv.ops')
            from mmcv.ops import nms  # noqa: F401
        except Exception as err:  # noqa: BLE001
            problems.append(f'mmcv {mmcv_v} has no usable compiled ops ({err}); rebuild it with '
                            f'MMCV_WITH_OPS=1 against this torch: {fix_all}')
    for name, module in (('mmdet', 'mmdet.models'), ('mmsegmentation', 'mmseg.models')):
        if versions[name]:
            try:
                importlib.import_module(module)
            except Exception as err:  # noqa: BLE001
                hint = (' (mmseg 1.2.2 needs ftfy and regex: pip install ftfy regex)'
                        if 'ftfy' in str(err) or 'regex' in str(err) else '')
                problems.append(f'import {module} fails: {err}{hint}')
    for name, pinned in PINNED.items():
        found = versions.get(name)
        if found and name not in ('torch', 'mmcv') and found != pinned:
            notes.append(f'{name} {found} is not the tested {pinned}')
    try:
        from mmeformer.models import EfficientFormerV2
        EfficientFormerV2('s0').eval()(torch.zeros(1, 3, 64, 64))
    except Exception as err:  # noqa: BLE001
        problems.append(f'mmeformer backbones do not run: {err}')
    return versions, problems, notes


def runtime_status():
    """(runtime, 'usable' or why not) for each deployment runtime. Not problems: the
    backbones, training and testing work without them (they are the ``deploy`` extra)."""
    status = []
    for name, dists, module in RUNTIMES:
        missing = [d for d in dists if _version(d) is None]
        if missing:
            status.append((name, f'not installed ({", ".join(missing)}): pip install '
                                 f"'mmeformer[deploy]' (make setup installs it)"))
            continue
        try:
            if module:
                importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any failure makes it unusable here
            status.append((name, f'installed but not usable: import {module} fails ({err})'))
            continue
        note = ' (converts here; prediction needs macOS)' if name == 'coreml' else ''
        status.append((name, f'usable{note}: ' + ', '.join(f'{d} {_version(d)}' for d in dists)))
    return status


def main():
    versions, problems, notes = diagnose()
    print(f'python {sys.version.split()[0]}')
    for name, version in versions.items():
        print(f'{name:16s} {version or "not installed"}')
    for name, status in runtime_status():
        print(f'runtime {name:12s} {status}')
    for note in notes:
        print(f'note: {note}')
    for problem in problems:
        print(f'PROBLEM: {problem}')
    print('OK: the environment is usable.' if not problems else
          f'{len(problems)} problem(s) found.')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
