"""Qualcomm AI Hub: compile, quantize (w8a16), profile and check on real Snapdragon phones.

Real code against the real ``qai_hub`` client (0.56). Everything works per ONNX graph
(``Build.graphs``: a whole component, or its parts in run order), so each graph is one HTP context.

Every upload and job is recorded in the build under a slot that names it (``compile`` /
``xiaomi-14-pro/w8a16/unet.part0``) together with a key: the hash of what produced it (source
model, device, options, input specs, inputs). A rerun reuses a recorded job only when its key is
unchanged and it has not failed (a running job is waited on); an inference job whose output
dataset expired (AI Hub keeps datasets 30 days) is submitted again. Several targets are submitted
together, then awaited together.

Known pitfalls handled here (../shared/snapdragon-npu.md): ``--truncate_64bit_io``; static input
specs only; ONNX with external weights is uploaded as a directory holding exactly one .onnx and one
.data (the client zips it into the temp dir and leaves the zip: every hub call runs with a temp dir
we remove); the client prints to stdout (``set_verbose(False)``, and whatever it still prints goes
to stderr); ``submit_profile_job`` is deprecated, so profiling is ``submit_inference_job(profile=True)``,
which also returns the outputs for the on-device check.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mvd_deploy.backends.base import Backend, CompileOptions, finish_profile, new_profile, with_calibration
from mvd_deploy.backends.inputs import pipeline_inputs
from mvd_deploy.build import Build, Graph
from mvd_deploy.errors import MvdError
from mvd_deploy.metrics import compare, latency_summary, relative_change
from mvd_deploy.metrics import top_ops as rank_top_ops
from mvd_deploy.onnx_tools import ort_session
from mvd_deploy.parts import graph_feeds, split_for_targets
from mvd_deploy.progress import Stages

logger = logging.getLogger(__name__)

NOT_CONFIGURED = (
    "Qualcomm AI Hub is not configured: run `qai-hub configure --api_token <your token>` "
    "(writes ~/.qai_hub/client.ini), or set QAIHUB_CLIENT_INI to a client.ini"
)
CHECK_SEED = 2
CALIBRATION_SEED = 7
# Compute units that put the graph in an HTP context (and so under its size limit).
HTP_COMPUTE_UNITS = ("npu", "all")
# Runtimes compiled ahead of time to a QNN context: graph names and the QAIRT version are baked in.
AOT_RUNTIMES = ("qnn_context_binary", "precompiled_qnn_onnx")
# Qualcomm's w8a16 recipe (qai-hub-models): ONNX first, then a min-max calibrated quantize job.
QUANTIZE_OPTIONS = "--range_scheme min_max"
PRE_QUANTIZE_COMPILE_OPTIONS = "--target_runtime onnx"


class HubError(MvdError):
    """AI Hub unreachable, rate limited, or a job failed: exit code 1, nothing partial written."""

    exit_code = 1


class LocalError(MvdError):
    """A step on this machine failed (ONNX Runtime, reading a result): exit code 1, not AI Hub's fault."""

    exit_code = 1


def hub_client():
    """The qai_hub client module, for everything that talks to AI Hub (tests replace this with a
    signature-checked double)."""
    import qai_hub

    return qai_hub


def _api_token() -> str | None:
    path = Path(os.environ.get("QAIHUB_CLIENT_INI", Path.home() / ".qai_hub" / "client.ini"))
    parser = configparser.ConfigParser()
    with contextlib.suppress(OSError, configparser.Error):
        parser.read(path)
        return parser.get("api", "api_token", fallback=None)
    return None


def scrub(text) -> str:
    """The client's message on one line, without the API token: its boxed explanation is kept (the
    first line alone is often just "Internal API failure."), the box drawing is dropped."""
    lines = (line.strip().strip("|│").strip() for line in str(text).splitlines())
    joined = " ".join(line for line in lines if line and not set(line) <= set("─┌┐└┘"))
    token = _api_token()
    return joined.replace(token, "***") if token else joined


def _is_network_error(e: OSError) -> bool:
    return isinstance(e, ConnectionError | TimeoutError) or type(e).__module__.split(".")[0] in ("requests", "urllib3")


@contextlib.contextmanager
def hub_errors(hub):
    """AI Hub's exceptions as one-line errors: not configured → exit 2; refused, rate limited,
    unreachable → exit 1. Failures on this machine keep their own message (never "unreachable")."""
    try:
        yield
    except MvdError:
        raise
    except hub.client.RateLimitedError as e:  # not a UserError; after the client's retries says neither 429 nor rate
        raise HubError(f"Qualcomm AI Hub is rate limiting this account; try again later ({scrub(e)})") from None
    except hub.UserError as e:
        text = scrub(e)
        # no client.ini ("Failed to load client configuration file"), or one without a token
        # ("Failed to load configuration file … Your API token is missing")
        if re.search(r"Failed to load (client )?configuration file|Please provide client configuration", text):
            raise MvdError(NOT_CONFIGURED) from None
        raise HubError(f"Qualcomm AI Hub refused the request: {text}") from None
    except hub.InternalError as e:
        raise HubError(f"Qualcomm AI Hub is unreachable or failing: {scrub(e)}") from None
    except OSError as e:
        if _is_network_error(e):
            raise HubError(f"Qualcomm AI Hub is unreachable or failing: {scrub(e) or type(e).__name__}") from None
        raise LocalError(f"on this machine: {scrub(e)}") from None
    except Exception as e:
        raise HubError(
            f"unexpected failure while working with Qualcomm AI Hub: {type(e).__name__}: {scrub(e)}"
        ) from None


@contextlib.contextmanager
def local_step(what: str):
    """A step on this machine inside a hub session: its failure is named as ours, not AI Hub's."""
    try:
        yield
    except MvdError:
        raise
    except Exception as e:
        raise LocalError(f"{what}: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def hub_session(hub, temp_parent: Path | None = None):
    """Errors mapped; the client quiet, and whatever it still prints ("Downloaded model to …") on
    stderr, so stdout stays one JSON object; its temp files (upload_model leaves a zip of the whole
    model there) in a directory removed afterwards."""
    temp = Path(tempfile.mkdtemp(prefix=".qai-hub-tmp-", dir=temp_parent))
    saved = tempfile.tempdir
    try:
        with hub_errors(hub), contextlib.redirect_stdout(sys.stderr):
            tempfile.tempdir = str(temp)
            hub.set_verbose(False)
            yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(temp, ignore_errors=True)


def _os_version(os_version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", os_version))


def _newest(devices: list):
    """get_devices returns one entry per OS version: the newest (the last of equals, as
    qai-hub-models takes the last)."""
    return sorted(devices, key=lambda d: _os_version(d.os))[-1]


def compile_graphs(build: Build, targets: list) -> list[Graph]:
    """The graphs every target compiles, split and checked for the NPU targets (parts.split_for_targets)."""
    split_for_targets(build, [(t, t.precision) for t in targets if t.compute_unit in HTP_COMPUTE_UNITS])
    return [graph for component in build.components for graph in build.graphs(component)]


def select_device(hub, target):
    """The profile's preferred device names first (newest OS), then a device with its attributes."""
    for name in target.device_names:
        devices = hub.get_devices(name=name)
        if devices:
            return _newest(devices), devices
    if target.device_attributes:
        devices = hub.get_devices(attributes=list(target.device_attributes))
        if devices:
            first = min(d.name for d in devices)
            same = [d for d in devices if d.name == first]
            return _newest(same), same
    wanted = list(target.device_names) + list(target.device_attributes)
    raise MvdError(f"{target.source}: key 'device': no AI Hub device matches {wanted}")


def select_qairt(hub, target):
    """The QAIRT version to pin (``--qairt_version``): the profile's ``qairt_version`` (a version or
    an AI Hub tag: default, latest) resolved against what AI Hub offers now."""
    frameworks = [f for f in hub.get_frameworks() if f.name.upper() == "QAIRT"] or hub.get_frameworks()
    wanted = target.qairt_version
    for framework in frameworks:
        if wanted in framework.api_tags or wanted in (framework.api_version, framework.full_version):
            return framework
    offered = ", ".join(
        f"{f.api_version} ({'/'.join(f.api_tags)})" if f.api_tags else f.api_version for f in frameworks
    )
    raise MvdError(f"{target.source}: key 'qairt_version': AI Hub offers no QAIRT {wanted!r} (offered: {offered})")


def qnn_graph_name(graph: Graph) -> str:
    """The graph's name inside its QNN context (``unet.part0`` → ``unet_part0``)."""
    return re.sub(r"\W", "_", graph.name)


def compile_options(target, qairt=None, graph: Graph | None = None) -> str:
    options = [f"--target_runtime {target.runtime}", "--truncate_64bit_io", f"--compute_unit {target.compute_unit}"]
    if target.precision == "float16":
        options.append("--quantize_full_type float16 --quantize_io")
    # w8a16 compiles the quantize job's QDQ model; its I/O stays float32 (no --quantize_io: uint16
    # I/O would need per-tensor scales in the app)
    if target.runtime in AOT_RUNTIMES:
        if qairt is not None:
            options.append(f"--qairt_version {qairt.api_version}")
        if graph is not None:  # without it the graph names in the context are random
            options.append(f"--qnn_options context_enable_graphs={qnn_graph_name(graph)}")
    if target.compile_options:
        options.append(target.compile_options)
    return " ".join(options)


def unpack_model(zipped: Path, directory: Path) -> Path:
    """An ONNX-type target model (downloaded as a zipped model directory) unpacked into
    ``directory``, the zip removed; returns its one .onnx file, else the directory."""
    from qai_hub.util.zipped_model import unzip_model

    scratch = directory.parent / f".{directory.name}.unzip"
    with local_step(f"unpacking {zipped.name}"):
        os.replace(unzip_model(str(zipped), str(scratch)), directory)
        shutil.rmtree(scratch)
        zipped.unlink()
    onnx_files = sorted(directory.glob("*.onnx"))
    return onnx_files[0] if len(onnx_files) == 1 else directory


def inference_options(target, record: dict, graph_entry: dict, runs: int) -> str:
    """On the QAIRT version and graph it was compiled with (as qai-hub-models profiles)."""
    qairt = record.get("versions", {}).get("qairt_api")
    options = [f"--max_profiler_iterations {runs}"]
    if qairt:
        options.append(f"--qairt_version {qairt}")
    if graph_entry.get("qnn_graph"):
        options.append(f"--qnn_options context_enable_graphs={graph_entry['qnn_graph']}")
    if target.profile_options:
        options.append(target.profile_options)
    return " ".join(options)


def job_key(**what) -> str:
    """sha256 of what produced a job: a recorded job is reused only while this is unchanged."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def inputs_digest(inputs: dict[str, list[np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name, samples in inputs.items():
        for sample in samples:
            digest.update(f"{name}{sample.dtype}{sample.shape}".encode())
            digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()


def _device_record(device, offered: list) -> dict:
    return {
        "name": device.name,
        "os": device.os,
        "attributes": list(device.attributes),
        "offered_os": sorted({d.os for d in offered}, key=_os_version),
    }


def _fail(job, kind: str, where: str) -> HubError:
    reason = scrub(job.get_status().message or "no reason given")
    return HubError(f"{where}: {kind} job {job.job_id} FAILED: {reason} ({job.url})")


class QaiHubBackend(Backend):
    name = "qai-hub"

    def __init__(self, hub=None):
        self.hub = hub

    def _hub(self):
        if self.hub is None:
            self.hub = hub_client()
        return self.hub

    # -- jobs, recorded in the build ---------------------------------------------------------------
    def _slot(self, build: Build, kind: str) -> dict:
        return build.manifest.setdefault("hub_jobs", {}).setdefault(kind, {})

    def _reusable(self, entry, key: str):
        """The recorded job when it was made from the same things (``key``) and has not failed; an
        inference job also needs its output dataset (expired after 30 days)."""
        if not isinstance(entry, dict) or entry.get("key") != key or not entry.get("job"):
            return None
        job = self._hub().get_job(entry["job"])
        status = job.get_status()
        if status.failure:
            return None
        if status.success and job.job_type == "inference":
            outputs = job.get_output_dataset()
            if outputs is None or outputs.is_expired():
                return None
        return job

    def _submit_once(self, build: Build, kind: str, slot: str, key: str, submit):
        """Reuse the job recorded at hub_jobs[kind][slot] for ``key``, else submit and record it at once."""
        recorded = self._slot(build, kind)
        job = self._reusable(recorded.get(slot), key)
        if job is None:
            job = submit()
            recorded[slot] = {"job": job.job_id, "key": key}
            build.save_manifest()
        return job

    def _wait(self, job, kind: str, where: str):
        status = job.wait()
        if not status.success:
            raise _fail(job, kind, where)
        return job

    # -- compile -----------------------------------------------------------------------------------
    def compile(self, build: Build, targets: list, options: CompileOptions) -> dict[str, dict]:
        targets = with_calibration(targets, options)
        hub = self._hub()
        graphs = compile_graphs(build, targets)
        quantizing = any(t.precision == "w8a16" for t in targets)
        stages = Stages(4 + quantizing, logger, name="compile qai-hub")
        with hub_session(hub, build.path):
            with stages.stage(f"upload {len(graphs)} ONNX graphs"):
                build.record_files()
                models = {graph.name: self._upload(build, graph) for graph in graphs}
            chosen = {t.name: select_device(hub, t) for t in targets}
            devices = {name: device for name, (device, _) in chosen.items()}
            qairt = {t.name: select_qairt(hub, t) if t.runtime in AOT_RUNTIMES else None for t in targets}
            quantized = {}
            if quantizing:
                with stages.stage("w8a16: compile to ONNX, quantize"):
                    quantized = self._quantize(build, targets, graphs, models, devices)
            with stages.stage(f"submit compile jobs for {', '.join(t.name for t in targets)}"):
                jobs = {}
                for target in targets:
                    device = devices[target.name]
                    for graph in graphs:
                        source = quantized[graph.name] if target.precision == "w8a16" else models[graph.name]
                        specs = self._input_specs(graph)
                        opts = compile_options(target, qairt[target.name], graph)
                        key = job_key(
                            source=source.model_id, device=[device.name, device.os], options=opts, input_specs=specs
                        )
                        jobs[target.name, graph.name] = self._submit_once(
                            build,
                            "compile",
                            f"{target.name}/{target.form}/{graph.name}",
                            key,
                            lambda s=source, d=device, g=graph, i=specs, o=opts: hub.submit_compile_job(
                                s, d, name=f"mvd-{build.manifest.get('model')}-{g.name}", input_specs=i, options=o
                            ),
                        )
            with stages.stage(f"wait for {len(jobs)} compile jobs"):
                for (target_name, graph_name), job in jobs.items():
                    self._wait(job, "compile", f"{target_name} {graph_name}")
            with stages.stage("download the compiled models"):
                records = {}
                for target in targets:
                    records[f"{target.name}/{target.form}"] = self._download(
                        build, target, chosen[target.name], qairt[target.name], jobs
                    )
        for key, record in records.items():
            build.manifest.setdefault("compiled", {})[key] = record
        build.save_manifest()
        return records

    def _upload(self, build: Build, graph: Graph):
        """Upload a graph as AI Hub's directory form (exactly one .onnx and one .data), once per content."""
        hub = self._hub()
        files = [path for path in (graph.onnx, graph.data) if path is not None]
        hashes = build.manifest.get("files", {})
        key = job_key(files={p.name: hashes[p.relative_to(build.path).as_posix()]["sha256"] for p in files})
        uploads = self._slot(build, "uploads")
        entry = uploads.get(graph.name)
        if isinstance(entry, dict) and entry.get("key") == key:
            return hub.get_model(entry["model"])
        staged = build.staging_dir(f"upload-{graph.name}") / graph.name
        staged.mkdir()
        try:
            for file in files:
                _link_or_copy(file, staged / file.name)
            model = hub.upload_model(str(staged), name=f"mvd-{build.manifest.get('model')}-{graph.name}")
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
            build.clean_staging()
        uploads[graph.name] = {"model": model.model_id, "key": key}
        build.save_manifest()
        return model

    @staticmethod
    def _input_specs(graph: Graph) -> dict:
        return {i["name"]: (tuple(i["shape"]), i.get("dtype") or "float32") for i in graph.inputs}

    def _quantize(self, build: Build, targets: list, graphs: list[Graph], models: dict, devices: dict) -> dict:
        """w8a16 as Qualcomm does it: compile each graph to ONNX, quantize that (weights int8,
        activations int16, min-max ranges) on pipeline-drawn calibration inputs; device independent,
        so shared by every w8a16 target. Returns {graph name: quantized model}."""
        hub = self._hub()
        w8a16 = [t for t in targets if t.precision == "w8a16"]
        device = devices[w8a16[0].name]  # the ONNX-to-ONNX compile does not depend on it
        samples = max(t.calibration_samples for t in w8a16)
        onnx_jobs = {}
        for graph in graphs:
            specs = self._input_specs(graph)
            key = job_key(source=models[graph.name].model_id, options=PRE_QUANTIZE_COMPILE_OPTIONS, input_specs=specs)
            onnx_jobs[graph.name] = self._submit_once(
                build,
                "onnx",
                graph.name,
                key,
                lambda g=graph, i=specs: hub.submit_compile_job(
                    models[g.name],
                    device,
                    name=f"mvd-{build.manifest.get('model')}-{g.name}-onnx",
                    input_specs=i,
                    options=PRE_QUANTIZE_COMPILE_OPTIONS,
                ),
            )
        calibration: dict[str, dict] = {}

        def calibration_data(graph: Graph) -> dict:
            if graph.component not in calibration:  # every graph of a component from the same samples
                with local_step(f"calibration inputs for {graph.component}"):
                    feeds = pipeline_inputs(build, graph.component, samples, seed=CALIBRATION_SEED)
                    sessions: dict = {}
                    per_graph = [graph_feeds(build.graphs(graph.component), feed, sessions) for feed in feeds]
                calibration[graph.component] = {
                    g.name: {name: [sample[i][name] for sample in per_graph] for name in per_graph[0][i]}
                    for i, g in enumerate(build.graphs(graph.component))
                }
            return calibration[graph.component][graph.name]

        jobs = {}
        for graph in graphs:
            onnx_job = self._wait(onnx_jobs[graph.name], "compile", f"w8a16 {graph.name} (to ONNX)")
            key = job_key(
                source=onnx_job.job_id, samples=samples, seed=CALIBRATION_SEED, options=QUANTIZE_OPTIONS, dtypes="w8a16"
            )
            jobs[graph.name] = self._submit_once(
                build,
                "quantize",
                f"w8a16/{graph.name}",
                key,
                lambda g=graph, j=onnx_job: hub.submit_quantize_job(
                    j.get_target_model(),
                    calibration_data(g),
                    weights_dtype=hub.QuantizeDtype.INT8,
                    activations_dtype=hub.QuantizeDtype.INT16,
                    name=f"mvd-{build.manifest.get('model')}-{g.name}-w8a16",
                    options=QUANTIZE_OPTIONS,
                ),
            )
        return {name: self._wait(job, "quantize", f"w8a16 {name}").get_target_model() for name, job in jobs.items()}

    def _download(self, build: Build, target, chosen: tuple, qairt, jobs: dict) -> dict:
        """The target's compiled graphs, with the contract each really has (I/O as compiled)."""
        device, offered = chosen
        relative = f"compiled/{target.name}/{target.form}"
        record = {
            "target": target.name,
            "backend": self.name,
            "form": target.form,
            "directory": relative,
            "device": _device_record(device, offered),
            "runtime": target.runtime,
            "options": compile_options(target, qairt),
            "versions": {"qairt": qairt.full_version, "qairt_api": qairt.api_version} if qairt else {},
            "components": {},
        }
        if target.precision == "w8a16":
            record["quantization"] = {
                "weights": "int8",
                "activations": "int16",
                "options": QUANTIZE_OPTIONS,
                "calibration_samples": target.calibration_samples,
            }
        with build.staged(relative, label=f"{target.name}-{target.form}") as staged:
            for component in build.components:
                entries = []
                for graph in build.graphs(component):
                    job = jobs[target.name, graph.name]
                    entries.append(self._download_graph(build, target, graph, job, staged, qairt))
                record["components"][component] = {"graphs": entries}
        return record

    def _download_graph(self, build: Build, target, graph: Graph, job, staged: Path, qairt) -> dict:
        # No extension: the client appends the server's own (.bin, .tflite, .onnx.zip).
        written = Path(job.download_target_model(str(staged / graph.name)))
        if written.suffix == ".zip":
            written = unpack_model(written, staged / graph.name)
        shapes = job.get_target_shapes() or {}
        model = job.get_target_model()
        outputs = [t for tensors in model.output_spec.values() for t in tensors]
        entry = {
            "name": graph.name,
            "file": written.relative_to(staged).as_posix(),
            "compile_job": job.job_id,
            "job_url": job.url,
            "options": compile_options(target, qairt, graph),
            # as compiled: with --quantize_io the I/O is float16, not the export's float32
            "inputs": [{"name": n, "shape": list(shape), "dtype": dtype} for n, (shape, dtype) in shapes.items()],
            "outputs": [
                {
                    "name": t.name,
                    "shape": list(t.shape or []),
                    "dtype": t.dtype,
                    # compiled outputs may be renamed (output_0, …); the exported name, by position
                    "onnx_name": graph.outputs[i]["name"] if i < len(graph.outputs) else None,
                }
                for i, t in enumerate(outputs)
            ],
        }
        if target.runtime in AOT_RUNTIMES:
            entry["qnn_graph"] = qnn_graph_name(graph)
            entry["context_graphs"] = [name for name in model.output_spec if name is not None]
        return entry

    # -- profile and on-device check ---------------------------------------------------------------
    def profile(self, build: Build, targets: list, form: str | None, runs: int) -> list[dict]:
        hub = self._hub()
        stages = Stages(2, logger, name="profile qai-hub")
        feeds: dict[str, list[dict]] = {}  # component → per graph {input: [sample 1, sample 2]}
        with hub_session(hub, build.path):
            jobs, records = {}, {}
            with stages.stage("submit inference jobs (profile + outputs)"):
                for target in targets:
                    key = f"{target.name}/{form or target.form}"
                    record = build.compiled(key)
                    records[target.name] = record
                    device = hub.Device(record["device"]["name"], record["device"]["os"])
                    for component, compiled in record["components"].items():
                        graphs = self._compiled_graphs(build, key, component, compiled)
                        if component not in feeds:
                            feeds[component] = self._check_feeds(build, component, graphs)
                        for graph, entry, inputs in zip(graphs, compiled["graphs"], feeds[component], strict=True):
                            inputs = _as_compiled(inputs, entry, f"{key} {graph.name}")
                            options = inference_options(target, record, entry, runs)
                            job_id = entry["compile_job"]
                            jobs[target.name, graph.name] = self._submit_once(
                                build,
                                "inference",
                                f"{target.name}/{record['form']}/{graph.name}",
                                job_key(
                                    model=job_id,
                                    device=[device.name, device.os],
                                    options=options,
                                    runs=runs,
                                    inputs=inputs_digest(inputs),
                                ),
                                lambda j=job_id, d=device, i=inputs, o=options, g=graph: hub.submit_inference_job(
                                    hub.get_job(j).get_target_model(),
                                    d,
                                    inputs=i,
                                    name=f"mvd-check-{g.name}",
                                    options=o,
                                    profile=True,
                                ),
                            )
            with stages.stage(f"wait for {len(jobs)} inference jobs"):
                profiles = []
                for target in targets:
                    record = records[target.name]
                    profile = new_profile(target.name, record["form"], build, record["device"], runs)
                    for component, compiled in record["components"].items():
                        graphs = build.graphs(component)
                        parsed, checks = {}, {}
                        for graph, entry, inputs in zip(graphs, compiled["graphs"], feeds[component], strict=True):
                            where = f"{target.name} {graph.name}"
                            job = self._wait(jobs[target.name, graph.name], "inference", where)
                            with local_step(f"{where}: reading the profile of inference job {job.job_id}"):
                                parsed[graph.name] = parse_hub_profile(job.download_profile())
                            parsed[graph.name]["inference_job"] = job.job_id
                            outputs = job.download_output_data()
                            if outputs is None:
                                raise HubError(
                                    f"{where}: inference job {job.job_id} returned no output data ({job.url})"
                                )
                            with local_step(f"{where}: on-device check against the exported graph here"):
                                checks[graph.name] = self._on_device_check(graph, inputs, outputs)
                            entry["on_device"] = checks[graph.name]
                        check = combine_checks(checks)
                        profile["components"][component] = combine_graph_profiles(parsed)
                        profile["components"][component]["on_device"] = check
                        profile["components"][component]["psnr_db"] = check["psnr_db"]
                        compiled["on_device"] = check
                    profiles.append(finish_profile(profile))
        build.save_manifest()
        return profiles

    # -- generate --------------------------------------------------------------------------------
    def inference_runner(self, build: Build, target, record: dict, seconds: dict[str, dict[str, float]]):
        """Run a component as inference jobs on the record's device: its compiled graphs in order, each
        fed the inputs and the earlier graphs' outputs (the device's outputs taken by position: compiled
        outputs may be renamed). ``seconds``: each component's round trip (upload, queue, run, download),
        not its latency on the phone (``profile`` measures that)."""
        hub = self._hub()
        key = f"{target.name}/{record['form']}"

        def run(name: str, feeds: dict):
            import torch

            compiled = record["components"][name]
            graphs = self._compiled_graphs(build, key, name, compiled)
            available = {k: v.numpy().astype(np.float32) for k, v in feeds.items()}
            start = time.perf_counter()
            with hub_session(hub, build.path):
                device = hub.Device(record["device"]["name"], record["device"]["os"])
                for graph, entry in zip(graphs, compiled["graphs"], strict=True):
                    where = f"{key} {graph.name}"
                    inputs = _as_compiled({i["name"]: [available[i["name"]]] for i in graph.inputs}, entry, where)
                    job = hub.submit_inference_job(
                        hub.get_job(entry["compile_job"]).get_target_model(),
                        device,
                        inputs=inputs,
                        name=f"mvd-generate-{graph.name}",
                        options=inference_options(target, record, entry, 1),
                        profile=False,
                    )
                    outputs = self._wait(job, "inference", where).download_output_data()
                    if outputs is None:
                        raise HubError(f"{where}: inference job {job.job_id} returned no output data ({job.url})")
                    names = [o["name"] for o in graph.outputs]
                    if len(outputs) != len(names):
                        raise HubError(
                            f"{where}: inference job {job.job_id} returned {len(outputs)} outputs, not {len(names)}"
                        )
                    shapes = {o["name"]: o["shape"] for o in graph.outputs}
                    for output, samples in zip(names, outputs.values(), strict=True):
                        available[output] = np.asarray(samples[0], np.float32).reshape(shapes[output])
            seconds[name] = {"load": 0.0, "run": time.perf_counter() - start}
            return torch.from_numpy(available[build.components[name]["outputs"][0]["name"]])

        return run

    @staticmethod
    def _compiled_graphs(build: Build, key: str, component: str, compiled: dict) -> list[Graph]:
        graphs = build.graphs(component)
        names = [g.name for g in graphs]
        recorded = [g["name"] for g in compiled.get("graphs", [])]
        if recorded != names:
            raise MvdError(
                f"{build.path / 'build.json'}: key 'compiled.{key}.components.{component}.graphs': compiled "
                f"{recorded or 'without graphs'}, but the build's graphs are {names}; run `mvd-deploy compile` again"
            )
        return graphs

    def _check_feeds(self, build: Build, component: str, graphs: list[Graph]) -> list[dict]:
        """Each graph's inputs for the on-device check: two pipeline-drawn samples, the second with
        another image embedding (for sensitivity); parts get what the earlier parts make here."""
        [feed] = pipeline_inputs(build, component, 1, seed=CHECK_SEED)
        second = dict(feed)
        if "encoder_hidden_states" in feed:
            second["encoder_hidden_states"] = (
                np.random.default_rng(CHECK_SEED + 100)
                .standard_normal(feed["encoder_hidden_states"].shape)
                .astype(np.float32)
            )
        with local_step(f"on-device check inputs for {component}"):
            first_feeds, second_feeds = graph_feeds(graphs, feed), graph_feeds(graphs, second)
        return [{name: [a[name], b[name]] for name in a} for a, b in zip(first_feeds, second_feeds, strict=True)]

    @staticmethod
    def _on_device_check(graph: Graph, inputs: dict[str, list[np.ndarray]], outputs: dict) -> dict:
        """The device's outputs against the exported graph run here (ONNX Runtime CPU, fp32), each
        output by position (compiled outputs may be renamed); the worst one is the graph's figure."""
        session = ort_session(graph.onnx, low_memory=True)
        dtypes = {spec["name"]: spec.get("dtype") or "float32" for spec in graph.inputs}
        feeds = [{name: np.asarray(samples[i], dtypes[name]) for name, samples in inputs.items()} for i in range(2)]
        local = [session.run(None, feed) for feed in feeds]
        device = [[np.asarray(sample, np.float32) for sample in samples] for samples in outputs.values()]
        if len(device) != len(local[0]):
            raise ValueError(f"the device returned {len(device)} outputs, the exported graph has {len(local[0])}")
        per_output = [compare(device[k][0].reshape(local[0][k].shape), local[0][k]) for k in range(len(device))]
        check = min(per_output, key=lambda c: c["psnr_db"])
        check = {"psnr_db": check["psnr_db"], "max_abs_error": max(c["max_abs_error"] for c in per_output)}
        # conditioning reaches this graph when the two samples' inputs differ (only the embedding does)
        if any(not np.array_equal(samples[0], samples[1]) for samples in inputs.values()):
            first = device[0]
            check["conditioning_sensitivity"] = {
                "device": relative_change(first[0].reshape(local[0][0].shape), first[1].reshape(local[1][0].shape)),
                "reference": relative_change(local[0][0], local[1][0]),
            }
        return check


def _as_compiled(inputs: dict[str, list[np.ndarray]], entry: dict, where: str) -> dict[str, list[np.ndarray]]:
    """The check inputs in the compiled graph's input types (float16 after --quantize_io)."""
    dtypes = {spec["name"]: spec["dtype"] for spec in entry.get("inputs", [])}
    cast = {}
    for name, samples in inputs.items():
        dtype = np.dtype(dtypes.get(name, samples[0].dtype))
        if not np.issubdtype(dtype, np.floating) and np.issubdtype(samples[0].dtype, np.floating):
            raise MvdError(
                f"{where}: input {name!r} is compiled as {dtype} (quantized I/O); the on-device check feeds "
                "float inputs: compile without --quantize_io for this precision"
            )
        cast[name] = [np.ascontiguousarray(sample, dtype) for sample in samples]
    return cast


def combine_checks(checks: dict[str, dict]) -> dict:
    """A component's on-device check from its graphs': the worst PSNR, the largest error, and the
    conditioning sensitivity of the last graph (the one that makes the component's output)."""
    if len(checks) == 1:
        return next(iter(checks.values()))
    last = list(checks.values())[-1]
    combined = {
        "psnr_db": min(c["psnr_db"] for c in checks.values()),
        "max_abs_error": max(c["max_abs_error"] for c in checks.values()),
        "graphs": checks,
    }
    if "conditioning_sensitivity" in last:
        combined["conditioning_sensitivity"] = last["conditioning_sensitivity"]
    return combined


def combine_graph_profiles(parsed: dict[str, dict]) -> dict:
    """A component's profile from its graphs', run one after another with every context loaded:
    latencies, load times and peak memory add up (None when one graph lacks the figure)."""
    if len(parsed) == 1:
        return next(iter(parsed.values()))
    graphs = list(parsed.values())

    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else round(sum(values), 3)

    latency = {stat: total(g["latency_ms"][stat] for g in graphs) for stat in ("p50", "p90", "min", "mean")}
    units = Counter()
    for g in graphs:
        units.update(g["compute_units"])
    top = [dict(op, name=f"{name}/{op['name']}") for name, g in parsed.items() for op in g["top_ops"]]
    timed = sorted((op for op in top if op["ms"] is not None), key=lambda op: -op["ms"])
    for op in timed:
        op["share"] = round(op["ms"] / latency["p50"], 4) if latency["p50"] else None
    return {
        "latency_ms": latency,
        "load_ms": {kind: total(g["load_ms"][kind] for g in graphs) for kind in ("first", "warm")},
        "peak_memory_mb": total(g["peak_memory_mb"] for g in graphs),
        "compute_units": dict(units),
        "top_ops": (timed + [op for op in top if op["ms"] is None])[:10],
        "graphs": parsed,
    }


def peak_memory_bytes(summary: dict) -> int | None:
    """The inference peak: the upper bound of ``inference_memory_peak_range`` (bytes), else the
    deprecated ``estimated_inference_peak_memory``; None when neither measured it (0 means "not
    measured" in new profiles, never 0 bytes)."""
    peak_range = summary.get("inference_memory_peak_range")
    if peak_range and max(peak_range) > 0:
        return int(max(peak_range))
    return summary.get("estimated_inference_peak_memory") or None


def parse_hub_profile(profile: dict) -> dict:
    """AI Hub's download_profile() dict in the common profile schema (µs → ms, bytes → MB)."""
    summary, layers = profile.get("execution_summary") or {}, profile.get("execution_detail") or []
    times = [t / 1000 for t in summary.get("all_inference_times") or [summary["estimated_inference_time"]]]
    p50 = float(np.median(times))
    peak = peak_memory_bytes(summary)
    return {
        "latency_ms": latency_summary(times),
        "load_ms": {"first": _ms(summary.get("first_load_time")), "warm": _ms(summary.get("warm_load_time"))},
        "peak_memory_mb": round(peak / 2**20, 1) if peak else None,
        "compute_units": dict(Counter(layer["compute_unit"] for layer in layers)),
        "top_ops": top_ops(layers, p50),
    }


def top_ops(layers: list[dict], p50_ms: float) -> list[dict]:
    """The slowest layers: by execution time (µs) where AI Hub reports it, else by cycles (then
    ``ms`` and ``share`` are None and ``cycles_share`` is the layer's share of all layers' cycles)."""
    timed = sorted(
        (layer for layer in layers if layer.get("execution_time") is not None), key=lambda x: -x["execution_time"]
    )
    if timed:
        return rank_top_ops(((layer["name"], layer["type"], layer["execution_time"] / 1000) for layer in timed), p50_ms)
    cycled = sorted((layer for layer in layers if layer.get("execution_cycles")), key=lambda x: -x["execution_cycles"])
    total = sum(layer["execution_cycles"] for layer in cycled)
    return [
        {
            "name": layer["name"],
            "op_type": layer["type"],
            "ms": None,
            "share": None,
            "cycles": layer["execution_cycles"],
            "cycles_share": round(layer["execution_cycles"] / total, 4),
        }
        for layer in cycled[:10]
    ]


def _ms(microseconds) -> float | None:
    return round(microseconds / 1000, 1) if isinstance(microseconds, int | float) else None


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
