"""The ONNX Runtime worker process: its environment, its session's allocator, its two modes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mvd_deploy import ort_worker
from mvd_deploy.backends.inputs import VALIDATION_SEED
from mvd_deploy.build import Build
from mvd_deploy.errors import MvdError
from mvd_deploy.ort_worker import ALLOCATOR_TUNABLES, compiled_session, run_worker, worker_env


def _arena_in(env: dict, model) -> bool:
    """enable_cpu_mem_arena of compiled_session in a fresh process started with ``env``."""
    code = (
        "import sys, onnx, onnx.helper as h; from mvd_deploy.ort_worker import compiled_session;"
        "g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'g', [h.make_tensor_value_info('x', 1, [1])],"
        " [h.make_tensor_value_info('y', 1, [1])]);"
        "m = h.make_model(g, opset_imports=[h.make_opsetid('', 18)]); m.ir_version = 9;"
        "onnx.save(m, sys.argv[1]); print(compiled_session(sys.argv[1]).get_session_options().enable_cpu_mem_arena)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(model)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_a_worker_starts_with_the_allocator_tunables_where_huge_pages_work(monkeypatch, tmp_path):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the user's own: kept
    monkeypatch.setattr(ort_worker, "huge_pages_available", lambda: True)
    assert worker_env()["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{ALLOCATOR_TUNABLES}"
    monkeypatch.setattr(ort_worker, "huge_pages_available", lambda: False)
    assert worker_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


@pytest.mark.parametrize(
    ("libc", "thp", "available"),
    [
        ("glibc 2.36", "always [madvise] never\n", True),
        ("glibc 2.35", "[always] madvise never\n", True),
        ("glibc 2.34", "always [madvise] never\n", False),  # no hugetlb tunable: glibc ignores it
        ("glibc 2.36", "always madvise [never]\n", False),  # THP off: page faults on every call
        ("glibc 2.36", None, False),  # a kernel without THP
    ],
)
def test_huge_pages_need_glibc_2_35_and_thp_not_off(monkeypatch, tmp_path, libc, thp, available):
    setting = tmp_path / "enabled"
    if thp is not None:
        setting.write_text(thp)
    monkeypatch.setattr(ort_worker, "THP_SETTING", setting)
    monkeypatch.setattr(ort_worker.os, "confstr", lambda name: libc)
    assert ort_worker.huge_pages_available() is available


def test_the_session_drops_its_arena_only_where_glibc_unmaps_freed_blocks(tmp_path):
    env = {k: v for k, v in worker_env().items() if k != "GLIBC_TUNABLES"}
    assert _arena_in(env, tmp_path / "relu.onnx")  # glibc keeps freed blocks: the arena is the faster
    assert not _arena_in({**env, "GLIBC_TUNABLES": ALLOCATOR_TUNABLES}, tmp_path / "relu.onnx")


def test_run_worker_gives_what_an_in_process_session_gives(tiny_compiled_build, tmp_path):
    build = Build(tiny_compiled_build)
    model = tiny_compiled_build / "compiled" / "ort-cpu" / "fp32" / "decoder.onnx"
    inputs = build.random_inputs("decoder", VALIDATION_SEED)
    np.savez(tmp_path / "inputs.npz", **inputs, unused=np.zeros(1))  # inputs the model lacks are left out
    args = ["run", str(model), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npy")]
    report = run_worker(args, failure="decoder")
    expected = compiled_session(str(model)).run(None, inputs)[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-6)
    assert report["allocator"] == ("glibc-mmap" if ort_worker.huge_pages_available() else "arena")
    assert 0 < report["peak_memory_mb"] < 1024 and report["run_s"] > 0 and report["load_s"] > 0


def test_a_failing_worker_is_one_line_naming_the_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    np.savez(tmp_path / "inputs.npz", x=np.zeros(1))
    with pytest.raises(MvdError, match=r"bad\.onnx: ONNX Runtime failed \(.*(INVALID_PROTOBUF|Protobuf).*\)$") as error:
        run_worker(
            ["run", str(bad), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npy")],
            failure=f"{bad}: ONNX Runtime failed",
        )
    assert "\n" not in str(error.value) and not (tmp_path / "out.npy").exists()


def test_profile_mode_reports_the_allocator(tiny_compiled_build, tmp_path):
    model = tiny_compiled_build / "compiled" / "ort-cpu" / "fp32" / "decoder.onnx"
    np.savez(tmp_path / "inputs.npz", **Build(tiny_compiled_build).random_inputs("decoder", VALIDATION_SEED))
    report = run_worker(["profile", str(model), str(tmp_path / "inputs.npz"), "1", "1"], failure="decoder")
    assert report["allocator"] == ("glibc-mmap" if ort_worker.huge_pages_available() else "arena")
    assert report["latency_ms"]["p50"] > 0 and report["node_ms"]
