"""Profiles one ONNX model with ONNX Runtime CPU in its own process; prints one JSON object.

python -m mvd_deploy.backends.ort_worker MODEL INPUTS.npz RUNS THREADS [--progress]

With --progress, a bar on stderr counts the warm-up and timed calls (seconds each at full size).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from mvd_deploy.metrics import latency_summary, top_ops

WARMUP = 2


def _session(model: str, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # The compiled model is already optimised offline; do not optimise it again at load.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _top_ops(trace_path: str, total_ms: float) -> tuple[list[dict], dict[str, int]]:
    events = json.loads(Path(trace_path).read_text())
    per_node: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        entry = per_node.setdefault(name, {"name": name, "op_type": event["args"].get("op_name", "?"), "us": 0})
        entry["us"] += event["dur"]
    top = top_ops(((e["name"], e["op_type"], e["us"] / 1000) for e in per_node.values()), total_ms)
    by_type: dict[str, int] = defaultdict(int)
    for e in per_node.values():
        by_type[e["op_type"]] += 1
    return top, dict(by_type)


def main() -> None:
    model, inputs_path, runs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bar = tqdm(
        total=WARMUP + runs, desc=f"  {Path(model).stem} calls", unit="call", disable="--progress" not in sys.argv
    )
    inputs = dict(np.load(inputs_path))
    start = time.perf_counter()
    session = _session(model, threads)
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
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del session
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        profiled = _session(model, threads, profile_prefix=str(Path(tmp) / "ort"))
        warm_load_ms = (time.perf_counter() - start) * 1000
        profiled.run(None, inputs)
        top, nodes_by_type = _top_ops(profiled.end_profiling(), float(np.median(latencies)))
    result = {
        "latency_ms": latency_summary(latencies),
        "load_ms": {"first": round(load_ms, 1), "warm": round(warm_load_ms, 1)},
        "peak_memory_mb": round(peak_mb, 1),
        "compute_units": {"CPU": sum(nodes_by_type.values())},
        "top_ops": top,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
