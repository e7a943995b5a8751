"""The conditioning encoders of SVD's image-to-video pipeline, as deployed components.

* ``ImageEncoder``: SVD's ``CLIPVisionModelWithProjection`` (ViT-H/14 at 224×224). It takes the CLIP
  image, already resized and normalised (see ``mvd_deploy.pipeline``), and returns the projected
  ``image_embeds`` as ONE context token, (1, 1, projection_dim): what the UNet's
  ``encoder_hidden_states`` is.
* ``VAEEncoder``: the encoder half of SVD's ``AutoencoderKLTemporalDecoder`` (``encoder`` +
  ``quant_conv``). It takes the noise-augmented image in [-1, 1] and returns the *mode* (the mean) of
  the latent distribution, NOT multiplied by the VAE's scaling factor: SVD conditions its UNet on the
  unscaled latent (``vae.encode(image).latent_dist.mode()``).

Both are built from a config (recipe/checkpoint ``image_encoder`` / ``vae`` sections): only the
architecture keys below are read, with SVD's values as defaults, so ``image_encoder: {}`` is the
real ViT-H/14 and ``vae: {}`` SVD's VAE.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.autoencoders.vae import Encoder
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from mvd_deploy.model.encoder_configs import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, SVD_IMAGE_ENCODER, SVD_VAE

__all__ = ["CLIP_IMAGE_MEAN", "CLIP_IMAGE_STD", "SVD_IMAGE_ENCODER", "SVD_VAE", "ImageEncoder", "VAEEncoder"]


class ImageEncoder(nn.Module):
    """CLIP pixels (B, 3, S, S), normalised → image embedding as one context token (B, 1, projection_dim)."""

    def __init__(self, clip: CLIPVisionModelWithProjection):
        super().__init__()
        self.clip = clip

    @classmethod
    def build(cls, config: dict[str, Any], device: str | torch.device = "cpu") -> ImageEncoder:
        """Random init (transformers' own) at ``config``'s architecture; "meta" allocates nothing."""
        clip_config = CLIPVisionConfig(**config, attn_implementation="sdpa")
        with torch.device(device):
            return cls(CLIPVisionModelWithProjection(clip_config)).eval()

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    def restore_buffers(self) -> ImageEncoder:
        """Remake the non-persistent position ids (not in any checkpoint: on "meta" after a meta build)."""
        embeddings = self.clip.vision_model.embeddings
        positions = torch.arange(embeddings.num_positions).expand((1, -1))
        embeddings.register_buffer("position_ids", positions, persistent=False)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # 1. the vision transformer and its projection (SVD uses the projected embedding, not the tokens)
        embeds = self.clip(pixel_values=pixel_values).image_embeds
        # 2. one context token per image, as the UNet's cross-attention reads it
        return embeds.unsqueeze(1)


class VAEEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] → unscaled latent mode (B, latent_channels, H/8, W/8)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        # The modules AutoencoderKLTemporalDecoder.__init__ makes, under the same names, so its
        # checkpoint's encoder.* and quant_conv.* weights load unchanged.
        self.encoder = Encoder(
            in_channels=config["in_channels"],
            out_channels=config["latent_channels"],
            down_block_types=tuple(config["down_block_types"]),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            double_z=True,
        )
        latent = config["latent_channels"]
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.latent_channels = latent

    @classmethod
    def build(cls, config: dict[str, Any], device: str | torch.device = "cpu") -> VAEEncoder:
        with torch.device(device):
            return cls(config).eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # 1. encoder and quant_conv give the moments (mean, log-variance) of the latent distribution
        moments = self.quant_conv(self.encoder(image))
        # 2. the mode of a diagonal Gaussian is its mean: the first half of the channels
        return moments[:, : self.latent_channels]


def encoder_weight_prefixes() -> tuple[str, ...]:
    """The keys of a diffusers VAE checkpoint that the VAE encoder holds."""
    return ("encoder.", "quant_conv.")
