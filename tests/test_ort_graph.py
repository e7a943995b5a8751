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
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    from mvd_deploy.onnx_tools import ort_session

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
    }
    feed = {"sample": inputs["sample"].numpy()}
    np.testing.assert_array_equal(run_onnx(tmp_path / "rewritten.onnx", feed), run_onnx(source, feed))

    class Samples(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(
                [{"sample": np.random.default_rng(i).standard_normal((1, 8, 16, 16), np.float32)} for i in range(2)]
            )

        def get_next(self):
            return next(self.samples, None)

    quantized, compiled = tmp_path / "int8.onnx", tmp_path / "compiled.onnx"
    quantize_static(
        tmp_path / "rewritten.onnx",
        quantized,
        Samples(),
        op_types_to_quantize=["Conv"],
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    ort_session(quantized, optimization="extended", optimized_path=compiled)
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
