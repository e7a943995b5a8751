"""CI gates (exit codes, JUnit, Markdown), verified pulls, and the HTML report."""

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import mvd_deploy.backends.qai_hub as hub_backend
from helpers import ROOT
from hub_double import FakeHub
from mvd_deploy.backends.base import CompileOptions
from mvd_deploy.backends.qai_hub import QaiHubBackend
from mvd_deploy.build import Build, sha256_file
from mvd_deploy.cli import main
from mvd_deploy.cpu import cpu_features
from mvd_deploy.device_profiles import load_device_profile


def _profile(unet_ms=1500.0, decoder_ms=300.0, unet_mb=2000.0, psnr=45.0):
    def component(ms, mb, db):
        return {
            "latency_ms": {"p50": ms, "p90": ms, "min": ms, "mean": ms},
            "load_ms": {"first": 1.0, "warm": None},
            "peak_memory_mb": mb,
            "compute_units": {"NPU": 10},
            "top_ops": [],
            "psnr_db": db,
        }

    return {
        "schema": "mvd-deploy-profile",
        "schema_version": 1,
        "target": "xiaomi-14-pro",
        "form": "float16",
        "components": {
            "image_encoder": component(120.0, 800.0, 45.0),
            "vae_encoder": component(180.0, 300.0, 45.0),
            "unet": component(unet_ms, unet_mb, psnr),
            "decoder": component(decoder_ms, 500.0, psnr),
        },
        "total_latency_ms": 120.0 + 180.0 + unet_ms + decoder_ms,
    }


def _write(tmp_path, profile) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    return path


def test_gate_within_budget_exits_0_and_writes_junit_and_markdown(tmp_path):
    path = _write(tmp_path, _profile())
    result = CliRunner().invoke(main, ["gate", str(path), "--budget", "device_profiles/xiaomi-14-pro.yaml", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["failures"] == 0
    suite = ET.parse(tmp_path / "profile.junit.xml").getroot().find("testsuite")
    # the four components × (latency, memory, PSNR) + the pipeline total
    assert suite.get("tests") == "13" and suite.get("failures") == "0" and len(suite.findall("testcase")) == 13
    assert "within budget" in (tmp_path / "profile.gate.md").read_text()


def test_gate_over_budget_exits_1_with_measured_vs_budget(tmp_path):
    path = _write(tmp_path, _profile(unet_ms=2600.0, psnr=20.0))
    junit = tmp_path / "out" / "gate.xml"
    junit.parent.mkdir()
    result = CliRunner().invoke(main, ["gate", str(path), "--budget", "xiaomi-14-pro", "--junit", str(junit)])
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    failures = {(c.get("classname"), c.get("name")): c.find("failure") for c in root.iter("testcase")}
    failed = {k: f.get("message") for k, f in failures.items() if f is not None}
    assert set(failed) == {
        ("xiaomi-14-pro.unet", "latency_ms"),
        ("xiaomi-14-pro.unet", "min_psnr_db"),
        ("xiaomi-14-pro.decoder", "min_psnr_db"),
        ("xiaomi-14-pro.pipeline", "total_latency_ms"),
    }
    assert failed["xiaomi-14-pro.unet", "latency_ms"] == "unet latency_ms: measured 2600 ms, budget ≤ 2000 ms"
    assert root.get("failures") == "4" and root.get("tests") == "13"
    assert "| unet | latency_ms | 2600 ms | ≤ 2000 ms | ❌ |" in result.stdout


def test_gate_missing_component_fails(tmp_path):
    profile = _profile()
    del profile["components"]["decoder"]
    result = CliRunner().invoke(main, ["gate", str(_write(tmp_path, profile)), "--budget", "xiaomi-14-pro", "--json"])
    assert result.exit_code == 1
    failed = [c for c in json.loads(result.stdout)["checks"] if not c["passed"]]
    assert [(c["component"], c["note"]) for c in failed] == [("decoder", "not profiled")] * 3


def test_a_zero_peak_memory_fails_the_gate(tmp_path):
    """AI Hub's deprecated peak-memory field is 0 in new profiles: 0 MB is "not measured", not a pass."""
    result = CliRunner().invoke(
        main, ["gate", str(_write(tmp_path, _profile(unet_mb=0.0))), "--budget", "xiaomi-14-pro", "--json"]
    )
    assert result.exit_code == 1
    [failed] = [c for c in json.loads(result.stdout)["checks"] if not c["passed"]]
    assert (failed["component"], failed["metric"], failed["note"]) == ("unet", "peak_memory_mb", "not measured")


@pytest.mark.parametrize(
    "args,message",
    [
        (["gate", "nowhere.json", "--budget", "xiaomi-14-pro"], "nowhere.json: profile not found"),
        (["gate", "PROFILE", "--budget", "nowhere"], "--target: unknown target 'nowhere'"),
        (["gate", "BADPROFILE", "--budget", "xiaomi-14-pro"], "key 'schema': not an mvd-deploy profile"),
    ],
)
def test_gate_usage_errors_exit_2(tmp_path, args, message):
    good, bad = _write(tmp_path, _profile()), tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": "else"}))
    args = [str(good) if a == "PROFILE" else str(bad) if a == "BADPROFILE" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.stderr


def test_profile_gate_on_ort_cpu(compiled_build, tmp_path):
    """CPU latency budgets are shares of this CPU's GEMM rate measured in the same run: a floor far
    under what any CPU reaches passes, one no CPU can reach fails, whatever the machine's speed."""
    runner = CliRunner()
    shipped = (ROOT / "device_profiles" / "ort-cpu.yaml").read_text()
    loose, tight = tmp_path / "loose.yaml", tmp_path / "tight.yaml"
    for other in ("decoder: {min_compute_efficiency: 0.2,", "image_encoder: {min_compute_efficiency: 0.2,"):
        shipped = shipped.replace(other, other.split("{")[0] + "{min_compute_efficiency: 0.000001,")
    shipped = shipped.replace(
        "vae_encoder: {min_compute_efficiency: 0.1,", "vae_encoder: {min_compute_efficiency: 0.000001,"
    )
    loose.write_text(shipped.replace("min_compute_efficiency: 0.2,", "min_compute_efficiency: 0.000001,"))
    tight.write_text(shipped.replace("min_compute_efficiency: 0.2,", "min_compute_efficiency: 0.99,"))
    result = runner.invoke(main, ["profile", str(compiled_build), "--target", str(loose), "--runs", "1", "--gate"])
    assert result.exit_code == 0, result.output
    assert (compiled_build / "profiles" / "ort-cpu-fp32.junit.xml").is_file()
    profile = json.loads((compiled_build / "profiles" / "ort-cpu-fp32.json").read_text())
    assert profile["device"]["gemm_gflops"] > 0 and profile["components"]["unet"]["flops"] > 0
    assert profile["device"]["features"] == cpu_features()
    result = runner.invoke(main, ["profile", str(compiled_build), "--target", str(tight), "--runs", "1", "--gate"])
    assert result.exit_code == 1
    gates = json.loads((compiled_build / "build.json").read_text())["gates"]["ort-cpu/fp32"]
    assert not gates["passed"] and gates["failures"] == 1
    [failed] = [c for c in gates["checks"] if not c["passed"]]
    assert failed["component"] == "unet" and failed["metric"] == "min_compute_efficiency"
    assert 0 < failed["measured"] < 0.99


# -- pull ---------------------------------------------------------------------------------------------
def test_manifest_records_hashes_of_every_file(compiled_build):
    manifest = json.loads((compiled_build / "build.json").read_text())
    files = manifest["files"]
    assert {"unet.onnx", "unet.data", "compiled/ort-cpu/fp32/unet.onnx"} <= set(files)
    assert files["unet.data"]["sha256"] == sha256_file(compiled_build / "unet.data")
    assert set(manifest["checkpoint_sha256"]) == {
        "config.json",
        "unet.safetensors",
        "image_encoder.safetensors",
        "vae_encoder.safetensors",
    }
    assert manifest["toolchain"]["onnxruntime"] and manifest["passes"]


def test_pull_copies_verified_compiled_artifacts(compiled_build, tmp_path):
    result = CliRunner().invoke(main, ["pull", str(compiled_build), "--out", str(tmp_path / "app"), "--json"])
    assert result.exit_code == 0, result.output
    pulled = json.loads((tmp_path / "app" / "artifacts.json").read_text())
    assert set(pulled["compiled"]) == {"ort-cpu/fp32"}
    for relative, entry in pulled["files"].items():
        assert sha256_file(tmp_path / "app" / relative) == entry["sha256"]
    assert (tmp_path / "app" / "compiled" / "ort-cpu" / "fp32" / "unet.onnx").is_file()
    assert pulled["components"]["unet"]["inputs"][0]["name"] == "sample"
    # a record without per-graph contracts compiled each whole component with the export's I/O
    [unet] = pulled["graphs"]["ort-cpu/fp32"]["unet"]
    assert unet["path"] == "compiled/ort-cpu/fp32/unet.onnx" and (tmp_path / "app" / unet["path"]).is_file()
    assert unet["inputs"] == pulled["components"]["unet"]["inputs"]


def test_pull_catches_a_tampered_artifact(compiled_build, tmp_path):
    data = compiled_build / "compiled" / "ort-cpu" / "fp32" / "unet.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = CliRunner().invoke(main, ["pull", str(compiled_build), "--out", str(tmp_path / "app")])
    assert result.exit_code == 1
    assert "does not match the manifest" in result.stderr and "nothing was pulled" in result.stderr
    assert not (tmp_path / "app").exists() and not list(tmp_path.glob(".app*"))


@pytest.mark.parametrize("escape", ["../../etc/passwd", "/etc/passwd", "compiled/../../outside"])
def test_pull_refuses_a_manifest_path_outside_the_build(compiled_build, tmp_path, escape):
    manifest = json.loads((compiled_build / "build.json").read_text())
    manifest["files"][escape] = {"sha256": "0" * 64, "bytes": 1}
    (compiled_build / "build.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["pull", str(compiled_build), "--out", str(tmp_path / "app")])
    assert result.exit_code == 2
    assert "outside the build; refused" in result.stderr
    assert not (tmp_path / "app").exists()


def _hub_target(tmp_path, **keys):
    data = yaml.safe_load((ROOT / "device_profiles" / "xiaomi-14-pro.yaml").read_text()) | keys
    (tmp_path / "hub-target.yaml").write_text(yaml.safe_dump(data))
    return load_device_profile(tmp_path / "hub-target.yaml")


def test_pull_carries_each_graphs_contract_as_compiled(tiny_build, tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    build = Build(shutil.copytree(tiny_build, tmp_path / "build"))
    QaiHubBackend(hub).compile(build, [_hub_target(tmp_path, precision="float16")], CompileOptions())
    result = CliRunner().invoke(main, ["pull", str(build.path), "--out", str(tmp_path / "app"), "--json"])
    assert result.exit_code == 0, result.output
    pulled = json.loads((tmp_path / "app" / "artifacts.json").read_text())
    [unet] = pulled["graphs"]["xiaomi-14-pro/float16"]["unet"]
    assert unet["path"] == "compiled/xiaomi-14-pro/float16/unet.bin" and (tmp_path / "app" / unet["path"]).is_file()
    # not the export's float32 I/O: --quantize_io made it float16, the compiled outputs are renamed
    assert [(i["name"], i["dtype"]) for i in unet["inputs"]] == [
        ("sample", "float16"),
        ("encoder_hidden_states", "float16"),
    ]
    assert [(o["name"], o["dtype"]) for o in unet["outputs"]] == [("output_0", "float16")]


@pytest.mark.parametrize("runtime,path", [("qnn_context_binary", "model.bin"), ("onnx", "model/unet.onnx")])
def test_pull_an_ai_hub_compile_job(tiny_build, tmp_path, monkeypatch, runtime, path):
    hub = FakeHub()
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    build = Build(shutil.copytree(tiny_build, tmp_path / "build"))
    target = _hub_target(tmp_path, precision="float16", runtime=runtime)
    records = QaiHubBackend(hub).compile(build, [target], CompileOptions())
    job_id = records["xiaomi-14-pro/float16"]["components"]["unet"]["graphs"][0]["compile_job"]
    result = CliRunner().invoke(main, ["pull", job_id, "--out", str(tmp_path / "app"), "--json"])
    assert result.exit_code == 0, result.output
    pulled = json.loads(result.stdout)  # one JSON object: the client's "Downloaded model to …" went to stderr
    assert pulled["source"] == f"qai-hub:{job_id}" and pulled["path"] == path  # an ONNX target's .zip unpacked
    assert [i["dtype"] for i in pulled["inputs"]] == ["float16", "float16"]
    for name, entry in pulled["files"].items():
        assert sha256_file(tmp_path / "app" / name) == entry["sha256"]
    assert not list((tmp_path / "app").rglob("*.zip"))


def test_pull_a_job_that_is_not_a_compile_job(tiny_build, tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    build = Build(shutil.copytree(tiny_build, tmp_path / "build"))
    target = [_hub_target(tmp_path, precision="float16")]
    QaiHubBackend(hub).compile(build, target, CompileOptions())
    [profile] = QaiHubBackend(hub).profile(build, target, None, runs=1)
    job_id = profile["components"]["unet"]["inference_job"]
    result = CliRunner().invoke(main, ["pull", job_id, "--out", str(tmp_path / "app")])
    assert result.exit_code == 2 and not (tmp_path / "app").exists()
    assert result.stderr.strip() == (
        f"error: SOURCE {job_id}: AI Hub job {job_id} is not a compile job "
        f"(inference job, https://app.aihub.example/jobs/{job_id}/)"
    )


# -- report -------------------------------------------------------------------------------------------
def test_report_renders_with_its_plots(compiled_build):
    runner = CliRunner()
    assert runner.invoke(main, ["profile", str(compiled_build), "--target", "ort-cpu", "--runs", "1"]).exit_code == 0
    result = runner.invoke(main, ["report", str(compiled_build), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    page = Path(written["report"]).read_text()
    assert set(written["images"]) == {"stages.png", "latency.png", "top_ops_ort-cpu_fp32.png"}
    for image in written["images"]:
        assert f"src='{image}'" in page
        png = (Path(written["report"]).parent / image).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "+ temporal multiscaling" in page and "ort-cpu/fp32" in page
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(Path(written["report"]).parent / "stages.png").shape
    assert width > 600 and height > 300
