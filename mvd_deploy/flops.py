"""FLOPs per UNet call, counted by torch's FlopCounterMode on the meta device.

FlopCounterMode counts 2 FLOPs per multiply-add (the paper's convention) for matmuls, convolutions
and attention; it ignores norms, softmax and activations (< 0.01 T on SVD). On the meta device no
weights are allocated and the attention kernel is always counted (on real CPU tensors the default
flash SDPA kernel is not).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from mvd_deploy.recipe import ModelSpec, TemporalGate


@dataclass
class FlopCount:
    total: int
    per_module: dict[str, int]  # module path (relative to the counted model) -> FLOPs, sub-modules included

    @property
    def tflops(self) -> float:
        return self.total / 1e12


def count_flops(model: torch.nn.Module, inputs: dict, meta: bool = True) -> FlopCount:
    """FLOPs of ``model(**inputs)``.

    meta=True (the default) runs the model with meta stand-ins for its weights and inputs, so a
    model with real weights is counted at any input size without computing anything.
    """
    if meta:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        stand_ins = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
        inputs = {k: v.to("meta") for k, v in inputs.items()}

        def call():
            return functional_call(model, stand_ins, args=(), kwargs=inputs)
    else:

        def call():
            return model(**inputs)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            per_module[name[len(root) + 1 :]] = int(sum(ops.values()))
    return FlopCount(total=int(counter.get_total_flops()), per_module=per_module)


def count_model_flops(model) -> FlopCount:
    """FLOPs of one call of a MobileVD UNet at its recipe shape, batch 1 (any device)."""
    return count_flops(model, model.example_inputs(device="meta"))


def cheapest_first_gates(spec: ModelSpec) -> dict[str, TemporalGate]:
    """Gates for a recipe without trained flags: prune the cheapest round(fraction·n) temporal blocks.

    Cost is each temporal block's FLOPs in the deployed form (single-token cross-attention, merged
    funnels, multiscaling as configured): what the block would cost on the phone. Ties go to module
    order. The block's GFLOPs are recorded as its importance, so the recorded importance orders
    blocks the same way the pruning did.
    """
    from mvd_deploy.model.unet import MobileVDUNet
    from mvd_deploy.passes import DeployPipeline
    from mvd_deploy.passes.manager import make_passes

    unpruned = dataclasses.replace(spec.mobilevd, temporal_gates=None)
    model = MobileVDUNet.build(dataclasses.replace(spec, mobilevd=unpruned), device="meta")
    for deploy_pass in make_passes(["single_token_cross_attention", "merge_funnels"]):
        deploy_pass.run(DeployPipeline(model))
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
