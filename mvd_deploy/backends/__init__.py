"""Compile/profile targets. A new backend is one new file and one line in BACKENDS.

A ``--target`` names a device profile (device_profiles/*.yaml); the profile names its backend.
"""

from collections import defaultdict

from mvd_deploy.backends.base import Backend, CompileOptions
from mvd_deploy.backends.ort_cpu import OrtCpuBackend
from mvd_deploy.backends.qai_hub import QaiHubBackend
from mvd_deploy.device_profiles import DeviceProfile, resolve_target

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (OrtCpuBackend, QaiHubBackend)}


def get_backend(name: str) -> Backend:
    return BACKENDS[name]()


def group_targets(targets: list[str]) -> dict[str, list[DeviceProfile]]:
    """--target values → {backend name: [profiles]}, so each backend gets its targets together."""
    groups: dict[str, list[DeviceProfile]] = defaultdict(list)
    for target in dict.fromkeys(targets):
        profile = resolve_target(target)
        groups[profile.backend].append(profile)
    return dict(groups)


__all__ = ["BACKENDS", "Backend", "CompileOptions", "get_backend", "group_targets"]
