"""Snapdragon NPU, offline: QNN HTP compile and an emulated check with ``onnxruntime-qnn``, no AI Hub.

``compile BUILD --target xiaomi-14-pro --offline`` compiles every graph of every component for the
profile's SoC (its ``chipset``) into an EPContext ONNX wrapper plus the raw QNN context binary beside
it (what AI Hub calls a precompiled QNN ONNX), with CPU fallback disabled: a node the HTP cannot run
fails the compile and is named. Forms: w8a16 (uint8 weights, uint16 activations: ONNX Runtime's QNN
QDQ recipe calibrated on pipeline-drawn inputs) and float16 (the fp32 graph; the HTP runs it in fp16).

The emulated check runs the compiled graphs on the HTP emulator of this CPU (the x86-64 libQnnHtp,
~2 GFLOP/s) against the exported model on ONNX Runtime CPU fp32: PSNR and conditioning sensitivity.
It gives no phone timing (the emulator's cycle counts track this host's wall time), so offline
profiles carry latency ``None`` and say why.

License: the QNN libraries are loaded from the installed ``onnxruntime-qnn`` package (Qualcomm AI
Stack License) and never copied into a build or pulled artifacts; the context binaries are our models.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mvd_deploy import htp
from mvd_deploy.backends.base import (
    Backend,
    CompileOptions,
    finish_profile,
    new_profile,
    with_calibration,
)
from mvd_deploy.backends.inputs import VALIDATION_SEED, pipeline_inputs
from mvd_deploy.build import Build
from mvd_deploy.calibration import calibrate_min_max, calibration_reader
from mvd_deploy.cpu import cpu_name
from mvd_deploy.device_profiles import HUB_PRECISIONS
from mvd_deploy.errors import MvdError, ValidationFailed
from mvd_deploy.metrics import compare, conditioning_sensitivity, require_psnr
from mvd_deploy.onnx_tools import (
    describe_io,
    linear_time_quantizer,
    ort_session,
    quiet_ort_quantizer,
    unshare_norm_parameters,
)
from mvd_deploy.parts import graph_feeds, split_for_targets
from mvd_deploy.progress import Stages

QNN_EP = "QNNExecutionProvider"
FORMS = HUB_PRECISIONS  # the phone profiles' precisions: float16, w8a16
DEFAULT_MIN_PSNR_DB = {"w8a16": 30.0, "float16": 40.0}
# The HTP emulator's speed on a 2-core x86-64 host: ~2 GFLOP/s on large convolutions, plus a cost per
# node that dominates graphs of many small ops (tiny recipe, busy host: the TAESD decoder, 62 GFLOP in
# 89 nodes, ~20 s per call; the UNet, 2.3 GFLOP in ~1,950 nodes, ~60 s per call).
# w8a16 emulates ~4-6x slower than float16 (the tiny decoder: ~20 s vs 70-130 s per call).
EMULATOR_FLOP_PER_S = 2e9
EMULATOR_S_PER_NODE = 0.03
EMULATOR_SLOWDOWN = {"float16": 1.0, "w8a16": 5.0}
QUICK_EMULATION_S = 300.0  # the emulated check runs by default when its estimate is under this (tiny recipe)
CALIBRATION_SEED = 7  # the same pipeline draw as AI Hub's quantize job
NO_PHONE_TIMING = (
    "not measured: the QNN HTP emulator runs on this CPU and gives no phone timing "
    "(profile on a phone with the qai-hub backend)"
)
NO_PHONE_MEMORY = "not measured: the emulator's host memory is not the phone's"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# QNN EP's log: the summary "Unsupported nodes in QNN EP: { name: …, type: … }…" (error level, written
# only when part of the graph is supported) and, per node unit it rejects (verbose level), "Validation
# FAILED for N nodes in OrtNodeUnit (Op) :" + "\tOperator type: T Node name: N Node index: I" lines +
# "\tREASON : …".
_UNSUPPORTED = re.compile(r"\{ name: (.*?), type: (.*?) \}")
_FAILED_UNIT = re.compile(
    r"Validation FAILED for \d+ nodes in \w+ \((\w+)\) :\n((?:\s*Operator type: .*\n)+)(?:\s*REASON : (.*))?"
)
_UNIT_NODE = re.compile(r"Operator type: (\S+) Node name: (.*?) Node index")
logger = logging.getLogger(__name__)


def offline_form(precision: str) -> str:
    """The compiled form's name, distinct from AI Hub's record of the same target and precision."""
    return f"{precision}-offline"


def provider_options(chipset) -> dict[str, str]:
    # QNN EP ignores misspelled keys silently: compile() checks the compiled model's compatibility
    # info names this SoC and architecture, so a key that did not take effect fails there.
    return {"backend_type": "htp", "soc_model": str(chipset.soc_model), "htp_arch": str(chipset.htp_arch)}


SESSION_CONFIG = {"session.disable_cpu_ep_fallback": "1"}  # an unsupported node fails instead of running on CPU


def require_chipset(target):
    if target.chipset is None:
        raise MvdError(
            f"{target.source}: key 'chipset': needed for offline (the SoC the QNN compiler targets, "
            "e.g. chipset: {name: SM8650, soc_model: 57, htp_arch: 75})",
            parameter="offline",
        )
    return target.chipset


# -- the QNN runtime ---------------------------------------------------------------------------------
def qnn_runtime():
    """onnxruntime with the QNN plugin EP registered (once per process), and its HTP devices."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise MvdError(
            "offline needs the onnxruntime-qnn package (`make setup` installs it; "
            "pip install 'onnxruntime-qnn==2.7.*')",
            parameter="offline",
        ) from None
    import onnxruntime as ort

    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise MvdError("onnxruntime-qnn is installed but registered no QNN device")
    return ort, devices


def qnn_versions() -> dict[str, str]:
    import onnxruntime as ort
    import onnxruntime_qnn
    from onnxruntime_qnn import build_and_package_info as info

    return {"qnn_sdk": info.qnn_version, "onnxruntime_qnn": onnxruntime_qnn.__version__, "onnxruntime": ort.__version__}


def session_options(chipset):
    """Session options that put every node on the QNN HTP for ``chipset``, CPU fallback disabled.

    The plugin EP attaches only through ``add_provider_for_devices``: the ``providers=[...]`` form
    silently runs on CPU."""
    ort, devices = qnn_runtime()
    options = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    options.add_provider_for_devices(devices, provider_options(chipset))
    return options


@contextlib.contextmanager
def native_output():
    """fd 1 and 2 into a temporary file while ONNX Runtime and QNN run native code: their log lines
    (some to stdout) never reach our stdout (one JSON object with --json) or the progress lines. Yields
    a function that returns what they wrote."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log:
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield lambda: (log.seek(0), _ANSI.sub("", log.read().decode(errors="replace")))[1]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def unsupported_nodes(log: str) -> tuple[dict[str, str], list[str]]:
    """({node name: op type}, QNN EP's reasons) for the nodes it left off the HTP, from its log."""
    summary: dict[str, str] = {}
    for line in log.splitlines():
        if "Unsupported nodes in QNN EP:" in line:
            summary.update(_UNSUPPORTED.findall(line))
    rejected: dict[str, str] = {}
    reasons = []
    for unit_op, members, reason in _FAILED_UNIT.findall(log):
        rejected.update((name, op) for op, name in _UNIT_NODE.findall(members) if op == unit_op)
        if reason:
            reasons.append(reason.strip())
    # the summary, where QNN EP writes one, is the list (a rejected fusion's nodes may still be taken)
    return summary or rejected, list(dict.fromkeys(reasons))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def compile_graph(source: Path, out: Path, chipset, where: str) -> None:
    """``source`` → ``out`` (EPContext ONNX) + ``<out stem>_qnn.bin`` for ``chipset``; every node on the
    HTP or a one-line ValidationFailed naming each unsupported node and its op type."""
    ort, _ = qnn_runtime()
    options = session_options(chipset)
    options.log_severity_level = 0  # verbose, captured: QNN EP names rejected nodes only at this level
    error = None
    with native_output() as log:
        try:
            ort.ModelCompiler(options, str(source), embed_compiled_data_into_model=False).compile_to_file(str(out))
        except Exception as e:  # onnxruntime's Fail / RuntimeException: the reason is in its log
            error, text = e, log()
    if error is None:
        return
    nodes, reasons = unsupported_nodes(text)
    if nodes:
        listed = ", ".join(f"{name} ({op})" for name, op in nodes.items())
        raise ValidationFailed(
            f"{where}: {len(nodes)} node(s) the {chipset.name} HTP does not support (CPU fallback is "
            f"disabled; _token_ names are ONNX Runtime's layout transposes): {listed}"
            + (f"; QNN EP says: {' / '.join(reasons)}" if reasons else "")
        )
    raise ValidationFailed(f"{where}: the QNN HTP compile for {chipset.name} failed: {_first_line(error)}")


def _compile_and_send(send, source: Path, out: Path, chipset, where: str) -> None:
    """A spawned process's work: one ``compile_graph``; sends (seconds, None) or (None, the MvdError)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops this one
    start = time.perf_counter()
    try:
        compile_graph(source, out, chipset, where)
        send.send((round(time.perf_counter() - start, 1), None))
    except MvdError as error:
        send.send((None, error))


class BackgroundCompile:
    """``compile_graph`` in a spawned process: the QNN HTP compiler works on one core, so on a
    2-core machine the next graph's calibration runs meanwhile. ``result()`` waits and returns the
    compile's own seconds (or raises its error); ``cancel()`` stops it (an interrupted compile)."""

    def __init__(self, source: Path, out: Path, chipset, where: str):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # not fork: the parent holds ORT sessions and threads
        self.where = where
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_compile_and_send, args=(send, source, out, chipset, where), daemon=True)
        self._process.start()
        send.close()

    def result(self) -> float:
        try:
            seconds, error = self._receive.recv()
        except EOFError:  # the process died without a word: killed (out of memory) or crashed
            self._process.join()
            raise ValidationFailed(
                f"{self.where}: the QNN HTP compile process ended with exit code {self._process.exitcode} "
                "before finishing (out of memory?)"
            ) from None
        finally:
            self._receive.close()
        self._process.join()
        if error is not None:
            raise error
        return seconds

    def cancel(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()


def read_compiled(path: Path, chipset, where: str) -> dict:
    """The EPContext model's context binary, I/O contract and QNN compatibility info, checked to be
    one QNN context for ``chipset`` (the provider options took effect)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    other = sorted({n.op_type for n in model.graph.node if n.op_type != "EPContext"})
    binaries = set()
    for node in model.graph.node:
        if node.op_type == "EPContext":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attributes.get("embed_mode") != 0:
                raise ValidationFailed(f"{where}: the EPContext node embeds its context; expected a separate binary")
            binaries.add(attributes["ep_cache_context"].decode())
    if other or len(binaries) != 1:
        raise ValidationFailed(
            f"{where}: expected one QNN context and nothing else, got {len(binaries)} context(s) and ops {other}"
        )
    metadata = {p.key: p.value for p in model.metadata_props}
    compatibility = metadata.get(f"ep_compatibility_info.{QNN_EP}", "")
    # v2:<?>:<QNN SDK>:<QNN API>:<htp arch>:<soc model>:… (e.g. v2:6:2.51.0:5.51.0:75:57:0:0)
    fields = compatibility.split(":")
    if len(fields) < 6 or fields[4:6] != [str(chipset.htp_arch), str(chipset.soc_model)]:
        raise ValidationFailed(
            f"{where}: compiled for {compatibility or 'an unknown SoC'}, not htp_arch {chipset.htp_arch} / "
            f"soc_model {chipset.soc_model}: the QNN provider options did not take effect"
        )
    [binary] = binaries
    io = describe_io(path)
    return {"context_binary": binary, "inputs": io["inputs"], "outputs": io["outputs"], "compatibility": compatibility}


# -- w8a16 ---------------------------------------------------------------------------------------------
def quantize_w8a16(source: Path, out: Path, reader, work: Path) -> None:
    """ONNX Runtime's QNN QDQ recipe: qnn_preprocess_model, then uint16 activations / uint8 weights,
    MinMax-calibrated with bounded memory (``calibrate_min_max``) and quantised from ORT's calibration
    cache."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    try:
        model = onnx.load(str(source))
        # qnn_preprocess_model (ORT 1.32) fails on a model with metadata_props (onnxsim writes some)
        del model.metadata_props[:]
        unshare_norm_parameters(model)
        preprocessed = work / f"{out.stem}.pre.onnx"
        external = {"all_tensors_to_one_file": True, "location": f"{preprocessed.stem}.data"}
        with quiet_ort_quantizer():
            fused = qnn_preprocess_model(
                model,
                preprocessed,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                external_data_location=external["location"],
            )
        if not fused:  # nothing to fuse: the same model, written beside its weights for the opset conversion
            # (reloaded: qnn_preprocess_model leaves ``model`` pointing at weights in its deleted temp dir)
            model = onnx.load(str(source))
            del model.metadata_props[:]
            unshare_norm_parameters(model)
            onnx.save(model, str(preprocessed), save_as_external_data=True, **external)
        del model
        source = _opset_for_16bit(preprocessed, work / f"{out.stem}.pre21.onnx")
        config = get_qnn_qdq_config(
            str(source), reader, activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8
        )
        symmetric = (config.extra_options or {}).get("CalibTensorRangeSymmetric", False)
        cache = calibrate_min_max(
            source, reader, work / f"{out.stem}.ranges.json", op_types=config.op_types_to_quantize, symmetric=symmetric
        )
        with native_output(), quiet_ort_quantizer(), linear_time_quantizer():
            quantize_static(
                str(source),
                str(out),
                None,  # the ranges come from the cache
                calibration_cache_path=cache,
                calibrate_method=config.calibrate_method,
                quant_format=config.quant_format,
                activation_type=config.activation_type,
                weight_type=config.weight_type,
                op_types_to_quantize=config.op_types_to_quantize,
                nodes_to_quantize=config.nodes_to_quantize,
                nodes_to_exclude=config.nodes_to_exclude,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                use_external_data_format=config.use_external_data_format,
                extra_options=config.extra_options,
            )
    finally:
        for path in work.glob(f"{out.stem}.pre*"):
            path.unlink()


def _opset_for_16bit(source: Path, out: Path) -> Path:
    """``source`` at opset 21 (16-bit QuantizeLinear), converted on the graph alone.

    ORT's quantizer converts a model below opset 21 itself, but serialises it whole — weights included —
    which protobuf refuses past 2 GB (every full-size UNet part). The graph is converted here without
    its weights; the converted model sits beside ``source`` and refers to the same ``.data`` file."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    if opset >= 21:
        return source
    if out.parent != source.parent:
        raise ValueError("the converted model must sit beside its weights")
    onnx.save(onnx.version_converter.convert_version(model, 21), str(out))
    return out


# -- the emulated check ----------------------------------------------------------------------------------
def emulation_estimate_s(build: Build, component: str, precision: str) -> float:
    """Seconds the emulated check should take: per call, the component's FLOPs at EMULATOR_FLOP_PER_S
    plus its nodes at EMULATOR_S_PER_NODE, slowed for w8a16; two calls where it has a conditioning
    input (the sensitivity figure)."""
    calls = 2 if any(i["name"] == "encoder_hidden_states" for i in build.components[component]["inputs"]) else 1
    nodes = sum(_node_count(graph.onnx) for graph in build.graphs(component))
    per_call = build.components[component]["flops"] / EMULATOR_FLOP_PER_S + nodes * EMULATOR_S_PER_NODE
    return calls * per_call * EMULATOR_SLOWDOWN[precision]


def will_emulate(build: Build, component: str, precision: str, emulate: bool | None) -> bool:
    """``emulate`` True/False as asked; None (default): only where the check is quick."""
    if emulate is not None:
        return emulate
    return emulation_estimate_s(build, component, precision) <= QUICK_EMULATION_S


def emulated_check(
    build: Build, component: str, precision: str, compiled: list[Path], chipset, threshold: float
) -> dict:
    """The compiled graphs chained on the HTP emulator (each fed the previous compiled graphs' outputs)
    against the whole exported model on ONNX Runtime CPU fp32, on pipeline-drawn inputs."""
    ort, _ = qnn_runtime()
    [inputs] = pipeline_inputs(build, component, 1, seed=VALIDATION_SEED)
    output = build.components[component]["outputs"][0]["name"]
    expected, expected_sensitivity = _run_and_sensitivity(
        [ort_session(build.onnx_path(component), low_memory=True)], inputs, output
    )
    start = time.perf_counter()
    error = None
    with native_output() as log:
        try:
            sessions = [ort.InferenceSession(str(path), session_options(chipset)) for path in compiled]
            emulated, sensitivity = _run_and_sensitivity(sessions, inputs, output)
            del sessions
        except Exception as e:  # onnxruntime's Fail: say where, with its first line
            error, text = e, log()
    if error is not None:
        nodes, _ = unsupported_nodes(text)
        reason = ", ".join(f"{n} ({t})" for n, t in nodes.items()) if nodes else _first_line(error)
        raise ValidationFailed(f"{component}: the HTP emulator could not run the compiled model: {reason}")
    check = compare(emulated, expected) | {
        "min_psnr_db": threshold,
        "seed": VALIDATION_SEED,
        "reference": f"exported {build.onnx_path(component).name} on ONNX Runtime CPU fp32",
        "emulated": f"QNN HTP emulator for {chipset.name} on this CPU",
        "emulator_s": round(time.perf_counter() - start, 2),  # loading the contexts + one or two calls
        "estimated_s": round(emulation_estimate_s(build, component, precision), 1),
    }
    if expected_sensitivity is not None:
        check["conditioning_sensitivity"] = {"reference": expected_sensitivity, "compiled": sensitivity}
    return check


def _run_and_sensitivity(sessions: list, inputs: dict[str, np.ndarray], output: str) -> tuple:
    """``output`` of the sessions run in order (each fed the inputs and earlier sessions' outputs by
    name), and its conditioning sensitivity."""

    def run(feed):
        available = dict(feed)
        for session in sessions:
            names = [o.name for o in session.get_outputs()]
            part_feed = {i.name: available[i.name] for i in session.get_inputs()}
            available.update(zip(names, session.run(names, part_feed), strict=True))
        return available[output]

    result = run(inputs)
    return result, conditioning_sensitivity(run, inputs, VALIDATION_SEED, result)


# -- the backend -----------------------------------------------------------------------------------------
class QnnOfflineBackend(Backend):
    name = "qnn-offline"

    def precision(self, target, form: str | None) -> str:
        """The precision to compile or profile: ``form`` (w8a16, float16, or with -offline) or the
        profile's own."""
        wanted = (form or target.precision).removesuffix("-offline")
        if wanted not in FORMS:
            raise MvdError(f"form: the offline QNN forms are {', '.join(FORMS)}, got {form!r}", parameter="form")
        return wanted

    def compile(self, build: Build, targets: list, options: CompileOptions) -> dict[str, dict]:
        targets = with_calibration(targets, options)
        plan = [(target, self.precision(target, options.form)) for target in targets]
        for target, _ in plan:  # refuse bad input before any long work
            require_chipset(target)
        split_for_targets(build, plan)  # parts where a component is too large; refuses what cannot fit
        qnn_runtime()
        work = build.staging_dir("qnn-offline-work")  # QDQ models, shared by targets of one precision
        records: dict[str, dict] = {}
        done: dict[tuple, str] = {}  # (precision, samples, SoC, threshold) → key already compiled
        try:
            for target, precision in plan:
                key = f"{target.name}/{offline_form(precision)}"
                same = (precision, target.calibration_samples, target.chipset, options.min_psnr_db)
                records[key] = self._compile_target(
                    build, target, precision, options, work, records.get(done.get(same))
                )
                done.setdefault(same, key)
                build.manifest.setdefault("compiled", {})[key] = records[key]
                build.save_manifest()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            build.clean_staging()
        return records

    def _compile_target(self, build: Build, target, precision: str, options: CompileOptions, work: Path, twin) -> dict:
        chipset = target.chipset
        form = offline_form(precision)
        relative = f"compiled/{target.name}/{form}"
        threshold = options.min_psnr_db if options.min_psnr_db is not None else DEFAULT_MIN_PSNR_DB[precision]
        record = {
            "target": target.name,
            "backend": self.name,
            "form": form,
            "precision": precision,
            "directory": relative,
            "chipset": {"name": chipset.name, "soc_model": chipset.soc_model, "htp_arch": chipset.htp_arch},
            "qnn": qnn_versions(),
            "options": {"provider": provider_options(chipset), "session": SESSION_CONFIG, "embed_mode": 0},
            "context_limit_mb": target.context_limit_mb,
            "components": {},
        }
        if precision == "w8a16":
            record["calibration"] = {
                "samples": target.calibration_samples,
                "seed": CALIBRATION_SEED,
                "method": "MinMax",
                "activations": "uint16",
                "weights": "uint8",
            }
        graphs = {component: build.graphs(component) for component in build.components}
        emulate = {c: will_emulate(build, c, precision, options.emulate) for c in build.components}
        if twin is not None:  # same SoC, precision and calibration as a target just compiled: same binaries
            steps = 1
        else:
            quantize = [g for gs in graphs.values() for g in gs if precision == "w8a16"]
            steps = sum(map(len, graphs.values())) + sum(emulate.values())
            steps += sum(not _qdq_path(work, g, target).exists() for g in quantize)
        stages = Stages(steps, logger, name=f"compile {self.name} {target.name} {form}")
        with build.staged(relative, label=f"{target.name}-{form}") as staged:
            if twin is not None:
                with stages.stage(f"same {chipset.name} binaries as {twin['target']}"):
                    shutil.copytree(build.path / twin["directory"], staged, dirs_exist_ok=True)
                    record["components"] = copy.deepcopy(twin["components"])
                    for entry in record["components"].values():
                        for graph in entry["graphs"]:
                            _check_context_size(graph, target)
                return record
            # A graph's HTP compile runs in the background where another graph calibrates before the
            # compile is needed (by its component's emulated check, or at the end).
            order = [(c, g) for c, gs in graphs.items() for g in gs]
            calibrated = [
                i for i, (_, g) in enumerate(order) if precision == "w8a16" and not _qdq_path(work, g, target).exists()
            ]
            needed = {
                c: max(i for i, (d, _) in enumerate(order) if d == c) if emulate[c] else len(order) for c in graphs
            }
            background = {g.name for i, (c, g) in enumerate(order) if any(i < j <= needed[c] for j in calibrated)}
            compiles = _CompileQueue(stages, chipset, staged, background)
            try:
                for component in build.components:
                    entries = record["components"].setdefault(component, {"graphs": []})["graphs"]
                    self._compile_component(
                        build, component, graphs[component], target, precision, work, compiles, entries
                    )
                    if emulate[component]:
                        compiles.finish()  # the check runs the component's contexts
                        with stages.stage(f"{component}: emulated check on the HTP emulator"):
                            compiled = [staged / g["file"] for g in entries]
                            check = emulated_check(build, component, precision, compiled, chipset, threshold)
                        require_psnr(
                            check,
                            where=f"{component} ({target.name} {form})",
                            consequence="nothing was written",
                            emulated=True,
                        )
                        record["components"][component]["validation"] = check
                    else:
                        record["components"][component]["validation"] = None
                        estimate = emulation_estimate_s(build, component, precision)
                        record["components"][component]["emulation"] = (
                            f"not run (estimated {estimate:.0f} s on the HTP emulator); "
                            "run it with --emulate (compile or profile)"
                        )
                compiles.finish()
            finally:
                compiles.cancel()
        return record

    def _compile_component(self, build, component, graphs, target, precision, work, compiles, entries) -> None:
        """Each graph of ``component``: its w8a16 QDQ model made here, its HTP compile queued on
        ``compiles``; each graph's record lands in ``entries`` when its compile finishes."""
        chipset = target.chipset
        weights = htp.check_fits(graphs, precision, target.context_limit_mb, f"{target.name} ({target.source})")
        samples, sessions = [], {}  # the exported parts before each part, opened once for all samples
        for index, graph in enumerate(graphs):
            source, quantize_s = graph.onnx, None
            if precision == "w8a16":
                source = _qdq_path(work, graph, target)
                if not source.exists():  # another target of this compile may have made it
                    n = target.calibration_samples
                    with compiles.stages.stage(f"{graph.name}: w8a16 QDQ, {n} calibration samples"):
                        start = time.perf_counter()
                        samples = samples or pipeline_inputs(build, component, n, seed=CALIBRATION_SEED)
                        reader = calibration_reader(
                            samples, lambda s, i=index: graph_feeds(graphs[: i + 1], s, sessions)[i]
                        )
                        quantize_w8a16(graph.onnx, source, reader, work)
                        quantize_s = round(time.perf_counter() - start, 1)
            out = compiles.staged / f"{graph.name}.onnx"
            where = f"{graph.name} ({target.name} {offline_form(precision)})"

            def finish(seconds, graph=graph, source=source, out=out, where=where, quantize_s=quantize_s):
                compiled = read_compiled(out, chipset, where)
                entry = {
                    "name": graph.name,
                    "file": out.name,
                    "context_binary": compiled["context_binary"],
                    "context_bytes": (out.parent / compiled["context_binary"]).stat().st_size,
                    "inputs": compiled["inputs"],
                    "outputs": compiled["outputs"],
                    "weight_bytes": weights[graph.name],
                    "nodes": _node_count(source),
                    "ep_compatibility_info": compiled["compatibility"],
                    "quantize_s": quantize_s,  # calibration + QDQ; None where another target of the call made it
                    "compile_s": seconds,
                }
                _check_context_size(entry, target)
                entries.append(entry)

            compiles.submit(graph.name, source, out, where, finish)
        sessions.clear()

    # -- profile ---------------------------------------------------------------------------------------
    def profile(
        self,
        build: Build,
        targets: list,
        form: str | None,
        runs: int,
        *,
        emulate: bool | None = None,
    ) -> list[dict]:
        """The common profile schema with latency and memory None (NO_PHONE_TIMING) and the emulated
        check: the compile's, or run now with ``emulate`` (default: where quick and not yet run)."""
        profiles = []
        for target in targets:
            chipset = require_chipset(target)
            precision = self.precision(target, form)
            key = f"{target.name}/{offline_form(precision)}"
            record = build.compiled(key, "mvd-deploy compile --offline")
            device = {
                "name": f"QNN HTP emulator for {chipset.name} (v{chipset.htp_arch}) on {cpu_name()}",
                "chipset": record["chipset"],
                "emulated": True,
                "qnn": record["qnn"],
            }
            profile = new_profile(target.name, record["form"], build, device, 0)
            profile["not_measured"] = {"latency_ms": NO_PHONE_TIMING, "peak_memory_mb": NO_PHONE_MEMORY}
            threshold = DEFAULT_MIN_PSNR_DB[precision]
            components = record["components"]
            stages = Stages(len(components), logger, name=f"profile {self.name} {key}")
            for name, entry in components.items():
                check = entry.get("validation")
                if emulate or (emulate is None and check is None and will_emulate(build, name, precision, None)):
                    with stages.stage(f"{name}: emulated check on the HTP emulator"):
                        compiled = [build.path / record["directory"] / g["file"] for g in entry["graphs"]]
                        check = emulated_check(build, name, precision, compiled, chipset, threshold)
                else:
                    with stages.stage(f"{name}: emulated check {'from compile' if check else 'not run (--emulate)'}"):
                        pass
                profile["components"][name] = {
                    "latency_ms": None,
                    "load_ms": None,
                    "peak_memory_mb": None,
                    "compute_units": {"NPU": sum(g["nodes"] for g in entry["graphs"])},
                    "top_ops": [],
                    "psnr_db": check["psnr_db"] if check else None,
                    "emulated": check,
                    "context_bytes": sum(g["context_bytes"] for g in entry["graphs"]),
                }
            profiles.append(finish_profile(profile))
        return profiles


class _CompileQueue:
    """One target's HTP compiles into ``staged``, in order, at most one in the background at a time
    (full size: a compile process held up to ~5 GB beside a ~10 GB calibration; two compiles and the
    single core each uses would gain little on 2 cores and near 24 GB): the graphs named in
    ``background``, whose compile is not needed before another graph calibrates."""

    def __init__(self, stages: Stages, chipset, staged: Path, background: set[str]):
        self.stages, self.chipset, self.staged, self.background = stages, chipset, staged, background
        self.running = None

    def _label(self, name: str) -> str:
        return f"{name}: QNN HTP compile for {self.chipset.name} (v{self.chipset.htp_arch})"

    def submit(self, name: str, source: Path, out: Path, where: str, finish) -> None:
        """Compile ``source`` → ``out``; ``finish(seconds)`` when done (now, or from ``finish()``)."""
        self.finish()
        if name in self.background:
            logger.info("      %s: started in the background", self._label(name))
            self.running = (name, BackgroundCompile(source, out, self.chipset, where), finish)
            return
        with self.stages.stage(self._label(name)):
            start = time.perf_counter()
            compile_graph(source, out, self.chipset, where)
            seconds = round(time.perf_counter() - start, 1)
        finish(seconds)

    def finish(self) -> None:
        """Wait for the background compile, if any, and finish it."""
        if self.running is None:
            return
        name, compile, finish = self.running
        self.running = None
        with self.stages.stage(f"{self._label(name)}, in the background"):
            seconds = compile.result()
        finish(seconds)

    def cancel(self) -> None:
        if self.running is not None:
            self.running[1].cancel()
            self.running = None


def _qdq_path(work: Path, graph, target) -> Path:
    """Where a graph's w8a16 QDQ model is kept for the other targets of one compile."""
    return work / f"{graph.name}.w8a16-{target.calibration_samples}.onnx"


def _check_context_size(graph: dict, target) -> None:
    limit = int(target.context_limit_mb * 2**20)
    if graph["context_bytes"] > limit:
        raise ValidationFailed(
            f"{target.name} ({target.source}): {graph['name']}'s compiled HTP context is {graph['context_bytes']:,} "
            f"bytes, over the {limit:,}-byte limit (context_limit_mb {target.context_limit_mb:g}); "
            "split it into more parts"
        )


def _node_count(path: Path) -> int:
    """Nodes of a graph, its QuantizeLinear/DequantizeLinear left out (a w8a16 graph's layers)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type not in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)
