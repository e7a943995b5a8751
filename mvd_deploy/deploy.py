"""From a train-time checkpoint to the deploy pipeline: load, then run the deploy passes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mvd_deploy.checkpoint import DEPLOY_PASSES_KEY, CheckpointInfo, load_checkpoint, load_encoders
from mvd_deploy.errors import MvdError
from mvd_deploy.passes import DEFAULT_PASSES, DeployPipeline, Pass, PassOptions
from mvd_deploy.passes.manager import DEFAULT_TOLERANCE, PassResult, make_passes, run_passes
from mvd_deploy.progress import Stages
from mvd_deploy.recipe import ModelSpec, load_recipe, recipe_file

logger = logging.getLogger(__name__)


# What a recipe may change about a checkpoint's deployment; the rest is what the weights were trained as.
_DEPLOYMENT_SETTINGS = ("video", "nfe", "conditioning", "deploy_passes")
_TRAINED_SETTINGS = ("fun_factor", "funnel_layers", "temporal_multiscaling")


def with_recipe(spec: ModelSpec, recipe: str | Path) -> ModelSpec:
    """``spec`` deployed as ``recipe`` says (shape, steps, conditioning, passes); the model must match."""
    other = load_recipe(recipe)
    for key, value in other.unet.items():
        if key not in ("num_frames", "sample_size") and value != spec.unet[key]:
            raise MvdError(
                f"{other.source}: key 'unet.{key}' is {value!r} but the checkpoint's UNet has {spec.unet[key]!r}"
            )
    for key in _TRAINED_SETTINGS:
        if getattr(other.mobilevd, key) != getattr(spec.mobilevd, key):
            raise MvdError(
                f"{other.source}: key 'mobilevd.{key}' is {getattr(other.mobilevd, key)!r} but the checkpoint was "
                f"trained with {getattr(spec.mobilevd, key)!r}"
            )
    changes = {key: getattr(other.mobilevd, key) for key in _DEPLOYMENT_SETTINGS}
    return dataclasses.replace(spec, mobilevd=dataclasses.replace(spec.mobilevd, **changes))


@dataclass
class Deployment:
    """A checkpoint after the deploy passes: what runs on the phone, and what each pass did."""

    pipeline: DeployPipeline
    passes: list[PassResult]
    checkpoint: CheckpointInfo


def deploy_checkpoint(
    checkpoint: str | Path,
    *,
    passes: list[str] | None = None,
    keep_conditioning_inputs: bool = False,
    taesd_dir: str | Path | None = None,
    decoder_seed: int = 0,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    recipe: str | Path | None = None,
    without_weights: Collection[str] = (),
) -> Deployment:
    """Load ``checkpoint`` (deployed as ``recipe`` says, when given) and run the deploy passes: ``passes``,
    else the checkpoint's (or recipe's) ``deploy_passes``, else all; ``keep_conditioning_inputs`` leaves
    out fold_conditioning. ``check`` proves each exact pass kept the outputs to ``tolerance``. Conditioning
    encoders named in ``without_weights`` are built without reading their weights (:func:`load_encoders`)."""
    stages = Stages(2, logger, name="deploy")
    with stages.stage(f"load {checkpoint}"):
        unet, info = load_checkpoint(checkpoint)
        if recipe is not None:
            unet.spec = info.spec = with_recipe(info.spec, recipe)
        # the conditioning encoders are deployed as they are
        encoders = load_encoders(info, without_weights=without_weights)
    options = PassOptions(taesd_dir=Path(taesd_dir) if taesd_dir else None, decoder_seed=decoder_seed)
    deploy_passes = _make_passes(info, passes, keep_conditioning_inputs, options, recipe)
    pipeline = DeployPipeline(unet, **encoders)
    with stages.stage(f"run {len(deploy_passes)} deploy passes" + (" (each exact one checked)" if check else "")):
        # The layers are a function of the spec (gates, funnels, encoders and decoder sections);
        # a TAESD directory brings its own config, so that deployment counts every time.
        origin = None if taesd_dir else info.spec.canonical_json()
        results = run_passes(pipeline, deploy_passes, check=check, tolerance=tolerance, origin=origin)
    return Deployment(pipeline=pipeline, passes=results, checkpoint=info)


def _make_passes(
    info: CheckpointInfo, passes: list[str] | None, keep_conditioning_inputs: bool, options: PassOptions, recipe
) -> list[Pass]:
    """The passes to run: ``passes``, else the configured ones (named in errors by where they were
    configured), else all; minus fold_conditioning when conditioning stays inputs."""
    source = None
    if passes is None:
        configured = info.spec.mobilevd.deploy_passes
        if configured is not None:
            where = recipe_file(recipe) if recipe is not None else info.spec.source
            source = f"{where}: key '{DEPLOY_PASSES_KEY}'"
        passes = configured if configured is not None else DEFAULT_PASSES
    names = [n for n in passes if not (keep_conditioning_inputs and n == "fold_conditioning")]
    return make_passes(names, options, source=source)


def format_pass_log(results: list[PassResult]) -> str:
    lines = [f"  {'pass':<30} {'component':<9} {'params':>23} {'GFLOPs':>21} {'rel. error':>10}  change"]
    for r in results:
        err = f"{r.rel_error:.1e}" if r.rel_error is not None else ("unchecked" if r.exact and r.changed else "-")
        lines.append(
            f"  {r.name:<30} {r.component:<9} {r.params_before:>11,}→{r.params_after:<11,} "
            f"{r.flops_before / 1e9:>10.1f}→{r.flops_after / 1e9:<10.1f} {err:>10}  {r.changed or 'nothing to do'}"
        )
    return "\n".join(lines)
