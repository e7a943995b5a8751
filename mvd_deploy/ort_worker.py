"""Profiles one ONNX model with ONNX Runtime CPU in its own process; prints one JSON object.

python -m mvd_deploy.ort_worker MODEL INPUTS.npz RUNS THREADS [--progress]

With --progress, a bar on stderr counts the warm-up and timed calls (seconds each at full size).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from mvd_deploy.metrics import latency_summary, peak_rss_mb

WARMUP = 2


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
    # it, ~3.9 GB beyond 0.81 GB of live tensors in the full-size UNet. Its arena (kept) serves later
    # tensors from freed chunks instead. Full-size UNet peak RSS / per call, ORT's defaults → arena off
    # → this (issue 13, this 2-core EPYC): fp32 11.76 → 7.65 → 5.80 GB, 30-35 → 29-33 → 27-28 s;
    # int8-static 10.66 → 5.73 → 3.46 GB, 10-29 (noisy) → 14-16 → 11-12 s. Prepacked weights stay on: without
    # them int8-static calls measured 18-20 s against 14-16 s (arena off).
    options.enable_mem_reuse = False
    # No memory pattern either: from the second call ORT would pre-allocate the first call's allocations
    # as one block beside the arena's chunks. Full-size UNet, peak RSS over 3 calls with it → without
    # (same per-call times, issue 13): fp32 5.21 → 4.41 GiB, int8-dynamic 4.41 → 3.61, int8-static 3.07 → 2.01.
    options.enable_mem_pattern = False
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


def main() -> None:
    model, inputs_path, runs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bar = tqdm(
        total=WARMUP + runs, desc=f"  {Path(model).stem} calls", unit="call", disable="--progress" not in sys.argv
    )
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
    result = {
        "latency_ms": latency_summary(latencies),
        "load_ms": {"first": round(load_ms, 1), "warm": round(warm_load_ms, 1)},
        "peak_memory_mb": round(peak_mb, 1),
        "compute_units": {"CPU": len(nodes)},
        "node_ms": nodes,  # the parent names them by module and ranks them (it has the exported graph)
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
