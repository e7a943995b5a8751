"""The MobileVD UNet: SVD's spatio-temporal UNet with funnels, temporal gates and temporal multiscaling.

It owns diffusers' own submodules (``conv_in``, ``down_blocks``, ...), so parameter names match a
diffusers SVD UNet checkpoint, and adds:
  * channel funnels on the self-attention layers named by ``mobilevd.funnel_layers``, initialised
    by coupled singular initialisation (CSI) from the weights they sit between;
  * a keep flag on each of the temporal blocks (38 in SVD);
  * temporal multiscaling: frames halved (mean of frame pairs) after the first down block, restored
    (nearest, each frame repeated) before the last up block; the skips consumed by the last up block
    stay at the full frame rate.
The forward follows diffusers' ``UNetSpatioTemporalConditionModel.forward`` step by step (its
numbered steps, as of diffusers 0.42.1, ``models/unets/unet_spatio_temporal_condition.py``), with the
frame count tracked per level.
"""

from __future__ import annotations

import torch
from diffusers import UNetSpatioTemporalConditionModel
from torch import nn

from mvd_deploy.errors import MvdError
from mvd_deploy.model.funnel import FunnelLinear, add_funnels, init_funnels_csi
from mvd_deploy.model.gates import install_gates, set_gate
from mvd_deploy.recipe import ModelSpec

_DIFFUSERS_CHILDREN = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "add_time_proj",
    "add_embedding",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_norm_out",
    "conv_act",
    "conv_out",
)


# Both are written at rank 3: the Snapdragon HTP refuses rank-6 tensors, which the natural
# (B, F/2, 2, C, H, W) form exports to. Frames are consecutive within a video in B·F, so pairs of
# rows of (B·F, C·H·W) are pairs of frames; the arithmetic is the same mean of two.
def temporal_downsample(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B·F, C, H, W) → (B·F/2, C, H, W): the mean of each pair of consecutive frames."""
    n, c, h, w = x.shape
    return x.reshape(n // 2, 2, c * h * w).mean(dim=1).reshape(n // 2, c, h, w)


def temporal_upsample(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B·F, C, H, W) → (B·2F, C, H, W): nearest neighbour along time (each frame twice)."""
    n, c, h, w = x.shape
    return x.reshape(n, 1, c * h * w).expand(n, 2, c * h * w).reshape(2 * n, c, h, w)


class MobileVDUNet(nn.Module):
    def __init__(self, base: UNetSpatioTemporalConditionModel, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        for name in _DIFFUSERS_CHILDREN:
            setattr(self, name, getattr(base, name))
        # Set by the fold_conditioning pass: the fixed time + added-time embedding, (1, time_embed_dim).
        self.register_buffer("folded_emb", None)
        # Set by the fold_sampler pass (mvd_deploy.model.sampler.FoldedSampler): sample holds unit noise,
        # the output is the 1-step sampler's clean latent.
        self.sampler = None
        self.gate_kinds = install_gates(self)
        cfg = spec.mobilevd
        if cfg.temporal_multiscaling and len(self.down_blocks) < 2:
            raise MvdError(f"{spec.source}: key 'mobilevd.temporal_multiscaling': needs at least two UNet levels")
        for attn in self.funnel_attentions(cfg.funnel_layers):
            add_funnels(attn, cfg.fun_factor)
            if attn.to_q.weight.device.type != "meta":
                init_funnels_csi(attn)  # funnels start as the best approximation of the weights they join
        if cfg.temporal_gates is not None:
            self.apply_gates({name: g.keep for name, g in cfg.temporal_gates.items()})

    @classmethod
    def build(cls, spec: ModelSpec, device: str | torch.device = "cpu") -> MobileVDUNet:
        """Build with diffusers' random init on ``device`` ("meta" allocates no weights)."""
        with torch.device(device):
            base = UNetSpatioTemporalConditionModel(**spec.unet)
        # Some buffers/parameters are made with explicit CPU tensors inside diffusers; move them too.
        return cls(base.to(device), spec)

    # -- structure -------------------------------------------------------------------------------
    def funnel_attentions(self, kinds) -> list[nn.Module]:
        """The self-attention modules of the given kinds (diffusers ``Attention``), in module order."""
        found = []
        for path, module in self.named_modules():
            if not path.endswith(".attn1"):
                continue
            temporal = ".temporal_transformer_blocks." in path
            if ("temporal_self_attention" if temporal else "spatial_self_attention") in kinds:
                found.append(module)
        return found

    def funnels(self) -> dict[str, FunnelLinear]:
        return {p: m for p, m in self.named_modules() if isinstance(m, FunnelLinear)}

    def apply_gates(self, keep: dict[str, bool]) -> None:
        expected, given = set(self.gate_kinds), set(keep)
        if given != expected:
            name = sorted(given - expected or expected - given)[0]
            why = "names no temporal block of this UNet" if name in given else "is missing"
            raise MvdError(f"{self.spec.source}: key 'mobilevd.temporal_gates.{name}': {why}")
        for name, flag in keep.items():
            set_gate(self, name, flag)

    def level_frames(self) -> list[int]:
        """Frames seen by each down level (the mid block runs at the last one's rate)."""
        frames = self.spec.mobilevd.video.frames
        half = frames // 2 if self.spec.mobilevd.temporal_multiscaling else frames
        return [frames] + [half] * (len(self.down_blocks) - 1)

    @property
    def conditioning_folded(self) -> bool:
        return self.folded_emb is not None

    def example_inputs(
        self, batch: int = 1, seed: int = 0, device="cpu", latent_hw: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the recipe's shape, or another latent size (meta tensors on "meta").

        The conditioning inputs are the recipe's fixed values, and absent once they are folded.
        """
        shape = (batch,) + self.spec.latent_shape[1:3] + (latent_hw or self.spec.latent_shape[3:])
        cond = self.spec.mobilevd.conditioning
        ctx = (batch, 1, self.spec.unet["cross_attention_dim"])
        if str(device) == "meta":
            sample, ehs = torch.empty(shape, device="meta"), torch.empty(ctx, device="meta")
        else:
            gen = torch.Generator().manual_seed(seed)
            sample, ehs = torch.randn(shape, generator=gen), torch.randn(ctx, generator=gen)
        inputs = {"sample": sample.to(device), "encoder_hidden_states": ehs.to(device)}
        if not self.conditioning_folded:
            inputs["timestep"] = torch.tensor([cond.timestep], device=device)
            inputs["added_time_ids"] = torch.tensor([cond.added_time_ids()] * batch, device=device)
        return inputs

    # -- forward ---------------------------------------------------------------------------------
    def conditioning_embedding(self, timestep, added_time_ids, batch: int, dtype) -> torch.Tensor:
        """(batch, time_embed_dim): time embedding plus the added-time-ids embedding, as in SVD."""
        timesteps = timestep.reshape(-1).expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        time_embeds = self.add_time_proj(added_time_ids.flatten()).reshape(batch, -1).to(emb.dtype)
        return emb + self.add_embedding(time_embeds)

    def forward(self, sample, encoder_hidden_states, timestep=None, added_time_ids=None) -> torch.Tensor:
        # Mirrors diffusers 0.42.1 UNetSpatioTemporalConditionModel.forward; steps numbered as there.
        batch, frames = sample.shape[:2]
        # 0. the folded 1-step sampler's input scaling (fold_sampler; not in diffusers' UNet)
        if self.sampler is not None:
            sample, noisy_latent = self.sampler.scale_input(sample)
        # 1. time (once the conditioning is folded: the embedding the deploy pass computed)
        if self.conditioning_folded:
            emb = self.folded_emb.expand(batch, -1)
        else:
            emb = self.conditioning_embedding(timestep, added_time_ids, batch, sample.dtype)

        def per_frame(n: int) -> dict:
            return {
                "temb": emb.repeat_interleave(n, dim=0, output_size=batch * n),
                "encoder_hidden_states": encoder_hidden_states.repeat_interleave(n, dim=0, output_size=batch * n),
                "image_only_indicator": torch.zeros(batch, n, dtype=sample.dtype, device=sample.device),
            }

        def run(block, hidden, n, **extra):
            kwargs = per_frame(n)
            if not getattr(block, "has_cross_attention", False):
                del kwargs["encoder_hidden_states"]
            return block(hidden_states=hidden, **kwargs, **extra)

        multiscale = self.spec.mobilevd.temporal_multiscaling
        # 2. pre-process: frames into the batch
        x = self.conv_in(sample.flatten(0, 1))
        skips = [x]
        # 3. down (temporal multiscaling: frames halved after the first level)
        for level, block in enumerate(self.down_blocks):
            x, res = run(block, x, frames)
            skips.extend(res)
            if level == 0 and multiscale:
                x = temporal_downsample(x, frames)
                skips[-1] = x  # the down sampler's output feeds the next level, at the halved rate
                frames //= 2

        # 4. mid
        x = run(self.mid_block, x, frames)

        # 5. up (temporal multiscaling: frames restored before the last level)
        for level, block in enumerate(self.up_blocks):
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if level == len(self.up_blocks) - 1 and multiscale:
                x = temporal_upsample(x, frames)
                frames *= 2
            x = run(block, x, frames, res_hidden_states_tuple=tuple(res))

        # 6. post-process
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        # 7. reshape back to (batch, frames, channels, height, width)
        x = x.reshape(batch, frames, *x.shape[1:])
        # 8. the folded sampler's output combination: the clean latent (fold_sampler)
        return x if self.sampler is None else self.sampler.combine(x, noisy_latent)
