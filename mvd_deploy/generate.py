"""``mvd-deploy generate``: image → video from a build's compiled artifacts.

The image is checked first (missing, unreadable, an unsupported mode or too small: one line, exit 2,
nothing written); then the four components of the chosen compiled form run one at a time, in the
steps of mvd_deploy.pipeline — ort-cpu forms with ONNX Runtime on the CPU (each component in a worker
process, mvd_deploy.ort_worker, as ``profile`` measures it), offline QNN forms
(``offline``) as their QNN context binaries on the HTP emulator for the profile's SoC, AI Hub forms as
inference jobs on the compile's phone; the MP4 (imageio's bundled ffmpeg, through diffusers'
``export_to_video``), an animated GIF preview and optionally the frames as PNGs are written into a
staging directory beside ``--out`` and moved into place only once all of them are complete.
``--reference`` also runs the checkpoint's PyTorch model (train-time form, with the build's decoder)
on the same inputs and reports the video's PSNR against it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from diffusers.utils import export_to_video

from mvd_deploy.backends.qai_hub import QaiHubBackend
from mvd_deploy.backends.qnn_offline import (
    QnnOfflineBackend,
    native_output,
    offline_form,
    qnn_runtime,
    require_chipset,
    session_options,
)
from mvd_deploy.build import Build
from mvd_deploy.deploy import deploy_checkpoint
from mvd_deploy.device_profiles import Chipset, resolve_target
from mvd_deploy.errors import MvdError
from mvd_deploy.metrics import peak_rss_mb
from mvd_deploy.ort_worker import run_worker
from mvd_deploy.pipeline import PipelineContract, load_image, make_inputs, run_pipeline, run_reference
from mvd_deploy.progress import Stages

logger = logging.getLogger(__name__)

COMPONENTS = ("image_encoder", "vae_encoder", "unet", "decoder")
RUNS_ON = {  # per backend, filled from the compiled record
    "qnn-offline": "QNN HTP emulator for {chipset[name]} on this CPU (times are the emulator's, not the phone's)",
    "qai-hub": (
        "{device[name]} on Qualcomm AI Hub, as inference jobs (times are job round trips: upload, queue, run, "
        "download; `mvd-deploy profile` measures latency)"
    ),
}


def _check_out(out: Path, frames_dir: Path | None) -> None:
    if out.suffix.lower() != ".mp4":
        raise MvdError(f"--out {out}: must name an .mp4 file")
    if not out.parent.is_dir():
        raise MvdError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise MvdError(f"--out {out}: is a directory")
    if frames_dir is not None and frames_dir.exists() and (not frames_dir.is_dir() or any(frames_dir.iterdir())):
        raise MvdError(f"--frames {frames_dir}: exists and is not an empty directory")


def compiled_form(build: Build, target: str, form: str | None, offline: bool = False) -> tuple[str, dict]:
    """The compiled record to run: ``target``'s own form unless ``form`` is given (a phone target's:
    compiled on AI Hub); ``offline``: its offline QNN compile."""
    profile = resolve_target(target)
    if offline:
        require_chipset(profile)
        key = f"{profile.name}/{offline_form(QnnOfflineBackend().precision(profile, form))}"
        how = f"mvd-deploy compile {build.path} --target {target} --offline"
    else:
        # ort-cpu keys its forms by backend (one CPU target), phone backends by profile name
        key = f"{profile.backend if profile.backend == 'ort-cpu' else profile.name}/{form or profile.form}"
        how = f"mvd-deploy compile {build.path} --target {target}"
    record = build.compiled(key, how=how)
    missing = [name for name in COMPONENTS if name not in record["components"]]
    if missing:
        raise MvdError(
            f"{build.path}: compiled form {key} has no {', '.join(missing)}; export a checkpoint with encoders "
            "(its recipe's image_encoder and vae sections) and all four components"
        )
    return key, record


def ort_runner(build: Build, record: dict, seconds: dict[str, dict[str, float]]):
    """Run a component with its compiled ONNX model in a worker process, as ``profile`` measures it
    (mvd_deploy.ort_worker): one session at a time, its memory returned when the worker exits, so the
    peak is the largest component's, not the sum. ``seconds``: load, run and the worker's peak RSS."""
    directory = build.path / record["directory"]

    def run(name: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        model = directory / record["components"][name]["onnx"]
        with tempfile.TemporaryDirectory(prefix="mvd-generate-") as tmp:
            inputs, output = Path(tmp) / "inputs.npz", Path(tmp) / "output.npy"
            np.savez(inputs, **{k: v.numpy().astype(np.float32) for k, v in feeds.items()})
            report = run_worker(["run", str(model), str(inputs), str(output)], failure=f"{model}: ONNX Runtime failed")
            result = torch.from_numpy(np.load(output))
        seconds[name] = {"load": report["load_s"], "run": report["run_s"], "peak_rss_mb": report["peak_memory_mb"]}
        return result

    return run


def qnn_emulator_runner(build: Build, record: dict, seconds: dict[str, dict[str, float]]):
    """Run a component with its offline QNN context binaries (its parts in order, each fed the inputs
    and earlier parts' outputs by name) on the HTP emulator for the record's SoC, CPU fallback
    disabled. Its times are the emulator's on this CPU, not the phone's."""
    ort, _ = qnn_runtime()
    directory = build.path / record["directory"]
    chipset = Chipset(**record["chipset"])  # the SoC it was compiled for

    def run(name: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        graphs = record["components"][name]["graphs"]
        start = time.perf_counter()
        with native_output():  # QNN's log lines go to fds 1 and 2
            sessions = [ort.InferenceSession(str(directory / g["file"]), session_options(chipset)) for g in graphs]
        loaded = time.perf_counter()
        available = {k: v.numpy() for k, v in feeds.items()}
        for session in sessions:
            part_feed = {i.name: available[i.name].astype(_NUMPY[i.type]) for i in session.get_inputs()}
            names = [o.name for o in session.get_outputs()]
            available.update(zip(names, session.run(names, part_feed), strict=True))
        seconds[name] = {"load": loaded - start, "run": time.perf_counter() - loaded}
        output = build.components[name]["outputs"][0]["name"]
        return torch.from_numpy(available[output].astype(np.float32))

    return run


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def video_psnr_db(frames: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of two videos in [0, 1] (peak 1), over every frame and pixel."""
    mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(1, F, 3, H, W) in [0, 1] → (F, H, W, 3) uint8."""
    return (frames[0].permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, fps: int, out: Path, frames_dir: Path | None) -> dict[str, str]:
    """The MP4, a GIF preview beside it and optionally one PNG per frame, all or none."""
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    written = {}
    try:
        export_to_video([f for f in frames], str(staged / "video.mp4"), fps=fps)
        iio.imwrite(staged / "preview.gif", frames, extension=".gif", duration=1000 / fps, loop=0)
        if frames_dir is not None:
            (staged / "frames").mkdir()
            for i, frame in enumerate(frames):
                iio.imwrite(staged / "frames" / f"frame_{i:03d}.png", frame)
        preview = out.with_suffix(".gif")
        os.replace(staged / "video.mp4", out)
        os.replace(staged / "preview.gif", preview)
        written = {"video": str(out), "preview": str(preview)}
        if frames_dir is not None:
            if frames_dir.exists():
                frames_dir.rmdir()
            os.replace(staged / "frames", frames_dir)
            written["frames"] = str(frames_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return written


def generate_video(
    build_dir: str | Path,
    *,
    image: str | Path,
    out: str | Path,
    target: str = "ort-cpu",
    form: str | None = None,
    offline: bool = False,
    seed: int = 0,
    reference: bool = False,
    frames_dir: str | Path | None = None,
) -> dict:
    """Image → MP4 from a build's compiled form (``offline``: the target's offline QNN compile, run on
    the HTP emulator); returns what was written and the timings."""
    out, frames_dir = Path(out), Path(frames_dir) if frames_dir else None
    picture = load_image(image)  # bad input is refused before anything else
    _check_out(out, frames_dir)
    build = Build(build_dir)
    key, record = compiled_form(build, target, form, offline)
    if not build.manifest.get("pipeline"):
        raise MvdError(f"{build.path / 'build.json'}: key 'pipeline' is missing (exported without encoders)")
    contract = PipelineContract.from_dict(build.manifest["pipeline"])
    stages = Stages(4 if reference else 3, logger, name="generate")
    with stages.stage(f"preprocess {image} (seed {seed})"):
        inputs = make_inputs(picture, contract, seed)
    seconds: dict[str, dict[str, float]] = {}
    backend = record.get("backend", "ort-cpu")
    with stages.stage(f"run the four components ({key})"):
        if backend == "qai-hub":
            runner = QaiHubBackend().inference_runner(build, resolve_target(target), record, seconds)
        elif backend == "qnn-offline":
            runner = qnn_emulator_runner(build, record, seconds)
        else:
            runner = ort_runner(build, record, seconds)
        result = run_pipeline(runner, inputs, contract)
    # the deployed pipeline's own peak, before the PyTorch reference (if any) loads the checkpoint
    pipeline_peak_mb = peak_rss_mb()
    frames = to_uint8(result.frames)
    report = {
        "build": str(build.path),
        "compiled": key,
        "runs_on": RUNS_ON.get(backend, "ONNX Runtime CPU").format(**record),
        "image": str(image),
        "seed": seed,
        "frames": contract.frames,
        "size": [contract.width, contract.height],
        "fps": contract.fps,
        # per component: its call (latency) and its session's creation (model load), in order
        "seconds": {name: round(s["run"], 3) for name, s in seconds.items()},
        "load_seconds": {name: round(s["load"], 3) for name, s in seconds.items()},
        "total_seconds": round(sum(s["run"] for s in seconds.values()), 3),
        "total_with_load_seconds": round(sum(s["run"] + s["load"] for s in seconds.values()), 3),
    }
    if any("peak_rss_mb" in s for s in seconds.values()):  # ort-cpu: each component's own worker process
        report["component_peak_rss_mb"] = {name: s["peak_rss_mb"] for name, s in seconds.items()}
    if reference:
        with stages.stage("PyTorch reference pipeline on the same inputs"):
            report["reference"] = _reference(build, inputs, result)
    with stages.stage(f"write {out}"):
        report["written"] = write_video(frames, contract.fps, out, frames_dir)
    report["peak_rss_mb"] = round(pipeline_peak_mb, 1)
    if reference:
        report["reference"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return report


def _reference(build: Build, inputs, result) -> dict:
    """The checkpoint's train-time PyTorch model (funnels, gates, conditioning and sampler as the
    scheduler runs them: no exact pass applied) with the build's own TAESD decoder."""
    manifest = build.manifest
    source = manifest.get("decoder_source") or {}
    decoder = [p["name"] for p in manifest["passes"] if p["component"] == "decoder"]
    pipeline = deploy_checkpoint(
        manifest["checkpoint"],
        passes=decoder,
        taesd_dir=source.get("taesd_dir"),
        decoder_seed=source.get("decoder_seed", 0),
        check=False,
        recipe=manifest.get("recipe"),
    ).pipeline
    start = time.perf_counter()
    expected = run_reference(pipeline, inputs)
    seconds = time.perf_counter() - start
    psnr = video_psnr_db(result.frames.numpy(), expected.frames.numpy())
    latent_error = float((result.latents - expected.latents).abs().max() / expected.latents.abs().max())
    return {
        "psnr_db": round(psnr, 2) if math.isfinite(psnr) else None,  # None: identical
        "latents_rel_error": latent_error,
        "seconds": round(seconds, 3),
    }


def format_generate(r: dict) -> str:
    lines = [f"wrote {r['written']['video']} ({r['frames']} frames, {r['size'][0]}x{r['size'][1]}, {r['fps']} fps)"]
    lines.append(f"  {r['compiled']} on {r['runs_on']}")
    lines.append(
        f"  preview {r['written']['preview']}"
        + (f", frames {r['written']['frames']}" if "frames" in r["written"] else "")
    )
    for name, seconds in r["seconds"].items():
        lines.append(f"  {name:<14} {seconds * 1000:10.1f} ms   (load {r['load_seconds'][name] * 1000:.1f} ms)")
    lines.append(
        f"  {'total':<14} {r['total_seconds'] * 1000:10.1f} ms   (with loads {r['total_with_load_seconds']:.1f} s)  "
        f"peak RSS {r['peak_rss_mb']:.0f} MB"
        + (f" (its workers: {max(r['component_peak_rss_mb'].values()):.0f} MB)" if "component_peak_rss_mb" in r else "")
    )
    if "reference" in r:
        lines.append(f"  video PSNR against the PyTorch reference: {r['reference']['psnr_db']} dB")
    return "\n".join(lines)
