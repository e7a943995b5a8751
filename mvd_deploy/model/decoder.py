"""The deployed decoder: TAESD (diffusers' ``AutoencoderTiny`` decoder) for every frame at once.

Latent convention. SVD's UNet works in the VAE's *scaled* latent space: z·0.18215, where z is what
the VAE encoder produces (SVD's pipeline divides by ``vae.config.scaling_factor`` = 0.18215 before
its own decoder). TAESD was distilled to read Stable Diffusion latents in that same scaled space
(its AutoencoderTiny config has scaling_factor 1.0: latents go in as the UNet leaves them), and SVD's
VAE encoder is SD's. So the conversion is a factor TAESD_LATENT_SCALE / SVD_VAE_SCALING_FACTOR = 1,
kept explicit so a model with another VAE scaling only changes the constant.

Output: RGB frames in [0, 1], (batch, frames, 3, 8·h, 8·w) — DecoderTiny returns [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

SVD_VAE_SCALING_FACTOR = 0.18215  # stabilityai/stable-video-diffusion-img2vid vae/config.json
TAESD_LATENT_SCALE = 0.18215  # TAESD reads SD latents scaled by SD's VAE scaling factor


class TAESDDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, latent_scale: float = TAESD_LATENT_SCALE / SVD_VAE_SCALING_FACTOR):
        super().__init__()
        self.decoder = decoder  # diffusers DecoderTiny
        self.latent_scale = latent_scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, F, C, h, w), the 1-step sampler's denoised latents → frames (B, F, 3, 8h, 8w)."""
        frames = self.decoder(latents.flatten(0, 1) * self.latent_scale)
        frames = ((frames + 1) / 2).clamp(0, 1)
        return frames.unflatten(0, latents.shape[:2])
