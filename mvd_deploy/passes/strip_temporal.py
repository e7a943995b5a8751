"""strip_temporal: delete the temporal blocks whose keep flag is off, with their mixers.

The gated forward already skips them, so outputs are unchanged bit for bit; this drops their weights
(and, where a transformer unit keeps no temporal block, its frame embedding and mixer).
"""

from __future__ import annotations

from torch import nn

from mvd_deploy.model.gates import GatedSpatioTemporalResBlock, GatedTransformerSpatioTemporalModel
from mvd_deploy.passes.base import DeployPipeline, Pass


class StripTemporal(Pass):
    name = "strip_temporal"

    def call(self, pipeline: DeployPipeline) -> str:
        removed = 0
        for unit in pipeline.unet.modules():
            if isinstance(unit, GatedSpatioTemporalResBlock) and not unit.keep_temporal:
                if unit.temporal_res_block is not None:
                    unit.temporal_res_block = None
                    unit.time_mixer = None
                    removed += 1
            elif isinstance(unit, GatedTransformerSpatioTemporalModel):
                for i, keep in enumerate(unit.keep_temporal):
                    if not keep and not isinstance(unit.temporal_transformer_blocks[i], nn.Identity):
                        # an empty placeholder keeps layer indices (and parameter names) stable
                        unit.temporal_transformer_blocks[i] = nn.Identity()
                        removed += 1
                if not any(unit.keep_temporal) and unit.time_mixer is not None:
                    unit.time_pos_embed = unit.time_proj = unit.time_mixer = None
        return f"removed {removed} pruned temporal blocks" if removed else ""
