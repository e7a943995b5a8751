"""The exported graph rewritten for ONNX Runtime's CPU (the ort-cpu compiled forms only; the export stays
the portable opset-18 graph the NPU path compiles). Six rewrites, each exact up to fp32 rounding:

**Fused attention.** The exported attention is MatMul → Softmax → MatMul between head-splitting
reshapes (spatial self-attention, in query chunks after ``chunk_attention``) or broadcast
multiply-and-sum over the frames (``broadcast_temporal_attention``); on the CPU both materialise every
score (the temporal form a (F, F, pixels·heads, head_dim) product: 514 MiB per layer at full size).
ONNX Runtime's CPU ``com.microsoft.MultiHeadAttention`` runs flash attention (MLAS, score tiles sized
to the L2 cache) when given plain (batch, tokens, heads·head_dim) q, k, v and no mask, past or present:
each attention's q, k and v projections feed one such node, whose output replaces the merged-heads
tensor the exported graph computes. Matching checks meaning, not op sequences: every chain of
reshapes, transposes, unsqueezes, splits and scalar multiplies between a projection and the score
MatMul (or from the attention's output to the merged heads) is replayed on an index array and must
move elements exactly as the head split (merge) does. Anything else — a mask, a bias on the scores,
another layout — is left as exported.

**Fused GELU.** The exporter writes GELU as x · (0.5 · (1 + erf(x / √2))), an order ORT's own GELU
fusion does not match (it wants (x · 0.5) · (1 + erf(x / √2))): five elementwise passes over the
feed-forward's widest tensor become one ``com.microsoft.Gelu``.

**Convolutions with inputs of their own.** ORT's static quantizer puts one Quantize/Dequantize pair on
a convolution's input and gives the dequantised tensor to every consumer. Where the input also feeds
a skip connection or a norm (downsamplers, the up blocks' 1×1 shortcuts: 18 of the full-size UNet's
66), ORT then cannot fuse the pair into QLinearConv — the convolution stays float behind a Q/DQ round
trip — and the other consumers get the rounded tensor. An Identity in front of each such convolution
keeps the pair its own; ORT's optimiser removes the Identity from the float forms.

**GEGLU projections in two halves.** The feed-forward's projection makes one (tokens, 2·inner) tensor
and a Split copies out its halves (hidden, gate): the full-size UNet's widest tensors, 294 MB and two
of 147 MB alive together. Two projections by the weight's column halves give the halves directly (the
same products, the same weight bytes): no copy, and a lower peak. The halves' weights are the one thing
written (``<out>.data`` beside the rewritten model); every other weight stays where the export put it.

**Row blocks in chunks.** Even in halves, a feed-forward's hidden, gate and product are the widest
tensors of a call (147 MB each in the full-size UNet's first blocks), alive together; then come a
self-attention's q, k, v and output, and the last up block's GroupNorm over its 110 MB concatenated
skip. Every op between a feed-forward's input projections and its output projection works row by row
(token by token); a self-attention's MultiHeadAttention, and a GroupNorm → SiLU → convolution, batch
item by batch item (frame, or pixel for attention over the frames). So each such block whose widest
set of tensors exceeds ``ROW_CHUNK_BYTES`` runs on slices of its input's rows (whole batch items where
it attends or convolves), one copy of its nodes per slice reading the same weights (a reshape that
names the batch gets the slice's), and concatenates the slices' outputs.

**Broadcasts instead of Expands.** The single-token cross-attention adds one (frames, 1, hidden) row
per frame to every token, through an Expand to the full (frames, tokens, hidden) tensor (36.7 MB at
full size). It depends only on the conditioning, so ONNX Runtime computes it at the start of the call
and holds it until its Add, far into the UNet: several were alive at the peak. An elementwise reader
whose other input already has the Expand's shape broadcasts the row itself, to the same sums.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_VIEW_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Split"}
# Ops that compute each row (token) of their output from that row of their inputs alone, given
# constants of at most one axis (a scalar, a bias over the last axis).
_ROW_WISE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu"}
# At most this much of a row block's input projections' outputs in one chunk.
ROW_CHUNK_BYTES = 64 << 20


@dataclass
class _Piece:
    """One score map's share of an attention: which queries (rows) of which q, k, v it covers."""

    query: str  # the (batch, tokens, heads·head_dim) projections
    key: str
    value: str
    heads: int
    rows: tuple[int, int]
    scale: float
    output: str  # this piece's output, in the layout its kind gives it
    kind: str  # "sdpa": (batch, heads, rows, head_dim) | "broadcast": (frames, batch·heads, head_dim)
    scores: object  # the score node, whose name (and module) the fused node takes


class _Graph:
    def __init__(self, model, base_dir: Path):
        self.model, self.base_dir = model, base_dir
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.dims = {}
        for info in [*graph.value_info, *graph.input, *graph.output]:
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
                self.dims[info.name] = (tuple(d.dim_value for d in tensor_type.shape.dim), tensor_type.elem_type)
        for t in graph.initializer:
            self.dims[t.name] = (tuple(t.dims), t.data_type)

    def constant(self, name: str) -> np.ndarray | None:
        """A small constant's value (shapes, axes, scalars); None for anything else — weights are
        never read."""
        from onnx import helper, numpy_helper

        if name in self.initializers:
            tensor = self.initializers[name]
            if int(np.prod(tensor.dims)) > 64:
                return None
            return numpy_helper.to_array(tensor, base_dir=str(self.base_dir))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.dims.get(name, (None, None))[0]

    def is_float(self, name: str) -> bool:
        from onnx import TensorProto

        return self.dims.get(name, (None, None))[1] == TensorProto.FLOAT

    def sole_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def scalar(self, node) -> tuple[str, float] | None:
        """(the other input, the factor) of a Mul by a one-element constant."""
        if node.op_type != "Mul":
            return None
        for i, j in ((0, 1), (1, 0)):
            value = self.constant(node.input[j])
            if value is not None and value.size == 1:
                return node.input[i], float(value.reshape(()))
        return None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _replay(g: _Graph, node, index: int, x: np.ndarray) -> np.ndarray | None:
    """``node``'s output ``index`` for input ``x`` (a view op or a scalar Mul: elements only move)."""
    op = node.op_type
    if op == "Mul":
        return x
    if op == "Transpose":
        return x.transpose(_attr(node, "perm", list(range(x.ndim))[::-1]))
    axes_input = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if op == "Reshape":
        shape = [int(s) for s in axes_input]
        if not _attr(node, "allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Unsqueeze":
        rank = x.ndim + len(axes_input)
        for axis in sorted(int(a) % rank for a in axes_input):
            x = np.expand_dims(x, axis)
        return x
    if op == "Squeeze":
        return x.squeeze(tuple(int(a) % x.ndim for a in axes_input)) if axes_input is not None else x.squeeze()
    if op == "Split":
        axis = _attr(node, "axis", 0) % x.ndim
        if axes_input is not None:
            sizes = [int(s) for s in axes_input]
        else:
            parts = _attr(node, "num_outputs")
            step = -(-x.shape[axis] // parts)
            sizes = [min(step, x.shape[axis] - k * step) for k in range(parts)]
        start = sum(sizes[:index])
        return np.take(x, range(start, start + sizes[index]), axis=axis)
    return None


def _trace_back(g: _Graph, name: str):
    """From ``name`` back through view ops and scalar Muls to the tensor they start from:
    (that tensor, [(node, output index)] in execution order, product of the scalars)."""
    steps, scale = [], 1.0
    while True:
        node = g.producer.get(name)
        if node is None:
            break
        scalar = g.scalar(node)
        if scalar is not None:
            name, factor = scalar
            scale *= factor
            steps.append((node, 0))
            continue
        if node.op_type not in _VIEW_OPS:
            break
        steps.append((node, list(node.output).index(name)))
        name = node.input[0]
    return name, steps[::-1], scale


def _fixed(g: _Graph, node) -> bool:
    """Whether a view op's shape, axes or split sizes are constants (not computed at run time)."""
    return node.op_type == "Mul" or all(not x or g.constant(x) is not None for x in node.input[1:])


def _view(g: _Graph, root: str, steps) -> np.ndarray | None:
    """Where each element of the chain's result comes from in ``root`` (flat indices)."""
    shape = g.shape(root)
    if shape is None or len(shape) != 3:
        return None
    return _replay_chain(g, steps, np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape))


def _replay_chain(g: _Graph, steps, x: np.ndarray) -> np.ndarray | None:
    """``x`` through each (node, output index) of ``steps``; None where a step is not a fixed view."""
    for node, index in steps:
        if not _fixed(g, node):
            return None
        try:
            x = _replay(g, node, index, x)
        except (ValueError, IndexError, TypeError):
            return None
        if x is None:
            return None
    return x


def _heads(shape, heads: int, kind: str) -> np.ndarray:
    """(batch, tokens, heads·head_dim) flat indices in the layout a piece of ``kind`` works in:
    "sdpa" (batch, heads, tokens, head_dim), "broadcast" (tokens, batch·heads, head_dim)."""
    batch, tokens, hidden = shape
    x = np.arange(batch * tokens * hidden, dtype=np.int32).reshape(batch, tokens, heads, hidden // heads)
    if kind == "sdpa":
        return x.transpose(0, 2, 1, 3)
    return x.transpose(1, 0, 2, 3).reshape(tokens, batch * heads, hidden // heads)


def _sdpa_piece(g: _Graph, softmax) -> _Piece | None:
    """softmax(scale·q kᵀ) v with q (B, N, rows, H) a slice of the heads of one projection."""
    scores = g.producer.get(softmax.input[0])
    shape = g.shape(softmax.input[0])
    if scores is None or scores.op_type != "MatMul" or shape is None or len(shape) != 4:
        return None
    if _attr(softmax, "axis", -1) % 4 != 3:
        return None
    combine = g.sole_consumer(softmax.output[0])
    if combine is None or combine.op_type != "MatMul" or combine.input[0] != softmax.output[0]:
        return None
    heads = shape[1]
    (q, q_steps, q_scale), (k, k_steps, k_scale) = (_trace_back(g, x) for x in scores.input)
    v, v_steps, v_scale = _trace_back(g, combine.input[1])
    if v_scale != 1.0 or not all(g.is_float(x) for x in (q, k, v)):
        return None
    views = [_view(g, root, steps) for root, steps in ((q, q_steps), (k, k_steps), (v, v_steps))]
    if any(view is None for view in views) or any(g.shape(x)[2] % heads for x in (q, k, v)):
        return None
    (batch, _, hidden), (k_batch, tokens, k_hidden), (v_batch, v_tokens, _) = (g.shape(x) for x in (q, k, v))
    if (k_batch, v_batch, k_hidden, v_tokens) != (batch, batch, hidden, tokens):
        return None  # MultiHeadAttention's q, k, v share the batch (no broadcasting); k and v the tokens
    q_view, k_view, v_view = views
    q_heads = _heads(g.shape(q), heads, "sdpa")
    first = int(q_view.reshape(-1)[0]) // g.shape(q)[2] % g.shape(q)[1]  # the token of its first element
    rows = (first, first + q_view.shape[2])
    if not np.array_equal(q_view, q_heads[:, :, rows[0] : rows[1]]):
        return None
    if not np.array_equal(k_view, _heads(g.shape(k), heads, "sdpa").transpose(0, 1, 3, 2)):
        return None
    if not np.array_equal(v_view, _heads(g.shape(v), heads, "sdpa")):
        return None
    return _Piece(q, k, v, heads, rows, q_scale * k_scale, combine.output[0], "sdpa", scores)


def _broadcast_piece(g: _Graph, softmax) -> _Piece | None:
    """broadcast_temporal_attention's form: scores = Σ_h q[i,·,h]·k[j,·,h] over (F, F, B·N, H), softmax
    over the key frames (axis 1), out[i] = Σ_j w[i,j]·v[j] (see that pass)."""
    reduce = g.producer.get(softmax.input[0])
    shape = g.shape(softmax.input[0])
    if reduce is None or reduce.op_type != "ReduceSum" or shape is None or len(shape) != 3:
        return None
    if _attr(softmax, "axis", -1) % 3 != 1 or not _reduces(g, reduce, axis=3):
        return None
    product = g.producer.get(reduce.input[0])
    if product is None or product.op_type != "Mul":
        return None
    traced = [_trace_back(g, x) for x in product.input]
    # the value side: w[i, j, b] → w[i, j, b, 1] · v[1, j, b, h] → Σ_j
    expand = g.sole_consumer(softmax.output[0])
    weigh = expand and expand.op_type == "Unsqueeze" and g.sole_consumer(expand.output[0])
    if not weigh or weigh.op_type != "Mul":
        return None
    weighed = g.sole_consumer(weigh.output[0])
    if weighed is None or weighed.op_type != "ReduceSum" or not _reduces(g, weighed, axis=1):
        return None
    unsqueezed = g.constant(expand.input[1])
    if unsqueezed is None or [int(a) % 4 for a in unsqueezed] != [3]:
        return None
    v_input = weigh.input[1] if weigh.input[0] == expand.output[0] else weigh.input[0]
    v, v_steps, v_scale = _trace_back(g, v_input)
    frames, batch_heads = shape[0], shape[2]
    roots = [t[0] for t in traced] + [v]
    if v_scale != 1.0 or not all(g.is_float(x) and len(g.shape(x) or ()) == 3 for x in roots):
        return None
    batch = g.shape(v)[0]
    if batch_heads % batch or g.shape(v)[1] != frames:
        return None
    heads = batch_heads // batch
    if any(g.shape(x)[2] % heads for x in roots):
        return None
    v_view = _view(g, v, v_steps)
    if v_view is None or not np.array_equal(v_view, _heads(g.shape(v), heads, "broadcast")[None]):
        return None
    sides = {}
    for root, steps, scale in traced:
        view = _view(g, root, steps)
        if view is None:
            return None
        canonical = _heads(g.shape(root), heads, "broadcast")
        if np.array_equal(view, canonical[:, None]):
            sides["query"] = (root, scale)
        elif np.array_equal(view, canonical[None]):
            sides["key"] = (root, scale)
    if len(sides) != 2:
        return None
    (q, q_scale), (k, k_scale) = sides["query"], sides["key"]
    if not g.shape(q) == g.shape(k) == g.shape(v):
        return None  # self-attention over the frames: one (batch, frames, hidden) for q, k and v
    return _Piece(q, k, v, heads, (0, frames), q_scale * k_scale, weighed.output[0], "broadcast", product)


def _reduces(g: _Graph, node, axis: int) -> bool:
    axes = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    rank = len(g.shape(node.input[0]) or ())
    return (
        axes is not None
        and rank == 4
        and [int(a) % rank for a in axes] == [axis]
        and _attr(node, "keepdims", 1) == 0
        and not _attr(node, "noop_with_empty_axes", 0)
    )


def _merged_heads(g: _Graph, output: str, expected: np.ndarray, target: np.ndarray):
    """Follow ``output`` forward through sole-consumer view ops until the elements sit as the merged
    heads (batch, tokens, heads·head_dim) do: that tensor's name, or None."""
    x, name = expected, output
    while not (x.shape == target.shape and np.array_equal(x, target)):
        node = g.sole_consumer(name)
        if node is None or node.op_type not in _VIEW_OPS - {"Split"}:
            return None
        x = _replay_chain(g, [(node, 0)], x)
        if x is None:
            return None
        name = node.output[0]
    return name


def _attentions(g: _Graph):
    """Each attention the exported graph computes as whole pieces: (pieces, the merged-heads tensor)."""
    pieces = {}
    for node in g.model.graph.node:
        if node.op_type == "Softmax":
            piece = _sdpa_piece(g, node) or _broadcast_piece(g, node)
            if piece is not None:
                pieces[piece.output] = piece
    seen = set()
    for piece in list(pieces.values()):
        if piece.output in seen:
            continue
        group, joined = [piece], piece.output
        concat = g.sole_consumer(piece.output)
        chunked = concat is not None and concat.op_type == "Concat" and _attr(concat, "axis") % 4 == 2
        if piece.kind == "sdpa" and chunked:
            group = [pieces.get(x) for x in concat.input]
            joined = concat.output[0]
            if any(p is None for p in group):
                continue
        seen.update(p.output for p in group)
        same = {(p.query, p.key, p.value, p.heads, p.scale, p.kind) for p in group}
        ends = [p.rows for p in group]
        batch, tokens, _ = g.shape(piece.query)
        if len(same) != 1 or ends[0][0] != 0 or ends[-1][1] != tokens:
            continue
        if any(a[1] != b[0] for a, b in zip(ends, ends[1:], strict=False)):
            continue
        hidden_v = g.shape(piece.value)[2]
        # each output element's place in the merged heads (batch, tokens, heads·head_dim)
        labels = _heads((batch, tokens, hidden_v), piece.heads, piece.kind)
        merged = np.arange(batch * tokens * hidden_v, dtype=np.int32).reshape(batch, tokens, hidden_v)
        out = _merged_heads(g, joined, labels, merged)
        if out is not None:
            yield group, out


@contextmanager
def rewritten_for_ort(source: Path) -> Iterator[tuple[Path, dict]]:
    """``source`` rewritten (see the module) as a hidden model file beside it (it shares ``source``'s
    weights file: onnx refuses external data through links, and a copy would be GBs), removed on exit;
    yields (that file, :func:`rewrite_for_ort`'s counts)."""
    rewritten = source.with_name(f".{source.stem}.ort-cpu.onnx")
    try:
        yield rewritten, rewrite_for_ort(source, rewritten)
    finally:
        rewritten.unlink(missing_ok=True)
        rewritten.with_suffix(".data").unlink(missing_ok=True)


def rewrite_for_ort(source: Path, out: Path) -> dict:
    """Write ``source`` rewritten (see the module) to ``out`` in the same directory (the weights file
    stays shared); returns {"attention": {"fused": attentions fused, "softmax_left": softmaxes not
    fused}, "gelu_fused": GELUs fused, "conv_inputs_isolated": convolutions given an input of their own,
    "geglu_split": projections computed as two halves, "row_chunks": the chunks of each
    row block computed in row chunks, "expands_broadcast": Expands whose readers
    broadcast instead}."""
    import onnx
    from onnx import helper

    if out.parent.resolve() != source.parent.resolve():
        raise ValueError(f"{out}: must be in {source.parent}, where the weights are")
    model = onnx.load(str(source), load_external_data=False)
    g = _Graph(model, source.parent)
    softmaxes = sum(node.op_type == "Softmax" for node in model.graph.node)
    replaced = []
    for group, merged in _attentions(g):
        first = group[0]
        fused = helper.make_node(
            "MultiHeadAttention",
            [first.query, first.key, first.value],
            [merged],
            name=f"{first.scores.name}/MultiHeadAttention",  # module_of() finds the module by the prefix
            domain=MS_DOMAIN,
            num_heads=first.heads,
            scale=first.scale,
        )
        fused.metadata_props.extend(first.scores.metadata_props)
        replaced.append((g.producer[merged], fused))
    gelus = [(g.producer[out], _gelu(x, out, g.producer[out])) for x, out in _gelus(g)]
    nodes = list(model.graph.node)
    for old, new in replaced + gelus:
        nodes[nodes.index(old)] = new
    splits = list(_geglu_projections(g))
    if splits:
        with open(out.with_suffix(".data"), "wb") as data:
            for matmul, add, split in splits:
                index = nodes.index(split)
                nodes[index : index + 1] = _projection_halves(g, matmul, add, split, data)
    broadcast = _broadcast_expands(g, nodes)
    nodes = _live(model.graph, nodes)
    chunked = _chunk_row_blocks(model.graph, nodes, g)
    isolated = _isolate_conv_inputs(model.graph, nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for node in model.graph.node for i in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # the replaced reshapes' shapes, scales
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if (replaced or gelus) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(out))
    left = sum(node.op_type == "Softmax" for node in model.graph.node)
    logger.info(
        "%d attentions fused into MultiHeadAttention (%d of %d softmaxes left), %d GELUs into Gelu; "
        "%d convolutions given their own input; %d GEGLU projections in two halves; %d feed-forwards and "
        "self-attentions in %d row chunks; %d Expands left to the broadcast of their readers",
        len(replaced),
        left,
        softmaxes,
        len(gelus),
        isolated,
        len(splits),
        len(chunked),
        sum(chunked),
        broadcast,
    )
    return {
        "attention": {"fused": len(replaced), "softmax_left": left},
        "gelu_fused": len(gelus),
        "conv_inputs_isolated": isolated,
        "geglu_split": len(splits),
        "row_chunks": chunked,
        "expands_broadcast": broadcast,
    }


def _geglu_projections(g: _Graph):
    """(MatMul, Add, Split) of every x·W + b (W, b initializers) split in two equal halves along its
    last axis and read by nothing else."""
    for split in g.model.graph.node:
        if split.op_type != "Split" or len(split.output) != 2:
            continue
        add = g.producer.get(split.input[0])
        if add is None or add.op_type != "Add" or g.sole_consumer(add.output[0]) is not split:
            continue
        matmul = next((node for node in map(g.producer.get, add.input) if node is not None), None)
        if matmul is None or matmul.op_type != "MatMul" or g.sole_consumer(matmul.output[0]) is not add:
            continue
        weight, bias = g.initializers.get(matmul.input[1]), g.initializers.get(_other(add, matmul.output[0]))
        shape = g.shape(split.input[0])
        if weight is None or bias is None or len(weight.dims) != 2 or list(bias.dims) != [weight.dims[1]]:
            continue
        width = weight.dims[1]
        sizes = g.constant(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        halves = [width // 2] * 2 if sizes is None else [int(n) for n in sizes.reshape(-1)]
        if (
            shape is None
            or _attr(split, "axis", 0) % len(shape) != len(shape) - 1
            or width % 2
            or halves != [width // 2] * 2
        ):
            continue
        yield matmul, add, split


def _projection_halves(g: _Graph, matmul, add, split, data) -> list:
    """x·W + b as two projections by W's and b's column halves, giving ``split``'s outputs; the halves'
    values are appended to ``data`` (an open file beside the rewritten model)."""
    from onnx import external_data_helper, helper, numpy_helper

    weight, bias = g.initializers[matmul.input[1]], g.initializers[_other(add, matmul.output[0])]
    w = numpy_helper.to_array(weight, base_dir=str(g.base_dir))
    b = numpy_helper.to_array(bias, base_dir=str(g.base_dir))
    half = w.shape[1] // 2
    nodes = []
    for part, (columns, output) in enumerate(zip((slice(0, half), slice(half, None)), split.output, strict=True)):
        names = [f"{weight.name}/half{part}", f"{bias.name}/half{part}"]
        for name, value in zip(names, (w[:, columns], b[columns]), strict=True):
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
            offset = -data.tell() % 4096 + data.tell()  # page-aligned, so ORT can map it
            data.seek(offset)
            data.write(tensor.raw_data)
            external_data_helper.set_external_data(tensor, Path(data.name).name, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            g.model.graph.initializer.append(tensor)
        product = f"{matmul.output[0]}/half{part}"
        for node in (
            helper.make_node("MatMul", [matmul.input[0], names[0]], [product], name=f"{matmul.name}/half{part}"),
            helper.make_node("Add", [product, names[1]], [output], name=f"{add.name}/half{part}"),
        ):
            node.metadata_props.extend(matmul.metadata_props)
            nodes.append(node)
    return nodes


def _gelus(g: _Graph):
    """(x, output) of every x · (0.5 · (1 + erf(x / √2))) (either order of the two products)."""
    for div in g.model.graph.node:
        if div.op_type != "Div" or not _is_constant(g, div.input[1], np.sqrt(2)):
            continue
        x = div.input[0]
        erf = g.sole_consumer(div.output[0])
        add = erf is not None and erf.op_type == "Erf" and g.sole_consumer(erf.output[0])
        if not add or add.op_type != "Add" or not _is_constant(g, _other(add, erf.output[0]), 1.0):
            continue
        first = g.sole_consumer(add.output[0])
        second = first is not None and first.op_type == "Mul" and g.sole_consumer(first.output[0])
        if not second or second.op_type != "Mul" or not g.is_float(x):
            continue
        factors = {_other(first, add.output[0]), _other(second, first.output[0])}
        half = next((f for f in factors if f != x and _is_constant(g, f, 0.5)), None)
        if half is not None and factors == {x, half}:
            yield x, second.output[0]


def _gelu(x: str, output: str, last) -> object:
    from onnx import helper

    node = helper.make_node("Gelu", [x], [output], name=f"{last.name}/Gelu", domain=MS_DOMAIN)
    node.metadata_props.extend(last.metadata_props)
    return node


def _other(node, name: str) -> str:
    """A binary node's input that is not ``name``."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _is_constant(g: _Graph, name: str, value: float) -> bool:
    constant = g.constant(name)
    return constant is not None and constant.size == 1 and abs(float(constant.reshape(())) - value) <= 1e-6 * value


def _isolate_conv_inputs(graph, nodes: list) -> int:
    """An Identity in front of every Conv whose input something else also reads (in place); how many."""
    from onnx import helper

    readers = defaultdict(int)
    for node in nodes:
        for name in set(node.input):
            readers[name] += 1
    outputs = {o.name for o in graph.output}
    isolated = 0
    for index in range(len(nodes) - 1, -1, -1):
        conv = nodes[index]
        if conv.op_type != "Conv" or (readers[conv.input[0]] == 1 and conv.input[0] not in outputs):
            continue
        own = f"{conv.name}/input"
        identity = helper.make_node("Identity", [conv.input[0]], [own], name=f"{conv.name}/own_input")
        identity.metadata_props.extend(conv.metadata_props)
        conv.input[0] = own
        nodes.insert(index, identity)
        isolated += 1
    return isolated


def _live(graph, nodes):
    """``nodes`` without those whose outputs nothing uses (the replaced attentions' remains)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]


@dataclass
class _Block:
    """A run of nodes from one input ``x`` to one output that computes each row (or batch item) of its
    output from that row (batch item) of ``x`` alone."""

    x: str
    region: list  # its nodes, in graph order; the last writes the output
    width: int  # columns of its widest set of tensors alive at once, per row of x's last axis
    by_batch: bool  # rows are whole batch items (axis 0): it attends or convolves within each
    reshapes: tuple = ()  # Reshapes whose target shape names the batch: rewritten per chunk


def _chunk_row_blocks(graph, nodes: list, g: _Graph) -> list[int]:
    """Each feed-forward, self-attention or normalised convolution whose widest set of tensors exceeds
    ``ROW_CHUNK_BYTES`` computed on row slices of its input (in place, see the module); the number of
    slices of each."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    producer = {out: node for node in nodes for out in node.output}
    readers = defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    chunks = []
    for last in list(nodes):
        block = _row_block(last, producer, weights, nodes) or _norm_conv_block(last, producer, weights, nodes, g)
        if block is None:
            continue
        x, region = block.x, block.region
        shape, elem_type = g.dims.get(x, (None, None))
        if shape is None or len(shape) < 2 or elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        inside = {id(node) for node in region}
        made = {out for node in region for out in node.output} - {last.output[0]}
        if any(name in outputs or any(id(r) not in inside for r in readers[name]) for name in made):
            continue  # something else reads a tensor of the block: it cannot be sliced
        itemsize = 2 if elem_type == TensorProto.FLOAT16 else 4
        widest = int(np.prod(shape[:-1])) * block.width * itemsize
        count = -(-widest // ROW_CHUNK_BYTES)
        if block.by_batch:
            count = min(count, shape[0])
        axes = [0] if block.by_batch else range(len(shape) - 1)
        axis = next((a for a in axes if shape[a] >= count), None)
        if count < 2 or axis is None:
            continue
        bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(shape[axis]), count)])
        made_here = made | {last.output[0]}
        copies, pieces = [], []
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            suffix = f"/chunk{k}"
            # what the chunk adds is named by its block: x, and the reshapes' shapes, may be other blocks'
            chunk = f"{last.name}{suffix}"
            rows = f"{chunk}/rows"
            ends = [f"{rows}/{part}" for part in ("starts", "ends", "axes")]
            for name, value in zip(ends, (start, end, axis), strict=True):
                graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
            copies.append(helper.make_node("Slice", [x, *ends], [rows], name=rows))
            # the slices' types and shapes, for tools that read them (ORT's quantizer needs every type)
            rows_of = {x: rows} | {name: f"{name}{suffix}" for name in made_here}
            for name, chunk in rows_of.items():
                known = g.dims.get(name)
                same_axes = known and (len(known[0]) == len(shape) or block.by_batch)
                dims = list(known[0]) if same_axes else None
                if dims is not None:
                    dims[axis] = int(end - start)
                graph.value_info.append(helper.make_tensor_value_info(chunk, known[1] if known else elem_type, dims))
            # the same target shapes with this chunk's batch, one each (Reshapes share them)
            shapes = {name: f"{chunk}/{name}" for name in dict.fromkeys(r.input[1] for r in block.reshapes)}
            for name, chunk_name in shapes.items():
                target = g.constant(name).copy()
                target[0] = end - start
                graph.initializer.append(numpy_helper.from_array(target, chunk_name))
            renamed = rows_of | shapes
            for node in region:
                copy = helper.make_node(
                    node.op_type,
                    [renamed.get(i, i) for i in node.input],
                    [f"{o}{suffix}" for o in node.output],
                    name=f"{node.name}{suffix}",
                    domain=node.domain,
                )
                copy.attribute.extend(node.attribute)
                copy.metadata_props.extend(node.metadata_props)
                copies.append(copy)
            pieces.append(f"{last.output[0]}{suffix}")
        concat = helper.make_node("Concat", pieces, [last.output[0]], name=f"{last.name}/rows", axis=axis)
        concat.metadata_props.extend(last.metadata_props)
        # where the block's output was made: everything its nodes read is made before that
        at = nodes.index(last) - sum(nodes.index(node) < nodes.index(last) for node in region)
        nodes[:] = [node for node in nodes if id(node) not in inside]
        nodes[at:at] = [*copies, concat]
        chunks.append(count)
    return chunks


def _row_block(out_add, producer: dict, weights: dict, nodes: list):
    """(input, nodes in graph order, summed width of its input projections, whether it attends) of the
    block that ends in ``out_add``: x·W + b after row-wise ops or a MultiHeadAttention on input
    projections x·Wᵢ (+ bᵢ) of one x; or None."""
    if out_add.op_type != "Add":
        return None
    out_mm = next((p for p in map(producer.get, out_add.input) if p is not None and p.op_type == "MatMul"), None)
    if (
        out_mm is None
        or len(weights.get(out_mm.input[1], ())) != 2
        or not _is_vector(_other(out_add, out_mm.output[0]), producer, weights)
    ):
        return None
    region, inputs, width, pending, by_batch = [out_add, out_mm], set(), 0, [out_mm.input[0]], False
    seen = set()
    while pending:
        node = producer.get(pending.pop())
        if node is None:
            return None  # a graph input
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul" and len(weights.get(node.input[1], ())) == 2:
            inputs.add(node.input[0])
            width += weights[node.input[1]][1]
            region.append(node)
            continue
        if node.op_type == "MultiHeadAttention" and node.domain == MS_DOMAIN and len(node.input) == 3:
            by_batch = True  # each batch item's tokens attend to each other: rows are whole batch items
        elif node.op_type not in _ROW_WISE_OPS or node.domain not in ("", MS_DOMAIN):
            return None
        region.append(node)
        for i in node.input:
            if i and not _is_vector(i, producer, weights):
                pending.append(i)
    if len(inputs) != 1 or width == 0:
        return None
    x = next(iter(inputs))
    if any(x in node.input for node in region if node.op_type != "MatMul"):
        return None  # read beside the projections too: not a block's shape
    order = {id(node): index for index, node in enumerate(nodes)}
    return _Block(x, sorted(region, key=lambda node: order[id(node)]), width, by_batch)


def _is_vector(name: str, producer: dict, weights: dict) -> bool:
    """Whether ``name`` is a constant of at most one axis (broadcast along the last axis only)."""
    from onnx import helper

    if name in weights:
        return len(weights[name]) <= 1
    node = producer.get(name)
    if node is None or node.op_type != "Constant":
        return False
    return len(getattr(helper.get_attribute_value(node.attribute[0]), "dims", ())) <= 1


_BROADCASTING_OPS = {"Add", "Sub", "Mul", "Div"}


def _broadcast_expands(g: _Graph, nodes: list) -> int:
    """Every Expand read only by elementwise ops whose other input has the Expand's shape: those readers
    take the Expand's input and broadcast it (in place; ``_live`` then drops the Expand); how many."""
    readers = defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    dropped = 0
    for expand in nodes:
        if expand.op_type != "Expand" or expand.output[0] in g.outputs:
            continue
        shape = g.shape(expand.output[0])
        users = readers[expand.output[0]]
        if shape is None or g.shape(expand.input[0]) is None or not users:
            continue
        if not all(
            user.op_type in _BROADCASTING_OPS
            and list(user.input).count(expand.output[0]) == 1
            and g.shape(_other(user, expand.output[0])) == shape
            for user in users
        ):
            continue
        for user in users:
            user.input[list(user.input).index(expand.output[0])] = expand.input[0]
        dropped += 1
    return dropped


# Ops that work within each batch item, given constants without a batch axis (a normalisation's
# reshapes, InstanceNormalization, its per-channel scale and shift, SiLU).
_BATCH_WISE_OPS = {"Reshape", "InstanceNormalization", "Add", "Sub", "Mul", "Div", "Sigmoid"}


def _norm_conv_block(conv, producer: dict, weights: dict, nodes: list, g: _Graph) -> _Block | None:
    """GroupNorm (as the exporter writes it: Reshape, InstanceNormalization, Reshape, scale, shift), SiLU
    and the convolution they feed, from one input x; or None."""
    if conv.op_type != "Conv" or any(i and i not in weights for i in conv.input[1:]):
        return None
    region, pending, seen, inputs, reshapes = [conv], [conv.input[0]], set(), set(), []
    while pending:
        name = pending.pop()
        node = producer.get(name)
        if node is None or node.op_type not in _BATCH_WISE_OPS:
            inputs.add(name)
            continue
        if id(node) in seen:
            continue
        rank = max(len(g.shape(i) or ()) for i in node.input if i)
        data = [i for i in node.input if i and not _no_batch_constant(i, rank, producer, weights, g)]
        if node.op_type == "Reshape":
            target = g.constant(node.input[1])
            batch = (g.shape(node.input[0]) or (None,))[0]
            if target is None or data != [node.input[0]] or _attr(node, "allowzero", 0) or target[0] == -1:
                return None
            if target[0] != 0:  # 0 keeps the batch as it is; else it must be the batch, rewritten per chunk
                if target[0] != batch:
                    return None
                reshapes.append(node)
        elif node.op_type == "InstanceNormalization" and data != [node.input[0]]:
            return None
        if len(data) > 1 and not all(
            producer.get(i) is not None and producer[i].op_type in _BATCH_WISE_OPS for i in data
        ):
            inputs.update(data)  # two tensors from outside meet here (a residual): the block starts after
            continue
        seen.add(id(node))
        region.append(node)
        pending.extend(data)
    if len(inputs) != 1 or len(region) < 3:
        return None
    x = next(iter(inputs))
    shape = g.shape(x)
    if shape is None or len(shape) != 4:
        return None
    order = {id(node): index for index, node in enumerate(nodes)}
    # alive at once: x, the normalised tensor and its scaled copy (per row of x's channels)
    return _Block(x, sorted(region, key=lambda node: order[id(node)]), 2 * shape[-1], True, tuple(reshapes))


def _no_batch_constant(name: str, rank: int, producer: dict, weights: dict, g: _Graph) -> bool:
    """Whether ``name`` is a constant without a batch axis for a tensor of ``rank`` axes (fewer axes,
    or a leading 1)."""
    from onnx import helper

    if name in weights:
        dims = weights[name]
    elif producer.get(name) is not None and producer[name].op_type == "Constant":
        dims = tuple(getattr(helper.get_attribute_value(producer[name].attribute[0]), "dims", ()))
    else:
        return False
    return len(dims) < rank or (len(dims) > 0 and dims[0] == 1)
