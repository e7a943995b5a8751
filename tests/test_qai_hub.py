"""The Qualcomm AI Hub backend against a signature-checked double, and the real client's refusals."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta

import numpy as np
import onnx
import pytest
import qai_hub as real
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import mvd_deploy.backends.qai_hub as hub_backend
from helpers import ROOT
from hub_double import FakeDataset, FakeHub, FakeJob, FakeModel
from mvd_deploy.backends.base import CompileOptions
from mvd_deploy.backends.qai_hub import NOT_CONFIGURED, HubError, LocalError, QaiHubBackend, parse_hub_profile
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
    "double,method,real_class",
    [
        (FakeJob, "get_status", real.Job),
        (FakeJob, "wait", real.Job),
        (FakeJob, "get_target_model", real.CompileJob),
        (FakeJob, "get_target_shapes", real.CompileJob),
        (FakeJob, "download_target_model", real.CompileJob),
        (FakeJob, "get_target_model", real.QuantizeJob),
        (FakeJob, "download_profile", real.InferenceJob),
        (FakeJob, "get_output_dataset", real.InferenceJob),
        (FakeJob, "download_output_data", real.InferenceJob),
        (FakeModel, "download", real.Model),
        (FakeDataset, "download", real.Dataset),
        (FakeDataset, "is_expired", real.Dataset),
    ],
)
def test_double_methods_have_the_real_signatures(double, method, real_class):
    assert _parameters(getattr(double, method)) == _parameters(getattr(real_class, method))


@pytest.fixture
def build(tiny_build, tmp_path) -> Build:
    """The tiny build's UNet and decoder (the AI Hub flow per graph; the encoders are graphs like them,
    compiled together with the rest in test_all_four_components_compile_in_pipeline_order)."""
    build = Build(shutil.copytree(tiny_build, tmp_path / "build"))
    for name in ("image_encoder", "vae_encoder"):
        build.manifest["components"].pop(name)
    build.save_manifest()
    return Build(build.path)


def test_all_four_components_compile_in_pipeline_order_and_generate_on_the_device(tiny_build, tmp_path, monkeypatch):
    import imageio.v3 as iio
    import PIL.Image

    from mvd_deploy import generate_video

    build = Build(shutil.copytree(tiny_build, tmp_path / "build"))
    hub = FakeHub()
    target = _target(tmp_path, precision="float16", max_part_weights_mb=4)  # the UNet in two parts
    records = QaiHubBackend(hub).compile(build, [target], CompileOptions())
    order = ["image_encoder", "vae_encoder", "unet", "decoder"]
    uploads = ["image_encoder", "vae_encoder", "unet.part0", "unet.part1", "decoder"]
    assert [c[2] for c in _calls(hub, "upload_model")] == [f"mvd-tiny-{name}" for name in uploads]
    components = records["xiaomi-14-pro/float16"]["components"]
    assert list(components) == order
    for name in ("image_encoder", "vae_encoder", "decoder"):
        [graph] = components[name]["graphs"]
        assert [i["name"] for i in graph["inputs"]] == [i["name"] for i in build.components[name]["inputs"]]

    # generate from the AI Hub form: each graph an inference job on the phone, the UNet's parts chained
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    pixels = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "in.png")
    report = generate_video(
        build.path, image=tmp_path / "in.png", out=tmp_path / "v.mp4", target=target.source, reference=True
    )
    assert report["compiled"] == "xiaomi-14-pro/float16" and "on Qualcomm AI Hub" in report["runs_on"]
    jobs = [c for c in _calls(hub, "submit_inference_job") if c[1].startswith("mvd-generate-")]
    assert [c[1] for c in jobs] == [f"mvd-generate-{name}" for name in uploads]
    assert all(c[5] is False for c in jobs)  # no profiling: generate wants outputs
    assert list(report["seconds"]) == order
    frames = np.asarray(iio.imread(tmp_path / "v.mp4", index=None))
    assert frames.shape[0] == build.manifest["pipeline"]["frames"]
    # float16 I/O and the double's 1e-3 output noise: close to the PyTorch video, far from noise
    assert report["reference"]["psnr_db"] > 30


def _target(tmp_path, name="xiaomi-14-pro", **keys):
    """A shipped device profile with some keys changed; calibration kept small (it runs the tiny
    UNet once per sample for the decoder's inputs)."""
    data = yaml.safe_load((ROOT / "device_profiles" / f"{name}.yaml").read_text())
    data.update({"calibration_samples": 2, **keys})
    path = tempfile.NamedTemporaryFile(dir=tmp_path, prefix=f"{name}-", suffix=".yaml", delete=False).name
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return load_device_profile(path)


def _calls(hub, name):
    return [c for c in hub.calls if c[0] == name]


def _manifest(build) -> dict:
    return json.loads((build.path / "build.json").read_text())


# -- compile ------------------------------------------------------------------------------------------
def test_compile_float16_for_two_targets_together(build, tmp_path):
    hub = FakeHub()
    targets = [_target(tmp_path, precision="float16"), _target(tmp_path, "snapdragon-8-elite", precision="float16")]
    records = QaiHubBackend(hub).compile(build, targets, CompileOptions())
    assert set(records) == {"xiaomi-14-pro/float16", "snapdragon-8-elite/float16"}
    # one upload per graph, in AI Hub's directory form (checked by the real client's rule)
    assert [c[2] for c in _calls(hub, "upload_model")] == ["mvd-tiny-unet", "mvd-tiny-decoder"]
    compiles = _calls(hub, "submit_compile_job")
    assert len(compiles) == 4
    # every job of every target is submitted before any is awaited
    first_wait = next(i for i, c in enumerate(hub.calls) if c[0] == "wait")
    assert all(hub.calls.index(c) < first_wait for c in compiles)
    for _, name, _device, _os, specs, options, _ in compiles:
        graph = name.rsplit("-", 1)[-1]
        assert "--truncate_64bit_io" in options and "--target_runtime qnn_context_binary" in options
        assert "--quantize_full_type float16 --quantize_io" in options and "--compute_unit npu" in options
        assert "--qairt_version 2.37" in options  # AI Hub's default QAIRT, pinned
        assert f"--qnn_options context_enable_graphs={graph}" in options
        expected = {i["name"]: (tuple(i["shape"]), "float32") for i in build.components[graph]["inputs"]}
        assert specs == expected
    assert {c[2] for c in compiles} == {"Samsung Galaxy S24 (Family)", "Samsung Galaxy S25 (Family)"}
    record = records["xiaomi-14-pro/float16"]
    assert record["versions"] == {"qairt": "2.37.1.250807", "qairt_api": "2.37"}
    [unet] = record["components"]["unet"]["graphs"]
    assert (build.path / record["directory"] / unet["file"]).read_bytes().startswith(b"context binary")
    # the contract as compiled: float16 I/O after --quantize_io, renamed outputs, the pinned graph name
    assert [(i["name"], i["dtype"]) for i in unet["inputs"]] == [
        ("sample", "float16"),
        ("encoder_hidden_states", "float16"),
    ]
    assert [(o["name"], o["dtype"], o["onnx_name"]) for o in unet["outputs"]] == [
        ("output_0", "float16", "model_output")
    ]
    assert unet["qnn_graph"] == "unet" and unet["context_graphs"] == ["unet"]
    manifest = _manifest(build)
    assert manifest["hub_jobs"]["compile"]["xiaomi-14-pro/float16/unet"]["job"] == unet["compile_job"]
    assert manifest["compiled"]["xiaomi-14-pro/float16"]["device"]["name"] == "Samsung Galaxy S24 (Family)"


def test_device_is_the_newest_os_and_recorded(build, tmp_path):
    """get_devices(name=…) returns one entry per OS version, in no particular order."""
    records = QaiHubBackend(FakeHub()).compile(build, [_target(tmp_path, precision="float16")], CompileOptions())
    device = records["xiaomi-14-pro/float16"]["device"]
    assert (device["os"], device["offered_os"]) == ("15", ["13", "14", "15"])


def test_device_falls_back_to_the_chipset_attribute(build, tmp_path):
    hub = FakeHub()
    hub.devices = [d for d in hub.devices if "Galaxy S24" not in d.name]
    records = QaiHubBackend(hub).compile(build, [_target(tmp_path, precision="float16")], CompileOptions())
    assert records["xiaomi-14-pro/float16"]["device"]["name"] == "Snapdragon 8 Gen 3 QRD"


def test_a_rerun_reuses_recorded_jobs_and_a_change_resubmits(build, tmp_path):
    hub = FakeHub()
    target = _target(tmp_path, precision="float16")
    QaiHubBackend(hub).compile(build, [target], CompileOptions())
    submitted = len(_calls(hub, "submit_compile_job")) + len(_calls(hub, "upload_model"))
    QaiHubBackend(hub).compile(Build(build.path), [target], CompileOptions())
    assert len(_calls(hub, "submit_compile_job")) + len(_calls(hub, "upload_model")) == submitted
    # other options: the recorded jobs are stale (the uploads are not)
    changed = _target(tmp_path, precision="float16", compile_options="--optimization_level 2")
    QaiHubBackend(hub).compile(Build(build.path), [changed], CompileOptions())
    assert len(_calls(hub, "submit_compile_job")) == 4 and len(_calls(hub, "upload_model")) == 2
    # another device (the newest OS went away)
    hub.devices = [d for d in hub.devices if d.os != "15"]
    QaiHubBackend(hub).compile(Build(build.path), [changed], CompileOptions())
    assert [c[3] for c in _calls(hub, "submit_compile_job")[-2:]] == ["14", "14"]


def test_a_running_job_is_waited_on_not_submitted_again(build, tmp_path):
    hub = FakeHub()
    target = _target(tmp_path, precision="float16")
    QaiHubBackend(hub).compile(build, [target], CompileOptions())
    compile_job = _manifest(build)["hub_jobs"]["compile"]["xiaomi-14-pro/float16/unet"]["job"]
    hub.jobs[compile_job].pending = 3  # as if the first run had been interrupted while it ran
    QaiHubBackend(hub).compile(Build(build.path), [target], CompileOptions())
    assert len(_calls(hub, "submit_compile_job")) == 2 and ("wait", compile_job) in hub.calls[-6:]


def test_a_failed_job_names_reason_and_url_and_writes_nothing(build, tmp_path):
    hub = FakeHub()
    hub.fail["mvd-tiny-decoder"] = "QNN does not support op Foo"
    target = [_target(tmp_path, precision="float16")]
    with pytest.raises(
        HubError,
        match=r"xiaomi-14-pro decoder: compile job jp\d+ FAILED: QNN does not support op Foo "
        r"\(https://app.aihub.example/jobs/jp\d+/\)",
    ) as err:
        QaiHubBackend(hub).compile(build, target, CompileOptions())
    assert err.value.exit_code == 1
    assert not (build.path / "compiled").exists()
    assert _manifest(build)["compiled"] == {}
    # the rerun resubmits only the failed job
    QaiHubBackend(hub).compile(Build(build.path), target, CompileOptions())
    assert [c[1] for c in _calls(hub, "submit_compile_job")] == [
        "mvd-tiny-unet",
        "mvd-tiny-decoder",
        "mvd-tiny-decoder",
    ]


def test_w8a16_compiles_to_onnx_then_quantizes_min_max_then_compiles(build, tmp_path):
    hub = FakeHub()
    target = _target(tmp_path, calibration_samples=3)
    assert resolve_target("xiaomi-14-pro").precision == "w8a16"  # the shipped phone profiles' default
    records = QaiHubBackend(hub).compile(build, [target], CompileOptions())
    assert set(records) == {"xiaomi-14-pro/w8a16"}
    compiles = _calls(hub, "submit_compile_job")
    # Qualcomm's recipe: ONNX first (from the upload), quantize that, compile the quantized model
    assert [(c[1], c[5], c[6]) for c in compiles[:2]] == [
        ("mvd-tiny-unet-onnx", "--target_runtime onnx", "upload"),
        ("mvd-tiny-decoder-onnx", "--target_runtime onnx", "upload"),
    ]
    quantize = _calls(hub, "submit_quantize_job")
    assert [c[1] for c in quantize] == ["mvd-tiny-unet-w8a16", "mvd-tiny-decoder-w8a16"]
    for _, name, calibration, weights, activations, options in quantize:
        assert weights == real.QuantizeDtype.INT8 and activations == real.QuantizeDtype.INT16
        assert options == "--range_scheme min_max"
        component = name.split("-")[-2]
        for spec in build.components[component]["inputs"]:
            samples = calibration[spec["name"]]
            assert len(samples) == 3 and all(list(s.shape) == spec["shape"] for s in samples)
    for compile_call in compiles[2:]:
        assert compile_call[6] == "quantize"  # compiled from the quantize job's model
        assert "--quantize_full_type" not in compile_call[5] and "--quantize_io" not in compile_call[5]
    assert records["xiaomi-14-pro/w8a16"]["quantization"]["calibration_samples"] == 3


def test_a_graph_that_cannot_fit_one_context_is_refused_before_uploading(build, tmp_path):
    hub, target = FakeHub(), _target(tmp_path, context_limit_mb=0.5)
    with pytest.raises(MvdError) as err:
        QaiHubBackend(hub).compile(build, [target], CompileOptions())
    message = str(err.value)
    assert message.startswith(f"xiaomi-14-pro ({target.source}): unet cannot fit one HTP context")
    assert "bytes at w8a16" in message and "524,288 bytes" in message and "\n" not in message
    assert hub.calls == []


def test_onnx_targets_download_as_a_zip_that_is_unpacked(build, tmp_path):
    hub = FakeHub()
    target = _target(tmp_path, precision="float16", runtime="onnx")
    records = QaiHubBackend(hub).compile(build, [target], CompileOptions())
    record = records["xiaomi-14-pro/float16"]
    [unet] = record["components"]["unet"]["graphs"]
    assert unet["file"] == "unet/unet.onnx" and "qnn_graph" not in unet
    compiled = build.path / record["directory"]
    assert sorted(p.name for p in compiled.iterdir()) == ["decoder", "unet"]  # no .zip left
    assert sorted(p.name for p in (compiled / "unet").iterdir()) == ["unet.data", "unet.onnx"]


def test_upload_leaves_no_zip_in_the_temp_dir(build, tmp_path, monkeypatch):
    """upload_model zips the model directory into the temp dir and never removes it (GBs)."""
    hub, target = FakeHub(), _target(tmp_path, precision="float16")
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    QaiHubBackend(hub).compile(build, [target], CompileOptions())
    assert list(temp.iterdir()) == []
    assert not [p for p in build.path.iterdir() if p.name.startswith(".")]


# -- a component in parts -----------------------------------------------------------------------------
def test_a_component_over_the_part_size_is_compiled_in_parts(build, tmp_path):
    """The tiny UNet's float16 weights (7.6 MB) over a 4 MB part size: the build's own parts (#7)."""
    hub = FakeHub()
    target = _target(tmp_path, precision="float16", max_part_weights_mb=4)
    records = QaiHubBackend(hub).compile(build, [target], CompileOptions())
    components = records["xiaomi-14-pro/float16"]["components"]
    assert [g["name"] for g in components["unet"]["graphs"]] == ["unet.part0", "unet.part1"]
    assert [g["name"] for g in components["decoder"]["graphs"]] == ["decoder"]
    assert [c[2] for c in _calls(hub, "upload_model")] == [
        "mvd-tiny-unet.part0",
        "mvd-tiny-unet.part1",
        "mvd-tiny-decoder",
    ]
    assert [g.name for g in Build(build.path).graphs("unet")] == ["unet.part0", "unet.part1"]


def _parts_build(root) -> Build:
    """A build whose UNet is two small ONNX graphs run in order; part1 reads part0's output."""
    root.mkdir()
    rng = np.random.default_rng(0)
    sample, ehs = ("sample", [1, 2, 4, 4, 8]), ("encoder_hidden_states", [1, 1, 8])

    def io(values):
        return [{"name": n, "shape": s, "dtype": "float32"} for n, s in values]

    def save(name, nodes, inputs, outputs, weights):
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), w) for w in weights],
        )
        onnx.save(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), root / f"{name}.onnx"
        )
        return {"name": name, "onnx": f"{name}.onnx", "inputs": io(inputs), "outputs": io(outputs)}

    part0 = [
        helper.make_node("Mul", ["sample", "w0"], ["m"]),
        helper.make_node("Add", ["m", "encoder_hidden_states"], ["hidden"]),
    ]
    part1 = [helper.make_node("Tanh", ["hidden"], ["t"]), helper.make_node("Mul", ["t", "w1"], ["output"])]
    hidden, output = ("hidden", sample[1]), ("output", sample[1])
    whole = save("unet", part0 + part1, [sample, ehs], [output], ["w0", "w1"])
    parts = [
        dict(save("unet.part0", part0, [sample, ehs], [hidden], ["w0"])),
        dict(save("unet.part1", part1, [hidden, ehs], [output], ["w1"])),
    ]
    manifest = {
        "format": "mvd-deploy-build",
        "model": "parts",
        "components": {"unet": dict(whole, parts={"graphs": parts})},
    }
    (root / "build.json").write_text(json.dumps(manifest))
    return Build(root)


def test_parts_are_compiled_checked_and_profiled_per_graph(tmp_path):
    build = _parts_build(tmp_path / "parts")
    hub = FakeHub()
    fp16, w8a16 = _target(tmp_path, precision="float16"), _target(tmp_path, "galaxy-s24")
    backend = QaiHubBackend(hub)
    records = backend.compile(build, [fp16, w8a16], CompileOptions())
    graphs = records["xiaomi-14-pro/float16"]["components"]["unet"]["graphs"]
    assert [g["name"] for g in graphs] == ["unet.part0", "unet.part1"]  # in run order
    assert [g["qnn_graph"] for g in graphs] == ["unet_part0", "unet_part1"]
    assert [i["name"] for i in graphs[1]["inputs"]] == ["hidden", "encoder_hidden_states"]
    assert set(_manifest(build)["hub_jobs"]["compile"]) == {
        f"{t}/{graph}" for t in ("xiaomi-14-pro/float16", "galaxy-s24/w8a16") for graph in ("unet.part0", "unet.part1")
    }
    # part1 is calibrated on what part0 makes here from the same samples
    [(_, _, first, *_), (_, _, second, *_)] = _calls(hub, "submit_quantize_job")
    w0 = numpy_helper.to_array(onnx.load(str(build.path / "unet.part0.onnx")).graph.initializer[0])
    for i in range(2):
        expected = first["sample"][i] * w0 + first["encoder_hidden_states"][i]
        np.testing.assert_allclose(second["hidden"][i], expected, rtol=1e-6)

    [profile] = backend.profile(build, [fp16], None, runs=5)
    unet = profile["components"]["unet"]
    assert set(unet["graphs"]) == {"unet.part0", "unet.part1"}
    assert unet["latency_ms"]["p50"] == 3600.0  # the parts run one after the other
    assert unet["peak_memory_mb"] == 3000.0 and unet["top_ops"][0]["name"].startswith("unet.part")
    assert set(unet["on_device"]["graphs"]) == {"unet.part0", "unet.part1"} and 40 < unet["psnr_db"] < 100
    inference = _calls(hub, "submit_inference_job")
    assert [c[1] for c in inference] == ["mvd-check-unet.part0", "mvd-check-unet.part1"]
    assert inference[1][6]["hidden"][0].dtype == np.float16  # as compiled (--quantize_io)
    assert "--qnn_options context_enable_graphs=unet_part1" in inference[1][4]


# -- profile ------------------------------------------------------------------------------------------
def test_profile_and_on_device_check(build, tmp_path):
    hub = FakeHub()
    targets = [_target(tmp_path, precision="float16")]
    backend = QaiHubBackend(hub)
    backend.compile(build, targets, CompileOptions())
    [profile] = backend.profile(build, targets, None, runs=5)
    assert profile["schema"] == "mvd-deploy-profile" and profile["target"] == "xiaomi-14-pro"
    for call in _calls(hub, "submit_inference_job"):
        assert call[5] is True and "--max_profiler_iterations 5" in call[4] and "--qairt_version 2.37" in call[4]
        assert (call[2], call[3]) == ("Samsung Galaxy S24 (Family)", "15")  # the device compiled for
        assert all(v[0].dtype == np.float16 for v in call[6].values())  # the compiled inputs' type
    unet = profile["components"]["unet"]
    assert unet["latency_ms"]["p50"] == 1800.0  # the median of all_inference_times
    assert unet["latency_ms"]["p90"] > unet["latency_ms"]["min"]
    assert unet["load_ms"] == {"first": 2500.0, "warm": 300.0} and unet["peak_memory_mb"] == 1500.0
    assert unet["compute_units"] == {"NPU": 4, "CPU": 1}
    assert unet["top_ops"][0]["op_type"] == "MatMul" and unet["top_ops"][0]["ms"] == 600.0
    check = unet["on_device"]
    assert 40 < check["psnr_db"] < 100  # float16 I/O and the double's fp16-sized noise
    sensitivity = check["conditioning_sensitivity"]
    assert sensitivity["device"] == pytest.approx(sensitivity["reference"], rel=0.05) and sensitivity["reference"] > 0
    assert profile["total_latency_ms"] == pytest.approx(1800.0 + 90.0)
    manifest = _manifest(build)
    assert manifest["compiled"]["xiaomi-14-pro/float16"]["components"]["unet"]["on_device"] == check
    assert manifest["hub_jobs"]["inference"]["xiaomi-14-pro/float16/unet"]["job"] == unet["inference_job"]


def test_inference_jobs_are_reused_only_for_the_same_runs_and_live_outputs(build, tmp_path):
    hub = FakeHub()
    targets = [_target(tmp_path, precision="float16")]
    backend = QaiHubBackend(hub)
    backend.compile(build, targets, CompileOptions())
    backend.profile(build, targets, None, runs=5)
    backend.profile(Build(build.path), targets, None, runs=5)
    assert len(_calls(hub, "submit_inference_job")) == 2
    backend.profile(Build(build.path), targets, None, runs=7)
    assert len(_calls(hub, "submit_inference_job")) == 4
    unet_job = _manifest(build)["hub_jobs"]["inference"]["xiaomi-14-pro/float16/unet"]["job"]
    hub.jobs[unet_job].outputs.expiration_time -= timedelta(days=31)  # datasets live 30 days
    backend.profile(Build(build.path), targets, None, runs=7)
    assert [c[1] for c in _calls(hub, "submit_inference_job")[4:]] == ["mvd-check-unet"]


@pytest.mark.parametrize(
    "profile_format,peak_bytes,expected_mb",
    [
        ("current", 1500 * 2**20, 1500.0),  # the range's upper bound; the deprecated field says 0
        ("1.0", 1500 * 2**20, 1500.0),  # the deprecated field only
        ("legacy", 1500 * 2**20, None),  # None everywhere
        ("current", 0, None),  # not measured: never 0 MB
    ],
)
def test_peak_memory_from_each_profile_format(profile_format, peak_bytes, expected_mb):
    hub = FakeHub()
    hub.profile_format, hub.peak_memory_bytes = profile_format, peak_bytes
    assert parse_hub_profile(hub._profile("mvd-check-unet"))["peak_memory_mb"] == expected_mb


def test_an_unmeasured_peak_fails_the_gate(tmp_path):
    from mvd_deploy.gate import gate

    hub = FakeHub()
    hub.peak_memory_bytes = 0
    component = parse_hub_profile(hub._profile("mvd-check-unet")) | {"psnr_db": 50.0}
    checks = gate({"components": {"unet": component}}, resolve_target("xiaomi-14-pro"))
    [memory] = [c for c in checks if (c.component, c.metric) == ("unet", "peak_memory_mb")]
    assert not memory.passed and memory.note == "not measured"


def test_layers_timed_in_cycles_only_still_rank_the_top_ops():
    hub = FakeHub()
    hub.cycles_only = True
    ops = parse_hub_profile(hub._profile("mvd-check-unet"))["top_ops"]
    assert [(o["op_type"], o["ms"], o["share"]) for o in ops[:2]] == [("MatMul", None, None), ("Conv2d", None, None)]
    assert ops[0]["cycles"] == 600_000 * 1_400 and ops[0]["cycles_share"] == pytest.approx(600 / 1280, abs=1e-4)


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
@pytest.mark.parametrize("ini", [None, "[api]\napi_url = https://127.0.0.1:1\nweb_url = https://127.0.0.1:1\n"])
def test_unconfigured_real_client_gives_the_configure_line(build, tmp_path, ini):
    """The real qai_hub with no client.ini, or one without a token, raises UserError at once (no
    network); we print one line, exit 2."""
    path = tmp_path / "client.ini"
    if ini:
        path.write_text(ini)
    env = {**os.environ, "HOME": str(tmp_path), "QAIHUB_CLIENT_INI": str(path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mvd_deploy", "compile", str(build.path), "--target", "xiaomi-14-pro", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {NOT_CONFIGURED}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_the_token_never_reaches_output_or_the_build_and_the_box_is_kept(build, tmp_path, monkeypatch):
    token = "tok_4f9a1c2b7e"
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {token}\napi_url = https://127.0.0.1:1\nweb_url = https://127.0.0.1:1\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    hub = FakeHub()

    def unreachable(*args, **kwargs):
        from qai_hub.client import _visible_textbox

        box = _visible_textbox(f"Could not connect to Qualcomm AI Hub (header Authorization: Token {token}).")
        raise real.InternalError(f"Internal API failure.\n{box}")  # as the client raises it

    hub.upload_model = unreachable
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    result = CliRunner().invoke(main, ["compile", str(build.path), "--target", _target(tmp_path).source])
    assert result.exit_code == 1
    assert token not in result.output and "Token ***" in result.stderr
    assert "unreachable or failing: Internal API failure. Could not connect to Qualcomm AI Hub" in result.stderr
    assert not any(token in p.read_text(errors="ignore") for p in build.path.rglob("*") if p.is_file())


def test_rate_limited_after_the_clients_retries(build, tmp_path, monkeypatch):
    hub = FakeHub()
    hub.rate_limited = True
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    target = _target(tmp_path, precision="float16")
    result = CliRunner().invoke(main, ["compile", str(build.path), "--target", target.source, "--json"])
    assert result.exit_code == 1 and result.stdout == ""  # the client's retry box went to stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Qualcomm AI Hub is rate limiting this account; try again later "
        "(Could not create a job after retrying for 10 minutes. Please try again later.)"
    )


def test_missing_output_data_and_local_failures_are_not_called_unreachable(build, tmp_path, monkeypatch):
    hub = FakeHub()
    targets = [_target(tmp_path, precision="float16")]
    backend = QaiHubBackend(hub)
    backend.compile(build, targets, CompileOptions())
    hub.output_data = False
    with pytest.raises(HubError, match=r"xiaomi-14-pro unet: inference job jp\d+ returned no output data \(https://"):
        backend.profile(build, targets, None, runs=5)
    hub.output_data = True

    def broken(*args, **kwargs):
        raise RuntimeError("ORT cannot load it")

    monkeypatch.setattr(hub_backend, "ort_session", broken)
    with pytest.raises(LocalError) as err:
        backend.profile(Build(build.path), targets, None, runs=6)
    assert str(err.value) == (
        "xiaomi-14-pro unet: on-device check against the exported graph here: RuntimeError: ORT cannot load it"
    )


def test_cli_compile_profile_and_pull_print_one_json_object(build, tmp_path, monkeypatch):
    """The double prints like the real client ("Uploading …", "Scheduled …", "Downloaded model to …")."""
    hub = FakeHub()
    monkeypatch.setattr(hub_backend, "hub_client", lambda: hub)
    runner = CliRunner()
    xiaomi, s24 = _target(tmp_path, precision="float16").source, _target(tmp_path, "galaxy-s24").source
    result = runner.invoke(main, ["compile", str(build.path), "--target", xiaomi, "--target", s24, "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"xiaomi-14-pro/float16", "galaxy-s24/w8a16"}
    assert "Downloaded model to" in result.stderr
    result = runner.invoke(main, ["profile", str(build.path), "--target", xiaomi, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((build.path / "profiles" / "xiaomi-14-pro-float16.json").read_text()) == json.loads(result.stdout)
    summary = runner.invoke(main, ["summary", str(build.path)])
    assert "xiaomi-14-pro/float16" in summary.stdout and "1800.0" in summary.stdout
    job_id = _manifest(build)["compiled"]["galaxy-s24/w8a16"]["components"]["unet"]["graphs"][0]["compile_job"]
    result = runner.invoke(main, ["pull", job_id, "--out", str(tmp_path / "app"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == f"qai-hub:{job_id}"


# -- device profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["xiaomi-14-pro", "galaxy-s24", "snapdragon-8-elite", "ort-cpu"])
def test_shipped_device_profiles_load(name):
    profile = resolve_target(name)
    unet = profile.budgets["unet"]  # phones: absolute latency; CPUs: a share of the measured GEMM rate
    assert profile.name == name and (unet.latency_ms or 0) + (unet.min_compute_efficiency or 0) > 0


def test_xiaomi_selects_by_chipset():
    profile = resolve_target("xiaomi-14-pro")
    assert profile.device_attributes == ("chipset:qualcomm-snapdragon-8gen3",)
    assert profile.runtime == "qnn_context_binary" and profile.precision == "w8a16"
    assert profile.calibration_samples == 100 and profile.qairt_version == "default"


def test_an_unknown_qairt_version_names_the_key_and_what_is_offered(build, tmp_path):
    target = _target(tmp_path, precision="float16", qairt_version="2.9")
    with pytest.raises(MvdError) as err:
        QaiHubBackend(FakeHub()).compile(build, [target], CompileOptions())
    assert str(err.value) == (
        f"{target.source}: key 'qairt_version': AI Hub offers no QAIRT '2.9' (offered: 2.37 (default), 2.38 (latest))"
    )


@pytest.mark.parametrize(
    "edit,key",
    [
        (("runtime: qnn_context_binary", "runtime: coreml"), "runtime"),
        (("precision: w8a16", "precision: int4"), "precision"),
        (("backend: qai-hub", "backend: tensorrt"), "backend"),
        (("  decoder: {", "  vae: {"), "budgets.vae"),
        (("latency_ms: 2000,", "latency_ms: -5,"), "budgets.unet.latency_ms"),
        (("compute_unit: npu", "compute_unit: tpu"), "compute_unit"),
        (("compute_unit: npu", "compute_unit: npu\nqairt_version: 2.37"), "qairt_version"),
    ],
)
def test_bad_device_profile_names_file_and_key(tmp_path, edit, key):
    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "device_profiles" / "xiaomi-14-pro.yaml").read_text().replace(*edit))
    with pytest.raises(MvdError) as err:
        load_device_profile(path)
    assert str(err.value).startswith(f"{path}: key '{key}'") and "\n" not in str(err.value)
