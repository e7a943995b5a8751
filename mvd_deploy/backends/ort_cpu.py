"""ONNX Runtime CPU: the fully public fallback target.

compile: the export rewritten for ONNX Runtime (ort_graph.py: every attention as its
MultiHeadAttention, flash attention with no score maps; GELU fused; convolutions with inputs of their own;
feed-forward projections in halves);
optionally int8 (onnxruntime.quantization): dynamic (MatMul/Gemm), or static (convolutions with
activation ranges calibrated on inputs drawn from the pipeline, then MatMul/Gemm dynamic); then ONNX
Runtime's offline graph optimisation (level "extended": fusions that stay portable across CPUs) saved
as the compiled model. Every compiled component is re-validated against the build's exported model.

profile: each component in its own worker process (so its peak memory is its own): load time,
warm-up, N timed calls, and one profiled call for the op table.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mvd_deploy.backends.base import (
    STATIC_INT8_CALIBRATION_SAMPLES,
    Backend,
    CompileOptions,
    finish_profile,
    new_profile,
)
from mvd_deploy.backends.inputs import VALIDATION_SEED, pipeline_inputs
from mvd_deploy.backends.ort_graph import rewritten_for_ort
from mvd_deploy.build import Build
from mvd_deploy.calibration import calibrate_min_max, calibration_reader
from mvd_deploy.cpu import (
    EMULATOR,
    check_emulated_cpus,
    cpu_features,
    cpu_name,
    emulator_version,
    run_on_emulated_cpu,
)
from mvd_deploy.errors import MvdError
from mvd_deploy.metrics import compare, conditioning_sensitivity, cost_views, require_psnr, top_ops
from mvd_deploy.onnx_tools import (
    linear_time_quantizer,
    module_paths,
    ort_session,
    quiet_ort_quantizer,
)
from mvd_deploy.ort_worker import run_worker
from mvd_deploy.progress import Stages

logger = logging.getLogger(__name__)
DEFAULT_MIN_PSNR_DB = {"fp32": 80.0, "fp16": 40.0, "int8-dynamic": 30.0, "int8-static": 30.0}


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 GEMM rate through ONNX Runtime (MLAS) with ``threads`` threads: best of
    ``repeats`` n³ MatMuls. CPU budgets are fractions of it, so they hold on whatever CPU runs them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal((n, n), dtype=np.float32) for x in "ab"}
    session.run(None, feed)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


class OrtCpuBackend(Backend):
    name = "ort-cpu"

    def compile(self, build: Build, targets: list, options: CompileOptions) -> dict[str, dict]:
        for scheme in options.int8:
            if scheme not in INT8_FORMS:
                raise MvdError(f"int8: must be dynamic or static, got {scheme!r}", parameter="int8")
        base = "fp16" if build.manifest.get("precision") == "fp16" else "fp32"
        forms = [base] + [f"int8-{scheme}" for scheme in INT8_FORMS if scheme in options.int8]
        for target in targets:  # a profile may ask for a form the options did not
            if target.form not in forms and target.form.startswith("int8"):
                forms.append(target.form)
        if options.validate_on_cpus and forms == [base]:
            raise MvdError("validate_on_cpus: checks int8 forms; none is asked for", parameter="validate_on_cpus")
        check_emulated_cpus(options.validate_on_cpus, parameter="validate_on_cpus")
        records = {}
        references: dict[str, tuple] = {}  # component → (inputs, export's outputs, {form: output}) for all forms
        for form in forms:
            key = f"{self.name}/{form}"
            records[key] = self._compile_form(build, form, options, references)
            build.manifest.setdefault("compiled", {})[key] = records[key]
            build.save_manifest()
        return records

    def _compile_form(self, build: Build, form: str, options: CompileOptions, references: dict) -> dict:
        threshold = options.min_psnr_db if options.min_psnr_db is not None else DEFAULT_MIN_PSNR_DB[form]
        relative = f"compiled/{self.name}/{form}"
        # int8 kernels differ between x86 CPUs: int8 forms are also checked on the CPUs asked for, emulated
        emulated_cpus = options.validate_on_cpus if form.startswith("int8") else ()
        stages = Stages(len(build.components) + len(emulated_cpus), logger, name=f"compile {self.name} {form}")
        record = {"target": self.name, "form": form, "directory": relative, "components": {}}
        # its validation figures were measured on this CPU
        record["measured_on"] = {"cpu": cpu_name(), "features": cpu_features()}
        if form.startswith("int8"):
            record["int8_weights"] = INT8_WEIGHTS
            record["int8_ops"] = INT8_FORMS[form.removeprefix("int8-")]
        with build.staged(relative, label=form) as staged:
            for name in build.components:
                with stages.stage(name):
                    record["components"][name] = self._compile_component(
                        build, name, form, staged, options, threshold, references
                    )
            for cpu in emulated_cpus:
                with stages.stage(f"every component once on {cpu}, emulated ({EMULATOR}; slow at full size)"):
                    record.setdefault("emulated_cpus", {})[cpu] = self._validate_on_emulated_cpu(
                        cpu, form, staged, record["components"], references
                    )
        return record

    def _validate_on_emulated_cpu(self, cpu: str, form: str, staged: Path, components: dict, references: dict):
        """The form's components run once on ``cpu`` (one emulator process), validated as on this CPU:
        against the export with the same threshold, and against what this CPU computed."""
        names = list(components)
        outputs, features = run_on_emulated_cpu(cpu, [(staged / f"{n}.onnx", references[n][0]) for n in names])
        for name, output in zip(names, outputs, strict=True):
            validation = components[name]["validation"]
            check = compare(output, references[name][1]["output"]) | {"min_psnr_db": validation["min_psnr_db"]}
            where = f"{name} ({self.name} {form} on {cpu}, emulated)"
            require_psnr(check, where=where, consequence="the compiled form was not written")
            this_cpu = compare(output, references[name][2][form])
            validation.setdefault("emulated_cpus", {})[cpu] = {
                "psnr_db": check["psnr_db"],
                "max_abs_error": check["max_abs_error"],
                "psnr_db_vs_this_cpu": this_cpu["psnr_db"],  # 200: the same output bit for bit
            }
        return {"features": features, "emulator": emulator_version()}

    def _compile_component(self, build: Build, name: str, form: str, staged: Path, options, threshold, references):
        target = staged / f"{name}.onnx"
        # the export rewritten for ORT's CPU kernels (ort_graph.py), int8, then ORT's own fusions
        with rewritten_for_ort(build.onnx_path(name)) as (source, rewrites):
            if form.startswith("int8"):
                quantized = staged / "quantized" / f"{name}.onnx"
                quantized.parent.mkdir(exist_ok=True)
                _quantize(build, name, form, source, quantized, options)
                source = quantized
            ort_session(source, optimization="extended", optimized_path=target)  # writes the compiled model
        shutil.rmtree(staged / "quantized", ignore_errors=True)
        # Re-validate against the build's exported model, on fixed inputs such as the pipeline makes
        # (calibration draws other samples from the same distribution).
        if name not in references:
            [inputs] = pipeline_inputs(build, name, 1, seed=VALIDATION_SEED)
            references[name] = (inputs, _outputs(build.onnx_path(name), inputs), {})
        inputs, reference, compiled_outputs = references[name]
        # One session at a time: each holds the weights and (for the UNet) GBs of activations.
        compiled = _outputs(target, inputs)
        compiled_outputs[form] = compiled["output"]  # what this CPU computed, for the emulated CPUs' check
        validation = compare(compiled["output"], reference["output"])
        sensitivity = (reference["sensitivity"], compiled["sensitivity"])
        validation |= {"min_psnr_db": threshold, "seed": VALIDATION_SEED, "reference": f"exported {name}.onnx"}
        if sensitivity[0] is not None:
            validation["conditioning_sensitivity"] = {"reference": sensitivity[0], "compiled": sensitivity[1]}
        require_psnr(validation, where=f"{name} ({self.name} {form})", consequence="the compiled form was not written")
        files = sorted(p.name for p in staged.iterdir() if p.name.startswith(f"{name}."))
        return {
            "onnx": f"{name}.onnx",
            "files": files,
            "ops": _op_counts(target),
            "rewrites": rewrites,
            "validation": validation,
        }

    def profile(self, build: Build, targets: list, form: str | None, runs: int) -> list[dict]:
        return [self._profile_form(build, form or target.form, runs) for target in targets]

    def _profile_form(self, build: Build, form: str, runs: int) -> dict:
        key = f"{self.name}/{form}"
        record = build.compiled(key)
        threads = int(os.environ.get("MVD_ORT_THREADS", "0")) or os.cpu_count()
        # Measured in the same run as the model, so efficiency budgets compare like with like.
        device = {
            "name": cpu_name(),
            "features": cpu_features(),  # which MLAS kernels the timings are of
            "threads": threads,
            "gemm_gflops": round(gemm_gflops(threads), 1),
        }
        profile = new_profile(self.name, form, build, device, runs)
        stages = Stages(len(record["components"]), logger, name=f"profile {key}")
        for name in record["components"]:
            with stages.stage(f"{name}: warm-up + {runs} timed runs + 1 profiled run"):
                model = build.path / record["directory"] / f"{name}.onnx"
                measured = _profile_in_worker(build, name, model, runs, threads)
                # ops named by the module that made them (the exported graph keeps each node's path)
                nodes, modules = measured.pop("node_ms"), module_paths(build.onnx_path(name))
                p50 = measured["latency_ms"]["p50"]
                measured["top_ops"] = top_ops(nodes, p50, modules=modules)
                measured["cost"] = cost_views(nodes, modules)
                # the compiled form's PSNR against the export, so a gate needs the profile alone
                measured["psnr_db"] = record["components"][name]["validation"]["psnr_db"]
                measured["flops"] = build.components[name]["flops"]
                profile["components"][name] = measured
        return finish_profile(profile)


def _outputs(model: Path, inputs: dict[str, np.ndarray]) -> dict:
    """The model's output on ``inputs`` and its conditioning sensitivity, then the session is freed."""
    session = ort_session(model, low_memory=True)

    def run(feed):
        return session.run(None, feed)[0]

    output = run(inputs)
    return {"output": output, "sensitivity": conditioning_sensitivity(run, inputs, VALIDATION_SEED, output)}


_INT8_OPS = (
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
)


# x86 int8 kernels without VNNI (AVX2, AVX-512F/BW) multiply u8 activations by s8 weights with
# VPMADDUBSW, which adds two products into a saturating int16: 2·255·127 overflows it, 2·255·64 does
# not. Weights in [-64, 64] (ORT's reduce_range) make every int8 form compute the same on any x86 CPU; the
# full-size UNet's int8-dynamic PSNR fell from 51.7 dB (VNNI) to 32.8 dB (AVX2 only) with 8-bit weights
# (issue 13's figures).
INT8_WEIGHTS = {"range": [-64, 64], "per_channel": True, "why": "no int16 saturation in VPMADDUBSW (x86 without VNNI)"}


# What each int8 form quantises, and how. MatMul/Gemm are dynamic in both: in the full-size UNet, static
# QDQ of every op measured 33.1 dB and 17.7 s per call (Q/DQ pairs around the float ops, int8
# softmax), convolutions static with MatMul/Gemm dynamic 43.3 dB and 10.3 s (fp32 30.4 s; issue 13).
# ORT's dynamic ConvInteger is slower than its fp32 convolution on CPU, so dynamic leaves them float.
INT8_FORMS = {
    "dynamic": {"MatMul/Gemm": "dynamic (activations quantised per call)", "Conv": "float"},
    "static": {"MatMul/Gemm": "dynamic (activations quantised per call)", "Conv": "static (calibrated QDQ)"},
}


def _op_counts(path: Path) -> dict[str, int]:
    """Nodes in the compiled graph, and how many of them are int8 (quantised) ops."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {"nodes": len(graph.node), "int8": sum(node.op_type in _INT8_OPS for node in graph.node)}


def _quantize(build: Build, name: str, form: str, source: Path, out: Path, options: CompileOptions) -> None:
    """``source``'s int8 form (INT8_FORMS) at ``out``; intermediate files stay in ``out``'s directory."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    if form == "int8-static":
        # Convolutions as QDQ with calibrated activation ranges (QLinearConv once compiled). The ranges
        # come from the bounded-memory MinMax calibration over the convolutions' tensors only: ORT's
        # calibrator keeps every tensor of the run and does not fit the full-size UNet in 24 GB.
        samples = pipeline_inputs(build, name, options.calibration_samples or STATIC_INT8_CALIBRATION_SAMPLES, seed=7)
        reader = calibration_reader(samples, lambda sample: sample)
        ranges = calibrate_min_max(source, reader, out.with_suffix(".ranges.json"), op_types=["Conv"])
        convs = out.with_suffix(".convs.onnx")
        with quiet_ort_quantizer(), linear_time_quantizer():
            quantize_static(
                source,
                convs,
                None,  # the ranges come from the cache
                calibration_cache_path=ranges,
                op_types_to_quantize=["Conv"],
                # u8 activations, as ORT's x86 kernels take them: with s8, ORT converts each Q/DQ pair
                # to u8 at load, but not a quantizer read by several DQs, and the convolutions writing
                # those (4 of the full-size UNet's 66) stayed float, their weights dequantised every call
                # (a 59 MB tensor alive from the call's start). u8: all 66 are QLinearConv (issue 13).
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,  # see INT8_WEIGHTS
                use_external_data_format=True,
            )
        source = convs
    with quiet_ort_quantizer():
        quantize_dynamic(
            source,
            out,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,  # see INT8_WEIGHTS
            use_external_data_format=True,
        )


def _profile_in_worker(build: Build, component: str, model: Path, runs: int, threads: int) -> dict:
    inputs_path = model.parent / f".{component}-profile-inputs.npz"
    np.savez(inputs_path, **build.random_inputs(component, VALIDATION_SEED))
    quiet = not logger.isEnabledFor(logging.INFO)  # the worker's bar follows this module's progress lines
    try:
        args = ["profile", str(model), str(inputs_path), str(runs), str(threads)] + ([] if quiet else ["--progress"])
        return run_worker(args, failure=f"{model}: ONNX Runtime profiling failed", quiet=quiet)
    finally:
        inputs_path.unlink(missing_ok=True)
