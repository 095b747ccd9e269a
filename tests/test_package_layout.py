"""The package is the product and imports run one way: the models at the bottom (torch +
mmengine only), checkpoint conversion above them, then export / engine / builder; no module
imports one that imports it back; the lab (benchmarks/) and timm stay outside; an import inside
a function is either an optional package or one of the few named here with their reason."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / 'mmeformer'
# Packages that only some features need (extras): imported where those features run.
OPTIONAL = {'mmdet', 'mmseg', 'mmcv', 'onnxruntime', 'coremltools', 'matplotlib', 'torchvision',
            'safetensors', 'openvino', 'nncf', 'litert_torch', 'ai_edge_litert', 'torchao'}
# (module, imported mmeformer module) pairs allowed inside functions, with the reason.
ALLOWED_LOCAL = {
    # mmengine's init_cfg=dict(type='Pretrained') runs inside the model; the loader converts
    # checkpoints and sits above the models.
    ('mmeformer.models.backbones.base', 'mmeformer.checkpoint'),
    # The doctor imports what it diagnoses inside try blocks, so that a broken install is
    # reported instead of failing the import.
    ('mmeformer.doctor', 'mmeformer.models'),
}
LOWER_LAYERS = {'mmeformer', 'mmeformer.registry', 'mmeformer.safe_globals', 'mmeformer.models'}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    base = module.split('.')
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def imports(path: Path):
    """(imported module, at module level?) of every import in ``path``; ``from X import Y``
    counts as X, and as X.Y where that is a module of the package."""
    module, tree = module_name(path), ast.parse(path.read_text())
    is_package = path.name == '__init__.py'
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node)
            found.append((target, id(node) in top_level))
            for alias in node.names:
                sub = f'{target}.{alias.name}'
                if (REPO / Path(*sub.split('.'))).with_suffix('.py').exists() or (
                        REPO / Path(*sub.split('.')) / '__init__.py').exists():
                    found.append((sub, id(node) in top_level))
    return module, found


def package_imports():
    return dict(imports(p) for p in sorted(PACKAGE.rglob('*.py')))


def test_module_level_imports_have_no_cycle():
    graph = {m: {t for t, top in found if top and t.startswith('mmeformer')}
             for m, found in package_imports().items()}
    # A package's __init__ importing its own submodules is how packages are assembled: an edge
    # from a submodule to its package (through a relative import of a sibling) is not a cycle.
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = 'open'
        for target in sorted(graph.get(node, ())):
            if node.startswith(target + '.'):
                continue  # a module importing from its own package
            if state.get(target) == 'open':
                cycle.append(stack[stack.index(target):] + [target])
            elif target in graph and target not in state:
                visit(target, stack + [target])
        state[node] = 'done'

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycle == []


def test_the_models_import_nothing_above_them():
    bad = []
    for module, found in package_imports().items():
        if not module.startswith('mmeformer.models'):
            continue
        for target, top in found:
            inside = target.split('.')[:2]
            if (target.startswith('mmeformer') and '.'.join(inside) not in LOWER_LAYERS
                    and (module, '.'.join(inside)) not in ALLOWED_LOCAL):
                bad.append((module, target))
            if target.split('.')[0] in ('mmdet', 'mmseg', 'mmcv', 'timm', 'benchmarks'):
                bad.append((module, target))
    assert bad == []


def test_imports_inside_functions_are_optional_packages_or_named():
    bad = []
    for module, found in package_imports().items():
        for target, top in found:
            root = target.split('.')[0]
            if top or root in OPTIONAL:
                continue
            if root == 'mmeformer' and (module, '.'.join(target.split('.')[:2])) in ALLOWED_LOCAL:
                continue
            if module == 'mmeformer.doctor':  # see ALLOWED_LOCAL
                continue
            bad.append((module, target))
    assert bad == []


def test_the_package_does_not_reach_the_lab_or_timm():
    bad = [(m, t) for m, found in package_imports().items() for t, _ in found
           if t.split('.')[0] in ('benchmarks', 'timm')]
    assert bad == []
    code = ('import sys, mmeformer.models, mmeformer.checkpoint, mmeformer.engine, '
            'mmeformer.export, mmeformer.builder, mmeformer.complexity; '
            "print(sorted(m for m in ('timm', 'benchmarks', 'mmdet', 'mmseg') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd='/')
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]'


def test_the_lab_is_not_part_of_the_installed_package():
    setup = (REPO / 'setup.py').read_text()
    assert "include=['mmeformer', 'mmeformer.*']" in setup
    assert 'timm' not in setup.split('install_requires=')[1].split(']')[0]
    for gone in ('benchmark', 'official_reference', 'device_check', 'allocator', 'testing'):
        assert not (PACKAGE / f'{gone}.py').exists()


def test_public_classes_document_their_arguments_and_run_their_examples():
    """Every public model class has a typed ``Args:`` block naming each constructor argument
    and an ``Example:`` that runs (doctest) and prints the level shapes it claims."""
    import doctest
    import inspect

    import mmeformer.models.factory
    import mmeformer.models.layers.fast_path
    from mmeformer import models
    for cls in (models.EfficientFormer, models.EfficientFormerV2, models.EfficientViT,
                models.EfficientViTFPN):
        doc = inspect.getdoc(cls)
        assert 'Args:' in doc and 'Example:' in doc, cls.__name__
        for name in list(inspect.signature(cls.__init__).parameters)[1:]:
            assert f'    {name} (' in doc, (cls.__name__, name)
    for module in (models.backbones.efficientformer, models.backbones.efficientformer_v2,
                   models.backbones.efficientvit, models.necks.efficientvit_fpn,
                   mmeformer.models.factory, mmeformer.models.layers.fast_path):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
