"""ONNX export, the ort-cpu backend (compile, int8, profile), and their refusals — on the tiny recipe."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from mvd_deploy.backends import CompileOptions, get_backend
from mvd_deploy.backends.inputs import VALIDATION_SEED, pipeline_inputs
from mvd_deploy.build import Build
from mvd_deploy.cli import main
from mvd_deploy.cpu import KERNEL_FEATURES
from mvd_deploy.device_profiles import resolve_target
from mvd_deploy.errors import MvdError, ValidationFailed
from mvd_deploy.export import export_build
from mvd_deploy.metrics import block_of, cost_views, module_of, psnr_db
from mvd_deploy.onnx_tools import check_onnx, module_paths, run_onnx, simplify_onnx


def _copy_build(build: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(build, tmp_path / "build"))


def test_export_writes_one_checked_onnx_and_one_data_file_per_component(tiny_build):
    manifest = json.loads((tiny_build / "build.json").read_text())
    assert list(manifest["components"]) == ["image_encoder", "vae_encoder", "unet", "decoder"]  # pipeline order
    files = sorted(p.name for p in tiny_build.iterdir())
    assert files == ["build.json"] + sorted(f"{c}.{ext}" for c in manifest["components"] for ext in ("data", "onnx"))
    for component in manifest["components"].values():
        path = tiny_build / component["onnx"]
        check_onnx(path)
        model = onnx.load(str(path), load_external_data=False)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"} and model.opset_import[0].version == 18
        assert not any(node.domain == "com.microsoft" for node in model.graph.node)  # AI Hub rejects contrib ops
        assert all(i["dtype"] == "float32" and all(d > 0 for d in i["shape"]) for i in component["inputs"])
        assert component["validation"]["psnr_db"] >= 80.0
        assert component["nodes"]["simplified"] <= component["nodes"]["exported"]
    unet = manifest["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "encoder_hidden_states"]  # conditioning folded
    assert unet["inputs"][0]["shape"] == [1, 14, 8, 8, 16]
    assert manifest["components"]["decoder"]["outputs"][0]["shape"] == [1, 14, 3, 64, 128]
    assert manifest["components"]["image_encoder"]["outputs"][0] | {"dtype": None} == {
        "name": "image_embeds",
        "shape": [1, 1, 32],
        "dtype": None,
    }
    assert manifest["components"]["vae_encoder"]["outputs"][0]["shape"] == [1, 4, 8, 16]
    assert manifest["sampler"] == "folded" and manifest["pipeline"]["sampler_folded"]
    assert [p["name"] for p in manifest["passes"]][0] == "merge_funnels"
    assert manifest["toolchain"]["torch"].startswith("2.13.0")


def test_built_graphs_name_each_node_by_the_module_that_made_it(tiny_build):
    """onnxsim drops node metadata; the exporter's module path is put back (per-layer cost views use it)."""
    paths = module_paths(tiny_build / "unet.onnx")
    graph = onnx.load(str(tiny_build / "unet.onnx"), load_external_data=False).graph
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    assert paths[convs[0]] == "conv_in" and paths[convs[-1]] == "conv_out"
    assert len(paths) >= 0.9 * len(graph.node)
    assert any(p.startswith("up_blocks.3.") for p in paths.values())


def test_export_parity_is_what_the_manifest_says(tiny_build, tiny_checkpoint):
    """Recompute the UNet's validation independently: PyTorch deploy model vs the exported file."""
    import torch

    from mvd_deploy.deploy import deploy_checkpoint
    from mvd_deploy.export import component_inputs

    pipeline = deploy_checkpoint(tiny_checkpoint).pipeline
    inputs = component_inputs(pipeline, "unet")
    with torch.no_grad():
        reference = pipeline.unet(**inputs).numpy()
    output = run_onnx(tiny_build / "unet.onnx", {k: v.numpy() for k, v in inputs.items()})
    recorded = json.loads((tiny_build / "build.json").read_text())["components"]["unet"]["validation"]["psnr_db"]
    assert abs(psnr_db(output, reference) - recorded) < 0.5


def test_fp16_export_with_conditioning_inputs(tiny_checkpoint, tmp_path):
    manifest = export_build(
        tiny_checkpoint,
        out=tmp_path / "b16",
        components="unet",
        precision="fp16",
        keep_conditioning_inputs=True,
    ).manifest
    unet = manifest["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "encoder_hidden_states", "timestep", "added_time_ids"]
    assert all(i["dtype"] == "float32" for i in unet["inputs"] + unet["outputs"])  # fp32 I/O, fp16 inside
    assert 40.0 <= unet["validation"]["psnr_db"] < 120.0
    model = onnx.load(str(tmp_path / "b16" / "unet.onnx"), load_external_data=False)
    weights = [t for t in model.graph.initializer if t.name.endswith("weight")]
    assert len(weights) > 100 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert manifest["conditioning"] == "inputs" and "fold_conditioning" not in [p["name"] for p in manifest["passes"]]


# the last component's validation fails at the end; an earlier one's, run beside the next export, before its forward
@pytest.mark.parametrize("components, first_failed", [("decoder", "decoder"), ("vae_encoder,decoder", "vae_encoder")])
def test_failed_validation_promotes_nothing(tiny_checkpoint, tmp_path, components, first_failed):
    match = rf"{first_failed}: ONNX Runtime output is .* dB PSNR against PyTorch, below"
    with pytest.raises(ValidationFailed, match=match):
        export_build(tiny_checkpoint, out=tmp_path / "b", components=components, min_psnr_db=500.0)
    assert list(tmp_path.iterdir()) == []


def test_an_error_stops_a_validation_under_way(tmp_path):
    """An export that fails while an earlier component's ONNX Runtime check runs beside it stops that
    run (a process must not exit inside it) and waits for it."""
    from onnx import TensorProto, helper

    from mvd_deploy.export import BackgroundValidation
    from mvd_deploy.progress import Stages

    # 400 chained 2048x2048 products (6.9 TFLOP): over a second of ONNX Runtime work even on a large
    # machine (the check must still be running at the error), stoppable between nodes
    n = 2048
    nodes = [helper.make_node("MatMul", [f"x{i}", "w"], [f"x{i + 1}"]) for i in range(400)]
    weight = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("x400", TensorProto.FLOAT, [n, n])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "chain.onnx")
    inputs = {"x0": torch.ones(n, n)}
    stages = Stages(1, __import__("logging").getLogger("test"))
    reference = np.ones((n, n), np.float32)
    with pytest.raises(OSError, match="No space left"):
        with BackgroundValidation("chain", stages, tmp_path / "chain.onnx", inputs, reference, 0.0) as check:
            time.sleep(0.2)  # under way
            raise OSError(28, "No space left on device")
    assert not check._thread.is_alive()
    with pytest.raises(Exception, match="terminate"):  # ONNX Runtime's "Exiting due to terminate flag being set"
        check.result()


@pytest.mark.skipif(not hasattr(__import__("os"), "setpriority"), reason="no thread priorities here")
def test_idle_priority_lowers_only_the_calling_thread():
    import os
    import threading

    from mvd_deploy.background import LOWEST_NICE, at_idle_priority

    seen = {}

    def background():
        at_idle_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen["thread"] == LOWEST_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import mvd_deploy.export as export

    real_write = export.write_onnx

    def interrupted(model, path):
        real_write(model, path)
        assert path.is_file()  # files written into the staging directory, then the interruption
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_build(tiny_checkpoint, out=tmp_path / "b", components="decoder")
    assert list(tmp_path.iterdir()) == []


def test_export_of_one_component_reads_only_its_weights_and_records_what_a_full_export_does(
    tiny_build, tiny_checkpoint, tmp_path, monkeypatch
):
    """An encoder not exported is never read; FLOPs come from the pass log (or a count), hashes from a
    thread beside the work: all as a full export records them, and the hashes are the files' own."""
    import mvd_deploy.checkpoint as checkpoint
    from mvd_deploy.build import sha256_file
    from mvd_deploy.deploy import deploy_checkpoint

    read = []
    real_load = checkpoint.load_weights
    monkeypatch.setattr(checkpoint, "load_weights", lambda path, *a: read.append(path.name) or real_load(path, *a))
    manifest = export_build(tiny_checkpoint, out=tmp_path / "b", components="vae_encoder").manifest
    assert read == ["unet.safetensors", "vae_encoder.safetensors"]  # not the image encoder's
    full = json.loads((tiny_build / "build.json").read_text())
    assert manifest["checkpoint_sha256"] == full["checkpoint_sha256"]
    assert set(manifest["checkpoint_sha256"]) == {p.name for p in tiny_checkpoint.iterdir()}
    assert manifest["components"]["vae_encoder"]["flops"] == full["components"]["vae_encoder"]["flops"] > 0
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tmp_path / "b" / name) and entry["bytes"] > 0
    pipeline = deploy_checkpoint(tiny_checkpoint, check=False).pipeline  # counted afresh, not from the pass log
    for name, component in full["components"].items():
        assert component["flops"] == pipeline.flops(name) > 0, name


def test_reference_computed_beside_the_write_is_the_modules_output_and_its_errors_surface(tiny_checkpoint):
    from mvd_deploy.deploy import deploy_checkpoint
    from mvd_deploy.export import BackgroundReference, component_inputs
    from mvd_deploy.onednn import onednn_linear

    pipeline = deploy_checkpoint(tiny_checkpoint).pipeline
    unet, inputs = pipeline.unet, component_inputs(pipeline, "unet")
    with torch.no_grad(), onednn_linear():
        serial = unet(**inputs).numpy()
    beside = BackgroundReference(unet, inputs).result()  # on a thread, grad mode off and oneDNN Linear there too
    np.testing.assert_allclose(beside, serial, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword argument 'frames'"):
        BackgroundReference(unet, inputs | {"frames": inputs["sample"]}).result()


def test_an_error_beside_the_reference_stops_its_forward_at_the_next_module():
    """A process must not exit while the thread is inside a torch op (it aborts): an error in the
    block stops the forward at its next module and waits for it."""
    from mvd_deploy.export import BackgroundReference

    blocks = [torch.nn.Linear(64, 64) for _ in range(50)]
    ran = []
    for block in blocks:
        block.register_forward_hook(lambda *_: ran.append(1) or time.sleep(0.01))
    with pytest.raises(OSError, match="No space left"):
        with BackgroundReference(torch.nn.Sequential(*blocks), {"input": torch.randn(8, 64)}) as forward:
            raise OSError(28, "No space left on device")
    assert not forward._thread.is_alive() and len(ran) < len(blocks)
    assert not any(block._forward_pre_hooks for block in blocks)  # its hooks removed


def test_strided_weights_are_written_as_onnx_ir_writes_them(tmp_path):
    """The optimiser folds a Linear's transposed weight into a strided numpy view; write_onnx writes
    it through a contiguous copy (faster), byte for byte what onnx_ir.save writes."""
    import onnx_ir

    from mvd_deploy.onnx_tools import optimize_exported, trace_onnx, write_onnx

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    inputs = {"input": torch.randn(2, 4, 48)}  # 3-D: exported as MatMul by a transposed weight, not Gemm
    plain = trace_onnx(layer, inputs, "out")
    optimize_exported(plain)
    strided = [
        v
        for v in plain.graph.initializers.values()
        if getattr(v.const_value, "raw", None) is not None
        and isinstance(v.const_value.raw, np.ndarray)
        and not v.const_value.raw.flags.c_contiguous
    ]
    assert strided, "the case this test is for: a folded transpose kept as a strided view"
    onnx_ir.save(plain, tmp_path / "plain.onnx", external_data="plain.data")
    write_onnx(trace_onnx(layer, inputs, "out"), tmp_path / "fast.onnx")
    assert (tmp_path / "fast.data").read_bytes() == (tmp_path / "plain.data").read_bytes()
    output = run_onnx(tmp_path / "fast.onnx", {"input": inputs["input"].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(output, layer(**inputs).numpy(), rtol=1e-5, atol=1e-6)


def test_background_hashes_are_the_files_own_and_a_missing_file_is_named(tmp_path):
    from mvd_deploy.build import BackgroundHashes, sha256_file

    files = [tmp_path / "a.data", tmp_path / "b.onnx"]
    for i, path in enumerate(files):
        path.write_bytes(bytes(range(256)) * (1000 + i))
    entries = BackgroundHashes(files).result()
    assert {name: e["sha256"] for name, e in entries.items()} == {p.name: sha256_file(p) for p in files}
    assert [entries[p.name]["bytes"] for p in files] == [256000, 256256]
    with pytest.raises(MvdError, match=r"missing\.data: cannot read"):
        BackgroundHashes([files[0], tmp_path / "missing.data"]).result()


def test_export_refusals(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    cases = [
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "checkpoint directory not found"),
        (
            ["export", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--components", "unet,vae"],
            "--components: unknown component 'vae'",
        ),
        (["export", str(tiny_checkpoint), "--out", str(tmp_path / "f" / "b")], "cannot write there"),
    ]
    (tmp_path / "f").write_text("a file, not a directory")
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()


def test_a_hard_linked_weights_file_is_refused_in_one_line(tiny_build, tmp_path):
    """onnx reads no external weights through a file with several hard links (a build copied with
    `cp -al`): compile names the file instead of failing deep inside with a traceback."""
    own = _copy_build(tiny_build, tmp_path)  # links to the shared build would break the tests that read it
    build = tmp_path / "linked"
    build.mkdir()
    for f in own.iterdir():
        if f.is_file():
            (shutil.copy2 if f.name == "build.json" else os.link)(f, build / f.name)
    result = CliRunner().invoke(main, ["compile", str(build), "--target", "ort-cpu"])
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {build}/") and "hard links" in last and "Traceback" not in result.stderr


def test_simplify_never_loads_the_weights_and_keeps_outputs(tiny_build, tmp_path):
    build = _copy_build(tiny_build, tmp_path)
    data = (build / "unet.data").read_bytes()
    inputs = Build(build).random_inputs("unet", 3)
    before = run_onnx(build / "unet.onnx", inputs)
    simplify_onnx(build / "unet.onnx")  # a second pass: already simple, must stay correct
    assert (build / "unet.data").read_bytes() == data  # weights untouched, still one file
    check_onnx(build / "unet.onnx")
    np.testing.assert_allclose(run_onnx(build / "unet.onnx", inputs), before, rtol=1e-5, atol=1e-6)


# -- compile and profile ------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_compile_reports_its_psnr_honestly(tiny_build, tmp_path):
    """What compile promises, whatever figure this CPU's int8 kernels give: the PSNR it records is the
    PSNR of what it wrote; a threshold under it (0 dB) writes the form, one far over it refuses it.
    Both int8 forms in one compile (``--int8`` repeated)."""
    build = Build(_copy_build(tiny_build, tmp_path))
    # No threshold: the measured figure decides nothing here (it moves with the CPU's int8 kernels).
    result = CliRunner().invoke(
        main,
        ["compile", str(build.path), "--target", "ort-cpu", "--int8", "dynamic", "--int8", "static"]
        + ["--calibration-samples", "2", "--min-psnr", "0", "--json"],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert list(records) == ["ort-cpu/fp32", "ort-cpu/int8-dynamic", "ort-cpu/int8-static"]
    assert records["ort-cpu/fp32"]["components"]["unet"]["validation"]["psnr_db"] >= 80.0
    # every attention fused (MultiHeadAttention) in every form: the tiny UNet's are one score map each
    softmaxes = sum(
        n.op_type == "Softmax" for n in onnx.load(str(build.onnx_path("unet")), load_external_data=False).graph.node
    )
    for key, record in records.items():
        rewrites = record["components"]["unet"]["rewrites"]
        assert rewrites["attention"] == {"fused": softmaxes, "softmax_left": 0}, key
        assert rewrites["gelu_fused"] > 0 and rewrites["conv_inputs_isolated"] > 0, key
        assert rewrites["geglu_split"] == rewrites["gelu_fused"], key  # every feed-forward of the UNet is a GEGLU
        graph = onnx.load(str(build.path / record["directory"] / "unet.onnx"), load_external_data=False).graph
        assert sum(n.op_type == "MultiHeadAttention" for n in graph.node) == softmaxes > 0
        assert not any(n.op_type == "Split" and n.name.startswith("node_Split") for n in graph.node), key
    assert not list(build.path.glob(".*ort-cpu*"))  # the rewritten model and its halves' weights are gone
    [inputs] = pipeline_inputs(build, "unet", 1, seed=VALIDATION_SEED)
    exported = run_onnx(build.onnx_path("unet"), inputs)
    manifest = json.loads((build.path / "build.json").read_text())
    for int8 in ("dynamic", "static"):
        form = f"int8-{int8}"
        unet = records[f"ort-cpu/{form}"]["components"]["unet"]
        assert unet["ops"]["int8"] > 0  # something really was quantised
        compiled = build.path / "compiled" / "ort-cpu" / form / "unet.onnx"
        measured = psnr_db(run_onnx(compiled, inputs), exported)
        assert abs(measured - unet["validation"]["psnr_db"]) < 0.1
        assert measured < 150.0  # int8 is not bit-exact: ~200 dB would mean nothing was quantised
        assert np.isfinite(unet["validation"]["conditioning_sensitivity"]["compiled"])
        # weights in [-64, 64]: no x86 int8 kernel (VPMADDUBSW without VNNI) can saturate, whatever CPU runs it
        weights = [
            numpy_helper.to_array(t)
            for t in onnx.load(str(compiled)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 1  # scalars: activation zero points
        ]
        assert len(weights) > 100  # int8 weight and zero-point tensors checked: 520 dynamic, 654 static measured
        assert all(w.min() >= -64 and w.max() <= 64 for w in weights)  # 2·255·64 = 32,640 fits in an int16
        # what each form quantises (INT8_FORMS): MatMul/Gemm dynamic in both, convolutions static in static
        ops = {node.op_type for node in onnx.load(str(compiled), load_external_data=False).graph.node}
        assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
        if int8 == "static":  # and nothing else static: softmax, MatMul stay float or dynamic
            assert "QLinearConv" in ops and not ops & {"QLinearMatMul", "QLinearSoftmax", "QLinearMul"}
            assert "Conv" not in ops  # every convolution static: none left float behind a Q/DQ round trip
        else:
            assert "Conv" in ops and "QLinearConv" not in ops
        record = records[f"ort-cpu/{form}"]
        assert record["int8_ops"]["Conv"] == ("static (calibrated QDQ)" if int8 == "static" else "float")
        assert record["int8_weights"]["range"] == [-64, 64]
        assert set(record["measured_on"]["features"]) <= set(KERNEL_FEATURES)
        assert manifest["compiled"][f"ort-cpu/{form}"] == record
    assert not (build.path / ".staging").exists()

    # A threshold far above the measured figure refuses the form and writes nothing of it (the same
    # code refuses either form; dynamic is the quick one).
    form = "int8-dynamic"
    measured = records[f"ort-cpu/{form}"]["components"]["unet"]["validation"]["psnr_db"]
    shutil.rmtree(build.path / "compiled" / "ort-cpu" / form)
    # (the first component under it refuses the form: an encoder or the UNet)
    with pytest.raises(ValidationFailed, match=rf"\w+ \(ort-cpu {form}\): .* dB PSNR against the exported model"):
        get_backend("ort-cpu").compile(
            build,
            [resolve_target("ort-cpu")],
            CompileOptions(int8="dynamic", calibration_samples=2, min_psnr_db=measured + 20),
        )
    assert not (build.path / "compiled" / "ort-cpu" / form).exists() and not (build.path / ".staging").exists()


def test_compile_threshold_is_enforced(tiny_build, tmp_path):
    build = Build(_copy_build(tiny_build, tmp_path))
    result = CliRunner().invoke(main, ["compile", str(build.path), "--target", "ort-cpu", "--min-psnr", "250"])
    assert result.exit_code == 1
    assert "below the 250.0 dB threshold; the compiled form was not written" in result.stderr
    assert not (build.path / "compiled").exists() or not any((build.path / "compiled").rglob("*.onnx"))
    assert json.loads((build.path / "build.json").read_text())["compiled"] == {}


def test_profile_before_compile_is_refused(tiny_build, tmp_path):
    before = CliRunner().invoke(main, ["profile", str(_copy_build(tiny_build, tmp_path)), "--target", "ort-cpu"])
    assert before.exit_code == 2 and "run `mvd-deploy compile` first" in before.stderr


def test_profile_json(compiled_build):
    build, runner = compiled_build, CliRunner()
    result = runner.invoke(main, ["profile", str(build), "--target", "ort-cpu", "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)
    assert profile["schema"] == "mvd-deploy-profile" and profile["target"] == "ort-cpu"
    for name in ("unet", "decoder"):
        c = profile["components"][name]
        assert 0 < c["latency_ms"]["min"] <= c["latency_ms"]["p50"] <= c["latency_ms"]["p90"]
        assert c["load_ms"]["first"] > 0 and c["peak_memory_mb"] > 0
        assert c["compute_units"]["CPU"] > 0 and c["top_ops"]
        assert sum(op["share"] for op in c["top_ops"]) <= 1.5  # shares of one call (profiler overhead aside)
    # where the UNet's time goes: ops named by their module, summed per block and per op type
    unet = profile["components"]["unet"]
    by_block, by_type = unet["cost"]["by_block"], unet["cost"]["by_op_type"]
    assert {"conv_in", "down_blocks.0", "mid_block", "up_blocks.3", "conv_out"} <= {b["block"] for b in by_block}
    assert sum(b["ms"] for b in by_block) == pytest.approx(sum(t["ms"] for t in by_type), rel=1e-3)
    assert sum(b["share"] for b in by_block) == pytest.approx(1, abs=1e-3)
    # ORT's own nodes (reshapes around a Gemm, Splits) have no module: 10 % of the time measured here
    assert sum(b["share"] for b in by_block if b["block"] != "(unattributed)") > 0.5
    assert any(op["module"] for op in unet["top_ops"])
    assert profile["total_latency_ms"] == pytest.approx(
        sum(c["latency_ms"]["p50"] for c in profile["components"].values()), abs=1e-3
    )
    assert json.loads((build / "profiles" / "ort-cpu-fp32.json").read_text()) == profile


def test_profile_worker_reports_its_own_peak_memory(tiny_compiled_build, tmp_path):
    """Not its parent's: Linux keeps the forking process's ru_maxrss across exec."""
    import subprocess
    import sys

    ballast = np.ones(2**28)  # 2 GiB resident in the parent (this test process)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **Build(tiny_compiled_build).random_inputs("decoder", VALIDATION_SEED))
    model = tiny_compiled_build / "compiled" / "ort-cpu" / "fp32" / "decoder.onnx"
    command = [sys.executable, "-m", "mvd_deploy.ort_worker", "profile", str(model), str(inputs), "1", "1"]
    measured = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert 0 < measured["peak_memory_mb"] < 1024 < ballast.nbytes / 2**20  # the tiny decoder: ~100 MB


def test_compiled_nodes_are_named_by_the_module_that_made_them():
    modules = {"node_MatMul_5": "up_blocks.3.attentions.0.proj_in", "node_conv2d": "conv_in", "node_mul": "mid_block.x"}
    assert module_of("node_MatMul_5/MatMulAddFusion", modules) == "up_blocks.3.attentions.0.proj_in"  # fused
    assert module_of("node_MatMul_5_quant", modules) == "up_blocks.3.attentions.0.proj_in"  # quantised
    assert module_of("gemm_input_reshape_token_2", modules) is None  # added by ONNX Runtime
    assert [block_of(m) for m in ("up_blocks.3.attentions.0.proj_in", "conv_in", "mid_block.x", None)] == [
        "up_blocks.3",
        "conv_in",
        "mid_block",
        "(unattributed)",
    ]
    ops = [("node_conv2d", "Conv", 3.0), ("node_MatMul_5/MatMulAddFusion", "Gemm", 1.0), ("other", "Reshape", 1.0)]
    views = cost_views(ops, modules)
    assert views["by_block"] == [
        {"block": "conv_in", "ms": 3.0, "share": 0.6},
        {"block": "up_blocks.3", "ms": 1.0, "share": 0.2},
        {"block": "(unattributed)", "ms": 1.0, "share": 0.2},
    ]
    assert [t["op_type"] for t in views["by_op_type"]] == ["Conv", "Gemm", "Reshape"]


def test_unknown_target_and_not_a_build(tmp_path, tiny_build):
    with pytest.raises(MvdError, match="^target: unknown target 'snapdragon-x'; known: galaxy-s24, ort-cpu") as err:
        resolve_target("snapdragon-x")
    assert err.value.parameter == "target"  # the CLI says --target there (test_packaging)
    with pytest.raises(MvdError, match="not a build directory"):
        Build(tmp_path)


def test_export_optimiser_writes_the_graphs_onnxscripts_own_would(tiny_checkpoint, tiny_build, tmp_path, monkeypatch):
    """optimize_exported leaves out one costly rewrite rule (SlicesSplit): the built graphs (after
    onnxsim) must be those of onnxscript's full optimize_ir, node for node and attribute for
    attribute — on the VAE encoder (Pad into Conv) and the TAESD decoder (Min/Max into Clip, Conv
    biases), and the rule must find nothing in the tiny UNet's built graph."""
    import onnx_ir
    import onnxscript.optimizer
    from diffusers import AutoencoderTiny
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    from mvd_deploy import onnx_tools
    from mvd_deploy.checkpoint import load_encoders, read_checkpoint_info
    from mvd_deploy.model.decoder import TAESDDecoder

    vae_encoder = load_encoders(read_checkpoint_info(tiny_checkpoint))["vae_encoder"]
    decoder = TAESDDecoder(AutoencoderTiny(decoder_block_out_channels=(16, 16, 16, 16)).decoder).eval()
    cases = {
        "vae_encoder": (vae_encoder, {"image": torch.rand(1, 3, 32, 64) * 2 - 1}),
        "decoder": (decoder, {"latents": torch.randn(1, 2, 4, 4, 8)}),
    }

    def built_graph(name, optimizer) -> list:
        monkeypatch.setattr(onnx_tools, "optimize_exported", optimizer)
        module, inputs = cases[name]
        path = tmp_path / optimizer.__name__ / f"{name}.onnx"
        path.parent.mkdir(exist_ok=True)
        onnx_tools.export_onnx(module, inputs, "out", path)
        simplify_onnx(path)
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        return [(n.op_type, list(n.input), sorted((a.name, str(a)) for a in n.attribute)) for n in nodes]

    for name in cases:
        ours = built_graph(name, onnx_tools.optimize_exported)
        assert ours == built_graph(name, onnxscript.optimizer.optimize_ir), name
        assert len(ours) > 10
    assert not rewriter.RewritePass([slice_split_rule])(onnx_ir.load(tiny_build / "unet.onnx")).modified
