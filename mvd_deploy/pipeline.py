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

import dataclasses
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


@dataclass(frozen=True)
class PipelineContract:
    """What an app needs to run the four components: sizes, the fixed conditioning values, and where
    the sampler runs. Made from a model spec (``from_spec``) or a build's manifest (``from_dict``)."""

    width: int
    height: int
    frames: int
    clip_size: int
    noise_shape: tuple[int, ...]  # (1, F, C, h, w)
    timestep: float
    fps_id: float
    motion_bucket_id: float
    noise_aug_strength: float
    conditioning_folded: bool  # False: the UNet takes timestep and added_time_ids
    sampler: EDMScalings
    sampler_folded: bool  # False: the app scales the noise and combines the UNet's output

    @classmethod
    def from_spec(cls, spec: ModelSpec, conditioning_folded: bool, sampler_folded: bool) -> PipelineContract:
        video, cond = spec.mobilevd.video, spec.mobilevd.conditioning
        shape = spec.latent_shape
        return cls(
            width=video.width,
            height=video.height,
            frames=video.frames,
            clip_size=spec.image_encoder["image_size"],
            noise_shape=(shape[0], shape[1], spec.unet["out_channels"], *shape[3:]),
            timestep=cond.timestep,
            fps_id=cond.fps_id,
            motion_bucket_id=cond.motion_bucket_id,
            noise_aug_strength=cond.noise_aug_strength,
            conditioning_folded=conditioning_folded,
            sampler=sampler_scalings(spec),
            sampler_folded=sampler_folded,
        )

    @property
    def fps(self) -> int:
        """Frames per second of the video: SVD conditions on fps − 1."""
        return round(self.fps_id) + 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["noise_shape"] = list(self.noise_shape)
        d["sampler"] = self.sampler.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PipelineContract:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        values["noise_shape"] = tuple(d["noise_shape"])
        values["sampler"] = EDMScalings(d["sampler"]["sigma"])
        return cls(**values)


@dataclass
class PipelineInputs:
    """Everything the pipeline's components start from: the two images and the noise."""

    pixel_values: torch.Tensor  # (1, 3, S, S): the CLIP image
    image: torch.Tensor  # (1, 3, H, W): the VAE image, noise-augmented
    noise: torch.Tensor  # (1, F, C, h, w): unit Gaussian latent noise


def make_inputs(image: PIL.Image.Image, contract: PipelineContract, seed: int) -> PipelineInputs:
    cropped = crop_to_aspect(image, contract.width, contract.height)
    pixel_values = clip_pixels(cropped, contract.clip_size)
    pixels = vae_pixels(cropped, contract.width, contract.height)
    generator = torch.Generator().manual_seed(seed)
    augmentation = torch.randn(pixels.shape, generator=generator)
    noise = torch.randn(contract.noise_shape, generator=generator)
    return PipelineInputs(pixel_values, pixels + contract.noise_aug_strength * augmentation, noise)


# -- the components, in order --------------------------------------------------------------------
@dataclass
class PipelineResult:
    image_embeds: torch.Tensor
    image_latents: torch.Tensor
    latents: torch.Tensor  # the clean latent
    frames: torch.Tensor | None  # (1, F, 3, H, W) in [0, 1]; None without a decoder
    seconds: dict[str, float] = field(default_factory=dict)


def unet_feeds(
    contract: PipelineContract, image_embeds: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The UNet's inputs: ``sample`` = (noise, image latent per frame), the embedding, and — unless
    the conditioning is folded — the timestep and SVD's added time ids [fps − 1, motion bucket, aug]."""
    frames = noise.shape[1]
    sample = torch.cat([noise, image_latents.unsqueeze(1).expand(-1, frames, -1, -1, -1)], dim=2)
    feeds = {"sample": sample, "encoder_hidden_states": image_embeds}
    if not contract.conditioning_folded:
        feeds["timestep"] = torch.tensor([contract.timestep])
        feeds["added_time_ids"] = torch.tensor(
            [[contract.fps_id, contract.motion_bucket_id, contract.noise_aug_strength]]
        )
    return feeds


def run_pipeline(run: Runner, inputs: PipelineInputs, contract: PipelineContract, has_decoder: bool = True):
    """The four components in order (``run`` runs one), the sampler around the UNet unless folded."""
    seconds = {}

    def timed(name, feeds):
        start = time.perf_counter()
        output = run(name, feeds)
        seconds[name] = time.perf_counter() - start
        return output

    image_embeds = timed("image_encoder", {"pixel_values": inputs.pixel_values})
    image_latents = timed("vae_encoder", {"image": inputs.image})
    noise, sampler = inputs.noise, contract.sampler
    if not contract.sampler_folded:  # the scheduler's input scaling, outside the UNet (as FoldedSampler does it)
        noisy_latent = noise * sampler.init_noise_sigma
        noise = noisy_latent * sampler.c_in
    output = timed("unet", unet_feeds(contract, image_embeds, image_latents, noise))
    latents = output if contract.sampler_folded else noisy_latent * sampler.c_skip + output * sampler.c_out
    frames = timed("decoder", {"latents": latents}) if has_decoder else None
    return PipelineResult(image_embeds, image_latents, latents, frames, seconds)


def torch_runner(modules: dict[str, torch.nn.Module]) -> Runner:
    """Run components as PyTorch modules (no autograd)."""

    def run(name: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return modules[name](**feeds)

    return run


def contract_of(pipeline) -> PipelineContract:
    """The contract of a PyTorch deploy pipeline (mvd_deploy.passes.DeployPipeline)."""
    unet = pipeline.unet
    return PipelineContract.from_spec(unet.spec, unet.conditioning_folded, unet.sampler is not None)


def run_reference(pipeline, inputs: PipelineInputs) -> PipelineResult:
    """The PyTorch deploy pipeline on ``inputs``."""
    modules = pipeline.components()
    return run_pipeline(torch_runner(modules), inputs, contract_of(pipeline), has_decoder="decoder" in modules)


# -- the contract, for apps (pull's artifacts.json) ------------------------------------------------
def describe_contract(contract: PipelineContract) -> dict:
    """How to call the pulled components as a pipeline, without our code: order, preprocessing, the
    fixed values, the noise, and what every input and output is."""
    c, s = contract, contract.sampler
    h, w = c.noise_shape[3:]
    unet_inputs = {
        "sample": f"float32 {[1, c.frames, 2 * c.noise_shape[2], h, w]}: channels 0-{c.noise_shape[2] - 1} the noise "
        + ("as drawn (unit Gaussian)" if c.sampler_folded else "x·c_in, where x = noise·init_noise_sigma")
        + f"; channels {c.noise_shape[2]}-{2 * c.noise_shape[2] - 1} vae_encoder's image_latents, the same "
        "for every frame",
        "encoder_hidden_states": "image_encoder's image_embeds, as they are",
    }
    if not c.conditioning_folded:
        unet_inputs["timestep"] = f"float32 [1]: [{c.timestep}] (c_noise = 0.25·ln sigma)"
        unet_inputs["added_time_ids"] = (
            f"float32 [1, 3]: [[{c.fps_id}, {c.motion_bucket_id}, {c.noise_aug_strength}]] "
            "(fps − 1, motion bucket id, noise augmentation strength)"
        )
    unet_output = (
        "the clean latent (the 1-step sampler is folded in): the decoder's input as it is"
        if c.sampler_folded
        else "SVD's v-prediction F; the clean latent is x·c_skip + F·c_out (x as for sample)"
    )
    return {
        "order": ["image_encoder", "vae_encoder", "unet", "decoder"],
        "video": {"width": c.width, "height": c.height, "frames": c.frames, "fps": c.fps},
        "image": {
            "crop": f"centre crop to the aspect ratio {c.width}:{c.height} (the largest that fits)",
            "image_encoder": {
                "size": [c.clip_size, c.clip_size],
                "steps": [
                    "RGB pixels / 255 → [0, 1]; then ·2 − 1 → [-1, 1]",
                    f"resize to {c.clip_size}x{c.clip_size} with antialiasing, as SVD: Gaussian blur per axis with "
                    "sigma = max((in/out − 1)/2, 0.001), kernel size max(4·sigma, 3) rounded down to an int and made "
                    "odd, reflect padding; then bicubic interpolation with align_corners=True (no crop: the aspect "
                    "ratio is not kept)",
                    "(x + 1)/2 → [0, 1]; then (x − mean)/std per channel",
                ],
                "mean": list(CLIP_IMAGE_MEAN),
                "std": list(CLIP_IMAGE_STD),
                "layout": "NCHW float32, RGB",
            },
            "vae_encoder": {
                "size": [c.width, c.height],
                "steps": [
                    f"resize to {c.width}x{c.height} (PIL Lanczos)",
                    "RGB pixels / 255 · 2 − 1 → [-1, 1]",
                    f"add noise augmentation: + {c.noise_aug_strength} · unit Gaussian noise of shape "
                    f"[1, 3, {c.height}, {c.width}] (no clipping)",
                ],
                "layout": "NCHW float32, RGB",
            },
        },
        "noise": {
            "shape": list(c.noise_shape),
            "distribution": "unit Gaussian (float32), drawn after the augmentation noise",
        },
        "conditioning": {
            "fps_id": c.fps_id,
            "motion_bucket_id": c.motion_bucket_id,
            "noise_aug_strength": c.noise_aug_strength,
            "timestep": c.timestep,
            "folded": c.conditioning_folded,
        },
        "sampler": {"folded": c.sampler_folded, **s.to_dict(), "kind": "1-step EDM Euler, v-prediction (SVD's)"},
        "components": {
            "image_encoder": {
                "inputs": {"pixel_values": f"float32 [1, 3, {c.clip_size}, {c.clip_size}]: the CLIP image above"},
                "outputs": {"image_embeds": "float32 [1, 1, D]: the CLIP image embedding, one context token"},
            },
            "vae_encoder": {
                "inputs": {"image": f"float32 [1, 3, {c.height}, {c.width}]: the augmented image above"},
                "outputs": {"image_latents": f"float32 [1, 4, {h}, {w}]: the VAE latent's mode, NOT scaled"},
            },
            "unet": {"inputs": unet_inputs, "outputs": {"model_output": unet_output}},
            "decoder": {
                "inputs": {"latents": "float32: the clean latent"},
                "outputs": {"frames": f"float32 [1, {c.frames}, 3, {c.height}, {c.width}]: RGB in [0, 1]"},
            },
        },
    }
