"""single_token_cross_attention: cross-attention over the one CLIP token becomes to_out(to_v(context)).

Softmax over a single key is exactly 1, so to_q, to_k, the similarity map and the softmax go; in
temporal transformers the context is taken once per video instead of once per pixel.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention

from mvd_deploy.model.single_token import SingleTokenCrossAttention
from mvd_deploy.passes.base import DeployPipeline, Pass


def _cross_attentions(unet):
    for path, module in unet.named_modules():
        if path.endswith(".attn2") and isinstance(module, Attention):
            yield path, module


class SingleTokenCrossAttentionPass(Pass):
    name = "single_token_cross_attention"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        for path, attn in _cross_attentions(pipeline.unet):
            # Anything that acts on the attention beyond q/k/v/out would be lost by the rewrite.
            extras = [n for n in ("group_norm", "spatial_norm", "norm_cross", "norm_q", "norm_k") if getattr(attn, n)]
            if extras or attn.residual_connection or attn.rescale_output_factor != 1.0:
                return f"{path} is not a plain cross-attention ({', '.join(extras) or 'residual/rescale'})"
        return None

    def call(self, pipeline: DeployPipeline) -> str:
        rewritten = 0
        for path, attn in list(_cross_attentions(pipeline.unet)):
            parent, _, child = path.rpartition(".")
            setattr(pipeline.unet.get_submodule(parent), child, SingleTokenCrossAttention(attn.to_v, attn.to_out))
            rewritten += 1
        return f"rewrote {rewritten} cross-attentions to to_out(to_v(context))" if rewritten else ""
