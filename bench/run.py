"""mvd-deploy benchmarks (``make bench``): full-size figures, measured on this machine.

Each case runs the real CLI in its own process; wall time and that process's peak RSS (wait4) are
recorded. Results go to bench/results/latest.json and a table on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mvd_deploy"]
# Paper (arXiv 2412.07583) Table 8, TFLOPs per UNet call at 512x256.
PAPER_TFLOPS = {"svd": 8.60}


def measure(args: list[str]) -> dict:
    """Run ``mvd-deploy ARGS``; wall seconds, peak RSS (bytes) and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(CLI + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: mvd-deploy {' '.join(args)} failed")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": stdout}


def bench_inspect() -> list[dict]:
    rows = []
    for recipe in ("svd", "mobilevd", "mobilevd-hd"):
        run = measure(["inspect", f"models/{recipe}.yaml", "--json"])
        report = json.loads(run["stdout"])
        rows.append(
            {
                "case": f"inspect models/{recipe}.yaml",
                "wall_s": run["wall_s"],
                "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 2),
                "params": report["params"],
                "tflops": round(report["tflops"], 3),
                "paper_tflops": PAPER_TFLOPS.get(recipe),
            }
        )
    return rows


def bench_stages() -> list[dict]:
    rows = []
    for recipe in ("mobilevd", "mobilevd-hd"):
        run = measure(["inspect", f"models/{recipe}.yaml", "--stages", "--json"])
        for row in json.loads(run["stdout"]):
            rows.append(
                {
                    "case": f"stages models/{recipe}.yaml",
                    "stage": row["stage"],
                    "tflops": round(row["tflops"], 3),
                    "paper_tflops": row["paper_tflops"],
                    "delta_pct": None if row["delta_pct"] is None else round(row["delta_pct"], 1),
                    "params": row["params"],
                }
            )
        rows.append({"case": f"inspect --stages models/{recipe}.yaml", "wall_s": run["wall_s"]})
    return rows


def bench_checkpoint_and_passes() -> list[dict]:
    """init-checkpoint (full-size mobilevd), then all deploy passes on that checkpoint."""
    out = Path(tempfile.mkdtemp(prefix="mvd-bench-")) / "mobilevd-ckpt"
    try:
        init = measure(["init-checkpoint", "--model", "models/mobilevd.yaml", "--out", str(out), "--json"])
        weight_bytes = (out / "unet.safetensors").stat().st_size
        passes = measure(["passes", str(out), "--json"])
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    rows = []
    for case, run, goal_s, goal_ratio in (
        ("init-checkpoint models/mobilevd.yaml", init, 120, 2.0),
        ("passes (all 5, checked) on the mobilevd checkpoint", passes, 60, 1.3),
    ):
        rows.append(
            {
                "case": case,
                "wall_s": run["wall_s"],
                "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 2),
                "weight_gb": round(weight_bytes / 1e9, 2),
                "peak_over_weights": round(run["peak_rss_bytes"] / weight_bytes, 2),
                "goal": f"< {goal_s} s, peak < {goal_ratio}x weights",
            }
        )
    for r in json.loads(passes["stdout"]):
        rows.append(
            {
                "case": f"pass {r['name']}",
                "gflops": f"{r['flops_before'] / 1e9:.1f} -> {r['flops_after'] / 1e9:.1f}",
                "params": f"{r['params_before']} -> {r['params_after']}",
                "rel_error": r["rel_error"],
            }
        )
    return rows


def main() -> None:
    rows = bench_inspect() + bench_stages() + bench_checkpoint_and_passes()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items() if v is not None))


if __name__ == "__main__":
    main()
