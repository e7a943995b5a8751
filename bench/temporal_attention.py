"""One full-size temporal self-attention block, as SDPA and as broadcast multiply-and-sum
(``broadcast_temporal_attention``): Snapdragon HTP w8a16 compile time and ONNX Runtime CPU fp32 time.

    python bench/temporal_attention.py [--pixels 2048] [--frames 14] [--runs 5]

The shape is MobileVD's first UNet level at 512x256 (32x64 latent pixels, 14 frames, 320 channels, 5 heads
of 64). diffusers' ``Attention`` with random weights, its stock AttnProcessor2_0 against ours; each is
exported with torch.onnx, timed on ORT CPU, quantised w8a16 (one random calibration sample: the compile
time does not depend on the ranges) and compiled for SM8650 (Snapdragon 8 Gen 3) by onnxruntime-qnn.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mvd_deploy.backends import qnn_offline  # noqa: E402
from mvd_deploy.calibration import calibration_reader  # noqa: E402
from mvd_deploy.device_profiles import resolve_target  # noqa: E402
from mvd_deploy.passes.broadcast_temporal_attention import BroadcastSelfAttnProcessor  # noqa: E402


def measure(processor, pixels: int, frames: int, runs: int, work: Path) -> dict:
    import onnxruntime

    torch.manual_seed(0)
    attn = Attention(query_dim=320, heads=5, dim_head=64).eval()
    attn.set_processor(processor)
    x = torch.randn(pixels, frames, 320)
    path = work / "attention.onnx"
    with torch.no_grad():
        torch.onnx.export(attn, (x,), str(path), input_names=["hidden_states"], dynamo=True, opset_version=18)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"hidden_states": x.numpy()}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    ort_ms = (time.perf_counter() - start) / runs * 1000
    rng = np.random.default_rng(0)
    reader = calibration_reader([0], lambda _: {"hidden_states": rng.standard_normal(x.shape, np.float32)})
    qnn_offline.quantize_w8a16(path, work / "qdq.onnx", reader, work)
    chipset = resolve_target("xiaomi-14-pro").chipset
    start = time.perf_counter()
    qnn_offline.compile_graph(work / "qdq.onnx", work / "ctx.onnx", chipset, type(processor).__name__)
    return {"ort_cpu_fp32_ms": round(ort_ms, 1), "htp_w8a16_compile_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for processor in (BroadcastSelfAttnProcessor(), AttnProcessor2_0()):
        with tempfile.TemporaryDirectory() as work:
            results[type(processor).__name__] = measure(processor, args.pixels, args.frames, args.runs, Path(work))
        print(type(processor).__name__, results[type(processor).__name__], flush=True)
    print(json.dumps({"pixels": args.pixels, "frames": args.frames, **results}))


if __name__ == "__main__":
    main()
