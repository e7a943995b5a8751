"""The export rewritten for ONNX Runtime's CPU (mvd_deploy/backends/ort_graph.py): each attention form
the deploy passes export becomes one MultiHeadAttention, equal to the exported graph in fp32; anything
else (a mask on the scores) is left as exported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mvd_deploy.backends.ort_graph import rewrite_for_ort
from mvd_deploy.metrics import psnr_db
from mvd_deploy.onnx_tools import export_onnx, run_onnx, simplify_onnx
from mvd_deploy.passes.broadcast_temporal_attention import BroadcastSelfAttnProcessor
from mvd_deploy.passes.chunk_attention import ChunkedSelfAttnProcessor


class AttentionLayer(torch.nn.Module):
    def __init__(self, processor, cross: bool = False, masked: bool = False):
        super().__init__()
        self.attn = Attention(32, cross_attention_dim=24 if cross else None, heads=2, dim_head=16)
        self.attn.set_processor(processor)
        self.cross, self.masked = cross, masked

    def forward(self, hidden_states, context):
        kwargs = {"encoder_hidden_states": context} if self.cross else {}
        if self.masked:  # an additive mask on the scores: not what MultiHeadAttention is given here
            batch, tokens, _ = hidden_states.shape
            kwargs["attention_mask"] = torch.triu(torch.full((tokens, tokens), -1e4), 1).expand(batch, -1, -1)
        return self.attn(hidden_states, **kwargs)


CASES = {
    # name: (processor, cross-attention, masked, attentions fused)
    "sdpa": (AttnProcessor2_0(), False, False, 1),
    "query_chunks": (ChunkedSelfAttnProcessor(16), False, False, 1),  # 64 tokens: 4 score maps, 1 attention
    "broadcast_frames": (BroadcastSelfAttnProcessor(), False, False, 1),
    "cross": (AttnProcessor2_0(), True, False, 1),
    "masked": (AttnProcessor2_0(), False, True, 0),
}


@pytest.mark.parametrize("case", CASES)
def test_each_exported_attention_form_fuses_to_one_equal_node(case, tmp_path):
    processor, cross, masked, fused = CASES[case]
    torch.manual_seed(0)
    layer = AttentionLayer(processor, cross, masked).eval()
    tokens = 14 if case == "broadcast_frames" else 64  # the broadcast form attends over frames
    inputs = {"hidden_states": torch.randn(3, tokens, 32), "context": torch.randn(3, 5, 24)}
    source = tmp_path / "attention.onnx"
    export_onnx(layer, inputs, "out", source)
    simplify_onnx(source)
    exported = onnx.load(str(source), load_external_data=False).graph
    softmaxes = sum(node.op_type == "Softmax" for node in exported.node)
    feed = {name: x.numpy() for name, x in inputs.items() if name in {i.name for i in exported.input}}

    result = rewrite_for_ort(source, tmp_path / "fused.onnx")

    assert result["attention"] == {"fused": fused, "softmax_left": 0 if fused else softmaxes}
    graph = onnx.load(str(tmp_path / "fused.onnx"), load_external_data=False).graph
    attention = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert len(attention) == fused
    if fused:
        [node] = attention
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == 2 and attrs["scale"] == pytest.approx(16**-0.5)
        assert {"MatMul", "Softmax"} & {n.op_type for n in graph.node} == {"MatMul"}  # projections only
    expected = run_onnx(source, feed)
    actual = run_onnx(tmp_path / "fused.onnx", feed)
    # only the order of fp32 sums differs (flash attention's tiles): far above the 60 dB asked of fusions
    assert psnr_db(actual, expected) >= 100.0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


class SharedConvInput(torch.nn.Module):
    """A convolution whose input also feeds the residual path (as a downsampler's or shortcut's does)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, sample):
        hidden = torch.relu(sample)
        return self.conv(hidden) + hidden


def test_shared_convolution_inputs_get_their_own_and_quantize(tmp_path):
    """ORT's static quantizer would give the Q/DQ pair of a shared input to every reader; isolated, the
    convolution compiles to QLinearConv, and the float graph is unchanged."""

    torch.manual_seed(0)
    inputs = {"sample": torch.randn(1, 8, 16, 16)}
    source = tmp_path / "model.onnx"
    export_onnx(SharedConvInput().eval(), inputs, "out", source)
    result = rewrite_for_ort(source, tmp_path / "rewritten.onnx")
    assert result == {
        "attention": {"fused": 0, "softmax_left": 0},
        "gelu_fused": 0,
        "conv_inputs_isolated": 1,
        "geglu_split": 0,
        "row_chunks": [],
        "expands_broadcast": 0,
    }
    feed = {"sample": inputs["sample"].numpy()}
    np.testing.assert_array_equal(run_onnx(tmp_path / "rewritten.onnx", feed), run_onnx(source, feed))

    compiled = _static_convolutions(tmp_path / "rewritten.onnx", {"sample": (1, 8, 16, 16)}, tmp_path)
    ops = [node.op_type for node in onnx.load(str(compiled)).graph.node]
    assert ops.count("QLinearConv") == 1 and "Conv" not in ops and "Identity" not in ops


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_exported_gelu_fuses_to_one_equal_node(approximate, tmp_path):
    """diffusers' GEGLU (the UNet's feed-forward): erf GELU becomes com.microsoft.Gelu; the tanh
    approximation is another function and stays as exported. Either way the projection is computed as
    its two halves (no Split), by the weight's own column halves."""
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(32, 64)
    geglu.gelu = lambda gate: torch.nn.functional.gelu(gate, approximate=approximate)
    inputs = {"hidden_states": torch.randn(2, 16, 32)}
    source = tmp_path / "geglu.onnx"
    export_onnx(geglu.eval(), inputs, "out", source)
    simplify_onnx(source)
    result = rewrite_for_ort(source, tmp_path / "rewritten.onnx")
    fused = approximate == "none"
    assert result["gelu_fused"] == int(fused)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "rewritten.onnx"), load_external_data=False).graph.node]
    assert ops.count("Gelu") == int(fused) and "Erf" not in ops and ("Tanh" in ops) == (not fused)
    assert result["geglu_split"] == 1 and "Split" not in ops and ops.count("MatMul") == 2
    halves = {
        t.name: onnx.numpy_helper.to_array(t, base_dir=str(tmp_path))
        for t in onnx.load(str(tmp_path / "rewritten.onnx"), load_external_data=False).graph.initializer
        if "/half" in t.name
    }
    weight = geglu.proj.weight.detach().numpy().T  # (in, 2·inner): hidden's columns, then the gate's
    assert sorted(h.shape for h in halves.values()) == [(32, 64), (32, 64), (64,), (64,)]
    np.testing.assert_array_equal(np.hstack([halves[n] for n in sorted(halves) if halves[n].ndim == 2]), weight)
    feed = {"hidden_states": inputs["hidden_states"].numpy()}
    expected, actual = run_onnx(source, feed), run_onnx(tmp_path / "rewritten.onnx", feed)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_wide_feed_forward_runs_in_row_chunks_equal_to_whole(tmp_path, monkeypatch):
    """A feed-forward wider than ROW_CHUNK_BYTES runs on row slices of its input, each slice
    through its own copy of the nodes (one set of weights, quantised once), the slices concatenated:
    the same output as the whole."""
    from diffusers.models.attention import FeedForward
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mvd_deploy.backends import ort_graph

    torch.manual_seed(0)
    ff = FeedForward(32, activation_fn="geglu").eval()  # inner 128: projections 256 wide
    inputs = {"hidden_states": torch.randn(2, 16, 32)}
    source = tmp_path / "ff.onnx"
    export_onnx(ff, inputs, "out", source)
    simplify_onnx(source)
    whole = rewrite_for_ort(source, tmp_path / "whole.onnx")
    assert whole["geglu_split"] == 1 and whole["row_chunks"] == []  # 32 KiB: far below the default
    monkeypatch.setattr(ort_graph, "ROW_CHUNK_BYTES", 8 << 10)
    result = rewrite_for_ort(source, tmp_path / "chunked.onnx")
    assert result["row_chunks"] == [4]  # 2·16 rows × 256 × 4 bytes / 8 KiB; 2 frames < 4: by tokens
    graph = onnx.load(str(tmp_path / "chunked.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Slice") == 4 and ops.count("Concat") == 1 and ops.count("MatMul") == 3 * 4
    assert ops.count("Gelu") == 4
    feed = {"hidden_states": inputs["hidden_states"].numpy()}
    expected = run_onnx(source, feed)
    np.testing.assert_allclose(run_onnx(tmp_path / "chunked.onnx", feed), expected, rtol=1e-5, atol=1e-6)
    assert psnr_db(run_onnx(tmp_path / "chunked.onnx", feed), run_onnx(tmp_path / "whole.onnx", feed)) >= 100
    # compiled as ort-cpu compiles: the slices stay one per chunk (not one Split making them all at once)
    from mvd_deploy.onnx_tools import ort_session

    ort_session(tmp_path / "chunked.onnx", optimization="extended", optimized_path=tmp_path / "compiled.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "compiled.onnx"), load_external_data=False).graph.node]
    assert ops.count("Slice") == 4 and "Split" not in ops

    weights = {}
    for name in ("whole", "chunked"):
        quantized = tmp_path / f"{name}.int8.onnx"
        quantize_dynamic(tmp_path / f"{name}.onnx", quantized, weight_type=QuantType.QInt8)
        model = onnx.load(str(quantized))
        int8 = onnx.TensorProto.INT8
        weights[name] = sorted(t.name for t in model.graph.initializer if t.data_type == int8 and len(t.dims) == 2)
    assert len(weights["chunked"]) == 3 and weights["chunked"] == weights["whole"]


class ExpandedRow(torch.nn.Module):
    """The single-token cross-attention's form: one row per frame expanded over the tokens and added;
    and an expanded row summed over the tokens (not a broadcasting reader: it stays)."""

    def forward(self, hidden_states, row):
        frames, tokens, hidden = hidden_states.shape
        added = hidden_states + row.expand(frames, tokens, hidden)
        return added + (2 * row).expand(frames, tokens, hidden).cumsum(1)


def test_expand_read_by_a_broadcasting_add_is_left_to_the_add(tmp_path):
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(3, 16, 8), "row": torch.randn(3, 1, 8)}
    source = tmp_path / "expand.onnx"
    export_onnx(ExpandedRow().eval(), inputs, "out", source)
    simplify_onnx(source)
    ops = [n.op_type for n in onnx.load(str(source)).graph.node]
    assert ops.count("Expand") == 2
    result = rewrite_for_ort(source, tmp_path / "rewritten.onnx")
    assert result["expands_broadcast"] == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "rewritten.onnx")).graph.node]
    assert ops.count("Expand") == 1 and ops.count("Add") == 2
    feed = {name: value.numpy() for name, value in inputs.items()}
    import onnxruntime as ort

    expected = ort.InferenceSession(str(source)).run(None, feed)
    actual = ort.InferenceSession(str(tmp_path / "rewritten.onnx")).run(None, feed)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("case", ["sdpa", "broadcast_frames", "cross"])
def test_wide_self_attention_runs_in_batch_chunks_equal_to_whole(case, tmp_path, monkeypatch):
    """A self-attention (q, k, v projections of one input, MultiHeadAttention, output projection) runs
    on whole batch items of its input, the same output as the whole; a cross-attention (k, v from the
    context) is not a row block and stays whole."""
    from mvd_deploy.backends import ort_graph

    processor, cross, _, _ = CASES[case]
    torch.manual_seed(0)
    tokens = 14 if case == "broadcast_frames" else 64
    inputs = {"hidden_states": torch.randn(4, tokens, 32), "context": torch.randn(4, 5, 24)}
    source = tmp_path / "attention.onnx"
    export_onnx(AttentionLayer(processor, cross).eval(), inputs, "out", source)
    simplify_onnx(source)
    exported = onnx.load(str(source), load_external_data=False).graph
    feed = {name: x.numpy() for name, x in inputs.items() if name in {i.name for i in exported.input}}
    whole = rewrite_for_ort(source, tmp_path / "whole.onnx")
    assert whole["attention"]["fused"] == 1 and whole["row_chunks"] == []
    # q, k, v: 4·tokens rows × 3·32 columns × 4 bytes, in 2 chunks of 2 batch items
    monkeypatch.setattr(ort_graph, "ROW_CHUNK_BYTES", 4 * tokens * 96 * 4 // 2)
    result = rewrite_for_ort(source, tmp_path / "chunked.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "chunked.onnx"), load_external_data=False).graph.node]
    if cross:
        assert result["row_chunks"] == [] and ops.count("MultiHeadAttention") == 1 and "Slice" not in ops
        return
    assert result["row_chunks"] == [2]
    assert ops.count("MultiHeadAttention") == 2 and ops.count("Slice") == 2 and ops.count("Concat") == 1
    slices = [n for n in onnx.load(str(tmp_path / "chunked.onnx")).graph.node if n.op_type == "Slice"]
    initializers = {t.name: t for t in onnx.load(str(tmp_path / "chunked.onnx")).graph.initializer}
    assert {int(onnx.numpy_helper.to_array(initializers[s.input[3]])[0]) for s in slices} == {0}  # the batch axis
    chunked, expected = run_onnx(tmp_path / "chunked.onnx", feed), run_onnx(tmp_path / "whole.onnx", feed)
    np.testing.assert_allclose(chunked, expected, rtol=1e-5, atol=1e-6)
    assert psnr_db(chunked, run_onnx(source, feed)) >= 100.0
    # ORT's quantizer needs every MatMul input's type: the slices carry theirs
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(tmp_path / "chunked.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx"), load_external_data=False).graph.node]
    assert ops.count("DynamicQuantizeLinear") > 0 and ops.count("MultiHeadAttention") == 2


class NormConv(torch.nn.Module):
    """An up block's resnet start: the concatenated skip, GroupNorm, SiLU and a convolution (the UNet's
    widest tensors), and a 1×1 shortcut that reads the concatenation too."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 16)
        self.conv = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(16, 8, 1)

    def forward(self, sample, skip):
        x = torch.cat([sample, skip], dim=1)
        return self.conv(torch.nn.functional.silu(self.norm(x))) + self.shortcut(x)


def test_wide_group_norm_and_convolution_run_in_batch_chunks_equal_to_whole(tmp_path, monkeypatch):
    """GroupNorm (with its batch-sized reshape), SiLU and the convolution they feed run on whole batch
    items, the same output as the whole, and still quantise to QLinearConv."""

    from mvd_deploy.backends import ort_graph

    torch.manual_seed(0)
    module = NormConv().eval()
    torch.nn.init.normal_(module.norm.weight)
    torch.nn.init.normal_(module.norm.bias)
    inputs = {"sample": torch.randn(4, 8, 8, 8), "skip": torch.randn(4, 8, 8, 8)}
    source = tmp_path / "norm_conv.onnx"
    export_onnx(module, inputs, "out", source)
    simplify_onnx(source)
    feed = {name: x.numpy() for name, x in inputs.items()}
    assert rewrite_for_ort(source, tmp_path / "whole.onnx")["row_chunks"] == []
    monkeypatch.setattr(ort_graph, "ROW_CHUNK_BYTES", 8 << 10)  # x: 16 KiB; with the normalised copies 32
    result = rewrite_for_ort(source, tmp_path / "chunked.onnx")
    assert result["row_chunks"] == [4]  # one batch item each; the shortcut (no norm) stays whole
    ops = [n.op_type for n in onnx.load(str(tmp_path / "chunked.onnx"), load_external_data=False).graph.node]
    assert ops.count("Slice") == 4 and ops.count("InstanceNormalization") == 4 and ops.count("Conv") == 5
    chunked, whole = run_onnx(tmp_path / "chunked.onnx", feed), run_onnx(tmp_path / "whole.onnx", feed)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    assert psnr_db(chunked, run_onnx(source, feed)) >= 100.0

    shapes = {name: (4, 8, 8, 8) for name in feed}
    compiled = _static_convolutions(tmp_path / "chunked.onnx", shapes, tmp_path)
    ops = [node.op_type for node in onnx.load(str(compiled)).graph.node]
    assert ops.count("QLinearConv") == 5 and "Conv" not in ops


class TwoNormConvs(torch.nn.Module):
    """Two GroupNorm → SiLU → convolution blocks of one shape: the export shares their reshapes' shapes."""

    def __init__(self):
        super().__init__()
        self.norms = torch.nn.ModuleList([torch.nn.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)])
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)])

    def forward(self, sample):
        for norm, conv in zip(self.norms, self.convs, strict=True):
            sample = conv(torch.nn.functional.silu(norm(sample)))
        return sample


def test_blocks_sharing_reshape_shapes_get_their_own_chunk_shapes(tmp_path, monkeypatch):
    """Each chunked block names its own slices and per-chunk reshape shapes. Here the second block reads
    the first's output, and both read the same shape constants: no name is defined twice (ORT refuses
    a tensor made twice, and warns of an initializer given twice), and the output is the whole's."""
    from mvd_deploy.backends import ort_graph

    torch.manual_seed(0)
    inputs = {"sample": torch.randn(4, 16, 8, 8)}
    source = tmp_path / "two.onnx"
    export_onnx(TwoNormConvs().eval(), inputs, "out", source)
    simplify_onnx(source)
    monkeypatch.setattr(ort_graph, "ROW_CHUNK_BYTES", 8 << 10)
    assert rewrite_for_ort(source, tmp_path / "chunked.onnx")["row_chunks"] == [4, 4]
    graph = onnx.load(str(tmp_path / "chunked.onnx"), load_external_data=False).graph
    names = [t.name for t in graph.initializer]
    assert len(names) == len(set(names))
    feed = {"sample": inputs["sample"].numpy()}
    np.testing.assert_allclose(run_onnx(tmp_path / "chunked.onnx", feed), run_onnx(source, feed), rtol=1e-5, atol=1e-5)


def _static_convolutions(source, shapes: dict, tmp_path):
    """``source`` with its convolutions static int8 as ort-cpu's int8-static quantises them (u8
    activations, per-channel s8 weights; 2 random calibration samples), compiled by ORT; its path."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    from mvd_deploy.onnx_tools import ort_session

    class Samples(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.samples = iter(
                [{n: rng.standard_normal(shape, np.float32) for n, shape in shapes.items()} for _ in range(2)]
            )

        def get_next(self):
            return next(self.samples, None)

    quantized, compiled = tmp_path / "int8.onnx", tmp_path / "compiled.onnx"
    quantize_static(
        source,
        quantized,
        Samples(),
        op_types_to_quantize=["Conv"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    ort_session(quantized, optimization="extended", optimized_path=compiled)
    return compiled
