"""ONNX Runtime CPU sessions on compiled models, each in its own worker process; prints one JSON object.

python -m mvd_deploy.ort_worker profile MODEL INPUTS.npz RUNS THREADS [--progress]
python -m mvd_deploy.ort_worker run MODEL INPUTS.npz OUTPUT.npy

``profile`` times RUNS calls after warm-up and profiles one more (with --progress, a bar on stderr
counts the calls: seconds each at full size); ``run`` makes one call and saves its first output.
Both report the worker's own peak memory. Workers start with ``worker_env()``: glibc then returns
large tensors to the kernel when they are freed, and the session runs without ONNX Runtime's arena
(``compiled_session``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from mvd_deploy.errors import MvdError
from mvd_deploy.metrics import latency_summary, peak_rss_mb

WARMUP = 2
# glibc serves blocks of 1 MiB and more by mmap, each unmapped when freed, in transparent huge pages.
# It reads its tunables once, at start: a worker's environment, not a setting made at run time.
ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """glibc 2.35 or later (its ``hugetlb`` tunable) and the kernel's transparent huge pages not off.
    Without huge pages, every freed block's pages come back as page faults on the next call: the
    full-size int8-static UNet took 8.5-9.1 s per call instead of 5.4-5.7 (issue 13)."""
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        thp = THP_SETTING.read_text()
    except (AttributeError, ValueError, OSError):  # not glibc, or no THP in this kernel
        return False
    return libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35) and "[never]" not in thp


def worker_env() -> dict[str, str]:
    """The environment a worker starts with: ours, plus ALLOCATOR_TUNABLES where huge pages work."""
    env = dict(os.environ)
    if huge_pages_available() and ALLOCATOR_TUNABLES not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), ALLOCATOR_TUNABLES]))
    return env


def allocator() -> str:
    """``glibc-mmap`` where this process started with ALLOCATOR_TUNABLES, else ``arena``."""
    return "glibc-mmap" if ALLOCATOR_TUNABLES in os.environ.get("GLIBC_TUNABLES", "") else "arena"


def run_worker(args: list[str], *, failure: str, quiet: bool = True) -> dict:
    """``python -m mvd_deploy.ort_worker ARGS`` in worker_env(); its JSON report. ``quiet``: its stderr
    is kept for the error line, else it goes straight to the terminal (a progress bar, any error)."""
    command = [sys.executable, "-m", "mvd_deploy.ort_worker", *args]
    proc = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None, text=True, env=worker_env()
    )
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}; its error is above"]
        raise MvdError(f"{failure} ({last[0]})")
    return json.loads(proc.stdout)


def compiled_session(model: str, threads: int | None = None, profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session on an ort-cpu compiled model as the deployed pipeline runs it (``generate``, and the
    profile here, so the profile measures what runs)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # The compiled model is already optimised offline; do not optimise it again at load.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # No buffer-reuse plan: ORT keeps a freed buffer allocated until a later tensor of its size takes
    # it, ~3.9 GB beyond 0.81 GB of live tensors in the full-size UNet. Its arena (or glibc, below) serves
    # later tensors from freed chunks instead. Full-size UNet peak RSS / per call, ORT's defaults → arena off
    # → this (issue 13, this 2-core EPYC): fp32 11.76 → 7.65 → 5.80 GB, 30-35 → 29-33 → 27-28 s;
    # int8-static 10.66 → 5.73 → 3.46 GB, 10-29 (noisy) → 14-16 → 11-12 s. Prepacked weights stay on: without
    # them int8-static calls measured 18-20 s against 14-16 s (arena off).
    options.enable_mem_reuse = False
    # No memory pattern either: from the second call ORT would pre-allocate the first call's allocations
    # as one block beside the arena's chunks. Full-size UNet, peak RSS over 3 calls with it → without
    # (same per-call times, issue 13): fp32 5.21 → 4.41 GiB, int8-dynamic 4.41 → 3.61, int8-static 3.07 → 2.01.
    options.enable_mem_pattern = False
    # The arena keeps every page a call has touched, so the peak follows where its chunks land, not the
    # live tensors: the full-size int8-static UNet peaked at 1345 MiB (1.53x its weights) with it, 1294-
    # 1307 without it where glibc unmaps freed blocks (ALLOCATOR_TUNABLES), at 5.4-5.6 s per call
    # against 4.2-4.4 (eager 19.7 s); fp32 4025 → 3925 MiB, int8-dynamic 3021 → 2923 (issue 13).
    # Without those tunables glibc keeps freed blocks too, and the arena is the faster of the two.
    options.enable_cpu_mem_arena = allocator() == "arena"
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _node_times(trace_path: str) -> list[tuple[str, str, float]]:
    """(node name, op type, ms) of every node in one profiled call, in execution order."""
    events = json.loads(Path(trace_path).read_text())
    per_node: dict[str, list] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        per_node.setdefault(name, [name, event["args"].get("op_name", "?"), 0.0])[2] += event["dur"] / 1000
    return [tuple(entry) for entry in per_node.values()]


def profile(model: str, inputs_path: str, runs: int, threads: int, progress: bool) -> dict:
    """Load time, RUNS timed calls after WARMUP, peak memory, then one call under ORT's profiler."""
    bar = tqdm(total=WARMUP + runs, desc=f"  {Path(model).stem} calls", unit="call", disable=not progress)
    inputs = dict(np.load(inputs_path))
    start = time.perf_counter()
    session = compiled_session(model, threads)
    load_ms = (time.perf_counter() - start) * 1000
    for _ in range(WARMUP):
        session.run(None, inputs)
        bar.update()
    latencies = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, inputs)
        latencies.append((time.perf_counter() - start) * 1000)
        bar.update()
    bar.close()
    peak_mb = peak_rss_mb()
    del session
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        profiled = compiled_session(model, threads, profile_prefix=str(Path(tmp) / "ort"))
        warm_load_ms = (time.perf_counter() - start) * 1000
        profiled.run(None, inputs)
        nodes = _node_times(profiled.end_profiling())
    return {
        "latency_ms": latency_summary(latencies),
        "load_ms": {"first": round(load_ms, 1), "warm": round(warm_load_ms, 1)},
        "peak_memory_mb": round(peak_mb, 1),
        "allocator": allocator(),
        "compute_units": {"CPU": len(nodes)},
        "node_ms": nodes,  # the parent names them by module and ranks them (it has the exported graph)
    }


def run(model: str, inputs_path: str, output_path: str) -> dict:
    """One call on the inputs the model takes (of those given); its first output saved to OUTPUT."""
    inputs = dict(np.load(inputs_path))
    start = time.perf_counter()
    session = compiled_session(model)
    loaded = time.perf_counter()
    feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
    np.save(output_path, session.run(None, feeds)[0])
    return {
        "load_s": loaded - start,
        "run_s": time.perf_counter() - loaded,
        "peak_memory_mb": round(peak_rss_mb(), 1),
        "allocator": allocator(),
    }


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "profile":
        result = profile(args[0], args[1], int(args[2]), int(args[3]), progress="--progress" in args)
    else:
        result = run(*args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
