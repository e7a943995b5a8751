"""The ``mvd-deploy`` command line: thin click commands over the Python API."""

from __future__ import annotations

import functools
import json
import sys

import click

from mvd_deploy.errors import MvdError


def _user_errors(fn):
    """Bad input → one line on stderr, exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MvdError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _emit(result, as_json: bool, human) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else human(result))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvd-deploy")
def main():
    """Take a MobileVD video diffusion checkpoint to the phone."""


@main.command("init-checkpoint")
@click.option("--model", "recipe", required=True, type=click.Path(dir_okay=False), help="Model recipe (models/*.yaml).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to create.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random init.")
@click.option(
    "--from-svd",
    "from_svd",
    type=click.Path(file_okay=False),
    help="Local diffusers SVD UNet directory (config.json + safetensors) to initialise from.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def init_checkpoint_cmd(recipe, out, seed, from_svd, as_json):
    """Make a train-time MobileVD checkpoint (random init, or from an SVD UNet)."""
    from mvd_deploy.checkpoint import init_checkpoint

    result = init_checkpoint(recipe, out, seed=seed, from_svd=from_svd)
    _emit(
        result,
        as_json,
        lambda r: (
            f"wrote {r['checkpoint']}: {r['params']:,} parameters, temporal blocks "
            f"{r['temporal_blocks_kept']} kept / {r['temporal_blocks_pruned']} pruned, {r['funnel_pairs']} funnel pairs"
        ),
    )


@main.command("inspect")
@click.argument("target", type=click.Path())
@click.option("--stages", is_flag=True, help="FLOPs after each optimisation, in the paper's order (Table 8).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (an object; a list of rows with --stages).")
@_user_errors
def inspect_cmd(target, stages, as_json):
    """Parameters, shapes, temporal blocks and FLOPs of a recipe or checkpoint."""
    from mvd_deploy.inspect import format_inspect, inspect_model, inspect_stages
    from mvd_deploy.stages import format_stage_table

    if stages:
        _emit(inspect_stages(target), as_json, lambda rows: format_stage_table(rows, f"{target}: FLOPs per UNet call"))
    else:
        _emit(inspect_model(target), as_json, format_inspect)


def _pass_list(value: str | None) -> list[str] | None:
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


@main.command("passes")
@click.argument("checkpoint", type=click.Path())
@click.option("--passes", "passes", help="Comma-separated pass list (default: the checkpoint's deploy_passes).")
@click.option(
    "--keep-conditioning-inputs",
    is_flag=True,
    help="Leave out fold_conditioning: timestep and added_time_ids stay inputs.",
)
@click.option(
    "--taesd",
    "taesd_dir",
    type=click.Path(file_okay=False),
    help="Local diffusers AutoencoderTiny directory (default: random init).",
)
@click.option("--decoder-seed", default=0, show_default=True, type=int, help="Seed of a random-init TAESD.")
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    type=float,
    help="Largest relative output change an exact pass may make.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the pass log as JSON.")
@_user_errors
def passes_cmd(checkpoint, passes, keep_conditioning_inputs, taesd_dir, decoder_seed, tolerance, as_json):
    """Run the deploy passes on a checkpoint and check each exact one (writes nothing)."""
    from mvd_deploy.deploy import deploy, format_pass_log

    _, results, _ = deploy(
        checkpoint, _pass_list(passes), keep_conditioning_inputs, taesd_dir, decoder_seed, tolerance=tolerance
    )
    _emit([r.to_dict() for r in results], as_json, lambda _: format_pass_log(results))
