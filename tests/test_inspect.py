"""FLOPs counting and `mvd-deploy inspect` on the tiny recipe."""

import json
import re

import pytest
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import TINY, tiny_spec
from mvd_deploy.cli import main
from mvd_deploy.flops import count_flops, count_model_flops
from mvd_deploy.inspect import inspect_model
from mvd_deploy.model.unet import MobileVDUNet


@pytest.mark.slow
def test_meta_count_equals_count_on_real_tensors():
    """The meta-device count is what real CPU tensors give under the (counted) math attention kernel."""
    spec = tiny_spec()
    meta = count_model_flops(MobileVDUNet.build(spec, device="meta"))
    model = MobileVDUNet.build(spec).eval()
    with sdpa_kernel(SDPBackend.MATH):
        real = count_flops(model, model.example_inputs(), meta=False)
    assert meta.total == real.total > 0


@pytest.mark.slow
def test_each_optimisation_lowers_the_count():
    plain = tiny_spec(funnel_layers=(), temporal_multiscaling=False, temporal_prune_fraction=0.0)
    multiscaled = tiny_spec(funnel_layers=(), temporal_multiscaling=True, temporal_prune_fraction=0.0)
    pruned = tiny_spec(funnel_layers=(), temporal_multiscaling=True, temporal_prune_fraction=0.7)
    counts = [count_model_flops(MobileVDUNet.build(s, device="meta")).total for s in (plain, multiscaled, pruned)]
    assert counts[0] > counts[1] > counts[2]


@pytest.mark.slow
def test_cheapest_first_prunes_the_27_cheapest_of_38():
    spec = tiny_spec()
    gates = spec.mobilevd.temporal_gates
    assert len(gates) == 38
    assert sum(g.kind == "resnet" for g in gates.values()) == 22
    pruned = [g.importance for g in gates.values() if not g.keep]
    kept = [g.importance for g in gates.values() if g.keep]
    assert len(pruned) == 27 and max(pruned) <= min(kept)
    # importance is the block's measured cost: check one against a direct count
    model = MobileVDUNet.build(tiny_spec(temporal_prune_fraction=0.0), device="meta")
    per_module = count_model_flops(model).per_module
    name = "down_blocks.0.resnets.0.temporal_res_block"
    assert gates[name].importance == per_module[name] / 1e9


@pytest.mark.slow
def test_pruned_blocks_cost_nothing():
    spec = tiny_spec()
    per_module = count_model_flops(MobileVDUNet.build(spec, device="meta")).per_module
    for name, gate in spec.mobilevd.temporal_gates.items():
        assert (per_module.get(name, 0) > 0) == gate.keep, name


@pytest.mark.slow
def test_inspect_recipe_json():
    result = CliRunner().invoke(main, ["inspect", str(TINY), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert isinstance(report["params"], int) and isinstance(report["tflops"], float)
    model = MobileVDUNet.build(tiny_spec(), device="meta")
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["bytes"] == 4 * report["params"]
    assert report["latent_shape"] == [1, 14, 8, 8, 16]
    assert [lvl["frames"] for lvl in report["levels"]] == [14, 7, 7, 7, 7]
    assert report["temporal_blocks"] == {**report["temporal_blocks"], "total": 38, "kept": 11, "pruned": 27}
    assert sum(report["components"]["unet"]["parts"].values()) == report["params"]


def test_inspect_checkpoint_matches_recipe(tiny_checkpoint):
    from_recipe, from_checkpoint = inspect_model(TINY), inspect_model(tiny_checkpoint)
    for key in ("params", "flops", "latent_shape", "temporal_blocks"):
        assert getattr(from_recipe, key) == getattr(from_checkpoint, key), key
    assert from_checkpoint.kind == "checkpoint" and from_checkpoint.to_json()["kind"] == "checkpoint"


@pytest.mark.slow
def test_inspect_human_output():
    result = CliRunner().invoke(main, ["inspect", str(TINY)])
    assert result.exit_code == 0
    assert "temporal blocks   11 kept, 27 pruned of 38" in result.stdout
    assert re.search(r"down_blocks\.1\s+7 frames", result.stdout)


def test_inspect_missing_target():
    result = CliRunner().invoke(main, ["inspect", "nowhere.yaml"])
    assert result.exit_code == 2
    assert result.stderr == "error: nowhere.yaml: no such recipe file or checkpoint directory\n"
