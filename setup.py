import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'mmeformer' / '__init__.py').read_text()).group(1)

# The backbones need torch + mmengine only. timm is a reference of the tests and of the
# benchmarks beside the package (benchmarks/, not installed). The full pinned stack
# (torch===2.13.0, mmcv 2.1.0 built with ops, ...) is installed by `make setup`; see README.md.
MMCV = 'mmcv>=2.0.0rc4,<2.2.0'
EXTRAS = {
    'det': ['mmdet==3.3.0', MMCV],
    'seg': ['mmsegmentation==1.2.2', MMCV, 'ftfy', 'regex'],
    'export': ['onnx', 'onnxruntime'],
    # OpenVINO (+ NNCF for int8) and LiteRT (litert-torch converts, ai-edge-litert runs).
    'deploy': ['onnx', 'onnxruntime', 'openvino', 'nncf', 'litert-torch', 'ai-edge-litert'],
    'benchmark': ['timm', 'onnx', 'onnxruntime', 'matplotlib'],
    'tests': ['pytest', 'pytest-xdist', 'timm', 'onnx', 'onnxruntime'],
}
EXTRAS['all'] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name='mmeformer',
    version=VERSION,
    description='EfficientFormer, EfficientFormerV2 and EfficientViT backbones for OpenMMLab 3.x',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmeformer', 'mmeformer.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.1', 'mmengine>=0.10.0', 'safetensors'],
    extras_require=EXTRAS,
    license='Apache-2.0',
)
