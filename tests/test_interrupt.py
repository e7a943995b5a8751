"""A cancelled run (SIGTERM, as CI cancels a job) leaves nothing behind; what a run killed outright
(SIGKILL) left is removed by the next run writing the same output, and nothing a live run owns."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from helpers import ROOT, TINY
from mvd_deploy.cli import main
from mvd_deploy.fileio import owned_temp_dir

INTERRUPTED = "error: interrupted by SIGTERM; unfinished output removed"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever else is installed


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    """The stderr lines up to the first containing ``text``; the process must still be running."""
    lines = []
    while text not in (lines[-1] if lines else ""):
        line = proc.stderr.readline()
        assert line, f"the process ended before printing {text!r}:\n{''.join(lines)}"
        lines.append(line)
    return lines


def _terminate(proc: subprocess.Popen) -> list[str]:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    return stderr.splitlines()


def test_sigterm_during_export_removes_the_partial_build(tiny_checkpoint, tmp_path):
    builds = tmp_path / "builds"
    proc = _start([sys.executable, "-m", "mvd_deploy", "export", str(tiny_checkpoint), "--out", str(builds / "b")])
    _wait_for_line(proc, "[export unet 1/4] torch.onnx.export")  # the dynamo export: many seconds
    (partial,) = builds.glob(".b.partial-*")  # what the signal must not leave behind
    stderr = _terminate(proc)
    assert proc.returncode == 128 + signal.SIGTERM == 143
    assert stderr[-1] == INTERRUPTED and not any("Traceback" in line for line in stderr)
    assert not partial.exists() and list(builds.iterdir()) == []


# Runs the real CLI, held inside Build.replace_dir: a form is compiled and staged, not yet in place.
HOLD_BEFORE_REPLACE = textwrap.dedent(
    """
    import sys, time
    from mvd_deploy.build import Build
    from mvd_deploy.cli import main

    def held(self, staged, relative):
        print("staged", staged, file=sys.stderr, flush=True)
        time.sleep(3600)

    Build.replace_dir = held
    main(sys.argv[1:])
    """
)


def test_sigterm_during_compile_removes_the_staged_form(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "build")
    manifest = (build / "build.json").read_text()
    proc = _start([sys.executable, "-c", HOLD_BEFORE_REPLACE, "compile", str(build), "--target", "ort-cpu"])
    staged = _wait_for_line(proc, "staged ")[-1].split(" ", 1)[1].strip()
    assert os.path.isdir(staged) and os.listdir(staged)
    stderr = _terminate(proc)
    assert proc.returncode == 143
    assert stderr[-1] == INTERRUPTED and not any("Traceback" in line for line in stderr)
    assert not (build / ".staging").exists() and not (build / "compiled").exists()
    assert (build / "build.json").read_text() == manifest


def _killed_owner_dir(parent, prefix: str, label: str = "") -> str:
    """A directory made by owned_temp_dir in a process then killed with SIGKILL (nothing cleaned up)."""
    code = (
        "import sys; from pathlib import Path; from mvd_deploy.fileio import owned_temp_dir; "
        f"print(owned_temp_dir(Path({str(parent)!r}), {prefix!r}, {label!r}), flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    path = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and os.path.isdir(path)
    return path


def _other_host(name: str, prefix: str) -> str:
    host = name[len(prefix) :].split("-")[0]
    return name.replace(f"{prefix}{host}-", f"{prefix}{host}x-", 1)


def test_next_run_removes_what_a_killed_run_left_beside_its_output(tmp_path):
    prefix = ".ck.partial-"
    stale = _killed_owner_dir(tmp_path, prefix)
    live = owned_temp_dir(tmp_path, prefix)  # this process: running
    other_host = tmp_path / _other_host(live.name, prefix)  # maybe running there: a shared filesystem
    unnamed = tmp_path / f"{prefix}abc123"  # no owner in the name
    for path in (other_host, unnamed):
        path.mkdir()

    result = CliRunner().invoke(main, ["init-checkpoint", "--model", str(TINY), "--out", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    assert not os.path.exists(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", live.name, other_host.name, unnamed.name])


def test_next_compile_removes_what_a_killed_compile_left_in_staging(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "build")
    (build / ".staging").mkdir()
    stale = _killed_owner_dir(build / ".staging", "", "fp32")
    live = owned_temp_dir(build / ".staging", "", "fp32")

    result = CliRunner().invoke(main, ["compile", str(build), "--target", "ort-cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)) == ["ort-cpu/fp32"]
    assert not os.path.exists(stale)
    assert os.listdir(build / ".staging") == [live.name]
