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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def inspect_cmd(target, as_json):
    """Parameters, shapes, temporal blocks and FLOPs of a recipe or checkpoint."""
    from mvd_deploy.inspect import format_inspect, inspect_model

    _emit(inspect_model(target), as_json, format_inspect)
