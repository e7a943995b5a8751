"""merge_funnels: fold every channel funnel into its projection, leaving plain Linears at the reduced width."""

from __future__ import annotations

from mvd_deploy.model.funnel import FunnelLinear
from mvd_deploy.passes.base import DeployPipeline, Pass


class MergeFunnels(Pass):
    name = "merge_funnels"

    def call(self, pipeline: DeployPipeline) -> str:
        merged = 0
        for path, module in list(pipeline.unet.named_modules()):
            if isinstance(module, FunnelLinear):
                parent, _, child = path.rpartition(".")
                setattr(pipeline.unet.get_submodule(parent), child, module.merged())
                merged += 1
        return f"merged {merged} funnelled projections into plain Linears" if merged else ""
