"""PyTorch eager fp32 time per UNet call of the deployed model, and this CPU's fp32 GEMM rate.

python bench/eager.py CHECKPOINT RUNS  → one JSON object on stdout
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from mvd_deploy.backends.ort_cpu import gemm_gflops as ort_gemm_gflops
from mvd_deploy.deploy import deploy_checkpoint


def gemm_gflops(n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """fp32 GEMM rate of this CPU through PyTorch (MKL) and ONNX Runtime (MLAS): their peak is the
    reference (MKL takes slower paths on AMD CPUs, so one library alone can understate the CPU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    torch_rate = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
    ort_rate = ort_gemm_gflops(os.cpu_count(), n=n, repeats=repeats)
    return {"torch_mkl": torch_rate, "onnxruntime_mlas": ort_rate, "peak": max(torch_rate, ort_rate)}


def main() -> None:
    checkpoint, runs = sys.argv[1], int(sys.argv[2])
    pipeline = deploy_checkpoint(
        checkpoint,
        passes=["merge_funnels", "strip_temporal", "single_token_cross_attention", "fold_conditioning"],
        check=False,
    ).pipeline
    unet = pipeline.unet
    inputs = unet.example_inputs()
    times = []
    with torch.no_grad():
        unet(**inputs)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            unet(**inputs)
            times.append((time.perf_counter() - start) * 1000)
    del pipeline, unet
    rates = gemm_gflops()
    print(
        json.dumps(
            {
                "eager_ms": sorted(times),
                "gemm_gflops": rates["peak"],
                "gemm_rates": rates,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
