"""The Qualcomm AI Hub backend against a signature-checked double, and the real client's refusals."""

import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import qai_hub as real
from click.testing import CliRunner

import mvd_deploy.backends.qai_hub as hub_backend
from helpers import ROOT
from hub_double import FakeHub, FakeJob
from mvd_deploy.backends.base import CompileOptions
from mvd_deploy.backends.qai_hub import NOT_CONFIGURED, HubError, QaiHubBackend, parse_hub_profile
from mvd_deploy.build import Build
from mvd_deploy.cli import main
from mvd_deploy.device_profiles import load_device_profile, resolve_target
from mvd_deploy.errors import MvdError


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", FakeHub.API)
def test_double_functions_have_the_real_signatures(name):
    assert _parameters(getattr(FakeHub(), name)) == _parameters(getattr(real, name))


@pytest.mark.parametrize(
    "method,real_class",
    [
        ("get_status", real.Job),
        ("wait", real.Job),
        ("get_target_model", real.CompileJob),
        ("download_target_model", real.CompileJob),
        ("get_target_model", real.QuantizeJob),
        ("download_profile", real.InferenceJob),
        ("download_output_data", real.InferenceJob),
    ],
)
def test_double_job_methods_have_the_real_signatures(method, real_class):
    assert _parameters(getattr(FakeJob, method)) == _parameters(getattr(real_class, method))


@pytest.fixture
def build(tiny_build, tmp_path) -> Build:
    return Build(shutil.copytree(tiny_build, tmp_path / "build"))


def _calls(hub, name):
    return [c for c in hub.calls if c[0] == name]


def test_compile_fp16_for_two_targets_together(build):
    hub = FakeHub()
    targets = [resolve_target("xiaomi-14-pro"), resolve_target("snapdragon-8-elite")]
    records = QaiHubBackend(hub).compile(build, targets, CompileOptions(), quiet=True)
    assert set(records) == {"xiaomi-14-pro/float16", "snapdragon-8-elite/float16"}
    # one upload per component, in AI Hub's directory form (checked by the real client's rule)
    assert [c[2] for c in _calls(hub, "upload_model")] == ["mvd-tiny-unet", "mvd-tiny-decoder"]
    compiles = _calls(hub, "submit_compile_job")
    assert len(compiles) == 4
    # every job of every target is submitted before any is awaited
    first_wait = next(i for i, c in enumerate(hub.calls) if c[0] == "wait")
    assert all(hub.calls.index(c) < first_wait for c in compiles)
    for _, name, _device, specs, options, _ in compiles:
        assert "--truncate_64bit_io" in options and "--target_runtime qnn_context_binary" in options
        assert "--quantize_full_type float16 --quantize_io" in options and "--compute_unit npu" in options
        component = name.rsplit("-", 1)[-1]
        expected = {i["name"]: (tuple(i["shape"]), "float32") for i in build.components[component]["inputs"]}
        assert specs == expected
    assert {c[2] for c in compiles} == {"Samsung Galaxy S24 (Family)", "Samsung Galaxy S25 (Family)"}
    record = records["xiaomi-14-pro/float16"]
    assert (build.path / record["directory"] / "unet.bin").read_bytes().startswith(b"context binary")
    manifest = json.loads((build.path / "build.json").read_text())
    assert (
        manifest["hub_jobs"]["compile"]["xiaomi-14-pro"]["float16"]["unet"]
        == record["components"]["unet"]["compile_job"]
    )
    assert manifest["compiled"]["xiaomi-14-pro/float16"]["device"]["name"] == "Samsung Galaxy S24 (Family)"


def test_a_rerun_reuses_recorded_jobs(build):
    hub = FakeHub()
    target = [resolve_target("xiaomi-14-pro")]
    QaiHubBackend(hub).compile(build, target, CompileOptions(), quiet=True)
    submitted = len(_calls(hub, "submit_compile_job")) + len(_calls(hub, "upload_model"))
    QaiHubBackend(hub).compile(Build(build.path), target, CompileOptions(), quiet=True)
    assert len(_calls(hub, "submit_compile_job")) + len(_calls(hub, "upload_model")) == submitted


def test_device_falls_back_to_the_chipset_attribute(build):
    hub = FakeHub()
    hub.devices = [d for d in hub.devices if "Galaxy S24" not in d.name]
    records = QaiHubBackend(hub).compile(build, [resolve_target("xiaomi-14-pro")], CompileOptions(), quiet=True)
    assert records["xiaomi-14-pro/float16"]["device"]["name"] == "Snapdragon 8 Gen 3 QRD"


def test_a_failed_job_names_reason_and_url_and_writes_nothing(build):
    hub = FakeHub()
    hub.fail["mvd-tiny-decoder"] = "QNN does not support op Foo"
    target = [resolve_target("xiaomi-14-pro")]
    with pytest.raises(
        HubError,
        match=r"xiaomi-14-pro decoder: compile job jp\d+ FAILED: QNN does not support op Foo "
        r"\(https://app.aihub.example/jobs/jp\d+/\)",
    ) as err:
        QaiHubBackend(hub).compile(build, target, CompileOptions(), quiet=True)
    assert err.value.exit_code == 1
    assert not (build.path / "compiled").exists()
    assert json.loads((build.path / "build.json").read_text())["compiled"] == {}
    # the rerun resubmits only the failed job
    QaiHubBackend(hub).compile(Build(build.path), target, CompileOptions(), quiet=True)
    assert [c[1] for c in _calls(hub, "submit_compile_job")] == [
        "mvd-tiny-unet",
        "mvd-tiny-decoder",
        "mvd-tiny-decoder",
    ]


def test_w8a16_quantizes_with_pipeline_calibration_then_compiles(build, tmp_path):
    profile = tmp_path / "w8a16.yaml"
    profile.write_text(
        (ROOT / "device_profiles" / "xiaomi-14-pro.yaml")
        .read_text()
        .replace("precision: float16", "precision: w8a16\ncalibration_samples: 3")
    )
    hub = FakeHub()
    records = QaiHubBackend(hub).compile(build, [load_device_profile(profile)], CompileOptions(), quiet=True)
    assert set(records) == {"xiaomi-14-pro/w8a16"}
    quantize = _calls(hub, "submit_quantize_job")
    assert [c[1] for c in quantize] == ["mvd-tiny-unet-w8a16", "mvd-tiny-decoder-w8a16"]
    for _, name, calibration, weights, activations in quantize:
        assert weights == real.QuantizeDtype.INT8 and activations == real.QuantizeDtype.INT16
        component = name.split("-")[-2]
        for spec in build.components[component]["inputs"]:
            samples = calibration[spec["name"]]
            assert len(samples) == 3 and all(list(s.shape) == spec["shape"] for s in samples)
    for compile_call in _calls(hub, "submit_compile_job"):
        assert compile_call[5] == "quantize"  # compiled from the quantize job's model
        assert "--quantize_full_type" not in compile_call[4]


def test_profile_and_on_device_check(build):
    hub = FakeHub()
    targets = [resolve_target("xiaomi-14-pro")]
    backend = QaiHubBackend(hub)
    backend.compile(build, targets, CompileOptions(), quiet=True)
    [profile] = backend.profile(build, targets, None, runs=5, quiet=True)
    assert profile["schema"] == "mvd-deploy-profile" and profile["target"] == "xiaomi-14-pro"
    assert all(c[4] is True and "--max_profiler_iterations 5" in c[3] for c in _calls(hub, "submit_inference_job"))
    unet = profile["components"]["unet"]
    assert unet["latency_ms"]["p50"] == 1780.0 and unet["latency_ms"]["p90"] > unet["latency_ms"]["min"]
    assert unet["load_ms"] == {"first": 2500.0, "warm": 300.0} and unet["peak_memory_mb"] == 1500.0
    assert unet["compute_units"] == {"NPU": 4, "CPU": 1}
    assert unet["top_ops"][0]["op_type"] == "MatMul" and unet["top_ops"][0]["ms"] == 600.0
    check = unet["on_device"]
    assert 40 < check["psnr_db"] < 100  # the double's fp16-sized noise
    sensitivity = check["conditioning_sensitivity"]
    assert sensitivity["device"] == pytest.approx(sensitivity["reference"], rel=0.05) and sensitivity["reference"] > 0
    assert profile["total_latency_ms"] == pytest.approx(1780.0 + 90.0)
    manifest = json.loads((build.path / "build.json").read_text())
    assert manifest["compiled"]["xiaomi-14-pro/float16"]["components"]["unet"]["on_device"] == check
    assert manifest["hub_jobs"]["inference"]["xiaomi-14-pro"]["float16"]["unet"] == unet["inference_job"]


def test_parse_hub_profile_units():
    profile = parse_hub_profile(
        {
            "execution_summary": {
                "estimated_inference_time": 2_000,
                "estimated_inference_peak_memory": 3 * 2**20,
                "first_load_time": 1_000,
                "warm_load_time": None,
            },
            "execution_detail": [
                {"name": "a", "type": "Conv", "compute_unit": "GPU", "execution_time": 500},
                {"name": "b", "type": "Relu", "compute_unit": "GPU"},
            ],
        }
    )
    assert profile["latency_ms"] == {"p50": 2.0, "p90": 2.0, "min": 2.0, "mean": 2.0}
    assert profile["load_ms"] == {"first": 1.0, "warm": None} and profile["peak_memory_mb"] == 3.0
    assert profile["compute_units"] == {"GPU": 2} and profile["top_ops"][0]["share"] == 0.25


# -- errors -------------------------------------------------------------------------------------------
def test_unconfigured_real_client_gives_the_configure_line(build, tmp_path):
    """The real qai_hub with no client.ini raises UserError at once (no network); we print one line."""
    env = {**os.environ, "HOME": str(tmp_path), "QAIHUB_CLIENT_INI": str(tmp_path / "missing.ini")}
    proc = subprocess.run(
        [sys.executable, "-m", "mvd_deploy", "compile", str(build.path), "--target", "xiaomi-14-pro"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {NOT_CONFIGURED}"
    assert "Traceback" not in proc.stderr


def test_the_token_never_reaches_output_or_the_build(build, tmp_path, monkeypatch):
    token = "tok_4f9a1c2b7e"
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {token}\napi_url = https://127.0.0.1:1\nweb_url = https://127.0.0.1:1\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    hub = FakeHub()

    def unreachable(*args, **kwargs):
        raise real.InternalError(f"POST /api/v1/models failed: header Authorization: Token {token}: connection refused")

    hub.upload_model = unreachable
    monkeypatch.setattr(hub_backend, "_client", lambda: hub)
    result = CliRunner().invoke(main, ["compile", str(build.path), "--target", "xiaomi-14-pro"])
    assert result.exit_code == 1
    assert token not in result.output and "Token ***" in result.stderr
    assert "unreachable or failing" in result.stderr
    assert not any(token in p.read_text(errors="ignore") for p in build.path.rglob("*") if p.is_file())


def test_cli_compile_and_profile_with_the_double(build, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(hub_backend, "_client", lambda: hub)
    runner = CliRunner()
    result = runner.invoke(
        main, ["compile", str(build.path), "--target", "xiaomi-14-pro", "--target", "galaxy-s24", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"xiaomi-14-pro/float16", "galaxy-s24/float16"}
    result = runner.invoke(main, ["profile", str(build.path), "--target", "xiaomi-14-pro", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((build.path / "profiles" / "xiaomi-14-pro-float16.json").read_text()) == json.loads(result.stdout)
    summary = runner.invoke(main, ["summary", str(build.path)])
    assert "xiaomi-14-pro/float16" in summary.stdout and "1780.0" in summary.stdout


# -- device profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["xiaomi-14-pro", "galaxy-s24", "snapdragon-8-elite", "ort-cpu"])
def test_shipped_device_profiles_load(name):
    profile = resolve_target(name)
    assert profile.name == name and profile.budgets["unet"].latency_ms > 0


def test_xiaomi_selects_by_chipset():
    profile = resolve_target("xiaomi-14-pro")
    assert profile.device_attributes == ("chipset:qualcomm-snapdragon-8gen3",)
    assert profile.runtime == "qnn_context_binary" and profile.precision == "float16"


@pytest.mark.parametrize(
    "edit,key",
    [
        (("runtime: qnn_context_binary", "runtime: coreml"), "runtime"),
        (("precision: float16", "precision: int4"), "precision"),
        (("backend: qai-hub", "backend: tensorrt"), "backend"),
        (("  decoder: {", "  vae: {"), "budgets.vae"),
        (("latency_ms: 2000,", "latency_ms: -5,"), "budgets.unet.latency_ms"),
        (("compute_unit: npu", "compute_unit: tpu"), "compute_unit"),
    ],
)
def test_bad_device_profile_names_file_and_key(tmp_path, edit, key):
    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "device_profiles" / "xiaomi-14-pro.yaml").read_text().replace(*edit))
    with pytest.raises(MvdError) as err:
        load_device_profile(path)
    assert str(err.value).startswith(f"{path}: key '{key}'") and "\n" not in str(err.value)
