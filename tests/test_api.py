"""The Python API a notebook uses (docs/python-api.md), and the module structure under it."""

from __future__ import annotations

import ast
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mvd_deploy
from helpers import ROOT
from mvd_deploy.cli import _option_message, main

PACKAGE = ROOT / "mvd_deploy"


def _function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):  # relative: inside the package by definition
                names = ["mvd_deploy (relative)"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.startswith("mvd_deploy")]
    return found


def test_modules_depend_one_way():
    """No module imports mvd_deploy inside a function (a deferred import hides a cycle); only the CLI
    defers its imports, so ``mvd-deploy --help`` stays fast."""
    found = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "cli.py" or path.parent != PACKAGE
        for hit in _function_level_imports(path)
    ]
    assert found == []


def test_the_structure_test_sees_a_deferred_import(tmp_path):
    deferred = tmp_path / "deferred.py"
    deferred.write_text("def f():\n    from mvd_deploy.flops import count_flops\n    import mvd_deploy.build\n")
    found = [line.split(" ", 1)[1] for line in _function_level_imports(deferred, root=tmp_path)]
    assert found == ["mvd_deploy.flops", "mvd_deploy.build"]


def test_public_names_are_the_api_not_modules():
    for name in mvd_deploy.__all__:
        value = getattr(mvd_deploy, name)
        assert not isinstance(value, type(mvd_deploy)), f"mvd_deploy.{name} is a module"
    assert mvd_deploy.export_build.__module__ == "mvd_deploy.export"
    with pytest.raises(AttributeError):
        mvd_deploy.no_such_function  # noqa: B018


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("mvd_deploy", ("torch", "onnxruntime", "diffusers")),
        # the profiling worker: its peak memory is reported as the model's (torch alone is ~190 MB)
        ("mvd_deploy.ort_worker", ("torch", "diffusers", "onnx")),
        # the emulated CPU's side (slow imports there)
        ("mvd_deploy.cpu", ("torch", "diffusers", "onnx")),
    ],
)
def test_import_is_cheap(module, heavy):
    """``import mvd_deploy`` loads neither torch nor ONNX Runtime (names load on first use); the
    ORT profiling worker loads ONNX Runtime and nothing else heavy."""
    code = f"import json, sys, {module}; print(json.dumps([m for m in {heavy} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_errors_name_parameters_and_the_cli_names_options(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("")
    with pytest.raises(mvd_deploy.MvdError) as err:
        mvd_deploy.export_build(tmp_path / "checkpoint", out=occupied)
    assert err.value.parameter == "out" and str(err.value).startswith(f"out {occupied}: already exists")
    with pytest.raises(mvd_deploy.MvdError, match="^components: unknown component 'vae'"):
        mvd_deploy.export_build(tmp_path / "checkpoint", out=tmp_path / "new", components=["vae"])
    result = CliRunner().invoke(main, ["export", str(tmp_path / "checkpoint"), "--out", str(occupied)])
    assert (
        result.exit_code == 2
        and result.stderr == f"error: --out {occupied}: already exists and is not empty; choose a new directory\n"
    )


@pytest.mark.parametrize(
    "message,parameter,printed",
    [
        ("out /b/out: already exists", "out", "--out /b/out: already exists"),
        (
            "/p/offline/x.yaml: key 'chipset': needed for offline (the SoC)",
            "offline",
            "/p/offline/x.yaml: key 'chipset': needed for --offline (the SoC)",
        ),
        (
            "unet: 3 dB PSNR; not written (lower it with min_psnr_db)",
            "min_psnr_db",
            "unet: 3 dB PSNR; not written (lower it with --min-psnr)",
        ),
        ("model_dir/recipe.yaml: key 'name': is missing", None, "model_dir/recipe.yaml: key 'name': is missing"),
    ],
)
def test_the_cli_says_the_option_where_the_api_says_the_parameter(message, parameter, printed):
    assert _option_message(mvd_deploy.MvdError(message, parameter=parameter)) == printed


def test_the_cli_leaves_loggers_as_it_found_them(tmp_path):
    root, package = logging.getLogger(), logging.getLogger("mvd_deploy")
    before = (list(root.handlers), root.level, list(package.handlers), package.level, package.propagate)
    result = CliRunner().invoke(main, ["inspect", "tiny"])
    assert result.exit_code == 0, result.output
    assert (list(root.handlers), root.level, list(package.handlers), package.level, package.propagate) == before


class _RootSpy:
    """Records every change made to the root logger's handlers or level (and basicConfig calls)."""

    def __init__(self, monkeypatch):
        self.changes = []
        root = logging.getLogger()
        for method in ("addHandler", "removeHandler", "setLevel"):
            original = getattr(root, method)
            monkeypatch.setattr(root, method, self._recording(method, original))
        monkeypatch.setattr(logging, "basicConfig", self._recording("basicConfig", logging.basicConfig))
        self.level, self.handlers = root.level, list(root.handlers)

    def _recording(self, name, original):
        def record(*args, **kwargs):
            self.changes.append(name)
            return original(*args, **kwargs)

        return record


def test_notebook_flow_compile_profile_gate_pull_report(tiny_build, tmp_path, monkeypatch):
    """export_build made ``tiny_build`` (conftest); the rest of docs/python-api.md's flow, from Python,
    with the root logger left alone throughout (ORT's quantizer logs there: it is held back without it)."""
    from mvd_deploy import compile_build, gate_profile, profile_build, pull_build, write_report

    spy = _RootSpy(monkeypatch)
    build = mvd_deploy.Build(shutil.copytree(tiny_build, tmp_path / "build"))
    compiled = compile_build(build, targets=["ort-cpu"], int8="dynamic", min_psnr_db=0.0)
    assert list(compiled.records) == ["ort-cpu/fp32", "ort-cpu/int8-dynamic"]
    assert compiled.to_json() == {k: build.manifest["compiled"][k] for k in compiled.records}

    profiled = profile_build(build, targets="ort-cpu", runs=1, gate=True)
    [profile] = profiled.profiles
    assert profiled.paths == [build.path / "profiles" / "ort-cpu-fp32.json"]
    assert json.loads(profiled.paths[0].read_text()) == profile
    [report] = profiled.gates
    assert profiled.passed == report.passed and build.manifest["gates"]["ort-cpu/fp32"] == report.to_json()
    again = gate_profile(profiled.paths[0], budget="ort-cpu", markdown=tmp_path / "gate.md")
    assert [c.metric for c in again.checks] == [c.metric for c in report.checks]
    assert (tmp_path / "gate.md").read_text() == again.summary()

    pulled = pull_build(build, out=tmp_path / "app", targets=["ort-cpu"])
    assert pulled.files and all((tmp_path / "app" / name).is_file() for name in pulled.files)
    page = write_report(build)
    assert page.report == build.path / "report" / "index.html" and page.report.is_file()

    root = logging.getLogger()
    assert spy.changes == [] and root.level == spy.level and root.handlers == spy.handlers
    assert logging.root.manager.disable == logging.NOTSET
