"""fold_conditioning: a 1-step deployment has fixed conditioning, so its embeddings are constants.

The timestep, fps, motion bucket and noise-augmentation strength are fixed (checkpoint/recipe
``mobilevd.conditioning``); this precomputes the time + added-time embedding and every resnet's time
projection. The deployed UNet's inputs are then the latent sample and the image embedding only.
Leave the pass out of the list to keep them as inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from mvd_deploy.passes.base import DeployPipeline, Pass, needs_one_step


class ConstantTimeProjection(nn.Module):
    """A resnet's time projection for the one fixed embedding: the precomputed value, per row."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.value.expand(*temb.shape[:-1], -1)


class FoldConditioning(Pass):
    name = "fold_conditioning"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        return needs_one_step(pipeline, "the timestep changes per step")

    @torch.no_grad()
    def call(self, pipeline: DeployPipeline) -> str:
        unet = pipeline.unet
        if unet.conditioning_folded:
            return ""
        inputs = unet.example_inputs(device=unet.conv_in.weight.device)
        emb = unet.conditioning_embedding(inputs["timestep"], inputs["added_time_ids"], 1, unet.conv_in.weight.dtype)
        folded = 0
        for block in unet.modules():
            projection = getattr(block, "time_emb_proj", None)
            if isinstance(projection, nn.Linear):
                act = emb if getattr(block, "skip_time_act", False) else block.nonlinearity(emb)
                block.time_emb_proj = ConstantTimeProjection(projection(act)[0])
                folded += 1
        unet.folded_emb = emb
        unet.time_proj = unet.time_embedding = unet.add_time_proj = unet.add_embedding = None
        return f"folded the time embedding and {folded} resnet time projections into constants"
