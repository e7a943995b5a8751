"""PyTorch eager fp32 time per UNet call of the deployed model, and this CPU's fp32 GEMM rate.

python bench/eager.py CHECKPOINT RUNS  → one JSON object on stdout
"""

from __future__ import annotations

import json
import sys
import time

import torch

from mvd_deploy.deploy import deploy


def gemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    checkpoint, runs = sys.argv[1], int(sys.argv[2])
    pipeline, _, _ = deploy(
        checkpoint,
        passes=["merge_funnels", "strip_temporal", "single_token_cross_attention", "fold_conditioning"],
        check=False,
        quiet=True,
    )
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
    print(json.dumps({"eager_ms": sorted(times), "gemm_gflops": gemm_gflops(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
