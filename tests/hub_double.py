"""A test double of the part of ``qai_hub`` that mvd-deploy uses, acting like a small device farm.

Its functions and job methods have the real client's signatures (tests/test_qai_hub.py checks them
with inspect.signature, so the double cannot drift from qai_hub 0.56). Data classes that need no
server (Device, JobStatus, QuantizeDtype, the exceptions) are the real ones. The "devices" run the
uploaded ONNX model with ONNX Runtime and add fp16-sized noise, so on-device checks have real numbers.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import qai_hub as real
from qai_hub.client import _get_model_dir_type  # the real client's rule for model directories

Device = real.Device
JobStatus = real.JobStatus
QuantizeDtype = real.QuantizeDtype
UserError = real.UserError
InternalError = real.InternalError

DEVICES = [
    Device("Samsung Galaxy S24 (Family)", "14", ["chipset:qualcomm-snapdragon-8gen3", "os:android"]),
    Device("Samsung Galaxy S25 (Family)", "15", ["chipset:qualcomm-snapdragon-8-elite", "os:android"]),
    Device("Snapdragon 8 Gen 3 QRD", "14", ["chipset:qualcomm-snapdragon-8gen3", "os:android"]),
]


class FakeModel:
    def __init__(self, model_id: str, onnx_path: Path | None, producer: str = "upload"):
        self.model_id, self.onnx_path, self.producer = model_id, onnx_path, producer

    def __repr__(self):
        return f"FakeModel({self.model_id}, {self.producer})"


class FakeJob:
    def __init__(self, hub: FakeHub, kind: str, job_id: str, failure: str | None = None, **details):
        self.hub, self.kind, self.job_id, self.failure, self.details = hub, kind, job_id, failure, details
        self.url = f"https://app.aihub.example/jobs/{job_id}/"
        self._target = FakeModel(f"m-{job_id}", details.get("onnx_path"), producer=kind)

    # -- the real Job / CompileJob / QuantizeJob / InferenceJob methods mvd-deploy calls -----------
    def get_status(self) -> JobStatus:
        if self.failure:
            return JobStatus(JobStatus.State.FAILED, self.failure)
        return JobStatus(JobStatus.State.SUCCESS)

    def wait(self, timeout: int | None = None) -> JobStatus:
        self.hub.calls.append(("wait", self.job_id))
        return self.get_status()

    def get_target_model(self):
        return self._target

    def download_target_model(self, filename: str) -> str | None:
        Path(filename).write_bytes(f"context binary of {self.job_id}".encode())
        return filename

    def download_profile(self, filename: str | None = None) -> dict | str:
        times = [1_780_000 + 10_000 * i for i in range(5)] if self.details["component"] == "unet" else [90_000] * 5
        layers = [
            {"name": f"node_{i}", "type": kind, "compute_unit": unit, "execution_time": t}
            for i, (kind, unit, t) in enumerate(
                [
                    ("Conv2d", "NPU", 400_000),
                    ("MatMul", "NPU", 600_000),
                    ("Softmax", "NPU", 200_000),
                    ("Transpose", "CPU", 50_000),
                    ("LayerNorm", "NPU", 30_000),
                ]
            )
        ]
        return {
            "execution_summary": {
                "estimated_inference_time": times[0],
                "estimated_inference_peak_memory": 1_500 * 2**20,
                "first_load_time": 2_500_000,
                "first_load_peak_memory": 2_000 * 2**20,
                "warm_load_time": 300_000,
                "warm_load_peak_memory": 1_800 * 2**20,
                "compile_time": 0,
                "all_inference_times": times,
            },
            "execution_detail": layers,
        }

    def download_output_data(self, filename: str | None = None):
        return self.details["outputs"]


class FakeHub:
    """Module-like: the functions below stand in for ``qai_hub.<function>``."""

    API = (
        "upload_model",
        "get_model",
        "get_devices",
        "get_job",
        "submit_compile_job",
        "submit_quantize_job",
        "submit_inference_job",
    )
    Device, JobStatus, QuantizeDtype, UserError, InternalError = (
        Device,
        JobStatus,
        QuantizeDtype,
        UserError,
        InternalError,
    )

    def __init__(self):
        self.calls: list[tuple] = []
        self.jobs: dict[str, FakeJob] = {}
        self.models: dict[str, FakeModel] = {}
        self.fail: dict[str, str] = {}  # job name → failure reason for the next submission
        self.devices = list(DEVICES)
        self.storage = Path(tempfile.mkdtemp(prefix="fake-hub-"))
        self._ids = (f"jp{n:07d}" for n in itertools.count(1))  # shaped like real ids

    def _job(self, kind: str, name: str | None, **details) -> FakeJob:
        job = FakeJob(self, kind, next(self._ids), self.fail.pop(name or "", None), **details)
        self.jobs[job.job_id] = job
        return job

    # -- qai_hub functions, with the real signatures ----------------------------------------------
    def upload_model(self, model, name: str | None = None, project=None):
        self.calls.append(("upload_model", str(model), name))
        path = Path(model)
        if path.is_dir():
            _get_model_dir_type(str(path))  # raises UserError exactly as the real client would
        stored = self.storage / f"u{len(self.models)}"
        shutil.copytree(path, stored)
        onnx = next(stored.glob("*.onnx"))
        model = FakeModel(f"u{len(self.models)}", onnx)
        self.models[model.model_id] = model
        return model

    def get_model(self, model_id: str):
        return self.models[model_id]

    def get_devices(self, name: str = "", os: str = "", attributes=None):
        wanted = [attributes] if isinstance(attributes, str) else list(attributes or [])
        return [d for d in self.devices if (not name or d.name == name) and all(a in d.attributes for a in wanted)]

    def get_job(self, job_id: str, job_type=None):
        return self.jobs[job_id]

    def submit_compile_job(
        self,
        model,
        device,
        name: str | None = None,
        input_specs=None,
        options: str = "",
        single_compile: bool = True,
        calibration_data=None,
        retry: bool = True,
        project=None,
    ):
        self.calls.append(("submit_compile_job", name, device.name, input_specs, options, model.producer))
        return self._job("compile", name, onnx_path=model.onnx_path, component=name.rsplit("-", 1)[-1])

    def submit_quantize_job(
        self,
        model,
        calibration_data,
        weights_dtype=QuantizeDtype.INT8,
        activations_dtype=QuantizeDtype.INT8,
        name: str | None = None,
        options: str = "",
        project=None,
    ):
        self.calls.append(("submit_quantize_job", name, calibration_data, weights_dtype, activations_dtype))
        return self._job("quantize", name, onnx_path=model.onnx_path, component=name.split("-")[-2])

    def submit_inference_job(
        self,
        model,
        device,
        inputs=None,
        name: str | None = None,
        options: str = "",
        retry: bool = True,
        profile: bool = True,
        project=None,
    ):
        import onnxruntime as ort

        self.calls.append(("submit_inference_job", name, device.name, options, profile))
        session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
        n = len(next(iter(inputs.values())))
        rng = np.random.default_rng(0)
        outputs = []
        for i in range(n):
            out = session.run(None, {k: v[i] for k, v in inputs.items()})[0]
            outputs.append(out + rng.normal(0, 1e-3 * float(np.std(out)), out.shape).astype(np.float32))
        return self._job("inference", name, component=name.rsplit("-", 1)[-1], outputs={"output_0": outputs})
