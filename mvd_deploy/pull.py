"""``mvd-deploy pull``: app teams take the compiled artifacts, verified.

SOURCE is a build directory (every compiled form, or the ``--target`` ones) or an AI Hub compile job
id. Every file is checked against the manifest's sha256 before it is copied; a manifest path that
points outside its build is refused; the output appears only when complete.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mvd_deploy.backends import qai_hub as hub_backend
from mvd_deploy.build import Build, sha256_file
from mvd_deploy.errors import MvdError, ValidationFailed
from mvd_deploy.fileio import atomic_output_dir, check_output_dir, write_json
from mvd_deploy.pipeline import PipelineContract, describe_contract

PULLED_MANIFEST = "artifacts.json"
_JOB_ID = re.compile(r"^j[a-z0-9]{5,}$")


def _inside(build: Path, relative: str, key: str) -> Path:
    """``build / relative``, refusing absolute paths and anything that escapes the build."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise MvdError(f"{build / 'build.json'}: key '{key}': path {relative!r} points outside the build; refused")
    path = (build / pure).resolve()
    if not path.is_relative_to(build.resolve()):
        raise MvdError(f"{build / 'build.json'}: key '{key}': path {relative!r} resolves outside the build; refused")
    return path


@dataclass
class PullResult:
    """What :func:`pull_build` wrote: the directory ``out`` and its manifest (``artifacts.json``)."""

    out: Path
    manifest: dict

    @property
    def files(self) -> dict[str, dict]:
        """Pulled file (relative to ``out``) → {sha256, bytes}."""
        return self.manifest["files"]

    def to_json(self) -> dict:
        return self.manifest


def pull_build(
    source: str | Path | Build, *, out: str | Path, targets: list[str] | tuple[str, ...] | None = None
) -> PullResult:
    """Copy compiled artifacts into the new directory ``out``, every file's sha256 verified: from a
    build (every compiled form, or only the ``targets``' ones), or an AI Hub compile job id's model."""
    out = Path(out)
    targets = list(targets) if targets else None
    if isinstance(source, Build):
        return PullResult(out, _pull_from_build(source.path, out, targets))
    if Path(source).is_dir():
        return PullResult(out, _pull_from_build(Path(source), out, targets))
    if _JOB_ID.match(str(source)):
        return PullResult(out, _pull_hub_job(str(source), out))
    raise MvdError(f"source {source}: neither a build directory nor an AI Hub compile job id", parameter="source")


def _pull_from_build(source: Path, out: Path, targets: list[str] | None) -> dict:
    build = Build(source)
    check_output_dir(out)
    compiled = build.manifest.get("compiled", {})
    keys = [k for k in compiled if targets is None or k.split("/")[0] in targets]
    if not keys:
        known = ", ".join(compiled) or "none"
        raise MvdError(
            f"{source}: nothing compiled{' for ' + ', '.join(targets) if targets else ''} (compiled: {known})"
        )
    files = build.manifest.get("files", {})
    wanted = {}
    for key in keys:
        directory = compiled[key]["directory"]
        _inside(build.path, directory, f"compiled.{key}.directory")
        for relative in files:
            if relative.startswith(directory.rstrip("/") + "/"):
                wanted[relative] = files[relative]
    for relative in files:
        _inside(build.path, relative, f"files.{relative}")
    pipeline = build.manifest.get("pipeline")
    with atomic_output_dir(out) as tmp:
        for relative, entry in wanted.items():
            path = _inside(build.path, relative, f"files.{relative}")
            if not path.is_file():
                raise ValidationFailed(f"{path}: listed in the manifest but missing; nothing was pulled")
            digest = sha256_file(path)
            if digest != entry["sha256"] or path.stat().st_size != entry["bytes"]:
                raise ValidationFailed(
                    f"{path}: sha256 {digest[:16]}… does not match the manifest's {entry['sha256'][:16]}…; "
                    f"the artifact was changed after the build — nothing was pulled"
                )
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        record = {
            "source": str(source),
            "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": build.manifest.get("model"),
            "components": {n: {"inputs": c["inputs"], "outputs": c["outputs"]} for n, c in build.components.items()},
            "compiled": {k: compiled[k] for k in keys},
            "graphs": {k: graph_contracts(build, compiled[k]) for k in keys},
            # how to run the components as image → video (None for a build exported without encoders)
            "pipeline": describe_contract(PipelineContract.from_dict(pipeline)) if pipeline else None,
            "files": {r: {"sha256": e["sha256"], "bytes": e["bytes"]} for r, e in wanted.items()},
            "toolchain": build.manifest.get("toolchain"),
        }
        write_json(tmp / PULLED_MANIFEST, record)
    return record


def graph_contracts(build: Build, record: dict) -> dict[str, list[dict]]:
    """Per component, the graphs an app runs in this order, each with its path in the pulled
    directory and its I/O as compiled. Any backend's record that lists ``graphs`` gives them (AI Hub:
    float16 I/O after --quantize_io, renamed outputs); a record without them compiled each whole
    component with the export's I/O."""
    contracts = {}
    for name, component in record["components"].items():
        graphs = component.get("graphs") or [
            {
                "name": name,
                "file": component.get("file") or component.get("onnx"),
                "inputs": build.components[name]["inputs"],
                "outputs": build.components[name]["outputs"],
            }
        ]
        contracts[name] = [
            {
                "name": graph["name"],
                "path": f"{record['directory']}/{graph['file']}",
                "inputs": graph["inputs"],
                "outputs": graph["outputs"],
            }
            for graph in graphs
        ]
    return contracts


def _pull_hub_job(job_id: str, out: Path) -> dict:
    """One AI Hub compile job's model (an ONNX-type target unpacked from its .zip), with its I/O as
    compiled."""
    check_output_dir(out)
    hub = hub_backend.hub_client()
    with hub_backend.hub_session(hub), atomic_output_dir(out) as tmp:
        job = hub.get_job(job_id)
        if job.job_type != "compile":
            raise MvdError(
                f"source {job_id}: AI Hub job {job_id} is not a compile job ({job.job_type} job, {job.url})",
                parameter="source",
            )
        status = job.get_status()
        if not status.success:
            raise ValidationFailed(
                f"AI Hub job {job_id} is not a finished compile job ({status.state.name}; {job.url})"
            )
        written = Path(job.download_target_model(str(tmp / "model")))  # the client adds the server's extension
        if written.suffix == ".zip":
            written = hub_backend.unpack_model(written, tmp / "model")
        shapes = job.get_target_shapes() or {}
        model = job.get_target_model()
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        record = {
            "source": f"qai-hub:{job_id}",
            "job_url": job.url,
            "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "path": written.relative_to(tmp).as_posix(),
            "inputs": [{"name": n, "shape": list(shape), "dtype": dtype} for n, (shape, dtype) in shapes.items()],
            "outputs": [
                {"name": t.name, "shape": list(t.shape or []), "dtype": t.dtype}
                for tensors in model.output_spec.values()
                for t in tensors
            ],
            "context_graphs": [name for name in model.output_spec if name is not None],
            "files": {
                p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files
            },
        }
        write_json(tmp / PULLED_MANIFEST, record)
    return record
