"""The train-time MobileVD UNet against diffusers' own SVD UNet and against its own contracts."""

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.resnet import AlphaBlender

from helpers import relative_error, tiny_spec
from mvd_deploy.model.funnel import FunnelLinear, coupled_singular_init
from mvd_deploy.model.unet import MobileVDUNet


def _pair(spec):
    """(MobileVD model, diffusers model) with identical weights."""
    base = UNetSpatioTemporalConditionModel(**spec.unet).eval()
    reference = UNetSpatioTemporalConditionModel(**spec.unet).eval()
    reference.load_state_dict(base.state_dict())
    return MobileVDUNet(base, spec).eval(), reference


@torch.no_grad()
def test_all_kept_no_funnels_no_multiscaling_is_diffusers_svd():
    spec = tiny_spec(funnel_layers=(), temporal_multiscaling=False, temporal_prune_fraction=0.0)
    model, reference = _pair(spec)
    inputs = model.example_inputs()
    assert torch.equal(model(**inputs), reference(**inputs, return_dict=False)[0])


@torch.no_grad()
def test_gates_off_equal_spatial_path():
    """With every gate off, the model equals diffusers' UNet whose blenders pass only the spatial path."""
    spec = tiny_spec(funnel_layers=(), temporal_multiscaling=False, temporal_prune_fraction=1.0)
    model, reference = _pair(spec)
    assert all(not g.keep for g in spec.mobilevd.temporal_gates.values())
    for blender in reference.modules():
        if isinstance(blender, AlphaBlender):
            blender.mix_factor.fill_(1e4)  # sigmoid → exactly 1.0: out = 1·spatial + 0·temporal
    inputs = model.example_inputs()
    assert torch.equal(model(**inputs), reference(**inputs, return_dict=False)[0])


@torch.no_grad()
def test_single_gate_off_equals_spatial_path_of_that_unit():
    spec = tiny_spec(funnel_layers=(), temporal_multiscaling=False, temporal_prune_fraction=0.0)
    model, _ = _pair(spec)
    unit = model.down_blocks[1].resnets[0]
    x = torch.randn(14, 32, 4, 8)
    temb = torch.randn(14, 128)
    indicator = torch.zeros(1, 14)
    with_temporal = unit(x, temb, image_only_indicator=indicator)
    unit.keep_temporal = False
    spatial_only = unit(x, temb, image_only_indicator=indicator)
    assert torch.equal(spatial_only, unit.spatial_res_block(x, temb))
    assert not torch.allclose(with_temporal, spatial_only)  # the gate did change something


def test_multiscaled_levels_see_7_of_14_frames():
    spec = tiny_spec()
    model = MobileVDUNet.build(spec).eval()
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = (kwargs["image_only_indicator"].shape[-1], kwargs["hidden_states"].shape[0])

        return hook

    blocks = {f"down_blocks.{i}": b for i, b in enumerate(model.down_blocks)}
    blocks |= {f"up_blocks.{i}": b for i, b in enumerate(model.up_blocks)} | {"mid_block": model.mid_block}
    for name, block in blocks.items():
        block.register_forward_pre_hook(record(name), with_kwargs=True)
    with torch.no_grad():
        out = model(**model.example_inputs())
    assert out.shape == (1, 14, 4, 8, 16)
    assert seen["down_blocks.0"] == (14, 14) and seen["up_blocks.3"] == (14, 14)
    for name in (
        "down_blocks.1",
        "down_blocks.2",
        "down_blocks.3",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ):
        assert seen[name] == (7, 7), name
    assert model.level_frames() == [14, 7, 7, 7]


def test_funnel_widths():
    spec = tiny_spec()
    model = MobileVDUNet.build(spec, device="meta")
    funnelled = model.funnel_attentions(("spatial_self_attention",))
    assert len(funnelled) == 16  # one self-attention per spatial transformer block
    for attn in funnelled:
        width = attn.to_q.out_features
        for proj in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            assert isinstance(proj, FunnelLinear)
            assert proj.inner == width // 2
    for attn in model.funnel_attentions(("temporal_self_attention",)):
        assert type(attn.to_q) is torch.nn.Linear  # the recipe funnels spatial self-attention only
    # 0.5 × 32 channels in 2 heads → 16 = 2 heads × 8
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.funnel.shape == (16, 32)


@pytest.mark.parametrize("side", ["output", "input"])
@torch.no_grad()
def test_funnel_linear_merges_to_a_plain_linear(side):
    f = FunnelLinear.wrap(torch.nn.Linear(24, 16), 8, side)
    torch.nn.init.normal_(f.funnel)
    x = torch.randn(5, 24 if side == "output" else 8)  # an input-side funnel reads the reduced width
    merged = f.merged()
    assert type(merged) is torch.nn.Linear
    assert merged.weight.shape == ((8, 24) if side == "output" else (16, 8))
    torch.testing.assert_close(merged(x), f(x), rtol=1e-5, atol=1e-5)


def test_coupled_singular_init_is_the_best_low_rank_product():
    torch.manual_seed(1)
    x, y = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 30, dtype=torch.float64)
    full = x.T @ y
    fx, fy = coupled_singular_init(x, y, 16)
    torch.testing.assert_close((fx @ x).T @ (fy @ y), full, rtol=1e-10, atol=1e-10)
    fx, fy = coupled_singular_init(x, y, 6)
    err = torch.linalg.matrix_norm((fx @ x).T @ (fy @ y) - full) ** 2
    tail = (torch.linalg.svdvals(full)[6:] ** 2).sum()  # Eckart–Young: the optimum
    torch.testing.assert_close(err, tail, rtol=1e-8, atol=1e-8)


@torch.no_grad()
def test_full_width_csi_funnels_reproduce_the_attention():
    spec = tiny_spec(
        fun_factor=1.0,
        funnel_layers=("spatial_self_attention", "temporal_self_attention"),
        temporal_multiscaling=False,
        temporal_prune_fraction=0.0,
    )
    model, reference = _pair(spec)  # funnels start from coupled singular init
    inputs = model.example_inputs()
    assert relative_error(model(**inputs), reference(**inputs, return_dict=False)[0]) < 1e-5


@torch.no_grad()
def test_half_width_funnels_change_the_output_but_not_wildly():
    spec = tiny_spec(temporal_multiscaling=False, temporal_prune_fraction=0.0)
    model, reference = _pair(spec)  # funnels start from coupled singular init
    inputs = model.example_inputs()
    err = relative_error(model(**inputs), reference(**inputs, return_dict=False)[0])
    assert 1e-4 < err < 1.0


def test_meta_build_allocates_nothing():
    model = MobileVDUNet.build(tiny_spec(), device="meta")
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"meta"}


def test_rank3_temporal_resampling_is_the_frame_pair_mean_and_repeat():
    """The HTP-friendly rank-3 forms compute exactly the natural (B, F/2, 2, C, H, W) forms."""
    from mvd_deploy.model.unet import temporal_downsample, temporal_upsample

    batch, frames = 2, 14
    x = torch.randn(batch * frames, 5, 4, 6, dtype=torch.float64)
    pairs = x.unflatten(0, (batch, frames // 2, 2)).mean(dim=2).flatten(0, 1)
    assert torch.equal(temporal_downsample(x, frames), pairs)
    repeated = pairs.unflatten(0, (batch, frames // 2)).repeat_interleave(2, dim=1).flatten(0, 1)
    assert torch.equal(temporal_upsample(pairs, frames // 2), repeated)
    assert temporal_upsample(pairs, frames // 2).shape == x.shape
