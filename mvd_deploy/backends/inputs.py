"""Inputs as the 1-step pipeline makes them: the calibration and validation draws every backend uses."""

from __future__ import annotations

import numpy as np

from mvd_deploy.build import Build
from mvd_deploy.model.encoder_configs import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from mvd_deploy.onnx_tools import ort_session

VALIDATION_SEED = 1  # the draw a compiled form is validated on (the export's own check uses seed 0)


def pipeline_inputs(build: Build, component: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs as the 1-step pipeline makes them (calibration data for static int8).

    UNet: channels 0-3 of ``sample`` are the noised latent scaled by c_in (≈ unit Gaussian at σ = 700),
    channels 4-7 the conditioning image's latent, the same for every frame (SVD repeats it); the image
    embedding a unit-variance vector. Decoder: the exported UNet's outputs on those inputs when the
    build has a UNet, else unit-Gaussian latents. Encoders: images of uniform random pixels, as the
    preprocessing gives them (CLIP-normalised for the image encoder, [-1, 1] for the VAE encoder).
    """
    rng = np.random.default_rng(seed)
    if component in ("image_encoder", "vae_encoder"):
        return [_image_inputs(build.components[component]["inputs"], rng) for _ in range(n)]
    unet_io = build.components.get("unet")
    samples = []
    for _ in range(n):
        feed = {}
        for spec in (unet_io or build.components[component])["inputs"]:
            shape = spec["shape"]
            if spec["name"] == "sample":
                noise = rng.standard_normal((*shape[:2], shape[2] // 2, *shape[3:]))
                image = np.repeat(rng.standard_normal((shape[0], 1, shape[2] - shape[2] // 2, *shape[3:])), shape[1], 1)
                feed["sample"] = np.concatenate([noise, image], axis=2).astype(np.float32)
            else:
                feed[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
        samples.append(feed)
    if component == "unet":
        return samples
    if unet_io is None:
        return [build.random_inputs(component, seed + i) for i in range(n)]
    session = ort_session(build.onnx_path("unet"), low_memory=True)
    return [{"latents": session.run(None, feed)[0]} for feed in samples]


def _image_inputs(specs: list[dict], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for spec in specs:
        pixels = rng.uniform(0.0, 1.0, spec["shape"])
        if spec["name"] == "pixel_values":
            mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in (CLIP_IMAGE_MEAN, CLIP_IMAGE_STD))
            feed[spec["name"]] = ((pixels - mean) / std).astype(np.float32)
        else:
            feed[spec["name"]] = (pixels * 2 - 1).astype(np.float32)
    return feed
