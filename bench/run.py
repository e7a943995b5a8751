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


def bench_init_checkpoint() -> dict:
    out = Path(tempfile.mkdtemp(prefix="mvd-bench-")) / "mobilevd-ckpt"
    try:
        run = measure(["init-checkpoint", "--model", "models/mobilevd.yaml", "--out", str(out), "--json"])
        weight_bytes = (out / "unet.safetensors").stat().st_size
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "case": "init-checkpoint models/mobilevd.yaml",
        "wall_s": run["wall_s"],
        "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 2),
        "weight_gb": round(weight_bytes / 1e9, 2),
        "peak_over_weights": round(run["peak_rss_bytes"] / weight_bytes, 2),
        "goal": "< 120 s, peak < 2.0x weights",
    }


def main() -> None:
    rows = bench_inspect() + [bench_init_checkpoint()]
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items() if v is not None))


if __name__ == "__main__":
    main()
