"""A component split into parts (one HTP context each): the chain computes what the whole computes."""

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest

from mvd_deploy.build import Build
from mvd_deploy.device_profiles import resolve_target
from mvd_deploy.errors import MvdError
from mvd_deploy.metrics import psnr_db
from mvd_deploy.onnx_tools import run_onnx
from mvd_deploy.parts import graph_feeds, parts_needed, run_chain, split_component, split_for_targets


@pytest.fixture
def build(tiny_build, tmp_path) -> Build:
    return Build(shutil.copytree(tiny_build, tmp_path / "build"))


def test_parts_chained_equal_the_whole(build):
    graphs = split_component(build, "unet", 3)
    assert [g.name for g in graphs] == ["unet.part0", "unet.part1", "unet.part2"]
    whole_inputs = [i["name"] for i in build.components["unet"]["inputs"]]
    assert [i["name"] for i in graphs[0].inputs] == whole_inputs
    assert graphs[-1].outputs == build.components["unet"]["outputs"]
    # every part is a checked, self-contained model with its own weights file
    for graph in graphs:
        onnx.checker.check_model(str(graph.onnx), full_check=True)
        assert graph.data.is_file() and graph.data.parent == graph.onnx.parent
        # a later part reads only component inputs and earlier parts' outputs
        produced = set(whole_inputs) | {o["name"] for g in graphs[: graphs.index(graph)] for o in g.outputs}
        assert {i["name"] for i in graph.inputs} <= produced
    feed = build.random_inputs("unet", seed=5)  # other inputs than the split's own check
    whole = run_onnx(build.onnx_path("unet"), feed)
    assert psnr_db(run_chain(graphs, feed), whole) >= 80.0
    recorded = build.manifest["components"]["unet"]["parts"]
    assert recorded["count"] == 3 and recorded["chain_validation"]["psnr_db"] >= 80.0
    # the split is balanced by weights: no part holds most of them
    elements = [g["weight_elements"] for g in recorded["graphs"]]
    assert max(elements) < 0.6 * sum(elements)
    # reopened from disk, the build lists the same graphs, hashed in the manifest
    reopened = Build(build.path)
    assert [g.name for g in reopened.graphs("unet")] == [g.name for g in graphs]
    assert "parts/unet/unet.part1.data" in reopened.manifest["files"]


def test_graph_feeds_hand_each_part_what_the_earlier_ones_made(build):
    graphs = split_component(build, "unet", 2)
    feed = build.random_inputs("unet", seed=3)
    feeds = graph_feeds(graphs, feed)
    assert feeds[0] == {k: feed[k] for k in feeds[0]}
    outputs = [o["name"] for o in graphs[0].outputs]
    from mvd_deploy.onnx_tools import ort_session

    made = dict(zip(outputs, ort_session(graphs[0].onnx).run(outputs, feeds[0]), strict=True))
    assert set(feeds[1]) == {i["name"] for i in graphs[1].inputs} and set(feeds[1]) & set(made)
    for name, value in feeds[1].items():
        np.testing.assert_allclose(value, made[name] if name in made else feed[name], rtol=1e-4, atol=1e-5)


def test_resplit_reuses_then_replaces_then_removes(build):
    split_component(build, "unet", 2)
    part = build.path / "parts" / "unet" / "unet.part0.onnx"
    stamp = part.stat().st_mtime_ns
    split_component(build, "unet", 2)
    assert part.stat().st_mtime_ns == stamp  # same count: reused
    assert len(split_component(build, "unet", 3)) == 3
    assert json.loads((build.path / "build.json").read_text())["components"]["unet"]["parts"]["count"] == 3
    [whole] = split_component(build, "unet", 1)
    assert whole.name == "unet" and not (build.path / "parts" / "unet").exists()
    assert "parts" not in json.loads((build.path / "build.json").read_text())["components"]["unet"]


def test_phone_targets_split_by_weight_and_refuse_what_cannot_fit(build):
    target = resolve_target("xiaomi-14-pro")
    split_for_targets(build, [(target, "w8a16")])
    assert [g.name for g in build.graphs("unet")] == ["unet"]  # tiny: one graph
    weights_mb = parts_needed(build, "unet", "float16", 1.0)  # float16 MB, rounded up
    small = dataclasses.replace(target, max_part_weights_mb=weights_mb / 3 + 0.01)
    split_for_targets(build, [(target, "w8a16"), (small, "float16")])  # the most demanding target decides
    assert len(build.graphs("unet")) == 3
    split_for_targets(build, [(target, "w8a16")])
    assert len(build.graphs("unet")) == 3  # a build in more parts is kept: targets share one split
    tiny_context = dataclasses.replace(target, context_limit_mb=0.5)
    with pytest.raises(
        MvdError,
        match=r"xiaomi-14-pro \(.*xiaomi-14-pro.yaml\): unet.part\d cannot fit one HTP context: its weights alone "
        r"are [\d,]+ bytes at w8a16, the limit is 524,288 bytes",
    ):
        split_for_targets(build, [(tiny_context, "w8a16")])
