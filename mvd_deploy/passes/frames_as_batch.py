"""frames_as_batch: temporal residual blocks computed on frames-as-batch (B·F, C, H, W), no transpose.

diffusers' SpatioTemporalResBlock turns its (B·F, C, H, W) input into a rank-5 (B, C, F, H, W) video
(Reshape + Transpose) for the temporal block (GroupNorm, Conv3d with a (k, 1, 1) kernel), then back.
ONNX Runtime's QNN quantizer and layout transform break the QDQ units around that Transpose (tiny
UNet, w8a16: "Unsupported nodes in QNN EP: Reshape, Add, Transpose_token…", data types do not match),
so the Snapdragon HTP refuses the w8a16 UNet. The same arithmetic without any transpose:
  * GroupNorm over (C/G, F, H, W) per video = mean/variance over axes (1, 3) of (B, F, G, C/G·H·W);
  * the (k, 1, 1) convolution over frames = one 1×1 Conv2d over the k frame-shifted copies
    (zero-padded per video), concatenated on channels, with the kernel taps laid side by side;
  * the time embedding and the AlphaBlender mix apply per frame row.
Exact up to fp32 summation order (checked by the pass manager like every exact pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mvd_deploy.model.gates import GatedSpatioTemporalResBlock
from mvd_deploy.passes.base import DeployPipeline, Pass


def group_norm_frames(norm: torch.nn.GroupNorm, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """``norm`` applied to the video (B, C, F, H, W) that frames-as-batch ``x`` (B·F, C, H, W) holds."""
    rows, channels, height, width = x.shape
    groups = x.reshape(batch, frames, norm.num_groups, channels // norm.num_groups * height * width)
    mean = groups.mean(dim=(1, 3), keepdim=True)
    centred = groups - mean
    variance = centred.pow(2).mean(dim=(1, 3), keepdim=True)
    normed = (centred / torch.sqrt(variance + norm.eps)).reshape(rows, channels, height, width)
    return normed * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def temporal_conv_frames(conv: torch.nn.Conv3d, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """``conv`` (kernel (k, 1, 1), stride 1) over the frames of frames-as-batch ``x``."""
    rows, channels, height, width = x.shape
    taps, pad = conv.kernel_size[0], conv.padding[0]
    video = x.reshape(batch, frames, channels * height * width)
    zeros = video.new_zeros(batch, pad, channels * height * width)
    padded = torch.cat([zeros, video, zeros], dim=1)
    shifted = [padded[:, tap : tap + frames].reshape(rows, channels, height, width) for tap in range(taps)]
    # (out, in, k, 1, 1) → (out, k·in, 1, 1), tap-major, matching the concatenation order above
    weight = conv.weight[:, :, :, 0, 0].permute(0, 2, 1).reshape(conv.out_channels, taps * channels, 1, 1)
    return F.conv2d(torch.cat(shifted, dim=1), weight, conv.bias)


class FramesAsBatchSpatioTemporalResBlock(GatedSpatioTemporalResBlock):
    """A kept spatio-temporal unit whose temporal block runs on frames-as-batch tensors."""

    def forward(self, hidden_states, temb=None, image_only_indicator=None):
        spatial = self.spatial_res_block(hidden_states, temb)
        if not self.keep_temporal:
            return spatial
        frames = image_only_indicator.shape[-1]
        rows = spatial.shape[0]
        batch = rows // frames
        block = self.temporal_res_block
        h = temporal_conv_frames(
            block.conv1, block.nonlinearity(group_norm_frames(block.norm1, spatial, batch, frames)), batch, frames
        )
        if block.time_emb_proj is not None:
            h = h + block.time_emb_proj(block.nonlinearity(temb))[:, :, None, None]
        h = block.dropout(block.nonlinearity(group_norm_frames(block.norm2, h, batch, frames)))
        h = temporal_conv_frames(block.conv2, h, batch, frames)
        shortcut = (
            spatial
            if block.conv_shortcut is None
            else temporal_conv_frames(block.conv_shortcut, spatial, batch, frames)
        )
        temporal = shortcut + h
        # AlphaBlender's (B, 1, F, 1, 1) factor, one per frame row
        alpha = self.time_mixer.get_alpha(image_only_indicator, 5)[:, 0, :, 0, 0].reshape(rows, 1, 1, 1)
        alpha = alpha.to(spatial.dtype)
        return alpha * spatial + (1.0 - alpha) * temporal


def _kept_units(unet):
    for path, module in unet.named_modules():
        if isinstance(module, GatedSpatioTemporalResBlock) and module.keep_temporal:
            yield path, module


class FramesAsBatch(Pass):
    name = "frames_as_batch"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        for path, unit in _kept_units(pipeline.unet):
            block = unit.temporal_res_block
            for conv in filter(None, (block.conv1, block.conv2, block.conv_shortcut)):
                if conv.kernel_size[1:] != (1, 1) or conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1):
                    return f"{path}: a temporal convolution is not (k, 1, 1) with stride 1"
                if conv.padding[0] * 2 + 1 != conv.kernel_size[0] or conv.padding[1:] != (0, 0):
                    return f"{path}: a temporal convolution is not 'same'-padded over frames"
            if unit.time_mixer.switch_spatial_to_temporal_mix:
                return f"{path}: its mixer swaps spatial and temporal"
        return None

    def call(self, pipeline: DeployPipeline) -> str:
        rewritten = 0
        for _, unit in _kept_units(pipeline.unet):
            if type(unit) is not FramesAsBatchSpatioTemporalResBlock:
                unit.__class__ = FramesAsBatchSpatioTemporalResBlock  # same parameters, same names
                rewritten += 1
        return f"{rewritten} temporal residual blocks on frames-as-batch tensors (no transpose)" if rewritten else ""
