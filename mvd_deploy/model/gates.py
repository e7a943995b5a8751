"""Temporal block gates: SVD's spatio-temporal units with a keep flag on their temporal block.

Every SVD unit computes ``out = α·spatial + (1−α)·temporal(spatial)`` (diffusers' AlphaBlender).
MobileVD prunes temporal blocks; a unit whose temporal block is not kept outputs exactly its
spatial path and does not run the temporal block at all.

diffusers builds these units deep inside its block constructors, so instead of copying its files we
change the class of each built unit to a subclass that only replaces ``forward``: parameter names
(and so checkpoint keys) stay diffusers' own.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import SpatioTemporalResBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from torch import nn

from mvd_deploy.model.single_token import SingleTokenCrossAttention


class GatedSpatioTemporalResBlock(SpatioTemporalResBlock):
    keep_temporal: bool = True

    def forward(self, hidden_states, temb=None, image_only_indicator=None):
        spatial = self.spatial_res_block(hidden_states, temb)
        if not self.keep_temporal:
            return spatial
        return _temporal_mix(self, spatial, temb, image_only_indicator)


def _temporal_mix(unit: SpatioTemporalResBlock, spatial, temb, image_only_indicator):
    """diffusers' SpatioTemporalResBlock.forward after its spatial block (same ops, same order)."""
    num_frames = image_only_indicator.shape[-1]
    batch_frames, channels, height, width = spatial.shape
    batch_size = batch_frames // num_frames
    video = spatial[None, :].reshape(batch_size, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
    if temb is not None:
        temb = temb.reshape(batch_size, num_frames, -1)
    temporal = unit.temporal_res_block(video, temb)
    mixed = unit.time_mixer(x_spatial=video, x_temporal=temporal, image_only_indicator=image_only_indicator)
    return mixed.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


class GatedTransformerSpatioTemporalModel(TransformerSpatioTemporalModel):
    keep_temporal: list[bool]

    def forward(self, hidden_states, encoder_hidden_states=None, image_only_indicator=None, return_dict=False):
        batch_frames, _, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        batch_size = batch_frames // num_frames
        any_temporal = any(self.keep_temporal)

        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch_frames, height * width, inner_dim)
        hidden_states = self.proj_in(hidden_states)

        if any_temporal:
            # The temporal blocks attend to the first frame's context, broadcast to every pixel
            # (a single-token cross-attention takes it once per video instead).
            context = encoder_hidden_states[None, :].reshape(
                batch_size, num_frames, -1, encoder_hidden_states.shape[-1]
            )[:, 0]
            time_context = context[:, None].broadcast_to(
                batch_size, height * width, context.shape[-2], context.shape[-1]
            )
            time_context = time_context.reshape(batch_size * height * width, -1, context.shape[-1])
            frame_ids = torch.arange(num_frames, device=hidden_states.device).repeat(batch_size, 1).reshape(-1)
            frame_emb = self.time_pos_embed(self.time_proj(frame_ids).to(hidden_states.dtype))[:, None, :]

        for i, block in enumerate(self.transformer_blocks):
            hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
            if self.keep_temporal[i]:
                temporal_block = self.temporal_transformer_blocks[i]
                single_token = isinstance(temporal_block.attn2, SingleTokenCrossAttention)
                mixed = temporal_block(
                    hidden_states + frame_emb,
                    num_frames=num_frames,
                    encoder_hidden_states=context if single_token else time_context,
                )
                hidden_states = self.time_mixer(
                    x_spatial=hidden_states, x_temporal=mixed, image_only_indicator=image_only_indicator
                )

        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_frames, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
        output = hidden_states + residual
        return (output,) if not return_dict else _output(output)


def _output(sample):
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

    return TransformerTemporalModelOutput(sample=sample)


def install_gates(model: nn.Module) -> dict[str, str]:
    """Swap every spatio-temporal unit in ``model`` to its gated class (all kept).

    Returns {gate name: kind}, in module order; a gate is named by its temporal block's path.
    """
    gates: dict[str, str] = {}
    for path, module in model.named_modules():
        if type(module) is SpatioTemporalResBlock:
            module.__class__ = GatedSpatioTemporalResBlock
            module.keep_temporal = True
            gates[f"{path}.temporal_res_block"] = "resnet"
        elif type(module) is TransformerSpatioTemporalModel:
            module.__class__ = GatedTransformerSpatioTemporalModel
            module.keep_temporal = [True] * len(module.temporal_transformer_blocks)
            for i in range(len(module.temporal_transformer_blocks)):
                gates[f"{path}.temporal_transformer_blocks.{i}"] = "transformer"
    return gates


def gate_owner(model: nn.Module, gate: str) -> tuple[nn.Module, int | None]:
    """The unit holding ``gate`` and, for transformer units, the layer index."""
    parts = gate.split(".")
    if parts[-1] == "temporal_res_block":
        return model.get_submodule(".".join(parts[:-1])), None
    return model.get_submodule(".".join(parts[:-2])), int(parts[-1])


def set_gate(model: nn.Module, gate: str, keep: bool) -> None:
    unit, index = gate_owner(model, gate)
    if index is None:
        unit.keep_temporal = keep
    else:
        unit.keep_temporal[index] = keep
