"""Compile/profile targets. A new backend is one new file and one line in BACKENDS.

A target names a device profile (device_profiles/*.yaml); the profile names its backend. With
``offline``, a phone (qai-hub) profile goes to ``qnn-offline``: the local QNN HTP compiler for its chipset.
"""

from collections import defaultdict
from pathlib import Path

from mvd_deploy.backends.base import Backend, CompileOptions
from mvd_deploy.backends.ort_cpu import OrtCpuBackend
from mvd_deploy.backends.qai_hub import QaiHubBackend
from mvd_deploy.backends.qnn_offline import QnnOfflineBackend, require_chipset
from mvd_deploy.device_profiles import DeviceProfile, resolve_target

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (OrtCpuBackend, QaiHubBackend, QnnOfflineBackend)}


def get_backend(name: str) -> Backend:
    return BACKENDS[name]()


def group_targets(targets: list[str | Path], offline: bool = False) -> dict[str, list[DeviceProfile]]:
    """Targets (profile names or paths) → {backend name: [profiles]}, so each backend gets its targets together.

    ``offline``: phone profiles go to qnn-offline (each needs its ``chipset``); ort-cpu stays local."""
    groups: dict[str, list[DeviceProfile]] = defaultdict(list)
    for target in dict.fromkeys(targets):
        profile = resolve_target(target)
        backend = profile.backend
        if offline and backend == QaiHubBackend.name:
            require_chipset(profile)
            backend = QnnOfflineBackend.name
        groups[backend].append(profile)
    return dict(groups)


__all__ = ["BACKENDS", "Backend", "CompileOptions", "QnnOfflineBackend", "get_backend", "group_targets"]
