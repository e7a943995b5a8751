"""Image → video: the conditioning encoders, the 1-step sampler, the reference pipeline and the
oracle no one here wrote (diffusers' own StableVideoDiffusionPipeline)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

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
    from mvd_deploy.deploy import deploy_checkpoint
    from mvd_deploy.pipeline import contract_of, make_inputs, run_reference

    recipe = plain_svd_recipe(tmp_path / "plain-svd.yaml")
    init_checkpoint(recipe, out=tmp_path / "ckpt", from_svd=svd_pipeline_dir)
    deployment = deploy_checkpoint(tmp_path / "ckpt")
    pipeline, info = deployment.pipeline, deployment.checkpoint
    video = info.spec.mobilevd.video
    image = _image(video.width, video.height)
    inputs = make_inputs(image, contract_of(pipeline), SEED)
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
    # thousands: its subtraction, scaling and addition each round at up to half an ulp of max|x|, ~1 ulp
    # (~2e-4) after the cancellation; measured here 1.8e-4, i.e. within the bound for this draw only.
    # Ours computes x0 directly, so the bound of those roundings (2 ulp), plus fp32 tightness on the
    # rest, is the tolerance: a preprocessing or sampler mistake moves the latents by orders more.
    ulp = float(np.spacing(np.float32(float((inputs.noise * math.sqrt(700.0**2 + 1)).abs().max()))))
    scale = float(latents.abs().max())
    assert float((ours.latents - latents).abs().max()) <= 2 * ulp + 1e-5 * scale


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

    spec = tiny_spec()
    two_frames = dataclasses.replace(spec.mobilevd.video, frames=2)  # the fold is per element: 2 frames suffice
    unet = MobileVDUNet.build(dataclasses.replace(spec, mobilevd=dataclasses.replace(spec.mobilevd, video=two_frames)))
    unet = unet.eval().double()
    before = copy.deepcopy(unet)
    assert FoldSampler()(DeployPipeline(unet))
    assert FoldSampler()(DeployPipeline(unet)) == ""  # idempotent
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


# -- generate ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def generated(tiny_compiled_build, tmp_path_factory):
    """`mvd-deploy generate` on the tiny compiled build, with --reference and --frames, once."""
    import json

    from click.testing import CliRunner

    from mvd_deploy.cli import main

    work = tmp_path_factory.mktemp("generate")
    _image(200, 90).save(work / "input.png")
    args = ["generate", str(tiny_compiled_build), "--image", str(work / "input.png"), "--out", str(work / "v.mp4")]
    result = CliRunner().invoke(main, [*args, "--seed", "5", "--reference", "--frames", str(work / "frames"), "--json"])
    assert result.exit_code == 0, result.output
    return work, json.loads(result.stdout)


@pytest.mark.slow
def test_generate_writes_a_video_that_decodes_back(generated):
    import imageio.v3 as iio

    from mvd_deploy.recipe import load_recipe

    work, report = generated
    video = load_recipe(TINY).mobilevd.video
    frames = np.asarray(iio.imread(work / "v.mp4", index=None))
    assert frames.shape == (video.frames, video.height, video.width, 3)
    preview = np.asarray(iio.imread(work / "v.gif", index=None))
    assert preview.shape[:3] == (video.frames, video.height, video.width)
    assert sorted(p.name for p in (work / "frames").iterdir()) == [f"frame_{i:03d}.png" for i in range(video.frames)]
    assert report["written"] == {
        "video": str(work / "v.mp4"),
        "preview": str(work / "v.gif"),
        "frames": str(work / "frames"),
    }
    # every component ran, timed, in the pipeline's order
    assert list(report["seconds"]) == ["image_encoder", "vae_encoder", "unet", "decoder"]
    assert report["total_seconds"] == pytest.approx(sum(report["seconds"].values()), abs=2e-3)
    # each in its own worker process, which reports its own peak memory (the tiny models': ~100 MB)
    assert list(report["component_peak_rss_mb"]) == list(report["seconds"])
    assert all(0 < mb < 1024 for mb in report["component_peak_rss_mb"].values())
    # the video is not blank: the frames vary (random weights still give texture)
    assert frames.std() > 1.0


@pytest.mark.slow
def test_generate_matches_the_pytorch_reference(generated):
    """The compiled fp32 components, composed, give the PyTorch pipeline's video (same inputs)."""
    _, report = generated
    assert report["reference"]["latents_rel_error"] <= 1e-4
    assert report["reference"]["psnr_db"] is None or report["reference"]["psnr_db"] >= 60.0


@pytest.mark.slow
def test_generate_with_another_seed_gives_another_video(tiny_compiled_build, generated, tmp_path):
    """From Python, keyword options: seed 6 against the session's seed-5 run."""
    from mvd_deploy import generate_video

    work, report = generated
    other = generate_video(
        tiny_compiled_build, image=work / "input.png", out=tmp_path / "b.mp4", seed=6, frames_dir=tmp_path / "fb"
    )
    assert other["frames"] == report["frames"] and other["seed"] == 6
    first = [np.asarray(PIL.Image.open(d / "frame_000.png")) for d in (work / "frames", tmp_path / "fb")]
    assert first[0].shape == first[1].shape
    assert not np.array_equal(*first)


def _bad_images(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    PIL.Image.new("CMYK", (128, 128)).save(tmp_path / "cmyk.jpg")
    PIL.Image.new("RGB", (16, 12)).save(tmp_path / "tiny.png")
    PIL.Image.new("I;16", (128, 128)).save(tmp_path / "deep.png")
    return [
        (tmp_path / "missing.png", "file not found"),
        (tmp_path / "text.png", "not an image PIL can read"),
        (tmp_path / "cmyk.jpg", "image mode CMYK is not supported"),
        (tmp_path / "deep.png", "is not supported"),
        (tmp_path / "tiny.png", "16x12 px is too small"),
    ]


def test_generate_refuses_bad_images_and_writes_nothing(tmp_path):
    """Checked before the build is even opened: one line naming the file, exit 2, nothing written."""
    from click.testing import CliRunner

    from mvd_deploy.cli import main

    out = tmp_path / "out"
    out.mkdir()
    for image, message in _bad_images(tmp_path):
        result = CliRunner().invoke(
            main, ["generate", str(tmp_path / "no-build"), "--image", str(image), "--out", str(out / "v.mp4")]
        )
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --image {image}:") and message in lines[0], lines
        assert "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_generate_refuses_bad_options(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from mvd_deploy.cli import main

    _image().save(tmp_path / "in.png")
    cases = [
        (["--out", str(tmp_path / "v.avi")], "must name an .mp4 file"),
        (["--out", str(tmp_path / "nowhere" / "v.mp4")], "does not exist"),
        (["--out", str(tmp_path / "v.mp4")], "not a build directory"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(main, ["generate", str(tmp_path), "--image", str(tmp_path / "in.png"), *extra])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


@pytest.mark.slow
def test_pull_says_how_to_call_the_pipeline(tiny_compiled_build, tmp_path):
    import json

    from mvd_deploy.pull import pull_build

    pull_build(tiny_compiled_build, out=tmp_path / "pulled")
    artifacts = json.loads((tmp_path / "pulled" / "artifacts.json").read_text())
    contract = artifacts["pipeline"]
    assert contract["order"] == ["image_encoder", "vae_encoder", "unet", "decoder"]
    unet = artifacts["components"]["unet"]
    [sample] = [i for i in unet["inputs"] if i["name"] == "sample"]
    noise = contract["noise"]["shape"]
    assert sample["shape"] == [*noise[:2], 2 * noise[2], *noise[3:]]
    [pixels] = artifacts["components"]["image_encoder"]["inputs"]
    assert pixels["shape"] == [1, 3, *contract["image"]["image_encoder"]["size"]]
    [image] = artifacts["components"]["vae_encoder"]["inputs"]
    assert image["shape"][2:] == contract["image"]["vae_encoder"]["size"][::-1]
    assert contract["sampler"]["folded"] and contract["sampler"]["sigma"] == 700.0
    assert contract["conditioning"]["folded"]
    assert set(contract["components"]) == set(artifacts["components"])
    for name, io in contract["components"].items():  # every input and output the graphs have is described
        graph = artifacts["components"][name]
        assert {i["name"] for i in graph["inputs"]} == set(io["inputs"]), name
        assert {o["name"] for o in graph["outputs"]} == set(io["outputs"]), name


@pytest.mark.slow
def test_report_shows_a_contact_sheet(compiled_build, generated):
    from click.testing import CliRunner

    from mvd_deploy.cli import main

    work, _ = generated
    result = CliRunner().invoke(main, ["report", str(compiled_build), "--video", str(work / "v.mp4"), "--json"])
    assert result.exit_code == 0, result.output
    page = (compiled_build / "report" / "index.html").read_text()
    assert "contact_sheet.png" in page
    sheet = PIL.Image.open(compiled_build / "report" / "contact_sheet.png")
    assert sheet.width > 2 * 128 and sheet.height > 64
    bad = CliRunner().invoke(main, ["report", str(compiled_build), "--video", str(work / "input.png") + ".nope"])
    assert bad.exit_code == 2 and "file not found" in bad.stderr


# -- recipes and checkpoints with encoders -------------------------------------------------------
def test_recipe_encoder_sections_are_checked(tmp_path):
    from mvd_deploy.errors import MvdError
    from mvd_deploy.recipe import load_recipe

    def recipe(**changes):
        data = yaml.safe_load(TINY.read_text())
        for key, value in changes.items():
            section, _, name = key.partition("__")
            if value is None:
                data.pop(section)
            elif name:
                data[section][name] = value
            else:
                data[section] = value
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    cases = [
        ({"image_encoder__projection_dim": 64}, "key 'image_encoder.projection_dim': must equal unet.cross_attention"),
        ({"image_encoder__hidden_sise": 64}, "key 'image_encoder.hidden_sise': is not a image_encoder architecture"),
        ({"vae__latent_channels": 8}, "key 'vae.latent_channels': must be half of unet.in_channels"),
        ({"vae": None}, "key 'vae': is missing (give both encoders, or neither)"),
        ({"vae__block_out_channels": [32, 32]}, "key 'vae.block_out_channels': needs 4 levels"),
        (
            {"decoder__decoder_block_out_channels": [16, 16]},
            "key 'decoder.decoder_block_out_channels': needs 4 positive",
        ),
        ({"decoder__upsample_fn": "bilinear"}, "key 'decoder.upsample_fn': is not a decoder architecture setting"),
    ]
    data = yaml.safe_load(TINY.read_text())
    data["mobilevd"]["conditioning"]["sigma"] = 80.0
    (tmp_path / "sigma.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MvdError, match=r"key 'mobilevd.conditioning.timestep': must be SVD's c_noise 0.25·ln\(sigma\)"):
        load_recipe(tmp_path / "sigma.yaml")
    for changes, message in cases:
        with pytest.raises(MvdError) as info:
            load_recipe(recipe(**changes))
        assert message in str(info.value), (changes, str(info.value))
    spec = load_recipe(recipe(image_encoder=None, vae=None))  # neither: a UNet-only model, as before
    assert spec.image_encoder is None and spec.vae is None


@pytest.mark.slow
def test_checkpoint_encoders_round_trip_and_missing_file(tiny_checkpoint, tmp_path):
    import shutil

    from mvd_deploy.checkpoint import load_encoders, read_checkpoint_info
    from mvd_deploy.errors import MvdError

    info = read_checkpoint_info(tiny_checkpoint)
    encoders = load_encoders(info)
    assert set(encoders) == {"image_encoder", "vae_encoder"}
    with torch.no_grad():
        embeds = encoders["image_encoder"](torch.randn(1, 3, 224, 224))
        latents = encoders["vae_encoder"](torch.rand(1, 3, 64, 128) * 2 - 1)
    assert embeds.shape == (1, 1, 32) and latents.shape == (1, 4, 8, 16)
    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (broken / "vae_encoder.safetensors").unlink()
    with pytest.raises(MvdError, match=r"vae_encoder.safetensors: weights file not found"):
        read_checkpoint_info(broken)


@pytest.mark.slow
def test_svd_pipeline_dir_must_match_the_recipe(svd_pipeline_dir, tmp_path):
    from mvd_deploy.checkpoint import init_checkpoint
    from mvd_deploy.errors import MvdError

    data = yaml.safe_load(plain_svd_recipe(tmp_path / "r.yaml").read_text())
    data["image_encoder"]["num_hidden_layers"] = 3
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MvdError, match=r"image_encoder/config.json: key 'num_hidden_layers' is 2 but recipe .* has"):
        init_checkpoint(tmp_path / "other.yaml", out=tmp_path / "ck", from_svd=svd_pipeline_dir)
    assert not (tmp_path / "ck").exists()
    # the UNet-directory form still works (encoders then random)
    result = init_checkpoint(tmp_path / "r.yaml", out=tmp_path / "ck2", from_svd=svd_pipeline_dir / "unet")
    assert result.encoders_from.startswith("random init")
