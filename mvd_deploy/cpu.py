"""This machine's CPU as ONNX Runtime's kernels see it, and other x86 CPUs by emulation.

ORT's MLAS picks its int8 and fp32 kernels from CPUID, so a compiled int8 form can compute differently
on another x86 CPU (issue 13: 51.7 dB with VNNI, 32.8 dB on an AVX2-only EPYC, the same build).
``run_on_emulated_cpu`` runs compiled models once under ``qemu-x86_64 -cpu MODEL`` (user-mode TCG:
the models' own instructions, that CPU's CPUID), so a machine with AVX-512 VNNI checks what an AVX2-only
one computes. The emulator gives exact instruction semantics (VPMADDUBSW saturates as the CPU does),
not timings: it runs a call 100-300× slower than the host.

python -m mvd_deploy.cpu JOBS.json   the emulated side: one process runs every job, printing a
                                     JSON line as each ends, then one with the features it saw

Imports numpy and ONNX Runtime only (no torch): it runs under the emulator, where every import is slow.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mvd_deploy.errors import MvdError
from mvd_deploy.ort_worker import compiled_session, worker_env

# The x86 features that decide which int8 and fp32 kernels ONNX Runtime (MLAS) picks on this CPU.
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
# numpy's names for those it detects itself at run time (CPUID and the OS's XSAVE state, as MLAS does)
_NUMPY_NAMES = {
    "avx2": "AVX2",
    "fma": "FMA3",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI",
}

logger = logging.getLogger(__name__)

EMULATOR = "qemu-x86_64"
# An AVX2-only x86 CPU (AMD Zen 2): FMA, no AVX-512, no VNNI, as in issue 13's report.
AVX2_ONLY_CPU = "EPYC-Rome"


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """This machine's CPU model, as profiles name the device that ran them."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Which of KERNEL_FEATURES the CPU running this process has.

    From CPUID (numpy's run-time dispatch), as MLAS decides: under an emulator or a masked CPUID,
    /proc/cpuinfo describes the host instead. It adds the features numpy does not detect (AVX-VNNI,
    AMX) only where it agrees with CPUID on the others."""
    flags = set((_cpuinfo("flags") or "").split())
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as detected
    except ImportError:  # numpy < 2
        return [f for f in KERNEL_FEATURES if f in flags]
    seen = {f for f, name in _NUMPY_NAMES.items() if detected.get(name)}
    if all((f in flags) == (f in seen) for f in _NUMPY_NAMES):
        seen |= {f for f in KERNEL_FEATURES if f not in _NUMPY_NAMES and f in flags}
    return [f for f in KERNEL_FEATURES if f in seen]


def emulator_version() -> str | None:
    """``qemu-x86_64 7.2.22``, or None where it is not installed or cannot run this machine's programs."""
    if platform.machine() not in ("x86_64", "AMD64") or not shutil.which(EMULATOR):
        return None
    first = subprocess.run([EMULATOR, "--version"], capture_output=True, text=True).stdout.splitlines()
    return f"{EMULATOR} {first[0].split('version')[-1].split()[0]}" if first else None


def check_emulated_cpus(cpus: tuple[str, ...], *, parameter: str) -> None:
    """Refuse (one line, exit 2) emulated CPUs this machine cannot run before any work starts."""
    if not cpus:
        return
    if emulator_version() is None:
        raise MvdError(
            f"{parameter}: needs {EMULATOR} (QEMU user mode, e.g. `apt-get install qemu-user`) on an x86-64 machine",
            parameter=parameter,
        )
    listing = subprocess.run([EMULATOR, "-cpu", "help"], capture_output=True, text=True).stdout
    known = {line.split()[1] for line in listing.splitlines() if line.startswith("x86 ")}
    for cpu in cpus:
        if cpu not in known:
            raise MvdError(f"{parameter}: unknown CPU {cpu!r} (`{EMULATOR} -cpu help` lists them)", parameter=parameter)


def run_on_emulated_cpu(cpu: str, jobs: list[tuple[Path, dict[str, np.ndarray]]]) -> tuple[list[np.ndarray], list[str]]:
    """Each (compiled model, inputs) run once in one ``qemu-x86_64 -cpu cpu`` process, in a session made
    as ``generate`` makes it; returns the first outputs and the KERNEL_FEATURES that CPU offered. A line
    per model as it finishes: a full-size UNet takes most of an hour there."""
    with tempfile.TemporaryDirectory(prefix="mvd-emulated-") as tmp, open(Path(tmp) / "stderr", "w+") as stderr:
        spec = []
        for k, (model, inputs) in enumerate(jobs):
            np.savez(Path(tmp) / f"inputs{k}.npz", **inputs)
            spec.append({"model": str(model), "inputs": f"{tmp}/inputs{k}.npz", "output": f"{tmp}/output{k}.npy"})
        (Path(tmp) / "jobs.json").write_text(json.dumps(spec))
        command = [EMULATOR, "-cpu", cpu, sys.executable, "-m", "mvd_deploy.cpu", f"{tmp}/jobs.json"]
        reports = []
        # worker_env: the session ``generate`` makes (qemu passes its environment on to the program it runs)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=worker_env()) as worker:
            try:
                for line in worker.stdout:
                    if not line.startswith("{"):  # a library's own print
                        continue
                    reports.append(json.loads(line))
                    if "model" in reports[-1]:
                        name, seconds = reports[-1]["model"], reports[-1]["s"]
                        logger.info("  on %s: %s (%d/%d) in %.0f s", cpu, name, len(reports), len(jobs), seconds)
            finally:  # interrupted (Ctrl-C, SIGTERM): the emulator goes too
                if worker.poll() is None:
                    worker.kill()
        if worker.returncode != 0:
            stderr.seek(0)
            # QEMU warns of every CPUID bit its TCG lacks (xsaves, ...): not the run's failure
            lines = stderr.read().splitlines()
            errors = [line for line in lines if line and not line.startswith(f"{EMULATOR}: warning")]
            raise MvdError(f"{EMULATOR} -cpu {cpu}: exit {worker.returncode}: {errors[-1] if errors else 'no message'}")
        return [np.load(job["output"]) for job in spec], reports[-1]["features"]


def main() -> None:
    for job in json.loads(Path(sys.argv[1]).read_text()):
        start = time.perf_counter()
        inputs = dict(np.load(job["inputs"]))
        session = compiled_session(job["model"])
        np.save(job["output"], session.run(None, inputs)[0])
        del session  # one model's weights at a time
        print(json.dumps({"model": Path(job["model"]).name, "s": time.perf_counter() - start}), flush=True)
    print(json.dumps({"features": cpu_features()}), flush=True)


if __name__ == "__main__":
    main()
