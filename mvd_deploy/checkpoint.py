"""The MobileVD checkpoint: a directory with ``config.json`` and ``unet.safetensors`` (train-time form).

See docs/checkpoint-format.md. Weights load through safetensors only (never pickle), after every
key, shape and dtype has been checked against the model the config describes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mvd_deploy.config import ConfigSection
from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import atomic_output_dir, check_output_dir, load_json, write_json
from mvd_deploy.model.unet import MobileVDUNet
from mvd_deploy.passes.manager import make_passes
from mvd_deploy.progress import Stages
from mvd_deploy.pruning import with_resolved_gates
from mvd_deploy.recipe import ModelSpec, load_recipe, read_spec, read_unet_config
from mvd_deploy.weights import TensorInfo, load_diffusers_weights, load_weights, read_safetensors_header

FORMAT = "mvd-deploy-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "unet.safetensors"
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
    return CheckpointInfo(path=path, spec=spec, dtype=dtype, weights=weights)


def load_checkpoint(path: str | Path) -> tuple[MobileVDUNet, CheckpointInfo]:
    """The train-time model with the checkpoint's weights (eval mode, CPU)."""
    info = read_checkpoint_info(path)
    model = MobileVDUNet.build(info.spec, device="meta")
    load_weights(info.path / WEIGHTS_FILE, model, info.dtype)
    return model.eval(), info


# -- writing -------------------------------------------------------------------------------------
def save_checkpoint(model: MobileVDUNet, out: str | Path) -> Path:
    """Write ``model`` (with resolved gates in its spec) to the directory ``out``, atomically."""
    spec = model.spec
    if spec.mobilevd.temporal_gates is None:
        raise ValueError("save_checkpoint needs a spec with resolved temporal gates")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"mixed dtypes in state dict: {sorted(dtypes)}")
    out = Path(out)
    with atomic_output_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
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
    temporal_blocks_kept: int
    temporal_blocks_pruned: int
    funnel_pairs: int

    def to_json(self) -> dict:
        return asdict(self)


def init_checkpoint(
    recipe: str | Path, *, out: str | Path, seed: int = 0, from_svd: str | Path | None = None
) -> CheckpointResult:
    """Make a train-time checkpoint in the new directory ``out`` from ``recipe`` (a shipped model's
    name or a recipe path): deterministic random init (``seed``), or from a local diffusers SVD UNet
    directory (``from_svd``)."""
    check_output_dir(Path(out))
    stages = Stages(3, logger)
    with stages.stage(f"read recipe {recipe}"):
        spec = load_recipe(recipe)
        if spec.mobilevd.deploy_passes is not None:  # refused now, not when the checkpoint is deployed
            make_passes(spec.mobilevd.deploy_passes, source=f"{spec.source}: key '{DEPLOY_PASSES_KEY}'")
        spec = with_resolved_gates(spec)
    if from_svd is not None:
        with stages.stage(f"load SVD UNet from {from_svd}, funnels by coupled singular init"):
            model = MobileVDUNet(_svd_unet(Path(from_svd), spec), spec)
    else:
        with stages.stage(f"random init (seed {seed}), funnels by coupled singular init"):
            torch.manual_seed(seed)
            model = MobileVDUNet.build(spec)
    attentions = model.funnel_attentions(spec.mobilevd.funnel_layers)
    with stages.stage(f"write {out}"):
        save_checkpoint(model, out)
    gates = spec.mobilevd.temporal_gates
    return CheckpointResult(
        checkpoint=str(out),
        recipe=str(recipe),
        seed=None if from_svd else seed,
        from_svd=str(from_svd) if from_svd else None,
        params=sum(p.numel() for p in model.parameters()),
        temporal_blocks_kept=sum(g.keep for g in gates.values()),
        temporal_blocks_pruned=sum(not g.keep for g in gates.values()),
        funnel_pairs=2 * len(attentions),
    )
