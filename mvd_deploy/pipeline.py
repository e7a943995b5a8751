"""Image → video, the way SVD's diffusers pipeline does it, with the deploy components.

The steps (``run_pipeline``), each one component call or a few lines of arithmetic an app repeats:

  0. the image, centre-cropped to the video's aspect ratio (our step: SVD's pipeline resizes without
     cropping, so an image of another aspect would be stretched);
  1. image_encoder: the CLIP image (SVD's ``_encode_image``: in [-1, 1], Gaussian-blurred and bicubic-
     resized to 224×224 (``_resize_with_antialiasing``), back to [0, 1], normalised with CLIP's
     mean/std) → the image embedding, one context token (1, 1, D);
  2. vae_encoder: the image resized (PIL Lanczos) to the video size, in [-1, 1], plus
     ``noise_aug_strength`` · unit Gaussian noise → the conditioning latent (1, 4, h, w), unscaled;
  3. unet: ``sample`` = (unit noise ε, the conditioning latent repeated for every frame) on channels,
     and the image embedding → the clean latent (the 1-step sampler folded in, mvd_deploy.model.sampler;
     when it is not, the same arithmetic runs here around the UNet);
  4. decoder: TAESD → frames in [0, 1].

The random draws use one ``torch.Generator`` seeded with ``seed``, in diffusers' order: the
augmentation noise first, then the latent noise. ``run_pipeline`` takes a function that runs one
component, so the PyTorch reference (``torch_runner``) and the compiled artifacts
(mvd_deploy.generate) go through the very same steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from diffusers.video_processor import VideoProcessor

from mvd_deploy.errors import MvdError
from mvd_deploy.model.encoder_configs import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from mvd_deploy.model.sampler import EDMScalings, sampler_scalings
from mvd_deploy.recipe import VAE_SCALE_FACTOR, ModelSpec

IMAGE_MODES = ("RGB", "RGBA", "L", "P")  # converted to RGB; others (CMYK, 16-bit, float) are refused
MIN_IMAGE_SIDE = 64  # px: smaller images carry too little to condition on (and crop to nothing)

Runner = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]


# -- the image -----------------------------------------------------------------------------------
def load_image(path: str | Path, option: str = "--image") -> PIL.Image.Image:
    """An RGB image from ``path``, or a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MvdError(f"{option} {path}: file not found")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            image = opened.copy()
    except (PIL.Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MvdError(f"{option} {path}: not an image PIL can read ({' '.join(str(e).split())})") from None
    if image.mode not in IMAGE_MODES:
        raise MvdError(f"{option} {path}: image mode {image.mode} is not supported (RGB, RGBA, L or P)")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise MvdError(
            f"{option} {path}: {image.width}x{image.height} px is too small (at least {MIN_IMAGE_SIDE} px a side)"
        )
    return image.convert("RGB")


def crop_to_aspect(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """The largest centred crop of ``image`` with the aspect ratio width:height."""
    scale = min(image.width / width, image.height / height)
    w, h = round(width * scale), round(height * scale)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def clip_pixels(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """SVD's CLIP input: (1, 3, size, size), normalised with CLIP's mean and std."""
    pixels = VideoProcessor.numpy_to_pt(VideoProcessor.pil_to_numpy(image))
    # SVD blurs and resizes in [-1, 1] (its original implementation's order), then returns to [0, 1]
    pixels = (_resize_with_antialiasing(pixels * 2.0 - 1.0, (size, size)) + 1.0) / 2.0
    mean = torch.tensor(CLIP_IMAGE_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).reshape(1, 3, 1, 1)
    return (pixels - mean) / std


def vae_pixels(image: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """SVD's VAE input before augmentation: (1, 3, height, width) in [-1, 1] (diffusers' preprocessing)."""
    return VideoProcessor(vae_scale_factor=VAE_SCALE_FACTOR).preprocess(image, height=height, width=width)


@dataclass
class PipelineInputs:
    """Everything the pipeline's components start from: the two images and the noise."""

    pixel_values: torch.Tensor  # (1, 3, S, S): the CLIP image
    image: torch.Tensor  # (1, 3, H, W): the VAE image, noise-augmented
    noise: torch.Tensor  # (1, F, C, h, w): unit Gaussian latent noise


def make_inputs(image: PIL.Image.Image, spec: ModelSpec, seed: int) -> PipelineInputs:
    video, cond = spec.mobilevd.video, spec.mobilevd.conditioning
    cropped = crop_to_aspect(image, video.width, video.height)
    pixel_values = clip_pixels(cropped, spec.image_encoder["image_size"])
    pixels = vae_pixels(cropped, video.width, video.height)
    generator = torch.Generator().manual_seed(seed)
    augmentation = torch.randn(pixels.shape, generator=generator)
    noise = torch.randn(latent_noise_shape(spec), generator=generator)
    return PipelineInputs(pixel_values, pixels + cond.noise_aug_strength * augmentation, noise)


def latent_noise_shape(spec: ModelSpec) -> tuple[int, ...]:
    """(1, frames, latent channels, h, w): the noise half of the UNet's sample."""
    shape = spec.latent_shape
    return (shape[0], shape[1], spec.unet["out_channels"], *shape[3:])


# -- the components, in order --------------------------------------------------------------------
@dataclass
class PipelineResult:
    image_embeds: torch.Tensor
    image_latents: torch.Tensor
    latents: torch.Tensor  # the clean latent
    frames: torch.Tensor | None  # (1, F, 3, H, W) in [0, 1]; None without a decoder
    seconds: dict[str, float] = field(default_factory=dict)


def unet_feeds(
    spec: ModelSpec, image_embeds: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, folded: bool
) -> dict[str, torch.Tensor]:
    """The UNet's inputs: ``sample`` = (noise, image latent per frame), the embedding, and — unless
    the conditioning is folded — the timestep and SVD's added time ids [fps − 1, motion bucket, aug]."""
    frames = noise.shape[1]
    sample = torch.cat([noise, image_latents.unsqueeze(1).expand(-1, frames, -1, -1, -1)], dim=2)
    feeds = {"sample": sample, "encoder_hidden_states": image_embeds}
    if not folded:
        cond = spec.mobilevd.conditioning
        feeds["timestep"] = torch.tensor([cond.timestep])
        feeds["added_time_ids"] = torch.tensor([cond.added_time_ids()])
    return feeds


def run_pipeline(
    run: Runner,
    inputs: PipelineInputs,
    spec: ModelSpec,
    conditioning_folded: bool,
    sampler: EDMScalings | None,
    has_decoder: bool = True,
) -> PipelineResult:
    """The four components in order. ``sampler``: None when the UNet has the sampler folded in, else
    the scalings to apply around it."""
    seconds = {}

    def timed(name, feeds):
        start = time.perf_counter()
        output = run(name, feeds)
        seconds[name] = time.perf_counter() - start
        return output

    image_embeds = timed("image_encoder", {"pixel_values": inputs.pixel_values})
    image_latents = timed("vae_encoder", {"image": inputs.image})
    noise = inputs.noise
    if sampler is not None:  # the scheduler's input scaling, outside the UNet (as FoldedSampler does it)
        noisy_latent = noise * sampler.init_noise_sigma
        noise = noisy_latent * sampler.c_in
    output = timed("unet", unet_feeds(spec, image_embeds, image_latents, noise, conditioning_folded))
    latents = output if sampler is None else noisy_latent * sampler.c_skip + output * sampler.c_out
    frames = timed("decoder", {"latents": latents}) if has_decoder else None
    return PipelineResult(image_embeds, image_latents, latents, frames, seconds)


def torch_runner(modules: dict[str, torch.nn.Module]) -> Runner:
    """Run components as PyTorch modules (no autograd)."""

    def run(name: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return modules[name](**feeds)

    return run


def run_reference(pipeline, inputs: PipelineInputs) -> PipelineResult:
    """The PyTorch deploy pipeline (mvd_deploy.passes.DeployPipeline) on ``inputs``."""
    unet = pipeline.unet
    sampler = None if unet.sampler is not None else sampler_scalings(unet.spec)
    return run_pipeline(
        torch_runner(pipeline.components()),
        inputs,
        unet.spec,
        unet.conditioning_folded,
        sampler,
        has_decoder=pipeline.decoder is not None,
    )
