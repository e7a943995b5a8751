"""Device profiles (``mvd_deploy/data/device_profiles/*.yaml``, or any path): a compile/profile
target and its budgets.

A profile names its backend (``qai-hub`` or ``ort-cpu``), how to pick the device, what to compile
(runtime, precision, compute unit, extra options) and the budgets CI gates on (latency, peak memory,
PSNR per component, optionally a whole-pipeline latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path

from mvd_deploy.config import ConfigSection, load_yaml
from mvd_deploy.shipped import DEVICE_PROFILES, resolve_yaml

BACKEND_NAMES = ("qai-hub", "ort-cpu")
RUNTIMES = ("qnn_context_binary", "tflite", "onnx", "precompiled_qnn_onnx")
HUB_PRECISIONS = ("float16", "w8a16")
ORT_FORMS = ("fp32", "fp16", "int8-dynamic", "int8-static")
COMPUTE_UNITS = ("npu", "gpu", "cpu", "all")
COMPONENTS = ("image_encoder", "vae_encoder", "unet", "decoder")


@dataclass(frozen=True)
class Chipset:
    """The Snapdragon SoC a phone profile targets, as the offline QNN HTP compiler names it."""

    name: str  # e.g. SM8650
    soc_model: int  # QNN's SoC id (57 = SM8650, 69 = SM8750, 43 = SM8550)
    htp_arch: int  # Hexagon architecture version (75 = v75, 79 = v79)


@dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None
    # CPU targets: achieved FLOP/s ÷ this CPU's fp32 GEMM FLOP/s measured in the same profile run.
    # A latency budget that holds on whatever CPU runs it (phones keep absolute ones: fixed hardware).
    min_compute_efficiency: float | None = None
    peak_memory_mb: float | None = None
    min_psnr_db: float | None = None


@dataclass
class DeviceProfile:
    name: str
    backend: str
    source: str
    description: str = ""
    device_names: tuple[str, ...] = ()
    device_attributes: tuple[str, ...] = ()
    runtime: str = "qnn_context_binary"
    precision: str = "float16"  # qai-hub: float16 | w8a16; ort-cpu: the compiled form to gate
    compute_unit: str = "npu"
    compile_options: str = ""
    profile_options: str = ""
    qairt_version: str = "default"  # qai-hub: a QAIRT version ("2.37") or AI Hub tag (default, latest), pinned per job
    calibration_samples: int = 100
    chipset: Chipset | None = None
    context_limit_mb: float = 2048.0  # one HTP context: the NPU is a 32-bit co-processor
    # Weights per compiled graph: a larger component is compiled in parts (mvd_deploy/parts.py), so
    # each context stays well inside the limit and each offline compile inside this machine's memory.
    max_part_weights_mb: float = 512.0
    budgets: dict[str, Budget] = field(default_factory=dict)
    total_latency_ms: float | None = None

    @property
    def form(self) -> str:
        """The compiled form this profile builds and gates (the key under compiled/<target>/)."""
        return self.precision


def _read_budgets(s: ConfigSection) -> tuple[dict[str, Budget], float | None]:
    budgets = {}
    total = s.get("total_latency_ms", float, None)
    for name in [k for k in s.data if k != "total_latency_ms"]:
        if name not in COMPONENTS:
            raise s.error(s.key(name), f"is not a component ({', '.join(COMPONENTS)}) or total_latency_ms")
        b = s.section(name)
        budget = Budget(
            latency_ms=b.get("latency_ms", float, None),
            min_compute_efficiency=b.get("min_compute_efficiency", float, None),
            peak_memory_mb=b.get("peak_memory_mb", float, None),
            min_psnr_db=b.get("min_psnr_db", float, None),
        )
        for key, value in vars(budget).items():
            if value is not None and value <= 0 and key != "min_psnr_db":
                raise b.error(b.key(key), f"must be positive, got {value}")
        if budget.min_compute_efficiency is not None and budget.min_compute_efficiency > 1:
            raise b.error(
                b.key("min_compute_efficiency"),
                f"is a fraction of the GEMM rate (≤ 1), got {budget.min_compute_efficiency}",
            )
        b.finish()
        budgets[name] = budget
    s.finish()
    return budgets, total


def load_device_profile(path: str | Path | Traversable) -> DeviceProfile:
    path = Path(path) if isinstance(path, str) else path
    s = ConfigSection(load_yaml(path, "device profile"), str(path))
    name = s.get("name", str)
    backend = s.get("backend", str)
    if backend not in BACKEND_NAMES:
        raise s.error("backend", f"must be one of {list(BACKEND_NAMES)}, got {backend!r}")
    profile = DeviceProfile(name=name, backend=backend, source=str(path), description=s.get("description", str, ""))
    if backend == "qai-hub":
        device = s.section("device")
        profile.device_names = tuple(device.get("names", list, []))
        profile.device_attributes = tuple(device.get("attributes", list, []))
        if not profile.device_names and not profile.device_attributes:
            raise device.error("device", "needs names or attributes to pick an AI Hub device")
        device.finish()
        profile.runtime = s.get("runtime", str, "qnn_context_binary")
        if profile.runtime not in RUNTIMES:
            raise s.error("runtime", f"must be one of {list(RUNTIMES)}, got {profile.runtime!r}")
        profile.compute_unit = s.get("compute_unit", str, "npu")
        if profile.compute_unit not in COMPUTE_UNITS:
            raise s.error("compute_unit", f"must be one of {list(COMPUTE_UNITS)}, got {profile.compute_unit!r}")
        profile.compile_options = s.get("compile_options", str, "")
        profile.profile_options = s.get("profile_options", str, "")
        profile.qairt_version = s.get("qairt_version", str, "default")  # quoted in YAML: "2.30", not 2.3
        profile.calibration_samples = s.get("calibration_samples", int, 100)
        if profile.calibration_samples < 1:
            raise s.error("calibration_samples", f"must be at least 1, got {profile.calibration_samples}")
        if "chipset" in s.data:
            chip = s.section("chipset")
            profile.chipset = Chipset(
                name=chip.get("name", str), soc_model=chip.get("soc_model", int), htp_arch=chip.get("htp_arch", int)
            )
            chip.finish()
        for key in ("context_limit_mb", "max_part_weights_mb"):
            value = s.get(key, float, getattr(profile, key))
            if value <= 0:
                raise s.error(key, f"must be positive, got {value}")
            setattr(profile, key, value)
    precision = s.get("precision", str, "w8a16" if backend == "qai-hub" else "fp32")
    allowed = HUB_PRECISIONS if backend == "qai-hub" else ORT_FORMS
    if precision not in allowed:
        raise s.error("precision", f"must be one of {list(allowed)} for backend {backend}, got {precision!r}")
    profile.precision = precision
    profile.budgets, profile.total_latency_ms = _read_budgets(s.section("budgets", {}))
    s.finish()
    return profile


def resolve_target(target: str | Path) -> DeviceProfile:
    """A target: a shipped profile's name (``xiaomi-14-pro``), or a path to a profile YAML."""
    return load_device_profile(resolve_yaml(target, DEVICE_PROFILES, "target", "target", "profile"))
