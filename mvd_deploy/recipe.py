"""Model recipes (``mvd_deploy/data/models/*.yaml``, or any path) and the ``mobilevd`` section of a
checkpoint's config.json.

A recipe and a checkpoint describe the same thing, a :class:`ModelSpec`: the diffusers
``UNetSpatioTemporalConditionModel`` config plus the MobileVD settings. A recipe says how to prune
(``temporal_prune_fraction``); a checkpoint carries the resulting per-block gates. Both go through
the same validation, and every failure names the file and the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from mvd_deploy.config import ConfigSection, load_yaml
from mvd_deploy.model.encoder_configs import SVD_IMAGE_ENCODER, SVD_VAE, TAESD_DECODER
from mvd_deploy.shipped import MODELS, resolve_yaml

FUNNEL_LAYER_KINDS = ("spatial_self_attention", "temporal_self_attention")
TEMPORAL_BLOCK_KINDS = ("resnet", "transformer")
VAE_SCALE_FACTOR = 8  # SVD's VAE: 8x spatial downsampling, 4 latent channels
LATENT_CHANNELS = 4


def unet_defaults() -> dict[str, Any]:
    from diffusers import UNetSpatioTemporalConditionModel

    params = inspect.signature(UNetSpatioTemporalConditionModel.__init__).parameters
    return {
        name: (list(p.default) if isinstance(p.default, tuple) else p.default)
        for name, p in params.items()
        if name != "self"
    }


@dataclass(frozen=True)
class Video:
    width: int
    height: int
    frames: int

    def latent_shape(self, in_channels: int) -> tuple[int, int, int, int, int]:
        """UNet sample shape, batch 1: (1, frames, in_channels, height/8, width/8)."""
        return (1, self.frames, in_channels, self.height // VAE_SCALE_FACTOR, self.width // VAE_SCALE_FACTOR)


@dataclass(frozen=True)
class Conditioning:
    """The values SVD feeds its time embeddings; fixed for a 1-step deployment.

    ``timestep`` is SVD's c_noise = 0.25·ln(σ); ``fps_id`` is what SVD's pipeline passes (fps − 1).
    """

    timestep: float
    fps_id: float
    motion_bucket_id: float
    noise_aug_strength: float
    # The σ the 1-step sampler runs at (mvd_deploy.model.sampler); None: exp(4·timestep).
    sigma: float | None = None

    def added_time_ids(self) -> list[float]:
        return [self.fps_id, self.motion_bucket_id, self.noise_aug_strength]


@dataclass(frozen=True)
class TemporalGate:
    kind: str  # "resnet" | "transformer"
    importance: float
    keep: bool


@dataclass
class MobileVDConfig:
    video: Video
    nfe: int
    conditioning: Conditioning
    fun_factor: float
    funnel_layers: tuple[str, ...]
    temporal_multiscaling: bool
    temporal_prune_fraction: float
    # The deploy passes' names, in order (mvd_deploy.passes); None means all of them.
    deploy_passes: tuple[str, ...] | None = None
    # None until resolved: a recipe prunes cheapest-first; a checkpoint carries trained gates.
    temporal_gates: dict[str, TemporalGate] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["funnel_layers"] = list(self.funnel_layers)
        if self.deploy_passes is None:
            del d["deploy_passes"]
        else:
            d["deploy_passes"] = list(self.deploy_passes)
        if self.temporal_gates is None:
            del d["temporal_gates"]
        if self.conditioning.sigma is None:
            del d["conditioning"]["sigma"]
        return d


@dataclass
class ModelSpec:
    name: str
    unet: dict[str, Any]  # complete diffusers UNetSpatioTemporalConditionModel config
    mobilevd: MobileVDConfig
    source: str = field(default="<memory>", compare=False)
    # The conditioning encoders' architectures (mvd_deploy.model.encoders); None: the model has none.
    image_encoder: dict[str, Any] | None = None
    vae: dict[str, Any] | None = None
    # The TAESD decoder's architecture (AutoencoderTiny keys) for a random-init decoder; None: TAESD's.
    decoder: dict[str, Any] | None = None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.mobilevd.video.latent_shape(self.unet["in_channels"])

    def canonical_json(self) -> str:
        """The spec as canonical JSON: a key for what is a pure function of the architecture (Table 8,
        the pass log's FLOPs)."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def to_dict(self) -> dict[str, Any]:
        parts = (("image_encoder", self.image_encoder), ("vae", self.vae), ("decoder", self.decoder))
        return {
            "name": self.name,
            "unet": self.unet,
            **{k: v for k, v in parts if v is not None},
            "mobilevd": self.mobilevd.to_dict(),
        }


def _read_video(s: ConfigSection) -> Video:
    video = Video(width=s.get("width", int), height=s.get("height", int), frames=s.get("frames", int))
    for name in ("width", "height"):
        value = getattr(video, name)
        s.check(
            name,
            value > 0 and value % (VAE_SCALE_FACTOR * 8) == 0,
            f"must be a positive multiple of 64 (8x VAE, 8x UNet), got {value}",
        )
    s.check("frames", video.frames >= 1, f"must be at least 1, got {video.frames}")
    s.finish()
    return video


def _read_conditioning(s: ConfigSection) -> Conditioning:
    cond = Conditioning(
        timestep=s.get("timestep", float),
        fps_id=s.get("fps_id", float),
        motion_bucket_id=s.get("motion_bucket_id", float),
        noise_aug_strength=s.get("noise_aug_strength", float),
        sigma=s.get("sigma", float, None),
    )
    if cond.sigma is not None:
        s.check("sigma", cond.sigma > 0, f"must be positive, got {cond.sigma}")
        c_noise = 0.25 * math.log(cond.sigma)
        s.check(
            "timestep",
            abs(c_noise - cond.timestep) <= 1e-4,
            f"must be SVD's c_noise 0.25·ln(sigma) = {c_noise:.6f} for sigma {cond.sigma:g}, got {cond.timestep}",
        )
    s.finish()
    return cond


def _read_gates(s: ConfigSection) -> dict[str, TemporalGate]:
    gates = {}
    for name in s.data:
        g = s.section(name)
        kind = g.get("kind", str)
        g.check("kind", kind in TEMPORAL_BLOCK_KINDS, f"must be one of {list(TEMPORAL_BLOCK_KINDS)}, got {kind!r}")
        gates[name] = TemporalGate(kind=kind, importance=g.get("importance", float), keep=g.get("keep", bool))
        g.finish()
    return gates


def _read_mobilevd(s: ConfigSection) -> MobileVDConfig:
    video = _read_video(s.section("video"))
    nfe = s.get("nfe", int)
    s.check("nfe", nfe >= 1, f"must be at least 1, got {nfe}")
    conditioning = _read_conditioning(s.section("conditioning"))
    fun_factor = s.get("fun_factor", float, 1.0)
    s.check("fun_factor", 0.0 < fun_factor <= 1.0, f"must be in (0, 1], got {fun_factor}")
    layers = s.get("funnel_layers", list, [])
    for kind in layers:
        s.check(
            "funnel_layers",
            kind in FUNNEL_LAYER_KINDS,
            f"entries must be among {list(FUNNEL_LAYER_KINDS)}, got {kind!r}",
        )
    multiscaling = s.get("temporal_multiscaling", bool, False)
    s.check(
        "temporal_multiscaling",
        not multiscaling or video.frames % 2 == 0,
        f"needs an even frame count (video.frames is {video.frames})",
    )
    prune = s.get("temporal_prune_fraction", float, 0.0)
    s.check("temporal_prune_fraction", 0.0 <= prune <= 1.0, f"must be in [0, 1], got {prune}")
    # Names only: they are checked where the passes are made (passes.manager.make_passes).
    deploy_passes = s.get("deploy_passes", list, None)
    if deploy_passes is not None:
        deploy_passes = tuple(deploy_passes)
    gates = _read_gates(s.section("temporal_gates")) if "temporal_gates" in s.data else None
    s.finish()
    return MobileVDConfig(
        video=video,
        nfe=nfe,
        conditioning=conditioning,
        fun_factor=fun_factor,
        funnel_layers=tuple(dict.fromkeys(layers)),
        temporal_multiscaling=multiscaling,
        temporal_prune_fraction=prune,
        deploy_passes=deploy_passes,
        temporal_gates=gates,
    )


def read_unet_config(s: ConfigSection) -> dict[str, Any]:
    config = unet_defaults()
    for name, value in s.data.items():
        s.check(name, name in config, "is not a UNetSpatioTemporalConditionModel setting (see diffusers' signature)")
        config[name] = list(value) if isinstance(value, tuple) else value
    s.read.update(s.data)
    levels = len(config["block_out_channels"])
    heads = config["num_attention_heads"]
    heads = [heads] * levels if isinstance(heads, int) else heads
    s.check("num_attention_heads", len(heads) == levels, f"needs one entry per level ({levels})")
    for i, (width, h) in enumerate(zip(config["block_out_channels"], heads, strict=True)):
        s.check(
            "block_out_channels",
            width % 32 == 0,
            f"entry {i} ({width}) must be a multiple of 32 (GroupNorm with 32 groups)",
        )
        s.check("num_attention_heads", width % h == 0, f"entry {i} ({h}) must divide block_out_channels[{i}] ({width})")
    return config


def read_spec(top: ConfigSection, allow_gates: bool = True) -> ModelSpec:
    """The model description in ``top`` (name, unet, mobilevd); the caller finishes ``top``."""
    name = top.get("name", str)
    top.get("description", str, "")
    unet = read_unet_config(top.section("unet", {}))
    image_encoder = read_architecture(top, "image_encoder", SVD_IMAGE_ENCODER)
    vae = read_architecture(top, "vae", SVD_VAE)
    decoder = read_architecture(top, "decoder", TAESD_DECODER)
    if decoder is not None:
        for key, value in decoder.items():  # TAESD's four levels make its 8x upsampling
            ok = len(value) == 4 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            top.check(f"decoder.{key}", ok, f"needs 4 positive integers (one per TAESD level), got {value!r}")
    mobilevd = _read_mobilevd(top.section("mobilevd"))
    if mobilevd.temporal_gates is not None and not allow_gates:
        raise top.error("mobilevd.temporal_gates", "belongs in a checkpoint; a recipe sets temporal_prune_fraction")
    if (image_encoder is None) != (vae is None):
        raise top.error(
            "image_encoder" if image_encoder is None else "vae", "is missing (give both encoders, or neither)"
        )
    if image_encoder is not None:
        _check_encoders(top, unet, image_encoder, vae)
    return ModelSpec(
        name=name,
        unet=unet,
        mobilevd=mobilevd,
        source=top.source,
        image_encoder=image_encoder,
        vae=vae,
        decoder=decoder,
    )


def read_architecture(top: ConfigSection, name: str, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """An architecture section (an encoder, the decoder): its keys over ``defaults`` ({} is the released
    model's); None when absent."""
    if name not in top.data:
        top.read.add(name)
        return None
    s = top.section(name)
    config = dict(defaults)
    for key, value in s.data.items():
        s.check(key, key in defaults, f"is not a {name} architecture setting (known: {', '.join(defaults)})")
        kind = type(defaults[key])
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        s.check(key, ok, f"must be {kind.__name__}, got {value!r}")
        config[key] = value
    s.read.update(s.data)
    return config


def _check_encoders(top: ConfigSection, unet: dict, image_encoder: dict, vae: dict) -> None:
    """The encoders must produce what the UNet reads."""
    if image_encoder["projection_dim"] != unet["cross_attention_dim"]:
        raise top.error(
            "image_encoder.projection_dim",
            f"must equal unet.cross_attention_dim ({unet['cross_attention_dim']}), "
            f"got {image_encoder['projection_dim']}",
        )
    if 2 * vae["latent_channels"] != unet["in_channels"]:
        raise top.error(
            "vae.latent_channels",
            f"must be half of unet.in_channels ({unet['in_channels']}: noise + image latent), "
            f"got {vae['latent_channels']}",
        )
    if 2 ** (len(vae["block_out_channels"]) - 1) != VAE_SCALE_FACTOR:
        raise top.error("vae.block_out_channels", f"needs 4 levels (the latent is 1/{VAE_SCALE_FACTOR} of the image)")
    if len(vae["down_block_types"]) != len(vae["block_out_channels"]):
        raise top.error("vae.down_block_types", "needs one entry per block_out_channels level")


def spec_from_dict(data: Any, source: str, allow_gates: bool = True) -> ModelSpec:
    top = ConfigSection(data, source)
    spec = read_spec(top, allow_gates)
    top.finish()
    return spec


def recipe_file(recipe: str | Path) -> Path | Traversable:
    """A recipe value: a shipped model's name (``mobilevd``) or a path to a recipe YAML."""
    return resolve_yaml(recipe, MODELS, "recipe", "model", "recipe")


def load_recipe(recipe: str | Path) -> ModelSpec:
    path = recipe_file(recipe)
    return spec_from_dict(load_yaml(path, "recipe"), str(path), allow_gates=False)
