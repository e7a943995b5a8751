"""``mvd-deploy inspect``: what a recipe or checkpoint is, and what one UNet call costs.

Everything is computed on the meta device from the config (and, for a checkpoint, the safetensors
header), so full-size models inspect in seconds without allocating weights.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from mvd_deploy.checkpoint import WEIGHTS_FILE, read_checkpoint_info
from mvd_deploy.errors import MvdError
from mvd_deploy.flops import count_model_flops
from mvd_deploy.model.funnel import FunnelLinear
from mvd_deploy.model.unet import MobileVDUNet
from mvd_deploy.pruning import with_resolved_gates
from mvd_deploy.recipe import VAE_SCALE_FACTOR, load_recipe
from mvd_deploy.shipped import MODELS, looks_like_path, shipped_file, shipped_names
from mvd_deploy.stages import stage_table
from mvd_deploy.weights import check_weights

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _part(name: str) -> str:
    """Top-level part of the UNet a parameter/module belongs to: 'down_blocks.1', 'mid_block', 'conv_in'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _temporal_gate(name: str, gates) -> str | None:
    for gate in gates:
        if name.startswith(gate + "."):
            return gate
    return None


def _read_target(target: str | Path):
    """(spec with gates, kind, dtype, checkpoint info or None) of a checkpoint directory, a recipe file
    or a shipped model's name."""
    if Path(target).is_dir():
        info = read_checkpoint_info(Path(target))
        return info.spec, "checkpoint", info.dtype, info
    if Path(target).is_file() or (not looks_like_path(target) and shipped_file(MODELS, str(target))):
        return with_resolved_gates(load_recipe(target)), "recipe", "float32", None
    if looks_like_path(target):
        raise MvdError(f"{target}: no such recipe file or checkpoint directory")
    known = ", ".join(shipped_names(MODELS))
    raise MvdError(f"{target}: no such recipe file or checkpoint directory, nor a model name (known: {known})")


def inspect_stages(target: str | Path) -> list[dict]:
    """The paper's Table 8 stages for a recipe or checkpoint (its own gates, funnels, multiscaling)."""
    spec, *_ = _read_target(target)
    return stage_table(spec)


@dataclass
class ModelInspection:
    """What :func:`inspect_model` found: sizes, shapes, temporal blocks, funnels and FLOPs of one UNet call."""

    source: str
    kind: str  # "checkpoint" | "recipe"
    name: str
    form: str
    params: int
    bytes: int
    dtype: str
    components: dict[str, dict]
    latent_shape: list[int]
    nfe: int
    levels: list[dict]  # per UNet level: frames and latent size (temporal multiscaling halves frames)
    temporal_multiscaling: bool
    funnels: dict
    temporal_blocks: dict
    flops: int
    tflops: float
    flops_by_part: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)


def inspect_model(target: str | Path) -> ModelInspection:
    """Parameters, shapes, temporal blocks and FLOPs of a checkpoint directory, a recipe file or a
    shipped model's name, computed on the meta device (no weights loaded)."""
    spec, kind, dtype, info = _read_target(target)
    model = MobileVDUNet.build(spec, device="meta")
    if kind == "checkpoint":
        check_weights(info.path / WEIGHTS_FILE, info.weights, model, dtype)
    gates = spec.mobilevd.temporal_gates
    params_by_part, funnel_params, temporal_params = _params_by_part(model, gates)
    params = sum(params_by_part.values())
    flops = count_model_flops(model)
    kept = [n for n, g in gates.items() if g.keep]
    return ModelInspection(
        source=str(target),
        kind=kind,
        name=spec.name,
        form="train-time",
        params=params,
        bytes=params * _BYTES[dtype],
        dtype=dtype,
        components={
            "unet": {
                "params": params,
                "bytes": params * _BYTES[dtype],
                "parts": params_by_part,
                "funnel_params": funnel_params,
                "temporal_params": temporal_params,
            }
        },
        latent_shape=list(spec.latent_shape),
        nfe=spec.mobilevd.nfe,
        levels=_levels(model, spec),
        temporal_multiscaling=spec.mobilevd.temporal_multiscaling,
        funnels={
            "fun_factor": spec.mobilevd.fun_factor,
            "layers": list(spec.mobilevd.funnel_layers),
            "funnelled_linears": sum(isinstance(m, FunnelLinear) for m in model.modules()),
        },
        temporal_blocks={"total": len(gates), "kept": len(kept), "pruned": len(gates) - len(kept), "kept_names": kept},
        flops=flops.total,
        tflops=flops.tflops,
        flops_by_part=_flops_by_part(flops),
    )


def _params_by_part(model, gates) -> tuple[dict[str, int], int, int]:
    """Parameters per top-level part, and how many are funnels' and temporal blocks'."""
    by_part: dict[str, int] = defaultdict(int)
    funnel = temporal = 0
    for name, p in model.named_parameters():
        by_part[_part(name)] += p.numel()
        if name.endswith(".funnel"):
            funnel += p.numel()
        if _temporal_gate(name, gates):
            temporal += p.numel()
    return dict(by_part), funnel, temporal


def _flops_by_part(flops) -> dict[str, int]:
    """FLOPs per top-level part (each counted once: a part's modules are inside it)."""
    by_part: dict[str, int] = defaultdict(int)
    for name, value in flops.per_module.items():
        if "." not in name or (name.count(".") == 1 and name.split(".")[0] in ("down_blocks", "up_blocks")):
            by_part[_part(name)] += value
    return dict(by_part)


def _levels(model, spec) -> list[dict]:
    """Frames and latent size at each UNet level (temporal multiscaling halves the frames)."""
    video = spec.mobilevd.video
    h, w = video.height // VAE_SCALE_FACTOR, video.width // VAE_SCALE_FACTOR
    frames = model.level_frames()
    levels = [{"level": f"down_blocks.{i}", "frames": f, "latent_hw": [h >> i, w >> i]} for i, f in enumerate(frames)]
    depth = len(frames) - 1
    levels.append({"level": "mid_block", "frames": frames[-1], "latent_hw": [h >> depth, w >> depth]})
    return levels


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def format_inspect(report: dict) -> str:
    lines = [
        f"{report['name']} ({report['kind']} {report['source']}, {report['form']} form)",
        f"  parameters        {report['params']:,} ({_human(report['bytes'], 'B')}, {report['dtype']})",
        f"  latent (B,F,C,H,W) {tuple(report['latent_shape'])}   NFE {report['nfe']}",
        f"  FLOPs per UNet call {report['tflops']:.3f} T (FlopCounterMode, 2 per multiply-add, meta device)",
        "  levels:",
    ]
    for level in report["levels"]:
        h, w = level["latent_hw"]
        lines.append(f"    {level['level']:<14} {level['frames']:>3} frames  {h}x{w}")
    t = report["temporal_blocks"]
    f = report["funnels"]
    lines += [
        f"  temporal blocks   {t['kept']} kept, {t['pruned']} pruned of {t['total']}"
        f"   multiscaling {'on' if report['temporal_multiscaling'] else 'off'}",
        f"  funnels           r={f['fun_factor']} on {', '.join(f['layers']) or 'none'}"
        f" ({f['funnelled_linears']} funnelled linears)",
        "  per part:            params        FLOPs",
    ]
    unet = report["components"]["unet"]
    for part, n in unet["parts"].items():
        lines.append(f"    {part:<16} {n:>12,}  {_human(report['flops_by_part'].get(part, 0))}")
    return "\n".join(lines)
