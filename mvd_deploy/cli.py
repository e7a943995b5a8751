"""The ``mvd-deploy`` command line: thin click commands over the Python API."""

from __future__ import annotations

import functools
import json
import sys

import click

from mvd_deploy.errors import MvdError


def _user_errors(fn):
    """Bad input → one line on stderr, exit code 2 (1 for a failed validation), no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MvdError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

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


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Build directory to create.")
@click.option(
    "--model",
    "recipe",
    type=click.Path(dir_okay=False),
    help="Recipe to deploy as (video size, steps, conditioning, passes); default: the checkpoint's own.",
)
@click.option("--components", help="Comma-separated: unet,decoder (default: every component the passes make).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--keep-conditioning-inputs",
    is_flag=True,
    help="Leave out fold_conditioning: timestep and added_time_ids stay UNet inputs.",
)
@click.option(
    "--taesd",
    "taesd_dir",
    type=click.Path(file_okay=False),
    help="Local diffusers AutoencoderTiny directory (default: random init).",
)
@click.option("--decoder-seed", default=0, show_default=True, type=int, help="Seed of a random-init TAESD.")
@click.option("--min-psnr", type=float, help="Validation threshold in dB (default: fp32 80, fp16 40).")
@click.option("--json", "as_json", is_flag=True, help="Print the build manifest as JSON.")
@_user_errors
def export_cmd(
    checkpoint, out, recipe, components, precision, keep_conditioning_inputs, taesd_dir, decoder_seed, min_psnr, as_json
):
    """Export a checkpoint's deploy model to ONNX (one model per component), validated against PyTorch."""
    from mvd_deploy.export import export_build, format_build

    manifest = export_build(
        checkpoint, out, recipe, components, precision, keep_conditioning_inputs, taesd_dir, decoder_seed, min_psnr
    )
    _emit(manifest, as_json, lambda m: format_build(m, out))


@main.command("compile")
@click.argument("build_dir", type=click.Path())
@click.option("--target", required=True, help="Backend to compile for (ort-cpu).")
@click.option(
    "--int8", type=click.Choice(["dynamic", "static"]), help="Also compile an int8 form (onnxruntime.quantization)."
)
@click.option("--min-psnr", type=float, help="Validation threshold in dB against the export (default per form).")
@click.option("--calibration-samples", default=4, show_default=True, type=int, help="Static int8 calibration inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the compiled records as JSON.")
@_user_errors
def compile_cmd(build_dir, target, int8, min_psnr, calibration_samples, as_json):
    """Compile a build for a target; every compiled form is re-validated against the export."""
    from mvd_deploy.backends import CompileOptions, get_backend
    from mvd_deploy.build import Build

    backend = get_backend(target)
    options = CompileOptions(int8=int8, min_psnr_db=min_psnr, calibration_samples=calibration_samples)
    records = backend.compile(Build(build_dir), options)
    _emit(records, as_json, _format_compiled)


def _format_compiled(records: dict) -> str:
    lines = []
    for form, record in records.items():
        for name, c in record["components"].items():
            v = c["validation"]
            sens = v.get("conditioning_sensitivity")
            extra = (
                f"  conditioning sensitivity {sens['compiled']:.3f} (export {sens['reference']:.3f})" if sens else ""
            )
            lines.append(
                f"  {record['target']}/{form:<13} {name:<8} PSNR {v['psnr_db']} dB (min {v['min_psnr_db']}){extra}"
            )
    return "\n".join(lines)


@main.command("profile")
@click.argument("build_dir", type=click.Path())
@click.option("--target", required=True, help="Backend whose compiled form to profile (ort-cpu).")
@click.option("--form", default="fp32", show_default=True, help="Compiled form: fp32, fp16, int8-dynamic, int8-static.")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1), help="Timed runs after warm-up.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile JSON.")
@_user_errors
def profile_cmd(build_dir, target, form, runs, as_json):
    """Latency, load time, peak memory and the slowest ops of a compiled build."""
    from mvd_deploy.backends import get_backend
    from mvd_deploy.build import Build
    from mvd_deploy.fileio import write_json

    build = Build(build_dir)
    profile = get_backend(target).profile(build, form, runs)
    (build.path / "profiles").mkdir(exist_ok=True)
    write_json(build.path / "profiles" / f"{target}-{form}.json", profile)
    _emit(profile, as_json, _format_profile)


def _format_profile(p: dict) -> str:
    lines = [f"{p['target']}/{p['form']} on {p['device']['name']} ({p['runs']} runs)"]
    for name, c in p["components"].items():
        lat = c["latency_ms"]
        lines.append(
            f"  {name:<8} p50 {lat['p50']:10.1f} ms  p90 {lat['p90']:10.1f} ms  min {lat['min']:10.1f} ms  "
            f"load {c['load_ms']['first']:8.1f} ms  peak {c['peak_memory_mb']:8.1f} MB"
        )
        for op in c["top_ops"][:5]:
            share = f"{100 * op['share']:5.1f}%" if op["share"] is not None else "    -"
            lines.append(f"      {op['op_type']:<24} {op['ms']:10.2f} ms {share}  {op['name']}")
    lines.append(f"  total p50 {p['total_latency_ms']:.1f} ms")
    return "\n".join(lines)


@main.command("summary")
@click.argument("build_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary rows as JSON.")
@_user_errors
def summary_cmd(build_dir, as_json):
    """One table of a build: each component's export, compiled forms and profiled latency."""
    from mvd_deploy.build import Build, summary_rows

    rows = summary_rows(Build(build_dir))
    _emit(rows, as_json, _format_summary)


def _format_summary(rows: list[dict]) -> str:
    header = (
        f"  {'component':<9} {'form':<22} {'params':>13} {'TFLOPs':>7} {'PSNR dB':>8} {'p50 ms':>10} {'peak MB':>9}"
    )
    lines = [header]
    for r in rows:
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(
            f"  {r['component']:<9} {r['form']:<22} {r['params']:>13,} {r['tflops']:>7.3f} "
            f"{r['psnr_db']:>8} {p50:>10} {peak:>9}"
        )
    return "\n".join(lines)
