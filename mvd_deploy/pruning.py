"""The pruning policy for a recipe without trained gates: prune the cheapest temporal blocks first."""

from __future__ import annotations

import dataclasses

from mvd_deploy.flops import count_model_flops
from mvd_deploy.model.unet import MobileVDUNet
from mvd_deploy.passes import DeployPipeline
from mvd_deploy.passes.manager import make_passes
from mvd_deploy.recipe import ModelSpec, TemporalGate


def cheapest_first_gates(spec: ModelSpec) -> dict[str, TemporalGate]:
    """Gates for a recipe without trained flags: prune the cheapest round(fraction·n) temporal blocks.

    Cost is each temporal block's FLOPs in the deployed form (single-token cross-attention, merged
    funnels, multiscaling as configured): what the block would cost on the phone. Ties go to module
    order. The block's GFLOPs are recorded as its importance, so the recorded importance orders
    blocks the same way the pruning did.
    """
    unpruned = dataclasses.replace(spec.mobilevd, temporal_gates=None)
    model = MobileVDUNet.build(dataclasses.replace(spec, mobilevd=unpruned), device="meta")
    pipeline = DeployPipeline(model)
    for deploy_pass in make_passes(["single_token_cross_attention", "merge_funnels"]):
        deploy_pass(pipeline)
    flops = count_model_flops(model).per_module
    names = list(model.gate_kinds)  # module order
    cost = {name: flops.get(name, 0) for name in names}
    n_pruned = round(spec.mobilevd.temporal_prune_fraction * len(names))
    order = sorted(names, key=lambda n: (cost[n], names.index(n)))
    pruned = set(order[:n_pruned])
    return {n: TemporalGate(kind=model.gate_kinds[n], importance=cost[n] / 1e9, keep=n not in pruned) for n in names}


def with_resolved_gates(spec: ModelSpec) -> ModelSpec:
    """``spec`` itself when it carries gates, else a copy with cheapest-first gates."""
    if spec.mobilevd.temporal_gates is not None:
        return spec
    gates = cheapest_first_gates(spec)
    return dataclasses.replace(spec, mobilevd=dataclasses.replace(spec.mobilevd, temporal_gates=gates))
