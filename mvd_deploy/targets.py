"""Compile and profile a build for device targets: every backend a list of targets needs, each
given its own targets together (a device farm runs them at once)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mvd_deploy.backends import QnnOfflineBackend, get_backend, group_targets
from mvd_deploy.backends.base import CompileOptions
from mvd_deploy.build import Build
from mvd_deploy.device_profiles import DeviceProfile
from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import write_json
from mvd_deploy.gate import GateReport, gate_profile

logger = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What :func:`compile_build` compiled: ``"<target>/<form>"`` → the record also written to the
    build manifest's ``compiled``."""

    build: Build
    records: dict[str, dict]

    def to_json(self) -> dict[str, dict]:
        return self.records


@dataclass
class ProfileResult:
    """What :func:`profile_build` measured: one profile per target (written to ``paths``), and with
    ``gate`` one gate report per profile."""

    build: Build
    profiles: list[dict]
    paths: list[Path]
    gates: list[GateReport] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every gate within budget (True when nothing was gated)."""
        return all(report.passed for report in self.gates)

    def to_json(self) -> list[dict]:
        return self.profiles


def open_build(build: Build | str | Path) -> Build:
    return build if isinstance(build, Build) else Build(build)


def _offline_only(offline: bool, **arguments) -> None:
    for name, value in arguments.items():
        if value is not None and not offline:
            raise MvdError(f"{name}: only with offline", parameter=name)


def _targets(targets: Iterable[str | Path] | str | Path) -> list[str | Path]:
    targets = [targets] if isinstance(targets, str | Path) else list(targets)
    if not targets:
        raise MvdError("targets: name at least one device profile", parameter="targets")
    return targets


def compile_build(
    build: Build | str | Path,
    *,
    targets: Iterable[str | Path] | str | Path,
    int8: str | Iterable[str] | None = None,
    min_psnr_db: float | None = None,
    calibration_samples: int | None = None,
    form: str | None = None,
    offline: bool = False,
    emulate: bool | None = None,
    validate_on_cpus: str | Iterable[str] | None = None,
) -> CompileResult:
    """Compile every component of ``build`` for each of ``targets`` (device profile names or paths);
    every compiled form is validated (PSNR at least ``min_psnr_db``, default per form).

    ``int8``: ort-cpu also compiles int8 forms (``dynamic``, ``static`` or both). ``calibration_samples``:
    static int8's (default 4) or the phones' w8a16 calibration (default: each profile's own).
    ``offline``: phone targets compile here with the QNN HTP compiler for each profile's chipset, no AI
    Hub; then ``form`` (``w8a16`` or ``float16``) overrides each profile's precision, and ``emulate``
    runs (True) or skips (False) the emulated check (default: only where it is quick).
    ``validate_on_cpus``: ort-cpu's int8 forms are also run once on these x86 CPUs (QEMU model names:
    ``EPYC-Rome`` is AVX2-only) under ``qemu-x86_64`` and validated as on this one; int8 kernels differ
    between x86 CPUs. Exact, but 100-300× slower than the host (docs/export-and-backends.md)."""
    _offline_only(offline, form=form, emulate=emulate)
    build = open_build(build)
    options = CompileOptions(
        int8=int8,
        min_psnr_db=min_psnr_db,
        calibration_samples=calibration_samples,
        form=form,
        emulate=emulate,
        validate_on_cpus=validate_on_cpus,
    )
    groups = group_targets(_targets(targets), offline=offline)
    if options.validate_on_cpus and "ort-cpu" not in groups:
        raise MvdError("validate_on_cpus: checks ort-cpu int8 forms; no ort-cpu target", parameter="validate_on_cpus")
    records = {}
    for backend, profiles in groups.items():
        records |= get_backend(backend).compile(build, profiles, options)
    return CompileResult(build=build, records=records)


def profile_build(
    build: Build | str | Path,
    *,
    targets: Iterable[str | Path] | str | Path,
    form: str | None = None,
    runs: int = 5,
    gate: bool = False,
    offline: bool = False,
    emulate: bool | None = None,
) -> ProfileResult:
    """Latency, load time, peak memory and the slowest ops of ``build``'s compiled form (``form``,
    default each profile's precision) on each of ``targets``, over ``runs`` timed calls; each profile
    is written to ``profiles/<target>-<form>.json`` in the build.

    ``gate``: check each profile against its target's budgets (:func:`gate_profile`, recorded in the
    manifest's ``gates``); the result's ``passed`` says whether all are within. ``offline``: the
    emulated check of the offline QNN compile (``emulate``: run it now), and no latency."""
    _offline_only(offline, emulate=emulate)
    if runs < 1:
        raise MvdError(f"runs: must be at least 1, got {runs}", parameter="runs")
    build = open_build(build)
    result = ProfileResult(build=build, profiles=[], paths=[])
    for backend, target_profiles in group_targets(_targets(targets), offline=offline).items():
        extra = {"emulate": emulate} if backend == QnnOfflineBackend.name else {}
        measured = get_backend(backend).profile(build, target_profiles, form, runs, **extra)
        for target, profile in zip(target_profiles, measured, strict=True):
            path = _write_profile(build, profile)
            result.profiles.append(profile)
            result.paths.append(path)
            if gate:
                result.gates.append(_gate_and_record(build, path, target, profile))
    build.save_manifest()
    return result


def _write_profile(build: Build, profile: dict) -> Path:
    path = build.path / "profiles" / f"{profile['target']}-{profile['form']}.json"
    path.parent.mkdir(exist_ok=True)
    write_json(path, profile)
    return path


def _gate_and_record(build: Build, path: Path, target: DeviceProfile, profile: dict) -> GateReport:
    report = gate_profile(path, budget=target)
    build.manifest.setdefault("gates", {})[f"{profile['target']}/{profile['form']}"] = report.to_json()
    return report
