"""What the Snapdragon HTP (Hexagon NPU) allows, shared by the offline QNN backend and AI Hub.

One HTP context is limited to ~2 GB (the NPU is a 32-bit co-processor; AI Hub's compiler says "graph
requires estimated allocation of 2347229 KB, limit is 2097152 KB"). A graph whose weights alone, at
the compiled precision, exceed the limit cannot compile: we refuse it before compiling or uploading.
"""

from __future__ import annotations

from pathlib import Path

from mvd_deploy.errors import MvdError

# Bytes per weight element in the compiled context, per precision (forms of the phone targets).
WEIGHT_BYTES = {"w8a16": 1, "float16": 2}
# A part's weights may use this share of the context limit: activations and the runtime need the rest.
PART_WEIGHT_SHARE = 0.5


def weight_elements(onnx_path: Path) -> int:
    """Elements of the model's floating-point initializers (its weights), from the graph alone."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in floating:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count
    return total


def weight_bytes(onnx_path: Path, precision: str) -> int:
    """The weights' bytes once compiled at ``precision`` (w8a16: one byte each; float16: two)."""
    if precision not in WEIGHT_BYTES:
        raise MvdError(f"precision: must be one of {', '.join(WEIGHT_BYTES)}, got {precision!r}")
    return weight_elements(onnx_path) * WEIGHT_BYTES[precision]


def check_fits(graphs, precision: str, limit_mb: float, where: str) -> dict[str, int]:
    """Refuse (one line naming the graph, its bytes and the limit) when a graph's weights alone, at
    ``precision``, exceed one HTP context; returns {graph name: weight bytes}."""
    limit = int(limit_mb * 2**20)
    sizes = {}
    for graph in graphs:
        sizes[graph.name] = weight_bytes(graph.onnx, precision)
        if sizes[graph.name] > limit:
            raise MvdError(
                f"{where}: {graph.name} cannot fit one HTP context: its weights alone are "
                f"{sizes[graph.name]:,} bytes at {precision}, the limit is {limit:,} bytes ({limit_mb:g} MB); "
                "split it into more parts or compile at a smaller precision"
            )
    return sizes
