"""The figures every stage and backend reports, computed one way: PSNR against a reference,
conditioning sensitivity, a latency summary, the slowest ops. Needs numpy only (the profiling
worker process imports it)."""

from __future__ import annotations

import math
import resource
from collections.abc import Callable, Iterable

import numpy as np

from mvd_deploy.errors import ValidationFailed

PSNR_IDENTICAL_DB = 200.0  # reported for bit-identical outputs (keeps JSON finite)
TOP_OPS = 10


def psnr_db(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of ``output`` against ``reference``, peak = the reference's range (max − min)."""
    output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    mse = float(np.mean((output - reference) ** 2))
    peak = float(reference.max() - reference.min())
    if not math.isfinite(mse):
        return -math.inf
    if mse == 0.0 or peak == 0.0:
        return PSNR_IDENTICAL_DB if mse == 0.0 else -math.inf
    return min(10 * math.log10(peak**2 / mse), PSNR_IDENTICAL_DB)


def compare(output: np.ndarray, reference: np.ndarray) -> dict:
    return {
        "psnr_db": round(psnr_db(output, reference), 2),
        "max_abs_error": float(np.max(np.abs(np.asarray(output, np.float64) - reference))),
    }


def require_psnr(check: dict, *, where: str, consequence: str, emulated: bool = False) -> None:
    """The PSNR gate of a compiled form: ``check`` (``compare``'s figures plus ``min_psnr_db``)
    below its threshold raises ValidationFailed (exit code 1) saying what was not written."""
    psnr, threshold = check["psnr_db"], check["min_psnr_db"]
    if psnr >= threshold:
        return
    figure = f"emulated PSNR {psnr} dB" if emulated else f"{psnr} dB PSNR"
    raise ValidationFailed(
        f"{where}: {figure} against the exported model, below the {threshold} dB threshold; {consequence} "
        "(lower it with min_psnr_db)",
        parameter="min_psnr_db",
    )


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖a‖: how far ``b`` moved from ``a``."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def conditioning_sensitivity(
    run: Callable[[dict], np.ndarray], inputs: dict[str, np.ndarray], seed: int, output=None
) -> float | None:
    """How much the output moves when the image embedding changes: ‖f(x,c₁) − f(x,c₂)‖ / ‖f(x,c₁)‖.

    w8a16/int8 can keep PSNR and still lose the conditioning; comparing this figure between the
    reference and the compiled form catches that.
    """
    if "encoder_hidden_states" not in inputs:
        return None
    other = dict(inputs)
    other["encoder_hidden_states"] = (
        np.random.default_rng(seed + 100).standard_normal(inputs["encoder_hidden_states"].shape).astype(np.float32)
    )
    a = run(inputs) if output is None else output
    b = run(other)
    return relative_change(a, b)


def latency_summary(times_ms: Iterable[float]) -> dict[str, float]:
    """{p50, p90, min, mean} of per-call times in ms, rounded to µs."""
    times = list(times_ms)
    return {
        "p50": round(float(np.percentile(times, 50)), 3),
        "p90": round(float(np.percentile(times, 90)), 3),
        "min": round(float(np.min(times)), 3),
        "mean": round(float(np.mean(times)), 3),
    }


def top_ops(
    ops: Iterable[tuple[str, str, float]], total_ms: float, limit: int = TOP_OPS, modules: dict[str, str] | None = None
) -> list[dict]:
    """The slowest of ``ops`` ((name, op type, ms) in one call) as {name, op_type, ms, share of
    ``total_ms``}; equal times keep their order. With ``modules`` (exported node name → module path,
    onnx_tools.module_paths) each also names the ``module`` that made it (None: not attributable)."""
    ranked = sorted(ops, key=lambda op: -op[2])[:limit]
    return [
        {
            "name": name,
            "op_type": op_type,
            "ms": round(ms, 3),
            "share": round(ms / total_ms, 4) if total_ms else None,
        }
        | ({"module": module_of(name, modules)} if modules is not None else {})
        for name, op_type, ms in ranked
    ]


UNATTRIBUTED = "(unattributed)"


def module_of(node: str, modules: dict[str, str]) -> str | None:
    """The module that made a compiled node, from the exported graph's ``modules`` (node → module
    path). ONNX Runtime names a fused node '<its first node>/<fusion>' and the quantizer a quantised
    one '<node>_quant'; nodes ORT adds (reshapes around a Gemm, activation quantizers) have none."""
    name = node.split("/", 1)[0]
    return modules.get(name) or modules.get(name.removesuffix("_quant"))


def block_of(module: str | None) -> str:
    """A module path's top-level block: 'up_blocks.3' for 'up_blocks.3.resnets.1.conv1', 'mid_block'
    for 'mid_block.attentions.0.proj_in', 'conv_in' for 'conv_in' (the UNet's blocks, as the paper's
    Fig. 2 breaks its cost down)."""
    if module is None:
        return UNATTRIBUTED
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def cost_views(ops: Iterable[tuple[str, str, float]], modules: dict[str, str]) -> dict[str, list]:
    """One profiled call's node time summed per top-level block and per op type, largest first:
    {"by_block": [{block, ms, share}], "by_op_type": [{op_type, ms, share}]}; shares of the call's
    node time (they add up to 1)."""
    ops = list(ops)
    total_ms = sum(ms for _, _, ms in ops)
    by_block: dict[str, float] = {}
    by_type: dict[str, float] = {}
    for name, op_type, ms in ops:
        block = block_of(module_of(name, modules))
        by_block[block] = by_block.get(block, 0.0) + ms
        by_type[op_type] = by_type.get(op_type, 0.0) + ms

    def ranked(totals: dict[str, float], key: str) -> list[dict]:
        return [
            {key: k, "ms": round(ms, 3), "share": round(ms / total_ms, 4) if total_ms else None}
            for k, ms in sorted(totals.items(), key=lambda item: -item[1])
        ]

    return {"by_block": ranked(by_block, "block"), "by_op_type": ranked(by_type, "op_type")}


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started this program. Linux's ru_maxrss keeps the
    peak of the process it was forked from across exec (a parent with 6.4 GB resident made two
    different UNets' workers both report 6406.9 MB; issue 13): VmHWM is this address space's own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
