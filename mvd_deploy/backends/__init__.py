"""Compile/profile targets. A new backend is one new file and one line in BACKENDS."""

from mvd_deploy.backends.base import Backend, CompileOptions
from mvd_deploy.backends.ort_cpu import OrtCpuBackend
from mvd_deploy.errors import MvdError

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (OrtCpuBackend,)}


def get_backend(target: str) -> Backend:
    if target not in BACKENDS:
        raise MvdError(f"--target: unknown target {target!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[target]()


__all__ = ["BACKENDS", "Backend", "CompileOptions", "get_backend"]
