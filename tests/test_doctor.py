"""``mmeformer.doctor`` on broken environments.

Each known way the stack breaks is simulated in this process (distribution versions through the
module's ``_version``, failing imports through ``importlib.import_module`` or a ``None`` entry in
``sys.modules``) and must come out of ``diagnose()`` as a problem that names its fix, be printed
by ``main()`` as ``PROBLEM: ...`` with exit status 1, while the same check stays quiet just on the
healthy side of its condition. One run as a command sees a real missing module (ftfy shadowed).
"""
import importlib
import os
import re
import subprocess
import sys

import pytest

from mmeformer import doctor

REAL_VERSION = doctor._version
FIX_ALL = 'run `make setup` (it installs the pinned stack into .venv)'


@pytest.fixture(scope='module', autouse=True)
def _stack_imported():
    """Import what ``diagnose()`` imports first, so that each test sees only the failure it
    simulates (a fresh import of mmdet.models with mmcv.ops hidden would fail as well)."""
    for name in ('torchvision.ops', 'mmcv.ops', 'mmdet.models', 'mmseg.models',
                 'mmeformer.models'):
        importlib.import_module(name)


def set_versions(monkeypatch, **versions):
    """Distribution versions as ``diagnose()`` reads them (``mmcv_lite`` stands for mmcv-lite);
    None: not installed. Other distributions keep their real version."""
    versions = {name.replace('_', '-'): v for name, v in versions.items()}

    def _version(dist):
        return versions[dist] if dist in versions else REAL_VERSION(dist)

    monkeypatch.setattr(doctor, '_version', _version)


def fail_imports(monkeypatch, **errors):
    """``importlib.import_module(name)`` raises ``errors[name]`` (dots written as '__')."""
    errors = {name.replace('__', '.'): err for name, err in errors.items()}
    real = importlib.import_module

    def import_module(name, package=None):
        if name in errors:
            raise errors[name]
        return real(name, package)

    monkeypatch.setattr(importlib, 'import_module', import_module)


def flagged(capsys, pattern):
    """The only problem, which must match ``pattern``; ``main()`` prints it and returns 1."""
    versions, problems, notes = doctor.diagnose()
    assert len(problems) == 1, problems
    assert re.fullmatch(pattern, problems[0]), problems[0]
    assert doctor.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert f'PROBLEM: {problems[0]}' in out
    assert out[-1] == '1 problem(s) found.'
    assert 'OK: the environment is usable.' not in out
    return versions, out


def healthy(capsys):
    versions, problems, notes = doctor.diagnose()
    assert problems == []
    assert doctor.main() == 0
    out = capsys.readouterr().out.splitlines()
    assert not any(line.startswith('PROBLEM') for line in out)
    assert out[-1] == 'OK: the environment is usable.'
    return versions, notes, out


def test_healthy_environment_has_no_problem(capsys):
    versions, notes, out = healthy(capsys)
    assert versions['torch'] == '2.13.0' and versions['mmcv'] == '2.1.0'
    assert re.search(r'^torch\s+2\.13\.0$', '\n'.join(out), re.M)
    assert 'note: CUDA available: False' in out  # conftest hides the GPU


# -- (a) mmcv without its compiled ops ----------------------------------------------------------
def test_mmcv_ops_missing_from_sys_modules(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'mmcv.ops', None)
    flagged(capsys, r"mmcv 2\.1\.0 has no usable compiled ops \(.*mmcv\.ops.*\); rebuild it with "
            r"MMCV_WITH_OPS=1 against this torch: " + re.escape(FIX_ALL))


def test_mmcv_ops_extension_fails_to_load(monkeypatch, capsys):
    fail_imports(monkeypatch, mmcv__ops=ImportError(
        'mmcv/_ext.cpython-312-x86_64-linux-gnu.so: undefined symbol: _ZN3c10'))
    flagged(capsys, r"mmcv 2\.1\.0 has no usable compiled ops \(.*undefined symbol: _ZN3c10\); "
            r"rebuild it with MMCV_WITH_OPS=1 against this torch: " + re.escape(FIX_ALL))


# -- (b) mmcv-lite instead of mmcv --------------------------------------------------------------
def test_mmcv_lite_instead_of_mmcv(monkeypatch, capsys):
    set_versions(monkeypatch, mmcv=None, mmcv_lite='2.1.0')
    versions, out = flagged(capsys, re.escape(
        'mmcv-lite has no compiled ops (RoIAlign, NMS): uninstall it and ' + FIX_ALL))
    assert re.search(r'^mmcv\s+not installed$', '\n'.join(out), re.M)


def test_no_mmcv_at_all_is_only_a_note(monkeypatch, capsys):
    set_versions(monkeypatch, mmcv=None, mmcv_lite=None)
    _, notes, _ = healthy(capsys)
    assert any(n.startswith('mmcv is not installed: the backbones work') for n in notes), notes


# -- (c) setuptools >= 81 -----------------------------------------------------------------------
@pytest.mark.parametrize('version', ['81.0.0', '82.0.1'])
def test_setuptools_without_pkg_resources(monkeypatch, capsys, version):
    set_versions(monkeypatch, setuptools=version)
    flagged(capsys, re.escape(
        f'setuptools {version} has no pkg_resources, which mmengine needs to resolve '
        "mmdet::/mmseg:: base configs: pip install 'setuptools>=77.0.3,<81'"))


def test_setuptools_80_is_fine(monkeypatch, capsys):
    set_versions(monkeypatch, setuptools='80.9.0')
    healthy(capsys)


# -- (d) mmseg without ftfy / regex -------------------------------------------------------------
@pytest.mark.parametrize('missing', ['ftfy', 'regex'])
def test_mmseg_missing_ftfy_or_regex(monkeypatch, capsys, missing):
    fail_imports(monkeypatch, mmseg__models=ModuleNotFoundError(
        f"No module named '{missing}'", name=missing))
    flagged(capsys, re.escape(
        f"import mmseg.models fails: No module named '{missing}' (mmseg 1.2.2 needs ftfy and "
        'regex: pip install ftfy regex)'))


def test_other_mmseg_import_failure_has_no_ftfy_hint(monkeypatch, capsys):
    fail_imports(monkeypatch, mmseg__models=ImportError('libGL.so.1: cannot open shared object'))
    flagged(capsys, re.escape('import mmseg.models fails: libGL.so.1: cannot open shared object'))


def test_mmseg_without_ftfy_as_a_command(tmp_path):
    """A real missing module: an ``ftfy`` on PYTHONPATH that fails the way an absent one does,
    under the real mmseg import of ``python -m mmeformer.doctor``."""
    (tmp_path / 'ftfy').mkdir()
    (tmp_path / 'ftfy' / '__init__.py').write_text(
        "raise ModuleNotFoundError(\"No module named 'ftfy'\", name='ftfy')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, '-m', 'mmeformer.doctor'], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert ("PROBLEM: import mmseg.models fails: No module named 'ftfy' (mmseg 1.2.2 needs ftfy "
            "and regex: pip install ftfy regex)") in lines, proc.stdout
    assert lines[-1] == '1 problem(s) found.'


# -- (e) a +cpu local torch build ---------------------------------------------------------------
def test_local_cpu_torch_build(monkeypatch, capsys):
    set_versions(monkeypatch, torch='2.13.0+cpu')
    versions, out = flagged(capsys, re.escape(
        "torch 2.13.0+cpu is a local +cpu build on which torchvision's ops do not load: "
        "pip install 'torch===2.13.0' (three '=' skip the local wheel)"))
    assert re.search(r'^torch\s+2\.13\.0\+cpu$', '\n'.join(out), re.M)


def test_other_torch_builds_are_notes(monkeypatch, capsys):
    set_versions(monkeypatch, torch='2.13.0+cu128')
    _, notes, _ = healthy(capsys)
    assert any(n.startswith('torch 2.13.0+cu128 is not the tested 2.13.0') for n in notes)


# -- (f) mmcv >= 2.2 next to mmdet --------------------------------------------------------------
@pytest.mark.parametrize('version', ['2.2.0', '2.3.1'])
def test_mmcv_too_new_for_mmdet(monkeypatch, capsys, version):
    set_versions(monkeypatch, mmcv=version, mmdet='3.3.0')
    flagged(capsys, re.escape(
        f'mmcv {version} is too new for mmdet 3.3.0 (it asserts mmcv < 2.2.0): {FIX_ALL}, which '
        'builds mmcv 2.1.0 with ops'))


def test_mmcv_2_2_without_mmdet_is_fine(monkeypatch, capsys):
    set_versions(monkeypatch, mmcv='2.2.0', mmdet=None)
    healthy(capsys)


def test_several_problems_are_all_printed(monkeypatch, capsys):
    set_versions(monkeypatch, torch='2.13.0+cpu', setuptools='81.0.0', mmcv='2.2.0')
    _, problems, _ = doctor.diagnose()
    assert len(problems) == 3, problems
    assert doctor.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith('PROBLEM: ')] == [
        f'PROBLEM: {p}' for p in problems]
    assert out[-1] == '3 problem(s) found.'


def test_runtimes_are_reported_installed_usable_or_with_the_install_command(monkeypatch):
    status = dict(doctor.runtime_status())
    assert status['openvino'].startswith('usable: openvino ')  # make setup installs the extra
    set_versions(monkeypatch, ai_edge_litert=None)
    fail_imports(monkeypatch, nncf=ImportError('libopenvino.so: cannot open shared object'))
    status = dict(doctor.runtime_status())
    assert status['litert'] == ("not installed (ai-edge-litert): pip install 'mmeformer[deploy]' "
                                '(make setup installs it)')
    assert status['openvino'] == ('installed but not usable: import nncf fails '
                                  '(libopenvino.so: cannot open shared object)')
    assert status['onnxruntime'].startswith('usable: onnx ')
