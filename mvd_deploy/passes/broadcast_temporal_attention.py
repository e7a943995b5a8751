"""broadcast_temporal_attention: temporal self-attention over the few frames as broadcast multiply-and-sum.

Temporal self-attention attends across the F frames (14, or 7 under temporal multiscaling) of every
pixel: exported as SDPA it is a batch of (pixels × heads) tiny F×F matmuls — 10240 of them at 512×256.
The Snapdragon HTP compiler handles such a batch very slowly. Written frames first, the same sums are
broadcast multiplies and reductions over a (F, F, pixels·heads, head_dim) tensor: elementwise work the
HTP compiles in seconds (one full-size block, w8a16 for SM8650: 292.0 s as SDPA, 5.6 s this way;
``python bench/temporal_attention.py``). Only the order of the fp32 additions changes: the pass is
exact at the pass manager's fp32 tolerance.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention

from mvd_deploy.passes.base import DeployPipeline, Pass
from mvd_deploy.passes.chunk_attention import self_attention_projections


class BroadcastSelfAttnProcessor:
    """diffusers' AttnProcessor2_0 for plain self-attention over a short token axis (the frames),
    with the two matmuls written as broadcast multiply + sum."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        query, key, value, head_dim = self_attention_projections(
            attn, hidden_states, encoder_hidden_states, attention_mask
        )
        batch, frames, _ = hidden_states.shape

        def frames_first(x):  # (batch, F, heads·D) → (F, batch·heads, D)
            return x.view(batch, frames, attn.heads, head_dim).permute(1, 0, 2, 3).reshape(frames, -1, head_dim)

        # 1. scores[i, j] = <q_i, k_j> / sqrt(D): SDPA's default scale, as AttnProcessor2_0 uses it
        query, key, value = frames_first(query) * head_dim**-0.5, frames_first(key), frames_first(value)
        scores = (query.unsqueeze(1) * key.unsqueeze(0)).sum(-1)  # (F_query, F_key, batch·heads)
        # 2. softmax over the key frames
        weights = scores.softmax(dim=1)
        # 3. out_i = sum_j weights[i, j] v_j
        out = (weights.unsqueeze(-1) * value.unsqueeze(0)).sum(1)  # (F_query, batch·heads, D)
        out = out.reshape(frames, batch, attn.heads * head_dim).permute(1, 0, 2).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _temporal_self_attentions(unet):
    for path, module in unet.named_modules():
        if path.endswith(".attn1") and ".temporal_transformer_blocks." in path and isinstance(module, Attention):
            yield path, module


class BroadcastTemporalAttention(Pass):
    name = "broadcast_temporal_attention"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        for path, attn in _temporal_self_attentions(pipeline.unet):
            extras = [n for n in ("group_norm", "spatial_norm", "norm_q", "norm_k") if getattr(attn, n, None)]
            if extras or attn.residual_connection or attn.rescale_output_factor != 1.0:
                return f"{path} is not a plain self-attention ({', '.join(extras) or 'residual/rescale'})"
        return None

    def call(self, pipeline: DeployPipeline) -> str:
        changed = 0
        for _, attn in _temporal_self_attentions(pipeline.unet):
            if not isinstance(attn.processor, BroadcastSelfAttnProcessor):
                attn.set_processor(BroadcastSelfAttnProcessor())
                changed += 1
        return f"temporal self-attention as broadcast multiply-and-sum in {changed} layers" if changed else ""
