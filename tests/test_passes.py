"""Deploy passes: each exact on random weights, idempotent, and the manager's refusals."""

import copy
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderTiny

from helpers import relative_error, tiny_spec
from mvd_deploy.checkpoint import save_checkpoint
from mvd_deploy.cli import main
from mvd_deploy.model.sampler import denoised
from mvd_deploy.model.single_token import SingleTokenCrossAttention
from mvd_deploy.model.unet import MobileVDUNet
from mvd_deploy.onednn import onednn_linear
from mvd_deploy.passes import DEFAULT_PASSES, DeployPipeline, Pass, PassError, PassOptions
from mvd_deploy.passes.manager import check_latent_hw, make_passes, run_passes

pytestmark = pytest.mark.slow  # every test here builds and runs the tiny UNet

UNET_PASSES = [n for n in DEFAULT_PASSES if n != "taesd_decoder"]


def _mixed_gates(spec):
    """Every third temporal block kept: resnet and transformer units both kept and pruned."""
    gates = {
        name: dataclasses.replace(g, keep=i % 3 == 0)
        for i, (name, g) in enumerate(spec.mobilevd.temporal_gates.items())
    }
    kinds = {(g.kind, g.keep) for g in gates.values()}
    assert kinds == {("resnet", True), ("resnet", False), ("transformer", True), ("transformer", False)}
    return dataclasses.replace(spec, mobilevd=dataclasses.replace(spec.mobilevd, temporal_gates=gates))


@pytest.fixture
def train_time_unet():
    """Tiny train-time UNet with non-trivial (random, not CSI) funnels on all self-attention, mixed gates."""
    spec = _mixed_gates(tiny_spec(funnel_layers=("spatial_self_attention", "temporal_self_attention")))
    unet = MobileVDUNet.build(spec).eval()
    with torch.no_grad():
        for funnel in unet.funnels().values():
            funnel.funnel.normal_(0, funnel.funnel.shape[1] ** -0.5)
    return unet


@pytest.mark.parametrize("name", UNET_PASSES)
@torch.no_grad()
def test_each_pass_is_exact_and_idempotent(train_time_unet, name):
    before = copy.deepcopy(train_time_unet)
    pipeline = DeployPipeline(train_time_unet)
    [result] = run_passes(pipeline, make_passes([name]))
    assert result.changed, f"{name} found nothing to do on the train-time model"
    # The manager's figure is the real error of this pass on its check inputs (the 1-step sampler's
    # clean latent, so that fold_sampler is compared too; Linear through oneDNN, as the manager's): recompute it here.
    check_inputs = {"seed": 0, "latent_hw": check_latent_hw(before)}
    with onednn_linear():
        measured = (
            (
                denoised(train_time_unet, train_time_unet.example_inputs(**check_inputs))
                - denoised(before, before.example_inputs(**check_inputs))
            )
            .abs()
            .max()
        )
    assert result.max_abs_error == pytest.approx(float(measured), rel=1e-3, abs=1e-12)
    # independent of the manager: compare with the untouched copy on other inputs
    inputs = before.example_inputs(seed=11)
    after_inputs = train_time_unet.example_inputs(seed=11)
    reference, output = denoised(before, inputs), denoised(train_time_unet, after_inputs)
    assert relative_error(output, reference) <= 1e-4
    # idempotent: a second run changes nothing at all
    [again] = run_passes(pipeline, make_passes([name]))
    assert again.changed == "" and again.params_after == result.params_after
    # the very same model: not checked nor counted again
    assert again.rel_error is None and again.flops_after == again.flops_before == result.flops_after
    assert torch.equal(denoised(train_time_unet, after_inputs), output)


@torch.no_grad()
def test_exact_passes_are_exact_in_float64(train_time_unet):
    """In float64 the fp32 rounding differences vanish: what is left is the rewrites' own error (every
    exact pass in one chain; each is also checked alone in fp32 above)."""
    unet = train_time_unet.double()
    before = copy.deepcopy(unet)
    for deploy_pass in make_passes(UNET_PASSES):
        deploy_pass(DeployPipeline(unet))

    def inputs(model):
        return {k: v.double() for k, v in model.example_inputs(seed=6).items()}

    assert relative_error(denoised(unet, inputs(unet)), denoised(before, inputs(before))) <= 1e-12


@torch.no_grad()
def test_all_passes_together_are_exact(train_time_unet):
    before = copy.deepcopy(train_time_unet)
    pipeline = DeployPipeline(train_time_unet)
    results = run_passes(pipeline, make_passes(DEFAULT_PASSES))
    assert [r.name for r in results] == list(DEFAULT_PASSES)
    output = denoised(train_time_unet, train_time_unet.example_inputs(seed=4))
    assert relative_error(output, denoised(before, before.example_inputs(seed=4))) <= 1e-4
    assert results[-1].params_after > 0 and pipeline.decoder is not None


@torch.no_grad()
def test_merge_funnels_leaves_plain_linears_at_reduced_width(train_time_unet):
    run_passes(DeployPipeline(train_time_unet), make_passes(["merge_funnels"]))
    assert not train_time_unet.funnels()
    attn = train_time_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert type(attn.to_q) is torch.nn.Linear and attn.to_q.weight.shape == (16, 32)
    assert attn.to_out[0].weight.shape == (32, 16)


def test_strip_temporal_removes_exactly_the_pruned_blocks(train_time_unet):
    gates = train_time_unet.spec.mobilevd.temporal_gates
    names = {n for n, _ in train_time_unet.named_parameters()}
    run_passes(DeployPipeline(train_time_unet), make_passes(["strip_temporal"]))
    left = {n for n, _ in train_time_unet.named_parameters()}
    for gate, g in gates.items():
        had = any(n.startswith(gate + ".") for n in names)
        has = any(n.startswith(gate + ".") for n in left)
        assert had and has == g.keep, gate


@torch.no_grad()
def test_single_token_cross_attention_drops_q_and_k(train_time_unet):
    [result] = run_passes(DeployPipeline(train_time_unet), make_passes(["single_token_cross_attention"]))
    cross = [m for p, m in train_time_unet.named_modules() if p.endswith(".attn2")]
    assert cross and all(isinstance(m, SingleTokenCrossAttention) for m in cross)
    assert not any(".attn2.to_q" in n or ".attn2.to_k" in n for n, _ in train_time_unet.named_parameters())
    assert result.flops_after < result.flops_before


@torch.no_grad()
def test_fold_conditioning_removes_the_conditioning_inputs(train_time_unet):
    reference = train_time_unet(**train_time_unet.example_inputs(seed=2))
    run_passes(DeployPipeline(train_time_unet), make_passes(["fold_conditioning"]))
    inputs = train_time_unet.example_inputs(seed=2)
    assert set(inputs) == {"sample", "encoder_hidden_states"}
    assert relative_error(train_time_unet(**inputs), reference) <= 1e-4
    assert train_time_unet.time_embedding is None and train_time_unet.add_embedding is None


@torch.no_grad()
def test_chunk_attention_splits_the_queries_exactly(train_time_unet, monkeypatch):
    import torch.nn.functional as F

    import mvd_deploy.passes.chunk_attention as chunk_attention

    before = copy.deepcopy(train_time_unet)
    [result] = run_passes(
        DeployPipeline(train_time_unet), make_passes(["chunk_attention"], PassOptions(attention_chunk_tokens=16))
    )
    assert result.changed == "spatial self-attention in chunks of 16 queries in 16 layers"
    query_lengths = []

    def spy(query, key, value, **kwargs):
        query_lengths.append((query.shape[2], key.shape[2]))
        return F.scaled_dot_product_attention(query, key, value, **kwargs)

    monkeypatch.setattr(chunk_attention, "F", type("F", (), {"scaled_dot_product_attention": staticmethod(spy)}))
    inputs = train_time_unet.example_inputs(seed=8)
    output = train_time_unet(**inputs)
    assert (16, 128) in query_lengths and all(q <= 16 for q, _ in query_lengths)  # 128 tokens → 8 chunks
    assert relative_error(output, before(**inputs)) <= 1e-6


@torch.no_grad()
def test_broadcast_temporal_attention_is_exact_and_leaves_no_temporal_matmul(train_time_unet, monkeypatch):
    import torch.nn.functional as F

    before = copy.deepcopy(train_time_unet)
    [result] = run_passes(DeployPipeline(train_time_unet), make_passes(["broadcast_temporal_attention"]))
    temporal = [
        p for p, _ in train_time_unet.named_modules() if p.endswith(".attn1") and ".temporal_transformer_blocks." in p
    ]
    assert temporal
    assert result.changed == f"temporal self-attention as broadcast multiply-and-sum in {len(temporal)} layers"
    sdpa_key_lengths, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        sdpa_key_lengths.append(key.shape[2])
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    inputs = train_time_unet.example_inputs(seed=9)
    output = train_time_unet(**inputs)
    frames = set(train_time_unet.level_frames())
    assert sdpa_key_lengths and not frames & set(sdpa_key_lengths)  # spatial attention only: no F-key SDPA left
    assert relative_error(output, before(**inputs)) <= 1e-5  # fp32 sums in another order (float64: above)


# -- the decoder --------------------------------------------------------------------------------------
@torch.no_grad()
def test_taesd_decoder_decodes_every_frame(train_time_unet):
    pipeline = DeployPipeline(train_time_unet)
    run_passes(pipeline, make_passes(["taesd_decoder"], PassOptions(decoder_seed=3)))
    latents = torch.randn(1, 14, 4, 8, 16)
    frames = pipeline.decoder(latents)
    assert frames.shape == (1, 14, 3, 64, 128)
    assert frames.min() >= 0 and frames.max() <= 1
    # frames are batched, not mixed: frame 5 decodes alone to the same pixels
    alone = pipeline.decoder(latents[:, 5:6])
    torch.testing.assert_close(alone[0, 0], frames[0, 5], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_taesd_decoder_from_local_directory(tmp_path, train_time_unet):
    torch.manual_seed(7)
    taesd = AutoencoderTiny().eval()
    taesd.save_pretrained(tmp_path / "taesd", safe_serialization=True)
    pipeline = DeployPipeline(train_time_unet)
    [result] = run_passes(pipeline, make_passes(["taesd_decoder"], PassOptions(taesd_dir=tmp_path / "taesd")))
    assert "from" in result.changed
    latents = torch.randn(1, 14, 4, 8, 16)
    # SVD's UNet latents are in TAESD's input space already (both scaled by 0.18215): no rescaling
    expected = (taesd.decoder(latents.flatten(0, 1)) + 1) / 2
    torch.testing.assert_close(pipeline.decoder(latents)[0], expected.clamp(0, 1), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_the_recipes_decoder_section_shapes_the_random_init_taesd(train_time_unet):
    """tiny.yaml narrows TAESD (decoder_block_out_channels 16); a recipe without the section gets TAESD's 64."""
    assert train_time_unet.spec.decoder == {"decoder_block_out_channels": [16] * 4, "num_decoder_blocks": [3, 3, 3, 1]}
    for decoder, widths in ((train_time_unet.spec.decoder, {16, 3}), (None, {64, 3})):
        unet = copy.deepcopy(train_time_unet)
        unet.spec = dataclasses.replace(unet.spec, decoder=decoder)
        pipeline = DeployPipeline(unet)
        run_passes(pipeline, make_passes(["taesd_decoder"]))
        assert {m.out_channels for m in pipeline.decoder.modules() if isinstance(m, torch.nn.Conv2d)} == widths
        assert pipeline.decoder(torch.randn(1, 2, 4, 8, 16)).shape == (1, 2, 3, 64, 128)


# -- refusals -----------------------------------------------------------------------------------------
def test_impossible_lists_are_refused_clearly(train_time_unet):
    with pytest.raises(PassError, match="pass 'merge_funnels' is named twice"):
        make_passes(["merge_funnels", "strip_temporal", "merge_funnels"])
    with pytest.raises(PassError, match="unknown pass 'fuse_everything'; known passes: merge_funnels"):
        make_passes(["fuse_everything"])
    fifty_steps = dataclasses.replace(
        train_time_unet.spec, mobilevd=dataclasses.replace(train_time_unet.spec.mobilevd, nfe=50)
    )
    train_time_unet.spec = fifty_steps
    with pytest.raises(PassError, match=r"pass 'fold_conditioning' \(number 2 in the list\) cannot run: needs a fixed"):
        run_passes(DeployPipeline(train_time_unet), make_passes(["merge_funnels", "fold_conditioning"]))
    # called on its own (as the stage table and the pruning policy call passes), the same check
    [fold] = make_passes(["fold_conditioning"])
    with pytest.raises(PassError, match=r"^pass 'fold_conditioning' cannot run: needs a fixed"):
        fold(DeployPipeline(train_time_unet))
    assert not train_time_unet.conditioning_folded


class _BreaksTheModel(Pass):
    name = "break_it"

    def call(self, pipeline):
        with torch.no_grad():
            pipeline.unet.conv_out.bias.add_(0.1)
        return "nudged conv_out"


def test_a_pass_that_breaks_equivalence_is_stopped(train_time_unet):
    with pytest.raises(PassError, match=r"pass 'break_it' broke equivalence: max abs error 0\.1"):
        run_passes(DeployPipeline(train_time_unet), make_passes(["merge_funnels"]) + [_BreaksTheModel()])


def test_cli_passes_json_and_errors(tmp_path, train_time_unet):
    save_checkpoint(train_time_unet, tmp_path / "ck")
    result = CliRunner().invoke(main, ["passes", str(tmp_path / "ck"), "--json", "--keep-conditioning-inputs"])
    assert result.exit_code == 0, result.output
    log = json.loads(result.stdout)
    assert [r["name"] for r in log] == [
        "merge_funnels",
        "strip_temporal",
        "frames_as_batch",
        "single_token_cross_attention",
        "fold_sampler",
        "chunk_attention",
        "broadcast_temporal_attention",
        "taesd_decoder",
    ]
    # every exact pass that changed something was checked (a figure, not None), and only those
    checked = [r["rel_error"] is not None for r in log]
    assert checked == [r["exact"] and bool(r["changed"]) for r in log] and any(checked)
    bad = CliRunner().invoke(main, ["passes", str(tmp_path / "ck"), "--passes", "strip_temporal,strip_temporal"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: pass 'strip_temporal' is named"
    )


def test_pass_list_comes_from_the_option_then_the_checkpoint(tmp_path, train_time_unet):
    from mvd_deploy.deploy import deploy_checkpoint

    none_configured = dataclasses.replace(train_time_unet.spec.mobilevd, deploy_passes=())
    train_time_unet.spec = dataclasses.replace(train_time_unet.spec, mobilevd=none_configured)
    save_checkpoint(train_time_unet, tmp_path / "ck")
    results = deploy_checkpoint(tmp_path / "ck").passes
    assert results == []  # an empty list in the checkpoint means: deploy as it is
    results = deploy_checkpoint(tmp_path / "ck", passes=["strip_temporal"]).passes
    assert [r.name for r in results] == ["strip_temporal"]


# -- the stages table ---------------------------------------------------------------------------------
def test_tiny_stage_table_only_goes_down():
    from mvd_deploy.stages import stage_table

    rows = stage_table(tiny_spec())
    flops = [r["flops"] for r in rows]
    assert all(b <= a for a, b in zip(flops, flops[1:], strict=False))
    by_id = {r["id"]: r["flops"] for r in rows}
    assert by_id["cross_attention"] < by_id["svd"]
    assert by_id["multiscaling"] < by_id["one_step"]
    assert by_id["pruning"] < by_id["multiscaling"]
    assert by_id["funnels"] < by_id["pruning"]
    assert all(r["paper_tflops"] is None for r in rows)  # tiny is not the paper's model


def test_stages_use_a_checkpoints_trained_flags(tmp_path, train_time_unet):
    save_checkpoint(train_time_unet, tmp_path / "ck")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "ck"), "--stages", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {"stage", "tflops", "params"} <= set(rows[0])
    assert isinstance(rows[0]["tflops"], float) and isinstance(rows[0]["params"], int)
    pruning = next(r for r in rows if r["id"] == "pruning")
    assert pruning["stage"] == "+ temporal block pruning (25/38)"  # every third kept: 13 of 38
    cheapest = next(r for r in _recipe_stages() if r["id"] == "pruning")
    assert pruning["flops"] != cheapest["flops"]


def _recipe_stages():
    from mvd_deploy.stages import stage_table

    return stage_table(tiny_spec(funnel_layers=("spatial_self_attention", "temporal_self_attention")))


def test_a_checkpoint_deployed_again_reuses_its_flop_counts(tmp_path, train_time_unet, monkeypatch):
    """FLOPs are a function of the spec and the passes applied: counted once per process for each,
    the same figures either way; a hand-changed pipeline (no origin) is counted every time."""
    from mvd_deploy.deploy import deploy_checkpoint
    from mvd_deploy.passes import manager

    monkeypatch.setattr(manager, "_FLOPS", {})
    counted = []
    real = DeployPipeline.flops
    monkeypatch.setattr(DeployPipeline, "flops", lambda self, c: counted.append(c) or real(self, c))
    save_checkpoint(train_time_unet, tmp_path / "ck")

    first = deploy_checkpoint(tmp_path / "ck", passes=["merge_funnels", "strip_temporal"]).passes
    assert counted == ["unet"] * 3
    again = deploy_checkpoint(tmp_path / "ck", passes=["merge_funnels", "strip_temporal", "frames_as_batch"]).passes
    assert counted == ["unet"] * 4  # only the new prefix (+ frames_as_batch) is counted
    assert [r.to_dict() | {"seconds": 0} for r in again[:2]] == [r.to_dict() | {"seconds": 0} for r in first]
    assert first[0].flops_after < first[0].flops_before  # merge_funnels: its own figure, not its input's

    other = dataclasses.replace(train_time_unet.spec.mobilevd, temporal_multiscaling=False)
    train_time_unet.spec = dataclasses.replace(train_time_unet.spec, mobilevd=other)
    save_checkpoint(train_time_unet, tmp_path / "other")
    deploy_checkpoint(tmp_path / "other", passes=["merge_funnels"])
    assert counted == ["unet"] * 6  # another spec: counted afresh
    run_passes(DeployPipeline(train_time_unet), make_passes(["merge_funnels"]))
    assert counted == ["unet"] * 8  # no origin: counted
