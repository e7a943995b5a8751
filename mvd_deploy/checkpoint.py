"""The MobileVD checkpoint: a directory with ``config.json`` and ``unet.safetensors`` (train-time form).

See docs/checkpoint-format.md. Weights load through safetensors only (never pickle), after every
key, shape and dtype has been checked against the model the config describes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder
from safetensors.torch import save_file
from transformers import CLIPVisionConfig

from mvd_deploy.config import ConfigSection
from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import atomic_output_dir, check_output_dir, load_json, write_json
from mvd_deploy.model.encoder_configs import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from mvd_deploy.model.encoders import ImageEncoder, VAEEncoder, encoder_weight_prefixes
from mvd_deploy.model.unet import MobileVDUNet
from mvd_deploy.passes.manager import make_passes
from mvd_deploy.progress import Stages
from mvd_deploy.pruning import with_resolved_gates
from mvd_deploy.recipe import ModelSpec, load_recipe, read_spec, read_unet_config
from mvd_deploy.weights import (
    TensorInfo,
    load_diffusers_weights,
    load_weight_subset,
    load_weights,
    read_safetensors_header,
)

FORMAT = "mvd-deploy-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "unet.safetensors"
# The conditioning encoders' weights, when the config has image_encoder/vae sections.
ENCODER_WEIGHTS = {"image_encoder": "image_encoder.safetensors", "vae_encoder": "vae_encoder.safetensors"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that do not change the graph: an SVD directory may differ from the recipe here.
_UNET_KEYS_FREE = ("num_frames", "sample_size")
DEPLOY_PASSES_KEY = "mobilevd.deploy_passes"
logger = logging.getLogger(__name__)


# -- reading -------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    path: Path
    spec: ModelSpec
    dtype: str
    weights: dict[str, TensorInfo]
    encoder_weights: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Config and weight header of a checkpoint directory, all validated; no tensor data read."""
    path = Path(path)
    if not path.is_dir():
        raise MvdError(f"{path}: checkpoint directory not found")
    config_path = path / CONFIG_FILE
    data = load_json(config_path, "checkpoint config")
    top = ConfigSection(data, str(config_path))
    fmt = top.get("format", str)
    if fmt != FORMAT:
        raise top.error("format", f"must be {FORMAT!r}, got {fmt!r}")
    version = top.get("format_version", int)
    if version != FORMAT_VERSION:
        raise top.error("format_version", f"this mvd-deploy reads version {FORMAT_VERSION}, got {version}")
    dtype = top.get("dtype", str)
    if dtype not in _DTYPES:
        raise top.error("dtype", f"must be one of {list(_DTYPES)}, got {dtype!r}")
    weights_name = top.get("weights", str)
    if Path(weights_name).name != weights_name:
        raise top.error("weights", f"must be a file name inside the checkpoint directory, got {weights_name!r}")
    spec = read_spec(top)
    if spec.mobilevd.temporal_gates is None:
        raise top.error("mobilevd.temporal_gates", "is missing (a checkpoint records every gate)")
    top.finish()
    weights = read_safetensors_header(path / weights_name)
    encoders = {}
    if spec.image_encoder is not None:
        encoders = {name: read_safetensors_header(path / file) for name, file in ENCODER_WEIGHTS.items()}
    return CheckpointInfo(path=path, spec=spec, dtype=dtype, weights=weights, encoder_weights=encoders)


def load_checkpoint(path: str | Path) -> tuple[MobileVDUNet, CheckpointInfo]:
    """The train-time model with the checkpoint's weights (eval mode, CPU)."""
    info = read_checkpoint_info(path)
    model = MobileVDUNet.build(info.spec, device="meta")
    load_weights(info.path / WEIGHTS_FILE, model, info.dtype)
    return model.eval(), info


def load_encoders(info: CheckpointInfo, *, without_weights: Collection[str] = ()) -> dict[str, torch.nn.Module]:
    """The checkpoint's conditioning encoders ({} when it has none), eval mode, CPU. Those named in
    ``without_weights`` stay on the meta device, their weights unread: structure, shapes and FLOPs only
    (an export of other components; the full-size CLIP encoder is 2.5 GB)."""
    if info.spec.image_encoder is None:
        return {}
    image_encoder = ImageEncoder.build(info.spec.image_encoder, device="meta")
    if "image_encoder" not in without_weights:
        load_weights(info.path / ENCODER_WEIGHTS["image_encoder"], image_encoder.clip, info.dtype)
        image_encoder.restore_buffers()
    vae_encoder = VAEEncoder.build(info.spec.vae, device="meta")
    if "vae_encoder" not in without_weights:
        load_weights(info.path / ENCODER_WEIGHTS["vae_encoder"], vae_encoder, info.dtype)
    return {"image_encoder": image_encoder.eval(), "vae_encoder": vae_encoder.eval()}


def _encoder_states(encoders: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """What each encoder's weights file holds: the CLIP model's own (transformers) keys; the VAE's
    encoder.* and quant_conv.* (diffusers' keys)."""
    modules = {"image_encoder": encoders["image_encoder"].clip, "vae_encoder": encoders["vae_encoder"]}
    return {name: {k: v.detach().contiguous() for k, v in m.state_dict().items()} for name, m in modules.items()}


# -- writing -------------------------------------------------------------------------------------
def save_checkpoint(model: MobileVDUNet, out: str | Path, encoders: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write ``model`` (with resolved gates in its spec) and its ``encoders`` to ``out``, atomically.

    Encoders the spec describes but ``encoders`` does not give are random-initialised."""
    spec = model.spec
    if spec.mobilevd.temporal_gates is None:
        raise ValueError("save_checkpoint needs a spec with resolved temporal gates")
    if spec.image_encoder is None:
        encoders = {}
    elif not encoders:
        encoders = {"image_encoder": ImageEncoder.build(spec.image_encoder), "vae_encoder": VAEEncoder.build(spec.vae)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    encoder_states = _encoder_states(encoders) if encoders else {}
    tensors = [*state.values(), *(v for es in encoder_states.values() for v in es.values())]
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"mixed dtypes in state dict: {sorted(dtypes)}")
    out = Path(out)
    with atomic_output_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        for name, encoder_state in encoder_states.items():
            save_file(encoder_state, str(tmp / ENCODER_WEIGHTS[name]), metadata={"format": FORMAT})
        write_json(
            tmp / CONFIG_FILE,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dtype": dtypes.pop(),
                "weights": WEIGHTS_FILE,
                **spec.to_dict(),
            },
        )
    return out


def _svd_unet(unet_dir: Path, spec: ModelSpec) -> torch.nn.Module:
    """A diffusers SVD UNet from a local directory (config.json + safetensors), checked against ``spec``."""
    from diffusers import UNetSpatioTemporalConditionModel

    config_path = unet_dir / "config.json"
    raw = load_json(config_path, "diffusers UNet config")
    if not isinstance(raw, dict):
        raise MvdError(f"{config_path}: must hold a JSON object")
    section = ConfigSection({k: v for k, v in raw.items() if not k.startswith("_")}, str(config_path))
    config = read_unet_config(section)
    for key, value in config.items():
        if key not in _UNET_KEYS_FREE and value != spec.unet[key]:
            raise MvdError(f"{config_path}: key '{key}' is {value!r} but recipe {spec.source} has {spec.unet[key]!r}")
    with torch.device("meta"):
        base = UNetSpatioTemporalConditionModel(**{**spec.unet, **{k: config[k] for k in _UNET_KEYS_FREE}})
    return load_diffusers_weights(unet_dir, base.to("meta"))


@dataclass
class CheckpointResult:
    """What :func:`init_checkpoint` wrote."""

    checkpoint: str
    recipe: str
    seed: int | None  # None when initialised from an SVD UNet
    from_svd: str | None
    params: int
    encoders: dict[str, int]  # parameters of each conditioning encoder written
    encoders_from: str | None  # the SVD pipeline directory, or the random init's seed
    temporal_blocks_kept: int
    temporal_blocks_pruned: int
    funnel_pairs: int

    def to_json(self) -> dict:
        return asdict(self)


def _match_config(config_path: Path, raw: dict, wanted: dict, defaults: dict, spec: ModelSpec, section: str) -> None:
    """A diffusers/transformers config.json against the recipe's ``section`` (architecture keys only)."""
    for key, value in wanted.items():
        found = raw.get(key, defaults.get(key))
        found = list(found) if isinstance(found, tuple) else found
        if found != value:
            raise MvdError(
                f"{config_path}: key '{key}' is {found!r} but recipe {spec.source} has {section}.{key} {value!r}"
            )


def _json_object(path: Path, what: str) -> dict:
    raw = load_json(path, what)
    if not isinstance(raw, dict):
        raise MvdError(f"{path}: must hold a JSON object")
    return raw


def _first_existing(directory: Path, names: tuple[str, ...], what: str) -> Path:
    found = next((directory / n for n in names if (directory / n).exists()), None)
    if found is None:
        raise MvdError(f"{directory}: no {' or '.join(names)} for the {what} (only safetensors weights are read)")
    return found


def _svd_encoders(directory: Path, spec: ModelSpec) -> dict[str, torch.nn.Module]:
    """The image encoder and the VAE's encoder from a diffusers SVD pipeline directory, checked
    against ``spec``; with its feature extractor's normalisation and its scheduler checked against
    what the deployed pipeline does (mvd_deploy.pipeline, mvd_deploy.model.sampler)."""
    clip_dir, vae_dir = directory / "image_encoder", directory / "vae"
    config_path = clip_dir / "config.json"
    _match_config(
        config_path,
        _json_object(config_path, "CLIP vision config"),
        spec.image_encoder,
        CLIPVisionConfig().to_dict(),
        spec,
        "image_encoder",
    )
    config_path = vae_dir / "config.json"
    vae_defaults = {
        k: p.default for k, p in inspect.signature(AutoencoderKLTemporalDecoder.__init__).parameters.items()
    }
    _match_config(config_path, _json_object(config_path, "VAE config"), spec.vae, vae_defaults, spec, "vae")
    _check_feature_extractor(directory / "feature_extractor" / "preprocessor_config.json")
    _check_scheduler(directory / "scheduler" / "scheduler_config.json", spec)

    image_encoder = ImageEncoder.build(spec.image_encoder, device="meta")
    weights = _first_existing(clip_dir, ("model.safetensors", "model.fp16.safetensors"), "image encoder")
    header = read_safetensors_header(weights)
    load_weights(weights, image_encoder.clip, next(iter(header.values())).dtype if header else "float32")
    vae_encoder = VAEEncoder.build(spec.vae, device="meta")
    weights = _first_existing(
        vae_dir, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"), "VAE"
    )
    load_weight_subset(weights, vae_encoder, encoder_weight_prefixes())
    return {"image_encoder": image_encoder.restore_buffers().float().eval(), "vae_encoder": vae_encoder.float().eval()}


def _check_feature_extractor(path: Path) -> None:
    """SVD normalises the CLIP image with OpenAI CLIP's mean/std; the deployed pipeline does the same."""
    if not path.exists():
        return
    raw = _json_object(path, "CLIP image processor config")
    for key, expected in (("image_mean", CLIP_IMAGE_MEAN), ("image_std", CLIP_IMAGE_STD)):
        value = raw.get(key, expected)
        if (
            not isinstance(value, list)
            or len(value) != 3
            or any(abs(a - b) > 1e-6 for a, b in zip(value, expected, strict=True))
        ):
            raise MvdError(
                f"{path}: key '{key}' is {value!r}; the deployed pipeline normalises with CLIP's {list(expected)}"
            )


# What mvd_deploy.model.sampler implements: SVD's EulerDiscreteScheduler configuration.
_SCHEDULER = {
    "prediction_type": "v_prediction",
    "timestep_type": "continuous",
    "timestep_spacing": "leading",
    "use_karras_sigmas": True,
}


def _check_scheduler(path: Path, spec: ModelSpec) -> None:
    if not path.exists():
        return
    raw = _json_object(path, "scheduler config")
    for key, expected in _SCHEDULER.items():
        if raw.get(key) != expected:
            raise MvdError(
                f"{path}: key '{key}' is {raw.get(key)!r}; the deployed 1-step sampler is SVD's ({expected!r})"
            )
    sigma = spec.mobilevd.conditioning.sigma
    if sigma is not None and raw.get("sigma_max") != sigma:
        raise MvdError(
            f"{path}: key 'sigma_max' is {raw.get('sigma_max')!r} but recipe {spec.source} runs at "
            f"conditioning.sigma {sigma:g} (one Karras step is sigma_max)"
        )


def init_checkpoint(
    recipe: str | Path, *, out: str | Path, seed: int = 0, from_svd: str | Path | None = None
) -> CheckpointResult:
    """Make a train-time checkpoint in the new directory ``out`` from ``recipe`` (a shipped model's
    name or a recipe path): deterministic random init (``seed``), or from a local diffusers SVD UNet
    or pipeline directory (``from_svd``: a diffusers SVD pipeline directory — unet/, vae/,
    image_encoder/, ... — or its UNet directory alone)."""
    check_output_dir(Path(out))
    svd = Path(from_svd) if from_svd is not None else None
    pipeline_dir = svd is not None and (svd / "unet").is_dir()
    stages = Stages(4, logger)
    with stages.stage(f"read recipe {recipe}"):
        spec = load_recipe(recipe)
        if spec.mobilevd.deploy_passes is not None:  # refused now, not when the checkpoint is deployed
            make_passes(spec.mobilevd.deploy_passes, source=f"{spec.source}: key '{DEPLOY_PASSES_KEY}'")
        spec = with_resolved_gates(spec)
    if svd is not None:
        unet_dir = svd / "unet" if pipeline_dir else svd
        with stages.stage(f"load SVD UNet from {unet_dir}, funnels by coupled singular init"):
            model = MobileVDUNet(_svd_unet(unet_dir, spec), spec)
    else:
        with stages.stage(f"random init (seed {seed}), funnels by coupled singular init"):
            torch.manual_seed(seed)
            model = MobileVDUNet.build(spec)
    encoders, encoder_source = {}, None
    if spec.image_encoder is not None and pipeline_dir:
        with stages.stage(f"load the image encoder and the VAE encoder from {svd}"):
            encoders, encoder_source = _svd_encoders(svd, spec), str(svd)
    elif spec.image_encoder is not None:
        with stages.stage(f"image encoder and VAE encoder: random init (seed {seed})"):
            torch.manual_seed(seed + 1)
            encoders = {
                "image_encoder": ImageEncoder.build(spec.image_encoder),
                "vae_encoder": VAEEncoder.build(spec.vae),
            }
            encoder_source = f"random init, seed {seed}"
    attentions = model.funnel_attentions(spec.mobilevd.funnel_layers)
    with stages.stage(f"write {out}"):
        save_checkpoint(model, out, encoders)
    gates = spec.mobilevd.temporal_gates
    return CheckpointResult(
        checkpoint=str(out),
        recipe=str(recipe),
        seed=None if from_svd else seed,
        from_svd=str(from_svd) if from_svd else None,
        params=sum(p.numel() for p in model.parameters()),
        encoders={name: sum(p.numel() for p in m.parameters()) for name, m in encoders.items()},
        encoders_from=encoder_source,
        temporal_blocks_kept=sum(g.keep for g in gates.values()),
        temporal_blocks_pruned=sum(not g.keep for g in gates.values()),
        funnel_pairs=2 * len(attentions),
    )
