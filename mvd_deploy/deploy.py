"""From a train-time checkpoint to the deploy pipeline: load, then run the deploy passes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mvd_deploy.checkpoint import CheckpointInfo, load_checkpoint, load_encoders
from mvd_deploy.errors import MvdError
from mvd_deploy.passes import DEFAULT_PASSES, DeployPipeline, PassOptions
from mvd_deploy.passes.manager import DEFAULT_TOLERANCE, PassResult, make_passes, run_passes
from mvd_deploy.progress import Stages
from mvd_deploy.recipe import ModelSpec, load_recipe


def pass_names(info: CheckpointInfo, passes: list[str] | None, keep_conditioning_inputs: bool) -> list[str]:
    """The list to run: the command line's, else the checkpoint's, else all; minus folding if asked."""
    if passes is None:
        configured = info.spec.mobilevd.deploy_passes
        passes = configured if configured is not None else DEFAULT_PASSES
    names = list(passes)
    if keep_conditioning_inputs:
        names = [n for n in names if n != "fold_conditioning"]
    return names


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


def deploy(
    checkpoint: str | Path,
    passes: list[str] | None = None,
    keep_conditioning_inputs: bool = False,
    taesd_dir: str | Path | None = None,
    decoder_seed: int = 0,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    quiet: bool = False,
    recipe: str | Path | None = None,
) -> tuple[DeployPipeline, list[PassResult], CheckpointInfo]:
    """Load ``checkpoint`` (deployed as ``recipe`` says, when given) and run the deploy passes."""
    stages = Stages(2, quiet=quiet, name="deploy")
    with stages.stage(f"load {checkpoint}"):
        unet, info = load_checkpoint(checkpoint)
        if recipe is not None:
            unet.spec = info.spec = with_recipe(info.spec, recipe)
        encoders = load_encoders(info)  # the conditioning encoders are deployed as they are
    names = pass_names(info, passes, keep_conditioning_inputs)
    options = PassOptions(taesd_dir=Path(taesd_dir) if taesd_dir else None, decoder_seed=decoder_seed)
    deploy_passes = make_passes(names, options)
    pipeline = DeployPipeline(unet, **encoders)

    def progress(i, n, name):
        if not quiet:
            print(f"      pass {i + 1}/{n}: {name}", flush=True, file=sys.stderr)

    with stages.stage(f"run {len(names)} deploy passes" + (" (each exact one checked)" if check else "")):
        results = run_passes(pipeline, deploy_passes, check=check, tolerance=tolerance, progress=progress)
    return pipeline, results, info


def format_pass_log(results: list[PassResult]) -> str:
    lines = [f"  {'pass':<30} {'component':<9} {'params':>23} {'GFLOPs':>21} {'rel. error':>10}  change"]
    for r in results:
        err = f"{r.rel_error:.1e}" if r.rel_error is not None else ("-" if not r.exact else "unchecked")
        lines.append(
            f"  {r.name:<30} {r.component:<9} {r.params_before:>11,}→{r.params_after:<11,} "
            f"{r.flops_before / 1e9:>10.1f}→{r.flops_after / 1e9:<10.1f} {err:>10}  {r.changed or 'nothing to do'}"
        )
    return "\n".join(lines)
