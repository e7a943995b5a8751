"""SVD's sampler for one step: EDM preconditioning of a v-prediction UNet at one fixed σ.

SVD's scheduler (diffusers ``EulerDiscreteScheduler``: ``prediction_type: v_prediction``,
``timestep_type: continuous``, ``use_karras_sigmas: true``, σ from 700 to 0.002, ``timestep_spacing:
leading``) run for ONE step does, on unit Gaussian noise ε:

  1. x = ε · init_noise_sigma                       init_noise_sigma = √(σ² + 1)   ("leading" spacing)
  2. UNet input  = x · c_in                          c_in  = 1 / √(σ² + 1)         (scale_model_input)
     (the UNet's time input is c_noise = 0.25 · ln σ: the recipe's conditioning.timestep)
  3. clean latent x₀ = x · c_skip + F · c_out        c_skip = 1 / (σ² + 1), c_out = −σ / √(σ² + 1)
  4. the Euler step to σ = 0 returns x + (x − x₀)/σ · (0 − σ) = x₀.

With one step, the Karras schedule is the single value σ_max, so σ = 700 (see docs/deploy-passes.md,
"fold_sampler"). Every step here is a constant multiply or add, so the ``fold_sampler`` pass puts
them in the deployed UNet, and ``denoise`` below applies them outside an unfolded one: the two are
the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EDMScalings:
    """The 1-step sampler's constants at ``sigma`` (σ_data = 1, v-prediction, "leading" spacing)."""

    sigma: float

    @property
    def init_noise_sigma(self) -> float:
        return math.sqrt(self.sigma**2 + 1)

    @property
    def c_in(self) -> float:
        return 1 / math.sqrt(self.sigma**2 + 1)

    @property
    def c_skip(self) -> float:
        return 1 / (self.sigma**2 + 1)

    @property
    def c_out(self) -> float:
        return -self.sigma / math.sqrt(self.sigma**2 + 1)

    @property
    def c_noise(self) -> float:
        return 0.25 * math.log(self.sigma)

    def to_dict(self) -> dict[str, float]:
        names = ("sigma", "init_noise_sigma", "c_in", "c_skip", "c_out", "c_noise")
        return {name: getattr(self, name) for name in names}


def split_sample(sample: torch.Tensor, noise_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's ``sample`` (B, F, 2C, h, w) → (noise part, image-latent part), each (B, F, C, h, w)."""
    return sample[:, :, :noise_channels], sample[:, :, noise_channels:]


class FoldedSampler(nn.Module):
    """What ``fold_sampler`` installs on the UNet: input scaling before, output combination after."""

    def __init__(self, scalings: EDMScalings, noise_channels: int):
        super().__init__()
        self.scalings = scalings
        self.noise_channels = noise_channels

    def scale_input(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample`` holding unit noise ε → (UNet input holding x·c_in, x)."""
        noise, image = split_sample(sample, self.noise_channels)
        x = noise * self.scalings.init_noise_sigma
        return torch.cat([x * self.scalings.c_in, image], dim=2), x

    def combine(self, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The clean latent x₀ = x·c_skip + F·c_out."""
        return x * self.scalings.c_skip + model_output * self.scalings.c_out


def denoised(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 1-step sampler's clean latent from ``unet`` on ``inputs`` whose ``sample`` holds unit noise ε
    (channels 0..C-1) and the image latent: the UNet's own output once the sampler is folded into it,
    else the same arithmetic around it."""
    if getattr(unet, "sampler", None) is not None:
        return unet(**inputs)
    sampler = FoldedSampler(sampler_scalings(unet.spec), unet.spec.unet["out_channels"])
    scaled, x = sampler.scale_input(inputs["sample"])
    return sampler.combine(unet(**{**inputs, "sample": scaled}), x)


def sampler_scalings(spec) -> EDMScalings:
    """The σ a spec's 1-step model runs at: its conditioning's ``sigma``, else exp(4·timestep)."""
    cond = spec.mobilevd.conditioning
    sigma = cond.sigma if cond.sigma is not None else math.exp(4 * cond.timestep)
    return EDMScalings(sigma)
