"""Qualcomm AI Hub: compile, quantize (w8a16), profile and check on real Snapdragon phones.

Real code against the real ``qai_hub`` client (0.56). Every job id is written into the build the
moment the job is submitted, so a rerun waits on or reuses those jobs instead of submitting again
(a FAILED job is submitted anew). Several targets are submitted together, then awaited together.

Known pitfalls handled here (../shared/mobilevd-paper.md): ``--truncate_64bit_io``; static input
specs only; ONNX with external weights is uploaded as a directory holding exactly one .onnx and one
.data; ``submit_profile_job`` is deprecated, so profiling is ``submit_inference_job(profile=True)``,
which also returns the outputs for the on-device check.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from mvd_deploy.backends.base import Backend, CompileOptions, finish_profile, new_profile
from mvd_deploy.backends.ort_cpu import pipeline_inputs, relative_change
from mvd_deploy.build import Build
from mvd_deploy.errors import MvdError
from mvd_deploy.onnx_tools import compare, ort_session
from mvd_deploy.progress import Stages

NOT_CONFIGURED = (
    "Qualcomm AI Hub is not configured: run `qai-hub configure --api_token <your token>` "
    "(writes ~/.qai_hub/client.ini), or set QAIHUB_CLIENT_INI to a client.ini"
)
CHECK_SEED = 2
TARGET_MODEL_SUFFIX = {"qnn_context_binary": ".bin", "tflite": ".tflite", "onnx": ".onnx", "precompiled_qnn_onnx": ""}


class HubError(MvdError):
    """AI Hub unreachable, rate limited, or a job failed: exit code 1, nothing partial written."""

    exit_code = 1


def _client():
    """The qai_hub module (tests replace this with a signature-checked double)."""
    import qai_hub

    return qai_hub


def _api_token() -> str | None:
    path = Path(os.environ.get("QAIHUB_CLIENT_INI", Path.home() / ".qai_hub" / "client.ini"))
    parser = configparser.ConfigParser()
    with contextlib.suppress(OSError, configparser.Error):
        parser.read(path)
        return parser.get("api", "api_token", fallback=None)
    return None


def scrub(text: str) -> str:
    """``text`` without the API token (messages from the client can echo request headers)."""
    token = _api_token()
    first = next((line.strip(" |") for line in str(text).splitlines() if line.strip(" |─┌└┐┘")), "")
    return first.replace(token, "***") if token else first


@contextlib.contextmanager
def hub_errors(hub):
    """AI Hub's exceptions as one-line errors: not configured → exit 2; anything else → exit 1."""
    try:
        yield
    except MvdError:
        raise
    except hub.UserError as e:
        text = str(e)
        if "client configuration" in text or "api_token" in text or "client.ini" in text:
            raise MvdError(NOT_CONFIGURED) from None
        raise HubError(f"Qualcomm AI Hub refused the request: {scrub(text)}") from None
    except Exception as e:  # InternalError, connection errors, timeouts
        text = scrub(str(e)) or type(e).__name__
        if "429" in text or "rate" in text.lower():
            raise HubError(f"Qualcomm AI Hub is rate limiting this account; try again later ({text})") from None
        raise HubError(f"Qualcomm AI Hub is unreachable or failing: {text}") from None


def select_device(hub, target):
    """The profile's preferred device names first, then any device with its attributes."""
    for name in target.device_names:
        devices = hub.get_devices(name=name)
        if devices:
            return devices[0]
    if target.device_attributes:
        devices = hub.get_devices(attributes=list(target.device_attributes))
        if devices:
            return sorted(devices, key=lambda d: d.name)[0]
    wanted = list(target.device_names) + list(target.device_attributes)
    raise MvdError(f"{target.source}: key 'device': no AI Hub device matches {wanted}")


def compile_options(target) -> str:
    options = [f"--target_runtime {target.runtime}", "--truncate_64bit_io", f"--compute_unit {target.compute_unit}"]
    if target.precision == "float16":
        options.append("--quantize_full_type float16 --quantize_io")
    if target.compile_options:
        options.append(target.compile_options)
    return " ".join(options)


def _device_record(device) -> dict:
    return {"name": device.name, "os": device.os, "attributes": list(device.attributes)}


def _fail(job, kind: str, where: str) -> HubError:
    reason = scrub(job.get_status().message or "no reason given")
    return HubError(f"{where}: {kind} job {job.job_id} FAILED: {reason} ({job.url})")


class QaiHubBackend(Backend):
    name = "qai-hub"

    def __init__(self, hub=None):
        self.hub = hub

    def _hub(self):
        if self.hub is None:
            self.hub = _client()
        return self.hub

    # -- jobs, recorded in the build ---------------------------------------------------------------
    def _jobs(self, build: Build) -> dict:
        return build.manifest.setdefault("hub_jobs", {})

    def _reusable(self, job_id: str | None):
        """The recorded job, unless there is none or it failed (then it is submitted again)."""
        if not job_id:
            return None
        job = self._hub().get_job(job_id)
        return None if job.get_status().failure else job

    def _submit_once(self, build: Build, path: tuple[str, ...], submit):
        """Reuse the job recorded at ``path`` in hub_jobs, else submit and record it at once."""
        node = self._jobs(build)
        for key in path[:-1]:
            node = node.setdefault(key, {})
        job = self._reusable(node.get(path[-1]))
        if job is None:
            job = submit()
            node[path[-1]] = job.job_id
            build.save_manifest()
        return job

    def _wait(self, job, kind: str, where: str):
        status = job.wait()
        if not status.success:
            raise _fail(job, kind, where)
        return job

    # -- compile -----------------------------------------------------------------------------------
    def compile(self, build: Build, targets: list, options: CompileOptions, quiet: bool = False) -> dict[str, dict]:
        hub = self._hub()
        stages = Stages(4, quiet=quiet, name="compile qai-hub")
        with hub_errors(hub):
            with stages.stage("upload the exported models"):
                models = {name: self._upload(build, name) for name in build.components}
            with stages.stage(f"submit compile jobs for {', '.join(t.name for t in targets)}"):
                devices = {t.name: select_device(hub, t) for t in targets}
                sources = self._quantized_sources(build, targets, models)
                jobs = {}
                for target in targets:
                    for name in build.components:
                        source = sources.get((target.precision, name), models[name])
                        jobs[target.name, name] = self._submit_once(
                            build,
                            ("compile", target.name, target.form, name),
                            lambda t=target, n=name, s=source: hub.submit_compile_job(
                                s,
                                devices[t.name],
                                name=f"mvd-{build.manifest.get('model')}-{n}",
                                input_specs=self._input_specs(build, n),
                                options=compile_options(t),
                            ),
                        )
            with stages.stage(f"wait for {len(jobs)} compile jobs"):
                for (target_name, name), job in jobs.items():
                    self._wait(job, "compile", f"{target_name} {name}")
            with stages.stage("download the compiled models"):
                records = {}
                for target in targets:
                    records[f"{target.name}/{target.form}"] = self._download(build, target, devices[target.name], jobs)
        for key, record in records.items():
            build.manifest.setdefault("compiled", {})[key] = record
        build.save_manifest()
        return records

    def _upload(self, build: Build, name: str):
        """Upload a component as AI Hub's directory form: exactly one .onnx and one .data."""
        hub = self._hub()
        uploads = self._jobs(build).setdefault("uploads", {})
        if uploads.get(name):
            return hub.get_model(uploads[name])
        component = build.components[name]
        staged = build.staging_dir(f"upload-{name}") / name
        staged.mkdir()
        try:
            for file in filter(None, (component["onnx"], component.get("data"))):
                _link_or_copy(build.path / file, staged / file)
            model = hub.upload_model(str(staged), name=f"mvd-{build.manifest.get('model')}-{name}")
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
            build.clean_staging()
        uploads[name] = model.model_id
        build.save_manifest()
        return model

    def _input_specs(self, build: Build, name: str) -> dict:
        return {i["name"]: (tuple(i["shape"]), "float32") for i in build.components[name]["inputs"]}

    def _quantized_sources(self, build: Build, targets: list, models: dict) -> dict:
        """w8a16: one quantize job per component (device independent), calibrated on pipeline inputs."""
        hub = self._hub()
        if not any(t.precision == "w8a16" for t in targets):
            return {}
        samples = max(t.calibration_samples for t in targets if t.precision == "w8a16")
        jobs = {}
        for name in build.components:

            def submit(n=name):
                feeds = pipeline_inputs(build, n, samples, seed=7)
                calibration = {key: [feed[key] for feed in feeds] for key in feeds[0]}
                return hub.submit_quantize_job(
                    models[n],
                    calibration,
                    weights_dtype=hub.QuantizeDtype.INT8,
                    activations_dtype=hub.QuantizeDtype.INT16,
                    name=f"mvd-{build.manifest.get('model')}-{n}-w8a16",
                )

            jobs[name] = self._submit_once(build, ("quantize", "w8a16", name), submit)
        return {
            ("w8a16", name): self._wait(job, "quantize", f"w8a16 {name}").get_target_model()
            for name, job in jobs.items()
        }

    def _download(self, build: Build, target, device, jobs: dict) -> dict:
        staged = build.staging_dir(f"{target.name}-{target.form}")
        relative = f"compiled/{target.name}/{target.form}"
        record = {
            "target": target.name,
            "backend": self.name,
            "form": target.form,
            "directory": relative,
            "device": _device_record(device),
            "runtime": target.runtime,
            "options": compile_options(target),
            "components": {},
        }
        try:
            for name in build.components:
                job = jobs[target.name, name]
                wanted = staged / f"{name}{TARGET_MODEL_SUFFIX[target.runtime]}"
                written = Path(job.download_target_model(str(wanted)) or wanted)
                record["components"][name] = {"file": written.name, "compile_job": job.job_id, "job_url": job.url}
            build.replace_dir(staged, relative)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            build.clean_staging()
        return record

    # -- profile and on-device check ---------------------------------------------------------------
    def profile(self, build: Build, targets: list, form: str | None, runs: int, quiet: bool = False) -> list[dict]:
        hub = self._hub()
        stages = Stages(2, quiet=quiet, name="profile qai-hub")
        with hub_errors(hub):
            jobs, records = {}, {}
            with stages.stage("submit inference jobs (profile + outputs)"):
                for target in targets:
                    key = f"{target.name}/{form or target.form}"
                    record = build.manifest.get("compiled", {}).get(key)
                    if record is None:
                        raise MvdError(f"{build.path}: no compiled form {key!r}; run `mvd-deploy compile` first")
                    records[target.name] = record
                    device = hub.Device(record["device"]["name"])
                    for name, component in record["components"].items():
                        model = hub.get_job(component["compile_job"]).get_target_model()
                        inputs = self._check_inputs(build, name)
                        options = " ".join(filter(None, [f"--max_profiler_iterations {runs}", target.profile_options]))
                        jobs[target.name, name] = self._submit_once(
                            build,
                            ("inference", target.name, record["form"], name),
                            lambda m=model, d=device, i=inputs, o=options, n=name: hub.submit_inference_job(
                                m,
                                d,
                                inputs={k: list(v) for k, v in i.items()},
                                name=f"mvd-check-{n}",
                                options=o,
                                profile=True,
                            ),
                        )
            with stages.stage(f"wait for {len(jobs)} inference jobs"):
                profiles = []
                for target in targets:
                    record = records[target.name]
                    profile = new_profile(target.name, record["form"], build, record["device"], runs)
                    for name in record["components"]:
                        job = self._wait(jobs[target.name, name], "inference", f"{target.name} {name}")
                        profile["components"][name] = parse_hub_profile(job.download_profile())
                        profile["components"][name]["inference_job"] = job.job_id
                        check = self._on_device_check(build, name, job.download_output_data())
                        profile["components"][name]["on_device"] = check
                        profile["components"][name]["psnr_db"] = check["psnr_db"]
                        record["components"][name]["on_device"] = check
                    profiles.append(finish_profile(profile))
        build.save_manifest()
        return profiles

    def _check_inputs(self, build: Build, name: str) -> dict[str, np.ndarray]:
        """Two pipeline-drawn samples, the second with another image embedding (for sensitivity)."""
        [feed] = pipeline_inputs(build, name, 1, seed=CHECK_SEED)
        second = dict(feed)
        if "encoder_hidden_states" in feed:
            second["encoder_hidden_states"] = (
                np.random.default_rng(CHECK_SEED + 100)
                .standard_normal(feed["encoder_hidden_states"].shape)
                .astype(np.float32)
            )
        return {key: np.stack([feed[key], second[key]]) for key in feed}

    def _on_device_check(self, build: Build, name: str, outputs) -> dict:
        """Device outputs against the exported model run here (ONNX Runtime CPU, fp32)."""
        inputs = self._check_inputs(build, name)
        session = ort_session(build.onnx_path(name))
        local = [session.run(None, {k: v[i] for k, v in inputs.items()})[0] for i in range(2)]
        device = [np.asarray(o, np.float32).reshape(local[0].shape) for o in next(iter(outputs.values()))]
        check = compare(device[0], local[0])
        if "encoder_hidden_states" in inputs:
            check["conditioning_sensitivity"] = {
                "device": relative_change(*device),
                "reference": relative_change(*local),
            }
        return check


def parse_hub_profile(profile: dict) -> dict:
    """AI Hub's download_profile() dict in the common profile schema (µs → ms, bytes → MB)."""
    summary, layers = profile.get("execution_summary", {}), profile.get("execution_detail", [])
    times = [t / 1000 for t in summary.get("all_inference_times") or [summary["estimated_inference_time"]]]
    p50 = summary["estimated_inference_time"] / 1000
    timed = sorted((layer for layer in layers if "execution_time" in layer), key=lambda x: -x["execution_time"])
    return {
        "latency_ms": {
            "p50": round(p50, 3),
            "p90": round(float(np.percentile(times, 90)), 3),
            "min": round(min(times), 3),
            "mean": round(float(np.mean(times)), 3),
        },
        "load_ms": {"first": _ms(summary.get("first_load_time")), "warm": _ms(summary.get("warm_load_time"))},
        "peak_memory_mb": round(summary.get("estimated_inference_peak_memory", 0) / 2**20, 1),
        "compute_units": dict(Counter(layer["compute_unit"] for layer in layers)),
        "top_ops": [
            {
                "name": layer["name"],
                "op_type": layer["type"],
                "ms": round(layer["execution_time"] / 1000, 3),
                "share": round(layer["execution_time"] / 1000 / p50, 4) if p50 else None,
            }
            for layer in timed[:10]
        ],
    }


def _ms(microseconds) -> float | None:
    return round(microseconds / 1000, 1) if isinstance(microseconds, int | float) else None


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
