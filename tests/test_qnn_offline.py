"""The offline Snapdragon NPU backend (qnn-offline): QNN HTP compile and the emulated check.

Real onnxruntime-qnn throughout (compiler and HTP emulator on this CPU). The emulator is slow (~1 min
per tiny-UNet call), so the tiny build is compiled without emulation, and the emulated checks run on
the tiny decoder and on a micro build (a few nodes, in two parts) written here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from helpers import ROOT
from mvd_deploy.backends import QnnOfflineBackend, group_targets
from mvd_deploy.backends.base import CompileOptions
from mvd_deploy.build import Build, sha256_file
from mvd_deploy.calibration import calibrate_min_max, calibration_reader
from mvd_deploy.cli import main
from mvd_deploy.device_profiles import load_device_profile, resolve_target
from mvd_deploy.errors import MvdError, ValidationFailed
from mvd_deploy.metrics import psnr_db
from mvd_deploy.onnx_tools import augment_for_min_max, linear_time_quantizer, run_onnx
from mvd_deploy.pull import pull_build

SOCS = {"xiaomi-14-pro": ("SM8650", 57, 75), "snapdragon-8-elite": ("SM8750", 69, 79)}


def write_profile(tmp_path: Path, base: str = "xiaomi-14-pro", **changes) -> Path:
    """A copy of a device profile with some keys changed (None removes a key)."""
    data = yaml.safe_load((ROOT / "device_profiles" / f"{base}.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / f"{base}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def compiled_dir(build: Build, key: str) -> Path:
    return build.path / build.manifest["compiled"][key]["directory"]


# -- a micro build: a conditioned "unet" of a few nodes, whole and in two parts --------------------------
def _value(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _save(path: Path, nodes, inputs, outputs, initializers) -> None:
    model = helper.make_model(
        helper.make_graph(nodes, path.stem.replace(".", "_"), inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def micro_build(path: Path, inject_rank6: str | None = None) -> Build:
    """sample (1,2,4,4,4) and an image embedding (1,1,8) → model_output (1,2,2,4,4): a 3×3 conv over the
    frames, plus a projection of the embedding, then a 1×1 conv. Part 0 ends at ``h``; part 1 does the
    rest. ``inject_rank6`` ("part0" or "part1") takes ``h`` through a rank-6 reshape in that part."""
    rng = np.random.default_rng(0)
    path.mkdir()
    weights = {
        "w1": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(4).astype(np.float32) * 0.1,
        "wc": rng.standard_normal((8, 4)).astype(np.float32) * 0.5,
        "w2": rng.standard_normal((2, 4, 1, 1)).astype(np.float32) * 0.5,
        "frames": np.array([2, 4, 4, 4], np.int64),
        "per_channel": np.array([1, 4, 1, 1], np.int64),
        "video": np.array([1, 2, 2, 4, 4], np.int64),
        "rank6": np.array([1, 2, 2, 2, 4, 4], np.int64),
        "one": np.ones(1, np.float32),
    }
    init = {name: numpy_helper.from_array(value, name) for name, value in weights.items()}
    sample, ehs = _value("sample", [1, 2, 4, 4, 4]), _value("encoder_hidden_states", [1, 1, 8])
    h, out = _value("h", [2, 4, 4, 4]), _value("model_output", [1, 2, 2, 4, 4])

    def rank6(source: str, result: str) -> list:  # as the UNet's temporal multiscaling was: the HTP has no rank 6
        return [
            helper.make_node("Reshape", [source, "rank6"], ["h6"], name="inject_to_rank6"),
            helper.make_node("Mul", ["h6", "one"], ["h6s"], name="inject_scale_rank6"),
            helper.make_node("Reshape", ["h6s", "frames"], [result], name="inject_back_to_rank4"),
        ]

    part0 = [
        helper.make_node("Reshape", ["sample", "frames"], ["x"], name="to_frames"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv_in", pads=[1, 1, 1, 1]),
    ]
    part1 = [
        helper.make_node("MatMul", ["encoder_hidden_states", "wc"], ["c"], name="project_embedding"),
        helper.make_node("Reshape", ["c", "per_channel"], ["c4"], name="embedding_per_channel"),
        helper.make_node("Add", ["h", "c4"], ["hc"], name="add_embedding"),
        helper.make_node("Conv", ["hc", "w2"], ["y"], name="conv_out"),
        helper.make_node("Reshape", ["y", "video"], ["model_output"], name="to_video"),
    ]
    names0, names1 = ["frames", "w1", "b1"], ["wc", "per_channel", "w2", "video"]
    if inject_rank6 == "part0":
        part0[1] = helper.make_node("Conv", ["x", "w1", "b1"], ["h_in"], name="conv_in", pads=[1, 1, 1, 1])
        part0 += rank6("h_in", "h")
        names0 += ["rank6", "one"]
    elif inject_rank6 == "part1":
        part1[2:3] = [*rank6("h", "h4"), helper.make_node("Add", ["h4", "c4"], ["hc"], name="add_embedding")]
        names1 += ["rank6", "one", "frames"]
    _save(path / "unet.onnx", part0 + part1, [sample, ehs], [out], [init[n] for n in dict.fromkeys(names0 + names1)])
    _save(path / "unet.part0.onnx", part0, [sample], [h], [init[n] for n in names0])
    _save(path / "unet.part1.onnx", part1, [h, ehs], [out], [init[n] for n in names1])

    def io(*values):
        return [
            {"name": v.name, "shape": [d.dim_value for d in v.type.tensor_type.shape.dim], "dtype": "float32"}
            for v in values
        ]

    component = {
        "onnx": "unet.onnx",
        "inputs": io(sample, ehs),
        "outputs": io(out),
        "params": 144 + 4 + 32 + 8,
        "flops": 2 * (2 * 4 * 16 * 36 + 8 * 4 + 2 * 2 * 16 * 4),
        "validation": {"psnr_db": 200.0},
        "parts": {
            "graphs": [
                {"name": "unet.part0", "onnx": "unet.part0.onnx", "inputs": io(sample), "outputs": io(h)},
                {"name": "unet.part1", "onnx": "unet.part1.onnx", "inputs": io(h, ehs), "outputs": io(out)},
            ]
        },
    }
    manifest = {"format": "mvd-deploy-build", "format_version": 1, "model": "micro", "precision": "fp32"}
    (path / "build.json").write_text(json.dumps(manifest | {"components": {"unet": component}}))
    build = Build(path)
    build.save_manifest()
    return build


@pytest.fixture
def micro(tmp_path) -> Build:
    return micro_build(tmp_path / "micro")


def micro_profile(tmp_path: Path, **changes) -> Path:
    """xiaomi-14-pro with budgets for the micro build's one component, few calibration samples."""
    budgets = {"unet": {"latency_ms": 2000, "peak_memory_mb": 3500, "min_psnr_db": 30}, "total_latency_ms": 2500}
    return write_profile(tmp_path, calibration_samples=4, budgets=budgets, **changes)


# -- targets and options ---------------------------------------------------------------------------------
def test_offline_sends_phone_profiles_to_qnn_offline(tmp_path):
    groups = group_targets(["xiaomi-14-pro", "snapdragon-8-elite", "ort-cpu"], offline=True)
    assert [p.name for p in groups["qnn-offline"]] == ["xiaomi-14-pro", "snapdragon-8-elite"]
    assert [p.name for p in groups["ort-cpu"]] == ["ort-cpu"]
    assert "qnn-offline" not in group_targets(["xiaomi-14-pro"])
    no_chipset = write_profile(tmp_path, chipset=None)
    with pytest.raises(MvdError, match=rf"^{no_chipset}: key 'chipset': needed for offline"):
        group_targets([str(no_chipset)], offline=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "ort-cpu", "--emulate"], "--emulate: only with --offline"),
        (["--target", "xiaomi-14-pro", "--form", "float16"], "--form: only with --offline"),
    ],
)
def test_offline_options_need_offline(micro, args, message):
    result = CliRunner().invoke(main, ["compile", str(micro.path), *args])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}"


# -- the tiny build for two SoCs: the default w8a16 (Snapdragon 8 Gen 3) and float16 (8 Elite) -----------
# (no emulation here: the tiny UNet takes ~1 min per emulated call; the micro build checks emulation)
FORMS = {"xiaomi-14-pro": "w8a16", "snapdragon-8-elite": "float16"}


@pytest.fixture(scope="module")
def tiny_offline(tiny_build, tmp_path_factory) -> Build:
    build = Build(shutil.copytree(tiny_build, tmp_path_factory.mktemp("qnn") / "build"))
    for target, form in FORMS.items():
        options = CompileOptions(form=form, emulate=False, calibration_samples=2)
        QnnOfflineBackend().compile(build, [resolve_target(target)], options)
        if target == "xiaomi-14-pro":  # the whole build once (all four components); the other SoC: the decoder
            whole = dict(build.manifest["components"])
            build.manifest["components"] = {"decoder": whole["decoder"]}
    build.manifest["components"] = whole
    build.save_manifest()
    return Build(build.path)


@pytest.mark.slow
def test_tiny_build_compiles_offline_for_two_socs(tiny_offline):
    build = tiny_offline
    """Every graph of the tiny build — the UNet in its default w8a16 form included — whole on the HTP."""
    assert set(build.manifest["compiled"]) == {f"{name}/{form}-offline" for name, form in FORMS.items()}
    files = build.manifest["files"]
    for target, (soc, soc_model, htp_arch) in SOCS.items():
        key = f"{target}/{FORMS[target]}-offline"
        record = build.manifest["compiled"][key]
        assert record["directory"] == f"compiled/{target}/{key.split('/')[1]}" and record["backend"] == "qnn-offline"
        assert record["chipset"] == {"name": soc, "soc_model": soc_model, "htp_arch": htp_arch}
        assert record["options"]["session"] == {"session.disable_cpu_ep_fallback": "1"}
        assert record["qnn"]["qnn_sdk"].startswith("2.")
        assert set(record["components"]) == (
            {"image_encoder", "vae_encoder", "unet", "decoder"} if target == "xiaomi-14-pro" else {"decoder"}
        )
        for name, component in build.components.items():
            if name not in record["components"]:
                continue
            [graph] = record["components"][name]["graphs"]
            assert (graph["name"], graph["file"], graph["context_binary"]) == (name, f"{name}.onnx", f"{name}_qnn.bin")
            # the I/O contract as compiled: the export's names, shapes and float32
            assert graph["inputs"] == component["inputs"] and graph["outputs"] == component["outputs"]
            wrapper = onnx.load(str(compiled_dir(build, key) / graph["file"]))
            assert [n.op_type for n in wrapper.graph.node] == ["EPContext"]
            metadata = {p.key: p.value for p in wrapper.metadata_props}
            info = metadata["ep_compatibility_info.QNNExecutionProvider"].split(":")
            assert info[4:6] == [str(htp_arch), str(soc_model)] and info[2] == record["qnn"]["qnn_sdk"]
            binary = f"{record['directory']}/{graph['context_binary']}"
            assert files[binary]["sha256"] == sha256_file(build.path / binary)
            assert files[binary]["bytes"] == graph["context_bytes"] > 0
            assert record["components"][name]["validation"] is None
            assert "--emulate" in record["components"][name]["emulation"]
    # license: the QNN libraries stay in the installed package
    assert not [p for p in build.path.rglob("*") if ".so" in p.suffixes]
    assert not (build.path / ".staging").exists()


@pytest.mark.slow
def test_epcontext_runs_in_a_fresh_process_as_an_app_would(tiny_offline, tmp_path):
    """Pull the artifacts, then load the EPContext model with only onnxruntime + the QNN EP, fallback off."""
    pulled = tmp_path / "app"
    pull_build(tiny_offline.path, out=pulled, targets=["snapdragon-8-elite"])
    record = json.loads((pulled / "artifacts.json").read_text())["compiled"]["snapdragon-8-elite/float16-offline"]
    [graph] = record["components"]["decoder"]["graphs"]
    model = pulled / record["directory"] / graph["file"]
    assert (model.parent / graph["context_binary"]).is_file()
    latents = np.random.default_rng(3).standard_normal(graph["inputs"][0]["shape"]).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    provider = record["options"]["provider"]
    app = f"""
import numpy as np, onnxruntime as ort, onnxruntime_qnn
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
options = ort.SessionOptions()
options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
options.add_provider_for_devices(devices, {provider!r})
session = ort.InferenceSession({str(model)!r}, options)
latents = np.load({str(tmp_path / "latents.npy")!r})
np.save({str(tmp_path / "frames.npy")!r}, session.run(None, {{"latents": latents}})[0])
"""
    proc = subprocess.run([sys.executable, "-c", app], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = np.load(tmp_path / "frames.npy")
    assert list(frames.shape) == graph["outputs"][0]["shape"]
    expected = run_onnx(tiny_offline.onnx_path("decoder"), {"latents": latents})
    assert psnr_db(frames, expected) > 40  # fp16 on the emulated HTP; measured ~55 dB


@pytest.mark.slow
def test_generate_runs_the_offline_contexts_on_the_emulator(tiny_offline, tmp_path):
    """Image → video from the four w8a16 QNN context binaries (xiaomi-14-pro), on the HTP emulator."""
    import imageio.v3 as iio
    import PIL.Image

    from mvd_deploy import generate_video

    pixels = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "in.png")
    report = generate_video(
        tiny_offline.path,
        image=tmp_path / "in.png",
        out=tmp_path / "v.mp4",
        target="xiaomi-14-pro",
        offline=True,
        reference=True,
    )
    assert report["compiled"] == "xiaomi-14-pro/w8a16-offline" and "HTP emulator for SM8650" in report["runs_on"]
    assert list(report["seconds"]) == ["image_encoder", "vae_encoder", "unet", "decoder"]
    contract = tiny_offline.manifest["pipeline"]
    frames = np.asarray(iio.imread(tmp_path / "v.mp4", index=None))
    assert frames.shape[0] == contract["frames"] and frames.shape[1:3] == (contract["height"], contract["width"])
    # w8a16 on random weights, 2 calibration samples: far from fp32, but the same video, not noise
    assert report["reference"]["psnr_db"] > 15


# -- the micro build: emulated checks, parts, refusals -------------------------------------------------------
@pytest.mark.parametrize("form,floor", [("w8a16", 20.0), ("float16", 40.0)])
def test_parts_chained_on_the_emulator_match_the_whole_export(micro, tmp_path, form, floor, caplog):
    profile = load_device_profile(micro_profile(tmp_path))
    with caplog.at_level(logging.INFO, logger="mvd_deploy"):
        records = QnnOfflineBackend().compile(micro, [profile], CompileOptions(form=form))
    # w8a16: part 0 compiles in another process while part 1 calibrates; float16 has no calibration
    background = "unet.part0: QNN HTP compile for SM8650 (v75): started in the background"
    assert (background in caplog.text) == (form == "w8a16")
    component = records[f"xiaomi-14-pro/{form}-offline"]["components"]["unet"]
    assert [g["name"] for g in component["graphs"]] == ["unet.part0", "unet.part1"]
    assert [g["inputs"][0]["name"] for g in component["graphs"]] == ["sample", "h"]
    check = component["validation"]
    assert math.isfinite(check["psnr_db"]) and check["psnr_db"] > floor
    assert check["emulator_s"] > 0 and "exported unet.onnx" in check["reference"]
    sensitivity = check["conditioning_sensitivity"]
    assert sensitivity["reference"] > 0.05
    assert sensitivity["compiled"] == pytest.approx(sensitivity["reference"], rel=0.2)


def test_an_emulated_psnr_below_the_threshold_refuses_and_writes_nothing(micro, tmp_path):
    profile = load_device_profile(micro_profile(tmp_path))
    manifest_before = (micro.path / "build.json").read_text()
    with pytest.raises(ValidationFailed, match=r"emulated PSNR [\d.]+ dB .* below the 500.0 dB threshold") as err:
        QnnOfflineBackend().compile(micro, [profile], CompileOptions(form="float16", min_psnr_db=500.0))
    assert err.value.exit_code == 1
    assert not (micro.path / "compiled").exists() and not (micro.path / ".staging").exists()
    assert (micro.path / "build.json").read_text() == manifest_before


@pytest.mark.parametrize("form,part", [("float16", "part1"), ("w8a16", "part0")])  # w8a16 part0: in the background
def test_an_unsupported_node_is_named_with_its_op_type(tmp_path, form, part):
    build = micro_build(tmp_path / "micro", inject_rank6=part)
    profile = load_device_profile(micro_profile(tmp_path))
    with pytest.raises(ValidationFailed) as err:
        QnnOfflineBackend().compile(build, [profile], CompileOptions(form=form))
    message = str(err.value)
    assert message.startswith(f"unet.{part} (xiaomi-14-pro {form}-offline): ") and "\n" not in message
    assert "inject_to_rank6 (Reshape)" in message and "inject_scale_rank6 (Mul)" in message
    assert err.value.exit_code == 1
    assert not (build.path / "compiled").exists() and not (build.path / ".staging").exists()


def test_size_limits_refuse_before_and_after_compiling(micro, tmp_path):
    weights = load_device_profile(micro_profile(tmp_path, context_limit_mb=0.0001))  # ~100 bytes
    with pytest.raises(MvdError, match=r"unet.part0 cannot fit one HTP context: its weights alone are") as err:
        QnnOfflineBackend().compile(micro, [weights], CompileOptions(form="float16"))
    assert err.value.exit_code == 2
    context = load_device_profile(micro_profile(tmp_path, context_limit_mb=0.002))  # the weights fit, no context does
    with pytest.raises(ValidationFailed, match=r"compiled HTP context is [\d,]+ bytes, over the 2,097-byte limit"):
        QnnOfflineBackend().compile(micro, [context], CompileOptions(form="float16", emulate=False))
    assert not (micro.path / "compiled").exists()


def test_cli_compile_profile_gate_summary_report_with_no_latency(micro, tmp_path):
    runner = CliRunner()
    target = str(micro_profile(tmp_path))
    result = runner.invoke(main, ["compile", str(micro.path), "--target", target, "--offline", "--json"])
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)  # exactly one JSON object: native log lines never reach stdout
    assert list(records) == ["xiaomi-14-pro/w8a16-offline"]

    args = ["profile", str(micro.path), "--target", target, "--offline", "--gate", "--json"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    profile = json.loads(result.stdout)
    assert profile["form"] == "w8a16-offline" and profile["total_latency_ms"] is None
    unet = profile["components"]["unet"]
    assert unet["latency_ms"] is None and unet["peak_memory_mb"] is None
    assert unet["psnr_db"] == records["xiaomi-14-pro/w8a16-offline"]["components"]["unet"]["validation"]["psnr_db"]
    assert "no phone timing" in profile["not_measured"]["latency_ms"]
    gate = json.loads((micro.path / "build.json").read_text())["gates"]["xiaomi-14-pro/w8a16-offline"]
    by_metric = {(c["component"], c["metric"]): c for c in gate["checks"]}
    assert by_metric["unet", "min_psnr_db"]["passed"]
    for unmeasured in [("unet", "latency_ms"), ("unet", "peak_memory_mb"), ("pipeline", "total_latency_ms")]:
        assert by_metric[unmeasured]["not_measured"] and not by_metric[unmeasured]["passed"]
    assert gate["passed"] and gate["failures"] == 0 and gate["not_measured"] == 3
    assert "➖ 3 not measured" in result.stderr and "no phone timing" in result.stderr

    result = runner.invoke(main, ["summary", str(micro.path), "--json"])
    [row] = [r for r in json.loads(result.stdout) if r["form"] == "xiaomi-14-pro/w8a16-offline"]
    assert row["p50_ms"] is None and row["psnr_db"] == unet["psnr_db"]
    graphs = records["xiaomi-14-pro/w8a16-offline"]["components"]["unet"]["graphs"]
    assert row["graphs"] == 2 and row["context_mb"] == round(sum(g["context_bytes"] for g in graphs) / 2**20, 1)
    assert row["compile_s"] == round(sum(g["compile_s"] for g in graphs), 1)
    assert "context MB" in runner.invoke(main, ["summary", str(micro.path)]).stdout
    assert runner.invoke(main, ["report", str(micro.path)]).exit_code == 0


def test_profile_offline_needs_the_offline_compile(micro):
    result = CliRunner().invoke(main, ["profile", str(micro.path), "--target", "xiaomi-14-pro", "--offline"])
    assert result.exit_code == 2
    assert "no compiled form 'xiaomi-14-pro/w8a16-offline'" in result.stderr


def test_targets_of_one_soc_share_the_compiled_graphs(micro, tmp_path):
    budgets = {"unet": {"min_psnr_db": 30}}
    targets = [
        load_device_profile(write_profile(tmp_path, base, calibration_samples=4, budgets=budgets))
        for base in ("xiaomi-14-pro", "galaxy-s24")
    ]
    records = QnnOfflineBackend().compile(micro, targets, CompileOptions())
    xiaomi, galaxy = records["xiaomi-14-pro/w8a16-offline"], records["galaxy-s24/w8a16-offline"]
    assert galaxy["components"] == xiaomi["components"] and galaxy["chipset"]["name"] == "SM8650"
    assert galaxy["directory"] == "compiled/galaxy-s24/w8a16-offline"
    files = Build(micro.path).manifest["files"]
    for graph in xiaomi["components"]["unet"]["graphs"]:
        for name in (graph["file"], graph["context_binary"]):
            assert files[f"{galaxy['directory']}/{name}"]["sha256"] == files[f"{xiaomi['directory']}/{name}"]["sha256"]


def test_bounded_calibration_gives_ort_calibrators_ranges(micro, tmp_path):
    """calibrate_min_max (priority-ordered session, ranges folded per sample) writes exactly the ranges
    of ORT's own MinMax calibrator run on all samples at once."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    source = micro.path / "unet.onnx"
    rng = np.random.default_rng(3)
    samples = [
        {
            "sample": rng.standard_normal((1, 2, 4, 4, 4), np.float32) * (i + 1),
            "encoder_hidden_states": rng.standard_normal((1, 1, 8), np.float32),
        }
        for i in range(5)
    ]
    reader = calibration_reader(samples, lambda s: s)
    config = get_qnn_qdq_config(str(source), reader, activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8)
    ours = load_tensors_data(
        calibrate_min_max(source, reader, tmp_path / "ranges.json", op_types=config.op_types_to_quantize)
    )

    theirs = create_calibrator(source, config.op_types_to_quantize, augmented_model_path=str(tmp_path / "aug.onnx"))
    reader.set_range(0, len(samples))
    theirs.collect_data(reader)
    expected = theirs.compute_data()
    assert set(ours.data) == set(expected.data) >= {"sample", "x", "h", "hc", "y", "model_output"}
    for name, tensor in expected.data.items():
        assert np.array_equal(ours.data[name].range_value, tensor.range_value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aug.onnx", "micro", "ranges.json"]  # nothing else left

    # the linear-time augmentation adds what ORT's augment_graph adds: nodes, and outputs in order
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    graphs = []
    for augment in (MinMaxCalibrater.augment_graph, augment_for_min_max):
        calibrator = MinMaxCalibrater(source, config.op_types_to_quantize, str(tmp_path / "augmented.onnx"))
        augment(calibrator)
        graphs.append(onnx.load(str(tmp_path / "augmented.onnx")).graph)
    theirs_graph, ours_graph = graphs
    assert [o.name for o in ours_graph.output] == [o.name for o in theirs_graph.output]
    assert len(ours_graph.output) > 12

    def node_set(graph):  # the Reshape's shape initializer has a random (uuid) name
        return sorted((n.op_type, n.name, n.input[0], tuple(n.output)) for n in graph.node)

    assert node_set(ours_graph) == node_set(theirs_graph)


def test_the_linear_time_quantizer_writes_what_ort_writes(tiny_build, tmp_path):
    """quantize_static on the tiny VAE encoder (int8 QDQ convolutions as ort-cpu's static int8 makes
    them, ORT's own calibrator; 226 nodes, residual tensors with several consumers) with
    linear_time_quantizer and without: the same graph, node for node, and the same initializers."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from mvd_deploy.backends.inputs import pipeline_inputs

    samples = pipeline_inputs(Build(tiny_build), "vae_encoder", 2, seed=7)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(samples)

        def get_next(self):
            return next(self.samples, None)

    models = []
    for name, patch in (("ort", contextlib.nullcontext), ("linear", linear_time_quantizer)):
        out = tmp_path / f"{name}.onnx"
        with patch():
            source = tiny_build / "vae_encoder.onnx"
            # convolutions only, as ort-cpu's static int8 quantises them
            quantize_static(source, out, Reader(), use_external_data_format=True, op_types_to_quantize=["Conv"])
        models.append(onnx.load(str(out)))
    ort_model, linear = models
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.onnx_model import ONNXModel

    originals = MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes
    with linear_time_quantizer():  # what the quantizer calls is replaced for the call, and restored after
        assert MinMaxCalibrater.augment_graph is not originals[0]
        assert ONNXModel.replace_input_of_all_nodes is not originals[1]
    assert (MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes) == originals
    assert len(linear.graph.node) > 150 and any(n.op_type == "QuantizeLinear" for n in linear.graph.node)
    assert [n.SerializeToString() for n in linear.graph.node] == [n.SerializeToString() for n in ort_model.graph.node]
    assert sorted(t.SerializeToString() for t in linear.graph.initializer) == sorted(
        t.SerializeToString() for t in ort_model.graph.initializer
    )
