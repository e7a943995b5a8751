"""Image → video: the conditioning encoders, the 1-step sampler, the reference pipeline and the
oracle no one here wrote (diffusers' own StableVideoDiffusionPipeline)."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from helpers import TINY

SEED = 3


def _image(width: int = 160, height: int = 80, seed: int = 0) -> PIL.Image.Image:
    """A smooth colour pattern with some detail (not constant: CLIP and the VAE must see something)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x + p) * np.cos(4 * y - p) for p in (0.0, 1.0, 2.0)]
    pixels = (np.stack(channels, -1) * 0.4 + 0.5 + 0.05 * rng.standard_normal((height, width, 3))).clip(0, 1)
    return PIL.Image.fromarray((pixels * 255).astype(np.uint8))


def plain_svd_recipe(path):
    """The tiny recipe's architecture with nothing MobileVD-specific: SVD at one step."""
    data = yaml.safe_load(TINY.read_text())
    data["name"] = "tiny-plain-svd"
    data["mobilevd"] = {
        "video": data["mobilevd"]["video"],
        "nfe": 1,
        "conditioning": {
            "sigma": 700.0,
            "timestep": 0.25 * math.log(700.0),
            "fps_id": 6,
            "motion_bucket_id": 127,
            "noise_aug_strength": 0.02,
        },
        "fun_factor": 1.0,
        "funnel_layers": [],
        "temporal_multiscaling": False,
        "temporal_prune_fraction": 0.0,
        "deploy_passes": [],
    }
    path.write_text(yaml.safe_dump(data))
    return path


SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}


@pytest.fixture(scope="session")
def svd_pipeline_dir(tmp_path_factory):
    """A diffusers SVD pipeline directory at the tiny recipe's architecture, random weights,
    written with save_pretrained as users have it."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from mvd_deploy.recipe import load_recipe

    spec = load_recipe(TINY)
    torch.manual_seed(11)
    unet = UNetSpatioTemporalConditionModel(**spec.unet)
    vae = AutoencoderKLTemporalDecoder(**spec.vae)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec.image_encoder))
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True
    )
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )
    out = tmp_path_factory.mktemp("svd") / "pipeline"
    pipe.save_pretrained(out)
    return out


@pytest.mark.slow
def test_reference_pipeline_equals_diffusers_svd(svd_pipeline_dir, tmp_path):
    """Our reading of SVD's preprocessing, noise augmentation, added time ids and 1-step sampler,
    pinned to diffusers' StableVideoDiffusionPipeline on the same weights and noise."""
    from diffusers import StableVideoDiffusionPipeline

    from mvd_deploy.checkpoint import init_checkpoint
    from mvd_deploy.deploy import deploy
    from mvd_deploy.pipeline import make_inputs, run_reference

    recipe = plain_svd_recipe(tmp_path / "plain-svd.yaml")
    init_checkpoint(recipe, tmp_path / "ckpt", from_svd=svd_pipeline_dir, quiet=True)
    pipeline, _, info = deploy(tmp_path / "ckpt", quiet=True)
    video = info.spec.mobilevd.video
    image = _image(video.width, video.height)
    inputs = make_inputs(image, info.spec, SEED)
    ours = run_reference(pipeline, inputs)

    theirs = StableVideoDiffusionPipeline.from_pretrained(svd_pipeline_dir)
    latents = theirs(
        image,
        height=video.height,
        width=video.width,
        num_frames=video.frames,
        num_inference_steps=1,
        min_guidance_scale=1.0,
        max_guidance_scale=1.0,
        fps=7,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        generator=torch.Generator().manual_seed(SEED),
        latents=inputs.noise,
        output_type="latent",
    ).frames
    assert latents.shape == ours.latents.shape
    # diffusers' Euler step returns x + (x - x0)/σ·(0 - σ) in float32 with |x| = σ·|ε| in the
    # thousands: that cancellation rounds x0 to one float32 ulp of max|x| (~2e-4). Ours computes x0
    # directly, so that ulp, plus fp32 tightness on the rest, is the tolerance.
    ulp = float(np.spacing(np.float32(float((inputs.noise * math.sqrt(700.0**2 + 1)).abs().max()))))
    scale = float(latents.abs().max())
    assert float((ours.latents - latents).abs().max()) <= ulp + 1e-5 * scale


def test_sampler_constants_are_diffusers_svd_scheduler_at_one_step():
    """σ, the initial noise scale, c_noise and the clean-latent combination are those of SVD's
    EulerDiscreteScheduler set to one step (diffusers computes them; we only compare)."""
    from diffusers import EulerDiscreteScheduler

    from mvd_deploy.model.sampler import EDMScalings, sampler_scalings
    from mvd_deploy.recipe import load_recipe

    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    scheduler.set_timesteps(1)
    ours = sampler_scalings(load_recipe(TINY))
    assert ours == EDMScalings(700.0)
    assert float(scheduler.sigmas[0]) == pytest.approx(ours.sigma, rel=1e-6)
    assert float(scheduler.sigmas[1]) == 0.0  # one Euler step all the way to the clean latent
    assert float(scheduler.init_noise_sigma) == pytest.approx(ours.init_noise_sigma, rel=1e-6)
    [timestep] = scheduler.timesteps
    assert float(timestep) == pytest.approx(ours.c_noise, rel=1e-6)
    assert load_recipe(TINY).mobilevd.conditioning.timestep == pytest.approx(ours.c_noise, abs=1e-4)
    # the step itself, on v-predictions and noisy latents of the sampler's magnitudes
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen) * ours.init_noise_sigma
    assert float(scheduler.scale_model_input(x, timestep).div(x).mean()) == pytest.approx(ours.c_in, rel=1e-6)
    v = torch.randn(2, 3, 4, 5, generator=gen)
    step = scheduler.step(v, timestep, x)
    assert torch.allclose(step.pred_original_sample, x * ours.c_skip + v * ours.c_out, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@torch.no_grad()
def test_fold_sampler_is_exact_in_float64():
    """The folded UNet on (ε, image latent) equals the scheduler's arithmetic around the untouched one."""
    import copy

    from helpers import relative_error, tiny_spec
    from mvd_deploy.model.sampler import denoised, sampler_scalings
    from mvd_deploy.model.unet import MobileVDUNet
    from mvd_deploy.passes import DeployPipeline
    from mvd_deploy.passes.fold_sampler import FoldSampler

    unet = MobileVDUNet.build(tiny_spec()).eval().double()
    before = copy.deepcopy(unet)
    assert FoldSampler().run(DeployPipeline(unet))
    assert FoldSampler().run(DeployPipeline(unet)) == ""  # idempotent
    inputs = {k: v.double() for k, v in unet.example_inputs(seed=5, latent_hw=(8, 8)).items()}
    folded = unet(**inputs)
    # by hand, around the untouched UNet: x = ε·√(σ²+1); x₀ = x/(σ²+1) − σ/√(σ²+1)·F(x/√(σ²+1))
    s = sampler_scalings(unet.spec).sigma
    x = inputs["sample"][:, :, :4] * math.sqrt(s**2 + 1)
    raw = before(**{**inputs, "sample": torch.cat([x / math.sqrt(s**2 + 1), inputs["sample"][:, :, 4:]], 2)})
    by_hand = x / (s**2 + 1) - s / math.sqrt(s**2 + 1) * raw
    assert relative_error(folded, by_hand) <= 1e-12
    assert relative_error(denoised(before, inputs), folded) <= 1e-12
    # and the output is not the UNet's raw v-prediction any more
    assert relative_error(folded, before(**inputs)) > 1e-3


def test_fold_sampler_refuses_a_multi_step_model():
    from helpers import tiny_spec
    from mvd_deploy.model.unet import MobileVDUNet
    from mvd_deploy.passes import DeployPipeline
    from mvd_deploy.passes.fold_sampler import FoldSampler

    unet = MobileVDUNet.build(tiny_spec(nfe=50), device="meta")
    assert "1-step" in FoldSampler().why_not(DeployPipeline(unet))
