"""``mvd-deploy export``: checkpoint → deploy passes → one validated ONNX model per component.

Stages per component, each checkable on its own: export (dynamo, opset 18, static shapes, float32
I/O; the PyTorch deploy model's reference outputs computed while it is written) → simplify (onnxsim
on the graph, weights detached) → onnx.checker → ONNX Runtime CPU run, compared with the reference
(PSNR, max abs error). Everything is written into a temporary directory and moved to BUILD_DIR only
when every component passed; a failed validation exits 1 and promotes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import logging
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from mvd_deploy.background import BackgroundTask, at_idle_priority
from mvd_deploy.build import BUILD_FORMAT, MANIFEST, BackgroundHashes, Build
from mvd_deploy.checkpoint import CONFIG_FILE, ENCODER_WEIGHTS, WEIGHTS_FILE
from mvd_deploy.deploy import Deployment, deploy_checkpoint
from mvd_deploy.errors import MvdError, ValidationFailed
from mvd_deploy.fileio import atomic_output_dir, check_output_dir, write_json
from mvd_deploy.metrics import compare
from mvd_deploy.onednn import onednn_linear
from mvd_deploy.onnx_tools import Float32IO, check_onnx, describe_io, run_onnx, simplify_onnx, trace_onnx, write_onnx
from mvd_deploy.pipeline import contract_of
from mvd_deploy.progress import Stages
from mvd_deploy.recipe import recipe_file
from mvd_deploy.stages import stage_table

BUILD_VERSION = 1
COMPONENTS = ("image_encoder", "vae_encoder", "unet", "decoder")  # in the order the pipeline runs them
# The order they are exported in: the UNet last. Its trace (9 s at full size, Python on one core) is
# the longest stretch that leaves a core idle, and the others' ONNX Runtime checks fill it; they are
# waited for before its forward, the export's largest in memory (a CLIP encoder's check beside it:
# +1.9 GB peak, measured).
EXPORT_ORDER = ("image_encoder", "vae_encoder", "decoder", "unet")
OUTPUT_NAMES = {
    "image_encoder": "image_embeds",
    "vae_encoder": "image_latents",
    "unet": "model_output",
    "decoder": "frames",
}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
MIN_PSNR_DB = {"fp32": 80.0, "fp16": 40.0}
VALIDATION_SEED = 0
TOOLCHAIN = ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "onnxsim", "qai-hub", "safetensors")
logger = logging.getLogger(__name__)


def toolchain_versions() -> dict[str, str | None]:
    versions = {}
    for package in TOOLCHAIN:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["python"] = platform.python_version()
    return versions


def component_inputs(pipeline, component: str, seed: int = VALIDATION_SEED) -> dict[str, torch.Tensor]:
    """Fixed random float32 inputs of the component's static deploy shape."""
    unet = pipeline.unet
    if component == "unet":
        return unet.example_inputs(seed=seed)
    if component in ("image_encoder", "vae_encoder"):  # normalised CLIP pixels; an image in [-1, 1]
        name = "pixel_values" if component == "image_encoder" else "image"
        shape = pipeline.encoder_input_shape(component)
        pixels = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 2)) * 2 - 1
        return {name: pixels * 2 if component == "image_encoder" else pixels}
    return {"latents": torch.randn(pipeline.decoder_input_shape(), generator=torch.Generator().manual_seed(seed + 1))}


def parse_components(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    for name in names:
        if name not in COMPONENTS:
            raise MvdError(
                f"components: unknown component {name!r}; known: {', '.join(COMPONENTS)}", parameter="components"
            )
    if not names or len(set(names)) != len(names):
        raise MvdError("components: name each component once", parameter="components")
    return names


def export_build(
    checkpoint: str | Path,
    *,
    out: str | Path,
    recipe: str | Path | None = None,
    components: list[str] | str | None = None,
    precision: str = "fp32",
    keep_conditioning_inputs: bool = False,
    taesd_dir: str | Path | None = None,
    decoder_seed: int = 0,
    min_psnr_db: float | None = None,
) -> Build:
    """Export ``checkpoint``'s deploy model into the new build directory ``out``: one ONNX model per
    component (``components``, default every one the passes make), validated against PyTorch (PSNR
    at least ``min_psnr_db``, default per ``precision``). ``recipe`` deploys the checkpoint at another
    video size, steps, conditioning or pass list; the other options are :func:`deploy_checkpoint`'s.
    Nothing is written unless every component passed."""
    if precision not in PRECISIONS:
        raise MvdError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}", parameter="precision")
    components = parse_components(components)
    out = check_output_dir(Path(out))
    threshold = MIN_PSNR_DB[precision] if min_psnr_db is None else min_psnr_db
    start = time.perf_counter()
    # The checkpoint's hashes (provenance, 8.9 GB at full size: ~6 s of a core) at idle priority beside the export.
    checkpoint_files = [Path(checkpoint) / f for f in (CONFIG_FILE, WEIGHTS_FILE, *ENCODER_WEIGHTS.values())]
    checkpoint_sha256 = BackgroundHashes([f for f in checkpoint_files if f.is_file()])

    deployment = deploy_checkpoint(
        checkpoint,
        keep_conditioning_inputs=keep_conditioning_inputs,
        taesd_dir=taesd_dir,
        decoder_seed=decoder_seed,
        recipe=recipe,
        # an encoder not exported is not read (the full-size CLIP encoder: 2.5 GB, ~4 s)
        without_weights=[n for n in ("image_encoder", "vae_encoder") if components and n not in components],
    )
    pipeline = deployment.pipeline
    available = list(pipeline.components())
    components = components or available
    for name in components:
        if name not in available:
            raise MvdError(
                f"components: {name!r} is not in this deployment (its passes make {', '.join(available)})",
                parameter="components",
            )
    manifest = _manifest(checkpoint, recipe, precision, deployment, taesd_dir=taesd_dir, decoder_seed=decoder_seed)
    # Inputs and FLOPs first: each component's PyTorch model is freed once it is exported.
    inputs = {name: component_inputs(pipeline, name) for name in components}
    counted = {r.component: r.flops_after for r in deployment.passes}  # as the last pass on each left it
    flops = {name: counted[name] if name in counted else pipeline.flops(name) for name in components}
    # Components not exported are freed now, not at exit: the UNet's ORT validation is the export's peak,
    # and a CLIP image encoder left beside it adds 2.5 GB (full size) to it.
    for name in available:
        if name not in components:
            setattr(pipeline, name, None)
    release_memory()
    with atomic_output_dir(out) as tmp, contextlib.ExitStack() as running:
        records, checks, written = {}, {}, []
        order = sorted(components, key=EXPORT_ORDER.index)
        for name in order:
            # the last (the UNet when it is exported) waits for the others' checks before its forward
            earlier = list(checks.values()) if name == order[-1] else []
            records[name], check = _export_component(
                pipeline, name, inputs[name], precision, threshold, tmp, earlier=earlier
            )
            checks[name] = running.enter_context(check)  # on an error: its run stopped, and waited for
            # hashed while the next component exports; save_manifest keeps an entry whose size and mtime match
            written.append(BackgroundHashes([tmp / f for f in (records[name]["onnx"], records[name]["data"]) if f]))
        for name in components:
            manifest["components"][name] = records[name] | {"validation": checks[name].result(), "flops": flops[name]}
        manifest["checkpoint_sha256"] = {name: entry["sha256"] for name, entry in checkpoint_sha256.result().items()}
        manifest["export_seconds"] = round(time.perf_counter() - start, 1)
        manifest["files"] = {name: entry for hashes in written for name, entry in hashes.result().items()}
        write_json(tmp / MANIFEST, manifest)
        Build(tmp).save_manifest()  # every file's sha256 and size
    return Build(out)


def _manifest(
    checkpoint: str | Path,
    recipe: str | Path | None,
    precision: str,
    deployment: Deployment,
    *,
    taesd_dir: str | Path | None,
    decoder_seed: int,
) -> dict:
    """The build manifest before any component is exported: where it came from, Table 8, the pass log,
    and what an app needs to run the components as a pipeline."""
    spec, pipeline = deployment.checkpoint.spec, deployment.pipeline
    return {
        "format": BUILD_FORMAT,
        "format_version": BUILD_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(checkpoint),
        "model": spec.name,
        "recipe": str(recipe) if recipe else None,
        "precision": precision,
        "conditioning": "inputs" if not pipeline.unet.conditioning_folded else "folded",
        # the 1-step sampler: folded into the UNet (its output is the clean latent), or the app's to run
        "sampler": "folded" if pipeline.unet.sampler is not None else "outside",
        # what an app needs to run the components as a pipeline (mvd_deploy.pipeline); None without encoders
        "pipeline": contract_of(pipeline).to_dict() if pipeline.image_encoder is not None else None,
        "decoder_source": {"taesd_dir": str(taesd_dir) if taesd_dir else None, "decoder_seed": decoder_seed},
        "video": spec.mobilevd.video.__dict__,
        "checkpoint_sha256": None,  # filled in when its hashes are done (beside the export)
        "recipe_sha256": hashlib.sha256(recipe_file(recipe).read_bytes()).hexdigest() if recipe else None,
        "stages": stage_table(spec),
        "passes": [r.to_dict() for r in deployment.passes],
        "components": {},
        "compiled": {},
        "toolchain": toolchain_versions(),
    }


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Cancelled(Exception):
    pass


class BackgroundReference(BackgroundTask):
    """A component's PyTorch reference outputs (fp32), computed on a daemon thread while the caller
    goes on; cancelled, the forward stops at its next module.

    The export runs it beside onnxscript's optimisation and the writing of the weights, which leave a
    core idle; the forward takes it (each op releases the GIL). Not beside the trace: torch's tracers
    patch ``torch.nn.Module.__call__`` for every thread while they run (tried: the full-size export of
    all four components failed in the decoder's trace, "module is not installed as a submodule").
    """

    thread_name = "reference"

    def __init__(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        self._module, self._inputs, self._cancelled = module, inputs, False
        self._hooks = [m.register_forward_pre_hook(self._stop_if_cancelled) for m in module.modules()]
        super().__init__()

    def _stop_if_cancelled(self, module, args) -> None:
        if self._cancelled:
            raise _Cancelled

    def run(self) -> np.ndarray | None:
        try:
            with torch.no_grad(), onednn_linear():  # grad mode and function modes are per thread
                return self._module(**self._inputs).numpy()
        except _Cancelled:
            return None
        finally:
            for hook in self._hooks:
                hook.remove()

    def cancel(self) -> None:
        self._cancelled = True


def _export_component(
    pipeline, name, inputs, precision: str, threshold: float, directory: Path, *, earlier: list[BackgroundValidation]
) -> tuple[dict, BackgroundValidation]:
    """Export, write, simplify and check one component; its record, and its validation under way.

    The ``earlier`` validations still running go on beside this one's trace (one core) and are waited
    for before its first forward, so that their ONNX Runtime sessions do not add to its memory; a
    failed one stops the export there."""
    cast = precision != "fp32"
    stages = Stages(5 if cast else 4, logger, name=f"export {name}")
    module = getattr(pipeline, name)
    path = directory / f"{name}.onnx"
    params = sum(p.numel() for p in module.parameters())
    if cast:  # Float32IO casts the module's weights in place: the fp32 reference comes first
        for check in earlier:
            check.result()
        with stages.stage("PyTorch reference outputs (fp32)"), torch.no_grad(), onednn_linear():
            reference = module(**inputs).numpy()
    with stages.stage(f"torch.onnx.export (dynamo, opset 18, {precision})"):
        exported = Float32IO(module, PRECISIONS[precision]) if cast else module
        model = trace_onnx(exported, inputs, OUTPUT_NAMES[name])
    for check in earlier:
        check.result()
    with stages.stage(
        "onnxscript optimisation, weights written" + ("" if cast else "; PyTorch reference outputs beside")
    ):
        if cast:
            write_onnx(model, path)
        else:
            with BackgroundReference(module, inputs) as forward:
                write_onnx(model, path)
                reference = forward.result()
        # The PyTorch model is no longer needed: free it before ONNX Runtime loads its own copy.
        setattr(pipeline, name, None)
        del module, exported, model
        release_memory()
    with stages.stage("simplify (onnxsim, weights detached) and onnx.checker"):
        nodes_before, nodes_after = simplify_onnx(path)
        check_onnx(path)
    record = {
        "onnx": path.name,
        "data": f"{name}.data" if (directory / f"{name}.data").exists() else None,
        **describe_io(path),
        "params": params,
        "nodes": {"exported": nodes_before, "simplified": nodes_after},
        "output_range": [float(np.min(reference)), float(np.max(reference))],
    }
    return record, BackgroundValidation(name, stages, path, inputs, reference, threshold)


class BackgroundValidation(BackgroundTask):
    """A component's ONNX Runtime CPU run compared with its PyTorch reference, on a daemon thread at
    idle priority while the export goes on (the next component's trace leaves a core idle); the
    stage's lines come from that thread. Cancelled, the run stops (``RunOptions.terminate``).
    :meth:`result`: the validation record, or ValidationFailed below ``threshold``."""

    thread_name = "validation"

    def __init__(self, name: str, stages: Stages, path: Path, inputs, reference: np.ndarray, threshold: float):
        import onnxruntime as ort

        self._name, self._stages, self._path = name, stages, path
        self._reference, self._threshold = reference, threshold
        self._feeds = {k: v.numpy() for k, v in inputs.items()}
        self._run_options = ort.RunOptions()
        super().__init__()

    def run(self) -> dict:
        at_idle_priority()  # before the session: its pool threads inherit it
        with self._stages.stage("ONNX Runtime CPU vs PyTorch (at idle priority, beside what follows)"):
            output = run_onnx(self._path, self._feeds, run_options=self._run_options)
        validation = compare(output, self._reference)
        validation |= {
            "min_psnr_db": self._threshold,
            "seed": VALIDATION_SEED,
            "reference": "PyTorch fp32 deploy model",
        }
        if not validation["psnr_db"] >= self._threshold:
            raise ValidationFailed(
                f"{self._name}: ONNX Runtime output is {validation['psnr_db']} dB PSNR against PyTorch, below the "
                f"{self._threshold} dB threshold (max abs error {validation['max_abs_error']:.3g}); nothing was written"
            )
        return validation

    def cancel(self) -> None:
        self._run_options.terminate = True


def format_build(manifest: dict, out) -> str:
    lines = [f"wrote {out} ({manifest['model']}, {manifest['precision']}, conditioning {manifest['conditioning']})"]
    for name, c in manifest["components"].items():
        shapes = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in c["inputs"])
        v = c["validation"]
        lines.append(
            f"  {name:<8} {c['onnx']:<13} {c['params']:>13,} params  {c['flops'] / 1e12:7.3f} TFLOPs  "
            f"nodes {c['nodes']['exported']}->{c['nodes']['simplified']}  "
            f"PSNR {v['psnr_db']} dB (min {v['min_psnr_db']})  inputs: {shapes}"
        )
    return "\n".join(lines)
