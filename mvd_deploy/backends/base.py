"""The backend interface: every target compiles a build and profiles what it compiled.

A profile is one JSON schema for every backend (see ``new_profile``), so CI gates and reports read
ONNX Runtime CPU and Qualcomm AI Hub results the same way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

from mvd_deploy.build import Build

PROFILE_SCHEMA = "mvd-deploy-profile"
PROFILE_SCHEMA_VERSION = 1


@dataclass
class CompileOptions:
    int8: tuple[str, ...] | str = ()  # ort-cpu's int8 forms: "dynamic", "static" (a string: one form)
    min_psnr_db: float | None = None  # None: the backend's default per form
    calibration_samples: int | None = None  # None: ort-cpu static int8 4; phones: each profile's own
    form: str | None = None  # qnn-offline: w8a16 | float16 instead of each target's precision
    emulate: bool | None = None  # qnn-offline: the emulated check; None = only where quick
    validate_on_cpus: tuple[str, ...] | str = ()  # ort-cpu int8: also validated on these x86 CPUs, emulated

    def __post_init__(self):
        self.int8 = (self.int8,) if isinstance(self.int8, str) else tuple(self.int8 or ())
        cpus = self.validate_on_cpus
        self.validate_on_cpus = (cpus,) if isinstance(cpus, str) else tuple(cpus or ())


STATIC_INT8_CALIBRATION_SAMPLES = 4


def with_calibration(targets: list, options: CompileOptions) -> list:
    """Phone targets with ``options.calibration_samples`` (when given) instead of their profile's own."""
    if options.calibration_samples is None:
        return targets
    return [dataclasses.replace(t, calibration_samples=options.calibration_samples) for t in targets]


class Backend:
    """One backend serves every device profile that names it; several targets go in one call so a
    device farm can run them together."""

    name: ClassVar[str]

    def compile(self, build: Build, targets: list, options: CompileOptions) -> dict[str, dict]:
        """Compile every component for each target; returns {"<target>/<form>": record}, each also
        written to the manifest's ``compiled``."""
        raise NotImplementedError

    def profile(self, build: Build, targets: list, form: str | None, runs: int) -> list[dict]:
        """Measure the compiled form (default: each target's own) per target; ``new_profile`` schema."""
        raise NotImplementedError


def new_profile(target: str, form: str, build: Build, device: dict, runs: int) -> dict:
    """The common profile document; backends fill ``components``.

    components.<name>:
      latency_ms: {p50, p90, min, mean}   per call, after warm-up (None where not measured)
      load_ms: {first, warm}              model load / session creation (warm: None where not measured)
      peak_memory_mb: float | None        peak resident memory while running (None: not measured)
      compute_units: {unit: layers}       layers placed per compute unit (NPU/GPU/CPU)
      top_ops: [{name, op_type, ms, share}]  slowest layers of one profiled call (layers timed in
                                          cycles only: ms and share None, cycles and cycles_share;
                                          ort-cpu: also the module that made each, or None)
      cost: {by_block, by_op_type}        ort-cpu: one profiled call's time per top-level block
                                          ('up_blocks.3', ...) and per op type, largest first
      graphs: {graph: {...}}              a component compiled in parts: each part's own figures
      psnr_db: float                      the compiled form against the export (on the device for AI Hub)

    A backend that cannot measure a figure (the offline HTP emulator: no phone latency or memory) sets
    it None and says why in ``not_measured`` ({figure: reason}); gates report such checks as not measured.
    """
    return {
        "schema": PROFILE_SCHEMA,
        "schema_version": PROFILE_SCHEMA_VERSION,
        "target": target,
        "form": form,
        "device": device,
        "build": str(build.path),
        "model": build.manifest.get("model"),
        "runs": runs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "components": {},
    }


def finish_profile(profile: dict) -> dict:
    """The pipeline's total latency: None unless every component's was measured."""
    latencies = [(c.get("latency_ms") or {}).get("p50") for c in profile["components"].values()]
    profile["total_latency_ms"] = None if None in latencies else round(sum(latencies), 3)
    return profile
