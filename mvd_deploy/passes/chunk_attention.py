"""chunk_attention: spatial self-attention computed in query chunks, so no full score map exists.

ONNX (opset 18) has no fused attention: exported, SDPA becomes MatMul → Softmax → MatMul and the whole
(queries × keys) score map is materialised — at 512×256 that is 2048×2048 per head and frame, 1.1 GiB per
layer in fp32, ~4 GiB of ONNX Runtime's peak. Softmax is per query row, so splitting the queries into
chunks and concatenating the results is exact; the exported graph then holds one chunk's scores at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from mvd_deploy.passes.base import DeployPipeline, Pass


def self_attention_projections(attn: Attention, hidden_states, encoder_hidden_states, attention_mask):
    """q, k, v and the head size of a plain self-attention (no context, no mask), as AttnProcessor2_0."""
    if encoder_hidden_states is not None or attention_mask is not None:
        raise ValueError(f"{type(attn.processor).__name__} is for self-attention without a mask")
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    return query, key, value, key.shape[-1] // attn.heads


class ChunkedSelfAttnProcessor:
    """diffusers' AttnProcessor2_0 for plain self-attention, queries taken ``chunk_tokens`` at a time."""

    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        query, key, value, head_dim = self_attention_projections(
            attn, hidden_states, encoder_hidden_states, attention_mask
        )
        batch, tokens, _ = hidden_states.shape

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        chunks = math.ceil(tokens / self.chunk_tokens)  # a Python int: static shapes in the export
        out = torch.cat([F.scaled_dot_product_attention(q, key, value) for q in query.chunk(chunks, dim=2)], dim=2)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class ChunkAttention(Pass):
    name = "chunk_attention"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        for path, attn in self._targets(pipeline):
            if attn.residual_connection or attn.rescale_output_factor != 1.0 or attn.group_norm or attn.spatial_norm:
                return f"{path} is not a plain self-attention"
        return None

    def _targets(self, pipeline):
        for path, module in pipeline.unet.named_modules():
            if (
                path.endswith(".attn1")
                and ".temporal_transformer_blocks." not in path
                and isinstance(module, Attention)
            ):
                yield path, module

    def call(self, pipeline: DeployPipeline) -> str:
        size = self.options.attention_chunk_tokens
        changed = 0
        for _, attn in self._targets(pipeline):
            current = attn.processor
            if isinstance(current, ChunkedSelfAttnProcessor) and current.chunk_tokens == size:
                continue
            attn.set_processor(ChunkedSelfAttnProcessor(size))
            changed += 1
        return f"spatial self-attention in chunks of {size} queries in {changed} layers" if changed else ""
