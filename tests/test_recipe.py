from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import ROOT, TINY
from mvd_deploy.checkpoint import init_checkpoint
from mvd_deploy.cli import main
from mvd_deploy.errors import MvdError
from mvd_deploy.recipe import load_recipe


@pytest.mark.parametrize("name", ["svd", "mobilevd", "mobilevd-hd", "tiny"])
def test_shipped_recipes_load(name):
    spec = load_recipe(ROOT / "models" / f"{name}.yaml")
    assert spec.name == name
    assert spec.latent_shape[1:3] == (14, 8)


def test_recipe_settings():
    svd, mvd, hd = (load_recipe(ROOT / "models" / f"{n}.yaml") for n in ("svd", "mobilevd", "mobilevd-hd"))
    assert svd.mobilevd.nfe == 50 and not svd.mobilevd.temporal_multiscaling and svd.mobilevd.funnel_layers == ()
    assert mvd.mobilevd.nfe == 1 and mvd.mobilevd.fun_factor == 0.5 and mvd.mobilevd.temporal_prune_fraction == 0.7
    assert mvd.latent_shape == (1, 14, 8, 32, 64)
    assert hd.latent_shape == (1, 14, 8, 72, 128)
    assert svd.unet["block_out_channels"] == [320, 640, 1280, 1280]  # diffusers' SVD defaults


def _mutated(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(TINY.read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD_RECIPES = [
    (lambda d: d["mobilevd"].update(fun_factor=1.5), "mobilevd.fun_factor"),
    (lambda d: d["mobilevd"].update(fun_factor="half"), "mobilevd.fun_factor"),
    (lambda d: d["mobilevd"].pop("nfe"), "mobilevd.nfe"),
    (lambda d: d["mobilevd"]["video"].update(frames=True), "mobilevd.video.frames"),
    (lambda d: d["mobilevd"]["video"].update(width=100), "mobilevd.video.width"),
    (lambda d: d["mobilevd"]["video"].update(frames=13), "mobilevd.temporal_multiscaling"),
    (lambda d: d["mobilevd"].update(funnel_layers=["cross_attention"]), "mobilevd.funnel_layers"),
    (lambda d: d["mobilevd"].update(temporal_prune_fraction=-0.1), "mobilevd.temporal_prune_fraction"),
    (lambda d: d["mobilevd"].update(fun_factr=0.5), "mobilevd.fun_factr"),
    (lambda d: d["mobilevd"]["conditioning"].pop("timestep"), "mobilevd.conditioning.timestep"),
    (lambda d: d["unet"].update(block_out_chanels=[32]), "unet.block_out_chanels"),
    (lambda d: d["unet"].update(block_out_channels=[32, 64, 64, 48]), "unet.block_out_channels"),
    (lambda d: d["unet"].update(num_attention_heads=[3, 2, 4, 4]), "unet.num_attention_heads"),
    (lambda d: d["mobilevd"].update(temporal_gates={}), "mobilevd.temporal_gates"),
    (lambda d: d.pop("name"), "name"),
]


@pytest.mark.parametrize("edit,key", BAD_RECIPES)
def test_bad_recipe_names_file_and_key(tmp_path, edit, key):
    path = _mutated(tmp_path, edit)
    with pytest.raises(MvdError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: key '{key}'"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "passes,why", [(["merge_funnels", "quantize"], "unknown pass 'quantize'"), (["strip_temporal"] * 2, "named twice")]
)
def test_bad_pass_lists_are_refused_where_passes_are_made(tmp_path, passes, why):
    """A recipe stores pass names; they are checked when passes are made (before a checkpoint is
    written), naming the recipe and its key."""
    path = _mutated(tmp_path, lambda d: d["mobilevd"].update(deploy_passes=passes))
    assert load_recipe(path).mobilevd.deploy_passes == tuple(passes)
    with pytest.raises(MvdError) as err:
        init_checkpoint(path, out=tmp_path / "ck")
    assert str(err.value).startswith(f"{path}: key 'mobilevd.deploy_passes': ") and why in str(err.value)
    assert not (tmp_path / "ck").exists()


def test_not_yaml_and_not_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(MvdError, match=r"bad.yaml: not valid YAML at line"):
        load_recipe(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(MvdError, match=r"bad.yaml: key '<top level>': must be a mapping"):
        load_recipe(bad)
    with pytest.raises(MvdError, match=r"missing.yaml: cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    path = _mutated(tmp_path, lambda d: d["mobilevd"].update(fun_factor=0))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: {path}: key 'mobilevd.fun_factor'")
    assert "Traceback" not in result.output
