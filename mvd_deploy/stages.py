"""The paper's Table 8, reproduced: FLOPs per UNet call after each optimisation, in the paper's order.

Each row is counted on the actually transformed model (built on the meta device, rewritten by the
same passes the deployment uses), not by formula.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from mvd_deploy.flops import count_model_flops
from mvd_deploy.model.unet import MobileVDUNet
from mvd_deploy.passes import DeployPipeline
from mvd_deploy.passes.manager import make_passes
from mvd_deploy.recipe import ModelSpec, Video, unet_defaults

SVD_NFE = 50
# arXiv 2412.07583 Table 8 (512x256, 14 frames, per UNet call); keyed by our stage ids.
PAPER_TFLOPS = {
    "svd": 8.60,
    "cross_attention": 8.24,
    "one_step": 8.24,
    "multiscaling": 5.42,
    "pruning": 4.64,
    "funnels": 4.34,
}
# The paper's headline compares with SVD at 1024x576, 14 frames: 45.43 TFLOPs per call.
PAPER_TFLOPS_HD = {"svd": 45.43}
PAPER_VIDEOS = {
    Video(width=512, height=256, frames=14): PAPER_TFLOPS,
    Video(width=1024, height=576, frames=14): PAPER_TFLOPS_HD,
}


@dataclass(frozen=True)
class _Stage:
    id: str
    label: str
    spec: ModelSpec  # the model as it stands at this stage
    passes: tuple[str, ...]  # the deploy passes that make this stage's model from it
    nfe: int


def _count(stage: _Stage) -> tuple[int, int]:
    """FLOPs per call and parameters of the stage's model, rewritten by its passes (meta device)."""
    model = MobileVDUNet.build(stage.spec, device="meta")
    pipeline = DeployPipeline(model)
    for deploy_pass in make_passes(stage.passes):
        deploy_pass(pipeline)
    return count_model_flops(model).total, sum(p.numel() for p in model.parameters())


def _stage_specs(spec: ModelSpec) -> tuple[ModelSpec, ModelSpec, ModelSpec]:
    """SVD (every temporal block, no funnels, no multiscaling), then + multiscaling, then + pruning."""
    cfg = spec.mobilevd
    all_kept = {name: dataclasses.replace(g, keep=True) for name, g in cfg.temporal_gates.items()}
    svd = dataclasses.replace(
        spec,
        mobilevd=dataclasses.replace(cfg, funnel_layers=(), temporal_multiscaling=False, temporal_gates=all_kept),
    )
    multiscaled = dataclasses.replace(
        svd, mobilevd=dataclasses.replace(svd.mobilevd, temporal_multiscaling=cfg.temporal_multiscaling)
    )
    pruned = dataclasses.replace(
        multiscaled, mobilevd=dataclasses.replace(multiscaled.mobilevd, temporal_gates=cfg.temporal_gates)
    )
    return svd, multiscaled, pruned


def _stages(spec: ModelSpec) -> list[_Stage]:
    """Table 8's rows in the paper's order (and the deployed UNet, for a one-step model)."""
    cfg = spec.mobilevd
    svd, multiscaled, pruned = _stage_specs(spec)
    n_pruned = sum(not g.keep for g in cfg.temporal_gates.values())
    funnels = ", ".join(cfg.funnel_layers) or "none"
    single = ("single_token_cross_attention",)
    stripped = single + ("strip_temporal",)
    stages = [
        _Stage("svd", "SVD", svd, (), SVD_NFE),
        _Stage("cross_attention", "+ optimized cross-attention", svd, single, SVD_NFE),
        _Stage("one_step", f"+ adversarial finetuning (NFE {cfg.nfe})", svd, single, cfg.nfe),
        _Stage(
            "multiscaling",
            "+ temporal multiscaling" + ("" if cfg.temporal_multiscaling else " (off)"),
            multiscaled,
            single,
            cfg.nfe,
        ),
        _Stage(
            "pruning",
            f"+ temporal block pruning ({n_pruned}/{len(cfg.temporal_gates)})",
            pruned,
            stripped,
            cfg.nfe,
        ),
        _Stage(
            "funnels",
            f"+ channel funneling (r {cfg.fun_factor}: {funnels}) = {spec.name}",
            spec,
            stripped + ("merge_funnels",),
            cfg.nfe,
        ),
    ]
    if cfg.nfe == 1:
        stages.append(
            _Stage(
                "deployed",
                "deployed UNet (+ folded conditioning)",
                spec,
                stripped + ("merge_funnels", "fold_conditioning"),
                cfg.nfe,
            )
        )
    return stages


# spec (canonical JSON) → its rows: a pure function of the spec, and counting one takes seconds (each
# stage's model runs through FlopCounterMode on the meta device), so a process exporting or inspecting
# the same recipe again reuses it.
_TABLES: dict[str, list[dict]] = {}


def stage_table(spec: ModelSpec) -> list[dict]:
    """Rows {stage, id, nfe, flops, tflops, params, paper_tflops, delta_pct} for a spec with gates."""
    key = spec.canonical_json()
    if key not in _TABLES:
        _TABLES[key] = _stage_rows(spec)
    return copy.deepcopy(_TABLES[key])


def _stage_rows(spec: ModelSpec) -> list[dict]:
    paper = _paper_figures(spec)
    rows, counted = [], {}  # (spec, passes) → figures: some rows differ only in NFE
    for stage in _stages(spec):
        model_key = (id(stage.spec), stage.passes)
        if model_key not in counted:
            counted[model_key] = _count(stage)
        flops, params = counted[model_key]
        reference = paper.get(stage.id)
        rows.append(
            {
                "stage": stage.label,
                "id": stage.id,
                "nfe": stage.nfe,
                "flops": flops,
                "tflops": flops / 1e12,
                "params": params,
                "paper_tflops": reference,
                "delta_pct": None if reference is None else 100 * (flops / 1e12 - reference) / reference,
            }
        )
    return rows


def _paper_figures(spec: ModelSpec) -> dict[str, float]:
    """The paper's figures for this spec's size, when it has SVD's architecture; else none."""
    defaults = unet_defaults()
    same_unet = all(spec.unet[k] == v for k, v in defaults.items() if k not in ("num_frames", "sample_size"))
    return PAPER_VIDEOS.get(spec.mobilevd.video, {}) if same_unet else {}


def format_stage_table(rows: list[dict], title: str) -> str:
    width = max(len(r["stage"]) for r in rows)
    giga = max(r["tflops"] for r in rows) < 0.1  # tiny models read better in GFLOPs
    unit, scale = ("GFLOPs", 1e9) if giga else ("TFLOPs", 1e12)
    lines = [title, f"  {'stage':<{width}} {'NFE':>3} {unit:>9} {'paper':>6} {'delta':>7} {'params':>15}"]
    for r in rows:
        paper = f"{r['paper_tflops']:.2f}" if r["paper_tflops"] is not None else "-"
        delta = f"{r['delta_pct']:+.1f}%" if r["delta_pct"] is not None else "-"
        lines.append(
            f"  {r['stage']:<{width}} {r['nfe']:>3} {r['flops'] / scale:>9.3f} {paper:>6} {delta:>7} {r['params']:>15,}"
        )
    return "\n".join(lines)
