"""What every deploy pass is: a small unit with one contract, pipeline in, rewritten pipeline out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from mvd_deploy.errors import MvdError
from mvd_deploy.flops import count_flops, count_model_flops


class PassError(MvdError):
    """A pass cannot run here (impossible order or input), or broke equivalence."""


@dataclass
class PassOptions:
    """Settings some passes read; every pass gets the same object."""

    taesd_dir: Path | None = None  # local diffusers AutoencoderTiny directory; None → random init
    decoder_seed: int = 0
    attention_chunk_tokens: int = 512  # chunk_attention: queries per chunk


class DeployPipeline(nn.Module):
    """What the passes rewrite: the MobileVD UNet and, once ``taesd_decoder`` ran, its decoder; and
    the conditioning encoders when the checkpoint has them (mvd_deploy.model.encoders)."""

    ORDER = ("image_encoder", "vae_encoder", "unet", "decoder")  # the order an app runs them in

    def __init__(
        self,
        unet: nn.Module,
        decoder: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
        vae_encoder: nn.Module | None = None,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.vae_encoder = vae_encoder
        self.unet = unet
        self.decoder = decoder

    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.ORDER if getattr(self, name) is not None}

    def encoder_input_shape(self, component: str) -> tuple[int, ...]:
        """image_encoder: the CLIP image (1, 3, S, S); vae_encoder: the video-size image (1, 3, H, W)."""
        if component == "image_encoder":
            size = self.unet.spec.image_encoder["image_size"]
            return (1, 3, size, size)
        video = self.unet.spec.mobilevd.video
        return (1, 3, video.height, video.width)

    def decoder_input_shape(self) -> tuple[int, ...]:
        """The latents the decoder takes: the UNet's output at the deploy shape."""
        spec = self.unet.spec
        return spec.latent_shape[:2] + (spec.unet["out_channels"],) + spec.latent_shape[3:]

    def flops(self, component: str) -> int:
        """FLOPs of one call of ``component`` at the deploy shape (meta stand-ins); 0 when absent."""
        if component == "unet":
            return count_model_flops(self.unet).total
        module = getattr(self, component)
        if module is None:
            return 0
        if component == "decoder":
            return count_flops(module, {"latents": torch.empty(self.decoder_input_shape(), device="meta")}).total
        name = "pixel_values" if component == "image_encoder" else "image"
        return count_flops(module, {name: torch.empty(self.encoder_input_shape(component), device="meta")}).total


def needs_one_step(pipeline: DeployPipeline, why: str) -> str | None:
    """The shared precondition of the passes that fold per-step values into constants: a 1-step
    deployment (``why``: what would change per step otherwise)."""
    nfe = pipeline.unet.spec.mobilevd.nfe
    return None if nfe == 1 else f"needs a fixed-step (1-step) deployment (mobilevd.nfe is {nfe}: {why})"


class Pass:
    """Subclasses set ``name``, ``exact`` and ``component`` and implement ``call`` (and ``why_not``
    where a pass has preconditions).

    A pass is called: ``deploy_pass(pipeline)`` checks ``why_not`` (a reason the pass cannot run on
    this pipeline, or None) every time, then ``call`` rewrites the pipeline in place and returns what
    it changed, in words ("" when nothing: every pass is idempotent). As torch.fx's PassBase.
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    component: ClassVar[str] = "unet"

    def __init__(self, options: PassOptions | None = None):
        self.options = options or PassOptions()

    def __call__(self, pipeline: DeployPipeline, *, position: int | None = None) -> str:
        """Run the pass on ``pipeline``; ``position`` (1-based, in a list of passes) is named in the error."""
        reason = self.why_not(pipeline)
        if reason:
            where = f" (number {position} in the list)" if position is not None else ""
            raise PassError(f"pass {self.name!r}{where} cannot run: {reason}")
        return self.call(pipeline)

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        return None

    def call(self, pipeline: DeployPipeline) -> str:
        raise NotImplementedError
