"""taesd_decoder: attach TAESD as the deployed decoder (replaces SVD's VAE decoder; not an exact pass).

From a local diffusers AutoencoderTiny directory (config.json + diffusion_pytorch_model.safetensors,
read through safetensors only; its config is the architecture), or random init from a seed when none
is given, with TAESD's architecture or the one the recipe's ``decoder`` section sets.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import load_json
from mvd_deploy.model.decoder import TAESDDecoder
from mvd_deploy.passes.base import DeployPipeline, Pass
from mvd_deploy.weights import load_diffusers_weights


def load_autoencoder_tiny(directory: Path) -> AutoencoderTiny:
    config_path = directory / "config.json"
    config = load_json(config_path, "AutoencoderTiny config")
    if not isinstance(config, dict):
        raise MvdError(f"{config_path}: must hold a JSON object")
    try:
        with torch.device("meta"):
            model = AutoencoderTiny.from_config(config)  # diffusers' own config handling (aliases, extras)
    except (TypeError, ValueError) as e:
        raise MvdError(f"{config_path}: not an AutoencoderTiny config ({e})") from None
    return load_diffusers_weights(directory, model)


class TAESDDecoderPass(Pass):
    name = "taesd_decoder"
    exact = False
    component = "decoder"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        latent = pipeline.unet.spec.unet["out_channels"]
        if latent != 4:
            return f"TAESD decodes 4 latent channels; this UNet outputs {latent}"
        return None

    def call(self, pipeline: DeployPipeline) -> str:
        if pipeline.decoder is not None:
            return ""
        directory = self.options.taesd_dir
        device = pipeline.unet.conv_in.weight.device
        architecture = pipeline.unet.spec.decoder or {}
        if directory is not None:
            autoencoder, source = load_autoencoder_tiny(Path(directory)), f"from {directory}"
        elif device.type == "meta":
            with torch.device("meta"):
                autoencoder, source = AutoencoderTiny(**architecture), "shape only"
        else:
            torch.manual_seed(self.options.decoder_seed)
            autoencoder, source = AutoencoderTiny(**architecture), f"random init, seed {self.options.decoder_seed}"
        pipeline.decoder = TAESDDecoder(autoencoder.decoder.to(device)).eval()
        return f"attached the TAESD decoder ({source})"
