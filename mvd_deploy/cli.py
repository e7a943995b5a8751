"""The ``mvd-deploy`` command line: argument parsing and printing over the Python API
(docs/python-api.md); each command calls one API function and prints its result.

The API's errors name its parameters (``out``, ``targets``); here they name the options instead
(``--out``, ``--target``). Progress lines go to stderr through a handler on the ``mvd_deploy``
logger, for the command's duration, so stdout holds only the result (one JSON object with --json).
"""

from __future__ import annotations

import functools
import json
import re
import signal
import sys
import threading

import click

from mvd_deploy.errors import MvdError
from mvd_deploy.progress import show_progress

# API parameter → what the command line calls it
OPTION_NAMES = {
    "out": "--out",
    "recipe": "--model",
    "components": "--components",
    "precision": "--precision",
    "target": "--target",
    "targets": "--target",
    "int8": "--int8",
    "min_psnr_db": "--min-psnr",
    "calibration_samples": "--calibration-samples",
    "form": "--form",
    "offline": "--offline",
    "emulate": "--emulate",
    "validate_on_cpus": "--validate-on-cpu",
    "runs": "--runs",
    "source": "SOURCE",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (how CI cancels a job), raised in the main thread like Ctrl-C's KeyboardInterrupt so
    that every ``except BaseException``/``finally`` cleanup of staged output runs on the way out."""


EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _user_errors(fn):
    """Bad input → one line on stderr, exit code 2 (1 for a failed validation), no traceback.
    SIGTERM → staged output removed, one line, exit code 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MvdError as e:
            click.echo(f"error: {_option_message(e)}", err=True)
            sys.exit(e.exit_code)
        except Terminated:
            click.echo("error: interrupted by SIGTERM; unfinished output removed", err=True)
            sys.exit(EXIT_TERMINATED)

    return wrapper


def _option_message(error: MvdError) -> str:
    """The error's message with the API parameter it names replaced by the command-line option."""
    message = str(error)
    option = OPTION_NAMES.get(error.parameter or "")
    if option is None:
        return message
    # the parameter as a word of the message, never part of a path or another name
    return re.sub(rf"(?<![^\s(]){re.escape(error.parameter)}(?![\w/.-])", option, message, count=1)


def _terminate_on_sigterm() -> None:
    """SIGTERM raises :class:`Terminated` for the rest of this command (the previous handler comes
    back after it: the CLI may run inside another program, e.g. a test)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers

    def terminate(signum, frame):
        # Once: a second SIGTERM must not cut short the cleanup the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    if previous is None:  # a handler set outside Python: nothing to restore it with
        previous = signal.SIG_DFL
    click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def _emit(result, as_json: bool, human) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else human(result))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvd-deploy")
def main():
    """Take a MobileVD video diffusion checkpoint to the phone."""
    _terminate_on_sigterm()
    click.get_current_context().with_resource(show_progress())


@main.command("init-checkpoint")
@click.option(
    "--model",
    "recipe",
    required=True,
    help="Model recipe: a shipped model's name (mobilevd, svd, ...) or a path to a .yaml.",
)
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

    result = init_checkpoint(recipe, out=out, seed=seed, from_svd=from_svd).to_json()
    _emit(
        result,
        as_json,
        lambda r: (
            f"wrote {r['checkpoint']}: {r['params']:,} parameters, temporal blocks "
            f"{r['temporal_blocks_kept']} kept / {r['temporal_blocks_pruned']} pruned, {r['funnel_pairs']} funnel pairs"
            + "".join(f"; {name} {params:,} parameters" for name, params in r["encoders"].items())
            + (f" ({r['encoders_from']})" if r["encoders_from"] else "")
        ),
    )


@main.command("inspect")
@click.argument("target", type=click.Path())
@click.option("--stages", is_flag=True, help="FLOPs after each optimisation, in the paper's order (Table 8).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (an object; a list of rows with --stages).")
@_user_errors
def inspect_cmd(target, stages, as_json):
    """Parameters, shapes, temporal blocks and FLOPs of a checkpoint, a recipe file or a model name (mobilevd)."""
    from mvd_deploy.inspect import format_inspect, inspect_model, inspect_stages
    from mvd_deploy.stages import format_stage_table

    if stages:
        _emit(inspect_stages(target), as_json, lambda rows: format_stage_table(rows, f"{target}: FLOPs per UNet call"))
    else:
        _emit(inspect_model(target).to_json(), as_json, format_inspect)


def _deploy_options(command):
    """The options every command that runs the deploy passes shares."""
    for option in reversed(
        [
            click.option(
                "--keep-conditioning-inputs",
                is_flag=True,
                help="Leave out fold_conditioning: timestep and added_time_ids stay UNet inputs.",
            ),
            click.option(
                "--taesd",
                "taesd_dir",
                type=click.Path(file_okay=False),
                help="Local diffusers AutoencoderTiny directory (default: random init).",
            ),
            click.option("--decoder-seed", default=0, show_default=True, type=int, help="Seed of a random-init TAESD."),
        ]
    ):
        command = option(command)
    return command


def _offline_options(command):
    """--offline and --emulate, shared by compile and profile."""
    command = click.option(
        "--emulate/--no-emulate",
        default=None,
        help="--offline: run the check on the HTP emulator (slow: ~2 GFLOP/s) or not "
        "(default: only where its estimate, from the component's FLOPs and nodes, is under 5 min).",
    )(command)
    return click.option(
        "--offline",
        is_flag=True,
        help="Phone targets on this machine: QNN HTP compile for the profile's chipset with onnxruntime-qnn, "
        "checked on the HTP emulator; no AI Hub account.",
    )(command)


def _offline_only(offline: bool, **options) -> None:
    for name, value in options.items():
        if value is not None and not offline:
            raise MvdError(f"--{name}: only with --offline")


def _pass_list(value: str | None) -> list[str] | None:
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


@main.command("passes")
@click.argument("checkpoint", type=click.Path())
@click.option("--passes", "passes", help="Comma-separated pass list (default: the checkpoint's deploy_passes).")
@_deploy_options
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
    from mvd_deploy.deploy import deploy_checkpoint, format_pass_log

    results = deploy_checkpoint(
        checkpoint,
        passes=_pass_list(passes),
        keep_conditioning_inputs=keep_conditioning_inputs,
        taesd_dir=taesd_dir,
        decoder_seed=decoder_seed,
        tolerance=tolerance,
    ).passes
    _emit([r.to_dict() for r in results], as_json, lambda _: format_pass_log(results))


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Build directory to create.")
@click.option(
    "--model",
    "recipe",
    help="Recipe (model name or path) to deploy as: video size, steps, conditioning, passes (default: the checkpoint).",
)
@click.option(
    "--components",
    help="Comma-separated: image_encoder,vae_encoder,unet,decoder (default: every component the checkpoint makes).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@_deploy_options
@click.option("--min-psnr", type=float, help="Validation threshold in dB (default: fp32 80, fp16 40).")
@click.option("--json", "as_json", is_flag=True, help="Print the build manifest as JSON.")
@_user_errors
def export_cmd(
    checkpoint, out, recipe, components, precision, keep_conditioning_inputs, taesd_dir, decoder_seed, min_psnr, as_json
):
    """Export a checkpoint's deploy model to ONNX (one model per component), validated against PyTorch."""
    from mvd_deploy.export import export_build, format_build

    build = export_build(
        checkpoint,
        out=out,
        recipe=recipe,
        components=components,
        precision=precision,
        keep_conditioning_inputs=keep_conditioning_inputs,
        taesd_dir=taesd_dir,
        decoder_seed=decoder_seed,
        min_psnr_db=min_psnr,
    )
    _emit(build.manifest, as_json, lambda m: format_build(m, out))


@main.command("compile")
@click.argument("build_dir", type=click.Path())
@click.option(
    "--target",
    "targets",
    required=True,
    multiple=True,
    help="Device profile (device_profiles/NAME.yaml or a path); repeat for several, submitted together.",
)
@click.option(
    "--int8",
    type=click.Choice(["dynamic", "static"]),
    multiple=True,
    help="ort-cpu: also compile an int8 form (onnxruntime.quantization); repeat for both.",
)
@click.option(
    "--min-psnr",
    type=float,
    help="Validation threshold in dB against the export (ort-cpu; --offline: the emulated check).",
)
@click.option(
    "--calibration-samples",
    type=click.IntRange(min=1),
    help="Calibration inputs: ort-cpu static int8 (default 4); phones' w8a16 (default: the profile's).",
)
@click.option(
    "--form",
    type=click.Choice(["w8a16", "float16"]),
    help="--offline: compile this precision instead of each profile's own.",
)
@click.option(
    "--validate-on-cpu",
    "validate_on_cpus",
    multiple=True,
    metavar="CPU",
    help="ort-cpu: also validate each int8 form on this x86 CPU, emulated by qemu-x86_64 (e.g. EPYC-Rome: "
    "AVX2, no AVX-512/VNNI); repeat for several. Slow: a full-size UNet call takes minutes to an hour.",
)
@_offline_options
@click.option("--json", "as_json", is_flag=True, help="Print the compiled records as JSON.")
@_user_errors
def compile_cmd(
    build_dir, targets, int8, min_psnr, calibration_samples, validate_on_cpus, form, offline, emulate, as_json
):
    """Compile a build for one or more targets; every compiled form is validated."""
    from mvd_deploy.targets import compile_build

    _offline_only(offline, form=form, emulate=emulate)
    result = compile_build(
        build_dir,
        targets=targets,
        int8=int8,
        min_psnr_db=min_psnr,
        calibration_samples=calibration_samples,
        form=form,
        offline=offline,
        emulate=emulate,
        validate_on_cpus=validate_on_cpus,
    )
    _emit(result.to_json(), as_json, _format_compiled)


def _format_compiled(records: dict) -> str:
    lines = []
    width = max([28, *map(len, records)])
    for key, record in records.items():
        for name, c in record["components"].items():
            v = c.get("validation")
            label = f"  {key:<{width}} {name:<8} "
            if record.get("backend") == "qai-hub":  # checked on the device by `mvd-deploy profile`
                lines.append(label + ", ".join(f"{g['file']} (compile job {g['compile_job']})" for g in c["graphs"]))
                continue
            if "graphs" in c:  # qnn-offline: EPContext wrappers and their QNN context binaries
                contexts = ", ".join(f"{g['context_binary']} {g['context_bytes'] / 2**20:.1f} MB" for g in c["graphs"])
                lines.append(label + contexts)
                label = " " * len(label)
                if v is None:
                    lines.append(f"{label}emulated check {c['emulation']}")
                    continue
            sens = v.get("conditioning_sensitivity")
            extra = (
                f"  conditioning sensitivity {sens['compiled']:.3f} (export {sens['reference']:.3f})" if sens else ""
            )
            emulated = f" on the HTP emulator ({v['emulator_s']:.1f} s)" if "emulator_s" in v else ""
            lines.append(f"{label}PSNR {v['psnr_db']} dB (min {v['min_psnr_db']}){emulated}{extra}")
            for cpu, on in v.get("emulated_cpus", {}).items():  # ort-cpu int8 on other x86 CPUs
                same = "the same output" if on["psnr_db_vs_this_cpu"] >= 200 else f"{on['psnr_db_vs_this_cpu']} dB"
                lines.append(f"{' ' * len(label)}on {cpu} (emulated): PSNR {on['psnr_db']} dB; vs this CPU: {same}")
    return "\n".join(lines)


@main.command("profile")
@click.argument("build_dir", type=click.Path())
@click.option(
    "--target",
    "targets",
    required=True,
    multiple=True,
    help="Device profile (device_profiles/NAME.yaml or a path); repeat for several.",
)
@click.option("--form", help="Compiled form to profile (default: the profile's precision).")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1), help="Timed runs after warm-up.")
@click.option("--gate", is_flag=True, help="Gate each profile on its target's budgets: exit 1 when over.")
@_offline_options
@click.option("--json", "as_json", is_flag=True, help="Print the profile JSON (a list with several targets).")
@_user_errors
def profile_cmd(build_dir, targets, form, runs, gate, offline, emulate, as_json):
    """Latency, load time, peak memory and the slowest ops of a compiled build, per target.

    --offline: the emulated check of the offline QNN compile, and no latency (the HTP emulator gives
    no phone timing; the profile says so)."""
    from mvd_deploy.targets import profile_build

    _offline_only(offline, emulate=emulate)
    result = profile_build(
        build_dir, targets=targets, form=form, runs=runs, gate=gate, offline=offline, emulate=emulate
    )
    profiles = result.to_json()
    _emit(profiles[0] if len(profiles) == 1 else profiles, as_json, lambda _: "\n".join(map(_format_profile, profiles)))
    if gate:
        click.echo("\n".join(report.summary() for report in result.gates), err=True)
        sys.exit(0 if result.passed else 1)


@main.command("gate")
@click.argument("profile_json", type=click.Path())
@click.option("--budget", required=True, help="Device profile with the budgets (device_profiles/X.yaml or a name).")
@click.option("--junit", type=click.Path(dir_okay=False), help="JUnit XML path (default: beside the profile).")
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False),
    help="Markdown summary path (default: beside the profile).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the gate result as JSON.")
@_user_errors
def gate_cmd(profile_json, budget, junit, markdown_path, as_json):
    """Check a profile against budgets: exit 0 within budget, 1 over, 2 on bad input."""
    from mvd_deploy.gate import gate_profile, markdown_summary

    report = gate_profile(profile_json, budget=budget, junit=junit, markdown=markdown_path)
    _emit(report.to_json(), as_json, markdown_summary)
    sys.exit(0 if report.passed else 1)


def _format_profile(p: dict) -> str:
    if p.get("total_latency_ms") is None and p.get("not_measured"):  # the offline HTP emulator
        lines = [f"{p['target']}/{p['form']} on {p['device']['name']}"]
        for name, c in p["components"].items():
            check = c.get("emulated")
            figure = (
                f"PSNR {check['psnr_db']} dB (emulated in {check['emulator_s']:.1f} s)" if check else "not emulated"
            )
            lines.append(f"  {name:<8} {figure}, context {c['context_bytes'] / 2**20:.1f} MB")
        lines.extend(f"  {figure}: {why}" for figure, why in p["not_measured"].items())
        return "\n".join(lines)
    lines = [f"{p['target']}/{p['form']} on {p['device']['name']} ({p['runs']} runs)"]
    for name, c in p["components"].items():
        lat = c["latency_ms"]
        load, peak = c["load_ms"]["first"], c["peak_memory_mb"]
        lines.append(
            f"  {name:<8} p50 {lat['p50']:10.1f} ms  p90 {lat['p90']:10.1f} ms  min {lat['min']:10.1f} ms  "
            f"load {'-' if load is None else f'{load:.1f}':>8} ms  peak {'-' if peak is None else f'{peak:.1f}':>8} MB"
        )
        for op in c["top_ops"][:5]:
            if op["ms"] is None:  # the device reported cycles only
                share = f"{100 * op['cycles_share']:5.1f}%"
                lines.append(f"      {op['op_type']:<24} {op['cycles']:>13,} cycles {share}  {op['name']}")
                continue
            share = f"{100 * op['share']:5.1f}%" if op["share"] is not None else "    -"
            where = f"{op['module'] or '-'}  [{op['name']}]" if "module" in op else op["name"]
            lines.append(f"      {op['op_type']:<24} {op['ms']:10.2f} ms {share}  {where}")
        if c.get("cost"):
            blocks = ", ".join(f"{b['block']} {100 * b['share']:.1f}%" for b in c["cost"]["by_block"][:6])
            types = ", ".join(f"{t['op_type']} {100 * t['share']:.1f}%" for t in c["cost"]["by_op_type"][:6])
            lines.append(f"      by block: {blocks}")
            lines.append(f"      by op type: {types}")
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
    width = max([22, *(len(r["form"]) for r in rows)])
    header = f"  {'component':<9} {'form':<{width}} {'params':>13} {'TFLOPs':>7} {'PSNR dB':>8} "
    header += f"{'p50 ms':>10} {'peak MB':>9} {'graphs':>6} {'context MB':>10} {'compile s':>9}"
    lines = [header]
    for r in rows:
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        psnr = r["psnr_db"] if r["psnr_db"] is not None else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        phone = [f"{r[k]}" if r.get(k) is not None else "-" for k in ("graphs", "context_mb", "compile_s")]
        lines.append(
            f"  {r['component']:<9} {r['form']:<{width}} {r['params']:>13,} {r['tflops']:>7.3f} "
            f"{psnr:>8} {p50:>10} {peak:>9} {phone[0]:>6} {phone[1]:>10} {phone[2]:>9}"
        )
    return "\n".join(lines)


@main.command("pull")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
@click.option("--target", "targets", multiple=True, help="Only these targets' compiled forms (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the pulled manifest as JSON.")
@_user_errors
def pull_cmd(source, out, targets, as_json):
    """Copy a build's compiled artifacts (or an AI Hub compile job's model), hashes verified."""
    from mvd_deploy.pull import pull_build

    result = pull_build(source, out=out, targets=targets)
    _emit(result.to_json(), as_json, lambda r: f"pulled {len(r['files'])} files into {out}, every sha256 verified")


@main.command("report")
@click.argument("build_dir", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Report directory (default: BUILD/report).")
@click.option("--video", type=click.Path(dir_okay=False), help="A generated video (MP4/GIF): show a contact sheet.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@_user_errors
def report_cmd(build_dir, out, video, as_json):
    """An HTML page with plots: FLOPs per stage vs the paper, latency per component and target, top ops,
    and a generated video's frames."""
    from mvd_deploy.report import write_report

    result = write_report(build_dir, out=out, video=video).to_json()
    _emit(result, as_json, lambda r: f"wrote {r['report']} ({len(r['images'])} plots)")


@main.command("generate")
@click.argument("build_dir", type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="The conditioning image (PNG, JPEG, ...).")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="The MP4 to write (a .gif preview beside it)."
)
@click.option(
    "--target",
    default="ort-cpu",
    show_default=True,
    help="Device profile whose compiled form runs (a phone's AI Hub form runs as inference jobs on it).",
)
@click.option("--form", help="Compiled form (default: the profile's precision), e.g. int8-dynamic.")
@click.option(
    "--offline", is_flag=True, help="Run the target's offline QNN compile on the HTP emulator (slow; not phone timing)."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise (augmentation, then latent).")
@click.option("--reference", is_flag=True, help="Also run the PyTorch model; report the video PSNR between them.")
@click.option("--frames", "frames_dir", type=click.Path(file_okay=False), help="Also write every frame as PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written and the timings as JSON.")
@_user_errors
def generate_cmd(build_dir, image, out, target, form, offline, seed, reference, frames_dir, as_json):
    """Image → video from a build's compiled artifacts: the four components, timed, then MP4 + GIF."""
    from mvd_deploy.generate import format_generate, generate_video

    result = generate_video(
        build_dir,
        image=image,
        out=out,
        target=target,
        form=form,
        offline=offline,
        seed=seed,
        reference=reference,
        frames_dir=frames_dir,
    )
    _emit(result, as_json, format_generate)
