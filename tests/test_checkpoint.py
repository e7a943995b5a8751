"""Checkpoint directories: round trip, determinism, --from-svd, and every way a file can be bad."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNetSpatioTemporalConditionModel
from safetensors.torch import load_file, save_file

from helpers import ROOT, TINY, relative_error, tiny_spec, write_recipe
from mvd_deploy.checkpoint import CONFIG_FILE, WEIGHTS_FILE, init_checkpoint, load_checkpoint, save_checkpoint
from mvd_deploy.cli import main
from mvd_deploy.errors import MvdError
from mvd_deploy.model.unet import MobileVDUNet


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@torch.no_grad()
def test_round_trip_gives_identical_outputs(tmp_path):
    spec = tiny_spec()
    model = MobileVDUNet.build(spec).eval()
    for attn in model.funnel_attentions(spec.mobilevd.funnel_layers):
        for proj in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            torch.nn.init.normal_(proj.funnel, std=0.2)
    save_checkpoint(model, tmp_path / "ck")
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert info.spec.mobilevd == spec.mobilevd and info.spec.unet == spec.unet
    inputs = model.example_inputs(seed=3)
    assert torch.equal(loaded(**inputs), model(**inputs))


def test_config_records_gates_and_settings(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    assert config["format"] == "mvd-deploy-checkpoint" and config["dtype"] == "float32"
    assert config["unet"]["block_out_channels"] == [32, 64, 64, 64]
    gates = config["mobilevd"]["temporal_gates"]
    assert len(gates) == 38 and sum(not g["keep"] for g in gates.values()) == 27
    assert config["mobilevd"]["fun_factor"] == 0.5 and config["mobilevd"]["nfe"] == 1


def test_seed_is_deterministic(tmp_path, tiny_checkpoint):
    init_checkpoint(TINY, out=tmp_path / "again", seed=0)
    init_checkpoint(TINY, out=tmp_path / "other", seed=1)
    assert _sha(tmp_path / "again" / WEIGHTS_FILE) == _sha(tiny_checkpoint / WEIGHTS_FILE)
    assert _sha(tmp_path / "other" / WEIGHTS_FILE) != _sha(tiny_checkpoint / WEIGHTS_FILE)


def _svd_dir(tmp_path: Path) -> Path:
    unet = UNetSpatioTemporalConditionModel(**tiny_spec().unet)
    unet.save_pretrained(tmp_path / "svd-unet", safe_serialization=True)
    return tmp_path / "svd-unet"


@pytest.mark.slow
@torch.no_grad()
def test_from_svd_full_width_reproduces_diffusers(tmp_path):
    svd = _svd_dir(tmp_path)
    recipe = write_recipe(
        tmp_path / "r1.yaml",
        fun_factor=1.0,
        funnel_layers=["spatial_self_attention", "temporal_self_attention"],
        temporal_multiscaling=False,
        temporal_prune_fraction=0.0,
    )
    init_checkpoint(recipe, out=tmp_path / "ck", from_svd=svd)
    model, _ = load_checkpoint(tmp_path / "ck")
    assert len(model.funnels()) == 4 * 32  # every self-attention funnelled, at full width
    reference = UNetSpatioTemporalConditionModel.from_pretrained(svd).eval()
    inputs = model.example_inputs(seed=5)
    assert relative_error(model(**inputs), reference(**inputs, return_dict=False)[0]) <= 1e-5


@pytest.mark.slow
def test_from_svd_with_another_architecture_names_the_key(tmp_path):
    svd = _svd_dir(tmp_path)
    config = json.loads((svd / "config.json").read_text())
    config["cross_attention_dim"] = 64
    (svd / "config.json").write_text(json.dumps(config))
    with pytest.raises(MvdError, match=r"config.json: key 'cross_attention_dim' is 64 but recipe .*tiny.yaml has 32"):
        init_checkpoint(TINY, out=tmp_path / "ck", from_svd=svd)
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_from_svd_refuses_pickled_weights(tmp_path):
    svd = _svd_dir(tmp_path)
    (svd / "diffusion_pytorch_model.safetensors").rename(svd / "diffusion_pytorch_model.bin")
    with pytest.raises(MvdError, match="only safetensors weights are read"):
        init_checkpoint(TINY, out=tmp_path / "ck", from_svd=svd)


# -- bad checkpoints: one line, exit 2, naming file and key ---------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_weights(ck: Path, edit) -> None:
    state = load_file(str(ck / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(ck / WEIGHTS_FILE))


KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.funnel"


def _truncate(ck):
    data = (ck / WEIGHTS_FILE).read_bytes()
    (ck / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _config_edit(edit):
    def apply(ck):
        config = json.loads((ck / CONFIG_FILE).read_text())
        edit(config)
        (ck / CONFIG_FILE).write_text(json.dumps(config))

    return apply


BAD_CHECKPOINTS = {
    "truncated": (_truncate, rf"{WEIGHTS_FILE}: not a readable safetensors file, truncated or corrupt"),
    "missing key": (lambda ck: _rewrite_weights(ck, lambda s: s.pop(KEY)), rf"{WEIGHTS_FILE}: key '{KEY}' is missing"),
    "unexpected key": (
        lambda ck: _rewrite_weights(ck, lambda s: s.update(extra=torch.zeros(1))),
        rf"{WEIGHTS_FILE}: key 'extra' is unexpected",
    ),
    "wrong shape": (
        lambda ck: _rewrite_weights(ck, lambda s: s.update({KEY: torch.zeros(8, 32)})),
        rf"{WEIGHTS_FILE}: key '{KEY}' has shape \[8, 32\], expected \[16, 32\]",
    ),
    "wrong dtype": (
        lambda ck: _rewrite_weights(ck, lambda s: s.update({KEY: s[KEY].half()})),
        rf"{WEIGHTS_FILE}: key '{KEY}' has dtype float16, expected float32",
    ),
    "non-JSON config": (
        lambda ck: (ck / CONFIG_FILE).write_text("{not json"),
        rf"{CONFIG_FILE}: checkpoint config is not valid JSON",
    ),
    "bad setting": (
        _config_edit(lambda c: c["mobilevd"].update(fun_factor=2)),
        rf"{CONFIG_FILE}: key 'mobilevd.fun_factor'",
    ),
    "unknown gate": (
        _config_edit(
            lambda c: c["mobilevd"]["temporal_gates"].update(
                {"up_blocks.9.resnets.0.temporal_res_block": {"kind": "resnet", "importance": 0.0, "keep": True}}
            )
        ),
        rf"{CONFIG_FILE}: key 'mobilevd.temporal_gates.up_blocks.9.resnets.0.temporal_res_block': names no",
    ),
    "missing weights": (lambda ck: (ck / WEIGHTS_FILE).unlink(), rf"{WEIGHTS_FILE}: weights file not found"),
    "weights outside": (_config_edit(lambda c: c.update(weights="../x.safetensors")), rf"{CONFIG_FILE}: key 'weights'"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_exit_2(tmp_path, tiny_checkpoint, case):
    damage, message = BAD_CHECKPOINTS[case]
    ck = _copy(tiny_checkpoint, tmp_path / "ck")
    damage(ck)
    with pytest.raises(MvdError, match=message):
        load_checkpoint(ck)
    result = CliRunner().invoke(main, ["inspect", str(ck)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / CONFIG_FILE).write_text("[1,")
    proc = subprocess.run(
        [sys.executable, "-m", "mvd_deploy", "inspect", str(tmp_path / "ck")], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {tmp_path / 'ck' / CONFIG_FILE}: checkpoint config is not valid JSON")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


# -- nothing half-written ---------------------------------------------------------------------------
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import mvd_deploy.checkpoint as checkpoint

    def exploding_save(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-write

    monkeypatch.setattr(checkpoint, "save_file", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(TINY, out=tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(main, ["init-checkpoint", "--model", str(TINY), "--out", str(tiny_checkpoint)])
    assert result.exit_code == 2
    assert "already exists and is not empty" in result.stderr


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["init-checkpoint", "--model", str(TINY), "--out", str(blocker / "ck")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --out {blocker / 'ck'}: cannot write there")


def test_cli_json(tmp_path):
    result = CliRunner().invoke(
        main, ["init-checkpoint", "--model", str(TINY), "--out", str(tmp_path / "ck"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["temporal_blocks_pruned"] == 27 and report["params"] > 5_000_000
