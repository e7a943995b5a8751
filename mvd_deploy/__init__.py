"""mvd-deploy: take a MobileVD checkpoint to the phone.

The Python API (docs/python-api.md); the ``mvd-deploy`` command line is argument parsing and
printing over it::

    from mvd_deploy import export_build, compile_build, profile_build
    build = export_build("checkpoints/tiny", out="builds/tiny")
    compile_build(build, targets=["ort-cpu"])
    result = profile_build(build, targets=["ort-cpu"], runs=5, gate=True)

Names are loaded on first use (module ``__getattr__``, PEP 562): ``import mvd_deploy`` stays cheap
(no torch, diffusers or ONNX Runtime), which the CLI's ``--help`` and the profiling worker process
(``python -m mvd_deploy.ort_worker``, whose peak memory is measured) rely on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the module that defines it
_API = {
    "init_checkpoint": "checkpoint",
    "CheckpointResult": "checkpoint",
    "inspect_model": "inspect",
    "inspect_stages": "inspect",
    "ModelInspection": "inspect",
    "deploy_checkpoint": "deploy",
    "Deployment": "deploy",
    "export_build": "export",
    "Build": "build",
    "summary_rows": "build",
    "compile_build": "targets",
    "CompileResult": "targets",
    "profile_build": "targets",
    "ProfileResult": "targets",
    "gate_profile": "gate",
    "GateReport": "gate",
    "pull_build": "pull",
    "PullResult": "pull",
    "write_report": "report",
    "generate_video": "generate",
    "ReportResult": "report",
    "show_progress": "progress",
    "MvdError": "errors",
    "ValidationFailed": "errors",
}

__all__ = [
    "generate_video",
    "init_checkpoint",
    "CheckpointResult",
    "inspect_model",
    "inspect_stages",
    "ModelInspection",
    "deploy_checkpoint",
    "Deployment",
    "export_build",
    "Build",
    "summary_rows",
    "compile_build",
    "CompileResult",
    "profile_build",
    "ProfileResult",
    "gate_profile",
    "GateReport",
    "pull_build",
    "PullResult",
    "write_report",
    "ReportResult",
    "show_progress",
    "MvdError",
    "ValidationFailed",
    "__version__",
]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mvd_deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mvd_deploy.{_API[name]}"), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from mvd_deploy.build import Build, summary_rows
    from mvd_deploy.checkpoint import CheckpointResult, init_checkpoint
    from mvd_deploy.deploy import Deployment, deploy_checkpoint
    from mvd_deploy.errors import MvdError, ValidationFailed
    from mvd_deploy.export import export_build
    from mvd_deploy.gate import GateReport, gate_profile
    from mvd_deploy.inspect import ModelInspection, inspect_model, inspect_stages
    from mvd_deploy.progress import show_progress
    from mvd_deploy.pull import PullResult, pull_build
    from mvd_deploy.report import ReportResult, write_report
    from mvd_deploy.targets import CompileResult, ProfileResult, compile_build, profile_build
