"""FLOPs per UNet call, counted by torch's FlopCounterMode on the meta device.

FlopCounterMode counts 2 FLOPs per multiply-add (the paper's convention) for matmuls, convolutions
and attention; it ignores norms, softmax and activations (< 0.01 T on SVD). On the meta device no
weights are allocated and the attention kernel is always counted (on real CPU tensors the default
flash SDPA kernel is not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


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
