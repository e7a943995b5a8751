"""A build directory: the manifest (build.json) and the files it names, updated atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mvd_deploy.background import BackgroundTask, at_idle_priority
from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import load_json, owned_temp_dir, staged_dir, swap_in, write_json

MANIFEST = "build.json"
BUILD_FORMAT = "mvd-deploy-build"


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class BackgroundHashes(BackgroundTask):
    """sha256, size and mtime of each of ``paths`` (by file name; a manifest's ``files`` entry) on a
    daemon thread at idle priority, while the caller goes on: hashlib releases the GIL, so hashing
    takes the CPU time loading and compute leave idle instead of time after them."""

    thread_name = "sha256"

    def __init__(self, paths: list[Path]):
        self._paths = paths
        super().__init__()

    def run(self) -> dict[str, dict]:
        at_idle_priority()
        entries = {}
        for path in self._paths:
            try:
                stat = path.stat()
                entries[path.name] = {"sha256": sha256_file(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            except OSError as e:
                raise MvdError(f"{e.filename}: cannot read ({e.strerror})") from None
        return entries


@dataclass(frozen=True)
class Graph:
    """One ONNX graph a backend compiles: a whole component, or one part of a component split to fit
    a device's per-context limit (``components.<name>.parts`` in the manifest, run in order, each
    part's outputs feeding the next parts' inputs of the same name)."""

    component: str
    name: str  # "unet", or "unet.part0", "unet.part1", ...
    onnx: Path
    data: Path | None
    inputs: list[dict]  # [{name, shape, dtype}], as describe_io gives them
    outputs: list[dict]


def _check_not_hard_linked(data: Path) -> None:
    """onnx refuses to read external weights through a file with several hard links (a guard against
    hard-link attacks), with a traceback deep in a compile: say so first, naming the file."""
    with contextlib.suppress(FileNotFoundError):
        links = data.stat().st_nlink
        if links > 1:
            raise MvdError(
                f"{data}: has {links} hard links, and onnx reads no weights through a hard-linked file; "
                "give the build its own copy (cp without -l, or cp --remove-destination)"
            )


class Build:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise MvdError(f"{self.path}: not a build directory (no {MANIFEST}); make one with `mvd-deploy export`")
        self.manifest = load_json(self.path / MANIFEST, "build manifest")
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != BUILD_FORMAT:
            raise MvdError(f"{self.path / MANIFEST}: key 'format': not an mvd-deploy build manifest")
        for name, component in self.components.items():
            onnx_file = self.path / component["onnx"]
            if not onnx_file.is_file():
                raise MvdError(f"{self.path / MANIFEST}: key 'components.{name}.onnx': {onnx_file} is missing")

    @property
    def components(self) -> dict[str, dict]:
        return self.manifest.get("components", {})

    def onnx_path(self, component: str) -> Path:
        """The component's exported model, its weights file checked readable by onnx."""
        record = self.components[component]
        if record.get("data"):
            _check_not_hard_linked(self.path / record["data"])
        return self.path / record["onnx"]

    def graphs(self, component: str) -> list[Graph]:
        """The graphs that make ``component``: its parts in order when the build holds parts, else the
        whole exported model."""
        record = self.components[component]
        entries = record.get("parts", {}).get("graphs") or [dict(record, name=component)]
        for entry in entries:
            if entry.get("data"):
                _check_not_hard_linked(self.path / entry["data"])
        return [
            Graph(
                component=component,
                name=entry["name"],
                onnx=self.path / entry["onnx"],
                data=self.path / entry["data"] if entry.get("data") else None,
                inputs=entry["inputs"],
                outputs=entry["outputs"],
            )
            for entry in entries
        ]

    def compiled(self, key: str, how: str = "mvd-deploy compile") -> dict:
        """The compiled record ``key`` ("<target>/<form>"), or a one-line error saying how to make it."""
        record = self.manifest.get("compiled", {}).get(key)
        if record is None:
            known = ", ".join(self.manifest.get("compiled", {})) or "none"
            raise MvdError(f"{self.path}: no compiled form {key!r} (compiled: {known}); run `{how}` first")
        return record

    def random_inputs(self, component: str, seed: int) -> dict[str, np.ndarray]:
        """Fixed random float32 inputs of the component's static shapes."""
        rng = np.random.default_rng(seed)
        return {
            spec["name"]: rng.standard_normal(spec["shape"]).astype(np.float32)
            for spec in self.components[component]["inputs"]
        }

    def save_manifest(self, hash_files: bool = True) -> None:
        """Replace build.json in one step (a reader never sees half a manifest), files hashed."""
        if hash_files:
            self.record_files()
        tmp = self.path / f".{MANIFEST}.tmp"
        write_json(tmp, self.manifest)
        os.replace(tmp, self.path / MANIFEST)

    @contextlib.contextmanager
    def staged(self, relative: str, label: str) -> Iterator[Path]:
        """A new directory in the build's ``.staging/`` that replaces ``relative`` when the block
        completes (:meth:`replace_dir`), and is removed when it does not."""

        def swap(staged: Path, target: Path) -> None:
            self.replace_dir(staged, relative)

        try:
            with staged_dir(self.path / relative, staging=self.path / ".staging", label=label, swap=swap) as staged:
                yield staged
        finally:
            self.clean_staging()

    def replace_dir(self, staged: Path, relative: str) -> Path:
        """Move the completed directory ``staged`` to ``relative`` in the build, replacing any old one."""
        swap_in(staged, self.path / relative)
        return self.path / relative

    def staging_dir(self, name: str) -> Path:
        """A new directory in the build's ``.staging/``; what a killed run left there is removed first."""
        (self.path / ".staging").mkdir(exist_ok=True)
        return owned_temp_dir(self.path / ".staging", "", label=name)

    def record_files(self) -> dict[str, dict]:
        """sha256 and size of every file in the build (but build.json), into the manifest.

        Files whose size and mtime match their entry keep their hash (weights are GBs).
        """
        previous = self.manifest.get("files", {})
        files = {}
        for path in sorted(self.path.rglob("*")):
            relative = path.relative_to(self.path).as_posix()
            if not path.is_file() or relative == MANIFEST or any(part.startswith(".") for part in Path(relative).parts):
                continue
            stat = path.stat()
            old = previous.get(relative, {})
            if old.get("bytes") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns:
                files[relative] = old
            else:
                files[relative] = {"sha256": sha256_file(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self.manifest["files"] = files
        return files

    def clean_staging(self) -> None:
        """Remove the staging area once nothing is left in it."""
        with contextlib.suppress(OSError):
            (self.path / ".staging").rmdir()


def summary_rows(build: Build) -> list[dict]:
    """Per component and form: parameters, FLOPs, PSNR against its reference, profiled p50 and peak memory."""
    profiles = {}
    for path in sorted((build.path / "profiles").glob("*.json")) if (build.path / "profiles").is_dir() else []:
        profile = load_json(path, "profile")
        profiles[f"{profile['target']}/{profile['form']}"] = profile
    rows = []
    for name, component in build.components.items():
        forms = [("export " + build.manifest.get("precision", "fp32"), component["validation"], None, [])]
        for key, record in build.manifest.get("compiled", {}).items():
            if name in record["components"]:
                compiled = record["components"][name]
                # ort-cpu validates when compiling; AI Hub forms are checked on the device by `profile`;
                # qnn-offline on the HTP emulator when compiling, or by `profile --emulate`
                validation = compiled.get("validation") or compiled.get("on_device") or {}
                forms.append((key, validation, profiles.get(key), compiled.get("graphs") or []))
        for form, validation, profile, graphs in forms:
            contexts = [g["context_bytes"] for g in graphs if "context_bytes" in g]
            measured = profile["components"].get(name) if profile else None
            rows.append(
                {
                    "component": name,
                    "form": form,
                    "params": component["params"],
                    "tflops": component["flops"] / 1e12,
                    "psnr_db": validation.get("psnr_db", (measured or {}).get("psnr_db")),
                    # None where not measured (the offline HTP emulator has no phone latency)
                    "p50_ms": (measured.get("latency_ms") or {}).get("p50") if measured else None,
                    "peak_memory_mb": measured.get("peak_memory_mb") if measured else None,
                    # phone forms compiled here: how many graphs (parts), their contexts and compile time
                    "graphs": len(graphs) or None,
                    "context_mb": round(sum(contexts) / 2**20, 1) if contexts else None,
                    "compile_s": round(sum(g["compile_s"] for g in graphs), 1) if contexts else None,
                }
            )
    return rows
