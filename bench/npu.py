"""The phone path offline at full size: the UNet split into HTP parts, one part compiled for SM8650.

python bench/npu.py BUILD → one JSON object on stdout. Each step runs here, measured: the split for
the xiaomi-14-pro profile at w8a16 (time, parts, chained PSNR against the whole) and the float16 QNN
HTP compile of the first part (time, context size; this process's peak RSS covers both). w8a16 is
not compiled: ONNX Runtime's calibration of a full-size part does not fit 24 GB (docs/qnn-offline.md).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from mvd_deploy.backends.qnn_offline import compile_graph, read_compiled
from mvd_deploy.build import Build
from mvd_deploy.device_profiles import resolve_target
from mvd_deploy.parts import split_for_targets


def main() -> None:
    build = Build(sys.argv[1])
    target = resolve_target("xiaomi-14-pro")
    start = time.perf_counter()
    split_for_targets(build, [(target, "w8a16")])
    split_s = time.perf_counter() - start
    parts = build.manifest["components"]["unet"].get("parts", {})
    first = build.graphs("unet")[0]
    with tempfile.TemporaryDirectory(dir=build.path) as tmp:
        out = Path(tmp) / f"{first.name}.onnx"
        start = time.perf_counter()
        compile_graph(first.onnx, out, target.chipset, f"{first.name} (bench)")
        compile_s = time.perf_counter() - start
        compiled = read_compiled(out, target.chipset, first.name)
        context_bytes = (out.parent / compiled["context_binary"]).stat().st_size
    print(
        json.dumps(
            {
                "split_s": round(split_s, 1),
                "parts": [
                    {"name": g["name"], "weight_elements": g["weight_elements"], "crossing_bytes": g["crossing_bytes"]}
                    for g in parts.get("graphs", [])
                ],
                "chain_psnr_db": parts.get("chain_validation", {}).get("psnr_db"),
                "float16_first_part": {
                    "name": first.name,
                    "compile_s": round(compile_s, 1),
                    "context_bytes": context_bytes,
                },
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
