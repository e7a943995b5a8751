"""ONNX stages, one function each: export, simplify, save, check, run, compare.

Measured pitfalls this encodes (see ../shared/mobilevd-paper.md):
  * the dynamo exporter at opset 17 writes invalid Split nodes: always opset 18, always onnx.checker;
  * the legacy exporter scatters hundreds of weight files: weights go to ONE ``<name>.data``;
  * onnxsim runs out of memory (24 GB) on the full UNet: it only ever sees the graph with the large
    weights detached (they become graph inputs while it runs, so it can neither load nor fold them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 18


class Float32IO(nn.Module):
    """Runs ``module`` in ``dtype`` behind float32 inputs and outputs (mobile compilers want fp32 I/O)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, **inputs):
        return self.module(**{k: v.to(self.dtype) for k, v in inputs.items()}).float()


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its own progress and many warnings; our staged lines say what runs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_ort_quantizer():
    """ONNX Runtime's quantizer logs advice (run its pre-processing, opset updates) with module-level
    ``logging.warning``, i.e. on the root logger. Records at WARNING and below are held back for the
    call with ``logging.disable`` and the previous setting restored; the root logger's level and
    handlers are as they were after the call."""
    previous, handlers = logging.root.manager.disable, logging.root.handlers
    logging.disable(logging.WARNING)
    # ``logging.warning`` calls ``basicConfig()`` (a stderr handler on the root logger, for good) whenever
    # the root has no handler, disabled or not: the root holds a NullHandler for the call instead.
    if not handlers:
        logging.root.handlers = [logging.NullHandler()]
    try:
        yield
    finally:
        logging.root.handlers = handlers
        logging.disable(previous)


def augment_for_min_max(calibrator) -> None:
    """ORT's ``MinMaxCalibrater.augment_graph`` (per-tensor ranges), in linear time: the same
    ReduceMin/ReduceMax → Reshape nodes, names and extra outputs in the same order, each pair placed
    before its tensor's first consumer as ORT places it. ORT's own scans the whole graph twice per
    tensor (the insertion point, a dict of every value_info): 18 s of the tiny UNet's 58 s w8a16
    quantisation under cProfile, quadratic in graph size."""
    import uuid

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if calibrator.per_channel:
        raise ValueError("augment_for_min_max: per-tensor ranges only (per_channel: ORT's augment_graph)")
    model = calibrator.model
    tensors, value_infos = calibrator.select_tensors_to_calibrate(model)
    shape = str(uuid.uuid4())
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), shape))
    nodes = list(model.graph.node)
    first_consumer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            first_consumer.setdefault(name, index)
    inserted: dict[int, list] = {}  # node index → the reductions that go before it
    outputs = []
    for tensor in tensors:
        if tensor not in value_infos:
            raise ValueError(
                f"Unable to guess tensor type for tensor {tensor!r}, "
                "running shape inference before quantization may resolve this issue."
            )
        for op in ("ReduceMin", "ReduceMax"):
            reduced = f"{tensor}_{op}"
            inserted.setdefault(first_consumer.get(tensor, len(nodes)), []).extend(
                [
                    helper.make_node(op, [tensor], [f"{reduced}_Reshape"], keepdims=1, name=reduced),
                    helper.make_node("Reshape", [f"{reduced}_Reshape", shape], [reduced], name=f"{reduced}_Reshape"),
                ]
            )
            outputs.append(
                helper.make_tensor_value_info(reduced, value_infos[tensor].type.tensor_type.elem_type, [None])
            )
    augmented = [n for index, node in enumerate(nodes) for n in (*inserted.get(index, ()), node)]
    del model.graph.node[:]
    model.graph.node.extend(augmented + inserted.get(len(nodes), []))
    model.graph.output.extend(outputs)
    onnx.save(model, calibrator.augmented_model_path, save_as_external_data=calibrator.use_external_data_format)


@contextlib.contextmanager
def linear_time_quantizer():
    """ONNX Runtime's quantizer with two quadratic steps made linear for the call, then restored:
    ``MinMaxCalibrater.augment_graph`` (per-tensor ranges) by :func:`augment_for_min_max`, and
    ``ONNXModel.replace_input_of_all_nodes`` (once per quantised activation, over every node) by the
    same loop that skips nodes without the input — a C-level membership test instead of a Python loop
    over each node's inputs (26 s of the tiny UNet's w8a16 quantisation under cProfile). Both give
    exactly what ORT's give (tests compare)."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.onnx_model import ONNXModel

    augment_graph = MinMaxCalibrater.augment_graph

    def augment(self):
        return augment_graph(self) if self.per_channel else augment_for_min_max(self)

    def replace_input_of_all_nodes(self, old_input_name, new_input_name):
        for node in self.model.graph.node:
            if old_input_name in node.input:
                ONNXModel.replace_node_input(node, old_input_name, new_input_name)

    saved = MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes
    MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes = augment, replace_input_of_all_nodes
    try:
        yield
    finally:
        MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes = saved


def export_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], output_name: str, path: Path) -> None:
    """torch.onnx.export(dynamo=True) at opset 18, static shapes, weights in one ``<stem>.data`` file."""
    write_onnx(trace_onnx(module, inputs, output_name), path)


def trace_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], output_name: str):
    """``module`` traced by torch.onnx.export(dynamo=True) at opset 18 with static shapes: an ONNX IR
    model whose initializers wrap the module's parameters (nothing written yet)."""
    with _quiet_exporter(), torch.no_grad():
        return torch.onnx.export(
            module,
            (),
            kwargs=inputs,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=[output_name],
            optimize=False,
        ).model


def write_onnx(model, path: Path) -> None:
    """A traced model optimised (:func:`optimize_exported`) and saved, its weights in one
    ``<stem>.data`` file; then its references to the module's weights are dropped."""
    import onnx_ir

    class ContiguousOnWrite(onnx_ir.Tensor):
        """Written through a C-order copy made for the write alone. The optimiser folds each Linear's
        transposed weight into a strided view, which numpy's ``tofile`` writes element by element:
        writing the full-size UNet took 6.6 s, 1.4 GB of it such views (issue 13)."""

        def tofile(self, file) -> None:
            np.ascontiguousarray(self.raw).tofile(file)

    with _quiet_exporter():
        optimize_exported(model)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if type(tensor) is onnx_ir.Tensor and isinstance(tensor.raw, np.ndarray) and not tensor.raw.flags.c_contiguous:
            value.const_value = ContiguousOnWrite(tensor.raw, name=tensor.name)
    onnx_ir.save(model, path, external_data=f"{path.stem}.data")
    # onnxscript's rewrite rules keep the last graph they matched alive (module-level state), and its
    # initializers wrap the module's parameters: drop them so the weights can be freed after export.
    for value in model.graph.initializers.values():
        value.const_value = None
    model.graph.initializers.clear()


def optimize_exported(model) -> None:
    """onnxscript's ``optimize_ir`` (what ``torch.onnx.export(optimize=True)`` runs), in place, with
    every default rewrite rule but ``SlicesSplit``.

    That rule pairs every two Slice nodes of one input (quadratic): ~10 s of the tiny UNet's 14 s
    optimisation, and it matches nothing in our graphs (``chunk`` exports as Split). The graphs are
    the same node for node (tests/test_export.py compares the tiny VAE encoder's and TAESD decoder's
    with onnxscript's own, and checks that the rule finds nothing in the tiny UNet's).
    """
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import fold_constants_ir
    from onnxscript.rewriter.rules.common import slice_split_rule

    rules = rewriter.RewritePass([r for r in rewriter._DEFAULT_REWRITE_RULES if r is not slice_split_rule])
    common.InlinePass()(model)
    for _ in range(2):  # optimize_ir's loop: fold, rewrite, clean up; again while something changed
        modified = fold_constants_ir(model, onnx_shape_inference=True).modified
        modified |= rules(model).modified
        for cleanup in (common.RemoveUnusedNodesPass, common.RemoveUnusedFunctionsPass, common.RemoveUnusedOpsetsPass):
            modified |= cleanup()(model).modified
        if not modified:
            break
    for finish in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ):
        finish(model)


MODULE_SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of each node


def _module_scope(node) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == MODULE_SCOPE_KEY), None)


def module_paths(path: Path) -> dict[str, str]:
    """Node name → the PyTorch module that made it (``up_blocks.3.resnets.1.conv1``), from the
    exporter's name scopes (``['', 'up_blocks.3', ..., 'up_blocks.3.resnets.1.conv1', 'conv2d']``:
    the last entry is the op itself). Nodes made outside any module are left out."""
    import ast

    import onnx

    paths = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        scope = _module_scope(node)
        if scope:
            modules = [m for m in ast.literal_eval(scope)[:-1] if m]
            if modules:
                paths[node.name] = modules[-1]
    return paths


def simplify_onnx(path: Path) -> tuple[int, int]:
    """onnxsim on the graph alone; returns node counts (before, after). Rewrites ``path`` in place.

    Weights stored in the external file are detached as graph inputs while onnxsim runs, then put
    back as the same references into the same ``.data`` file: onnxsim folds only the small
    constants (shape arithmetic, scalars), and memory stays that of the graph, never the weights.
    """
    import onnx
    import onnxsim
    from onnx import external_data_helper, helper

    model = onnx.load(str(path), load_external_data=False)
    before = len(model.graph.node)
    scopes = {node.name: _module_scope(node) for node in model.graph.node}
    detached = {t.name: t for t in model.graph.initializer if external_data_helper.uses_external_data(t)}
    kept = [t for t in model.graph.initializer if t.name not in detached]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    n_inputs = len(model.graph.input)
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in detached.values()
    )
    with _quiet_exporter():
        simplified, ok = onnxsim.simplify(model)
    if not ok:
        return before, before  # onnxsim could not prove its result equal: keep the exported graph
    real_inputs = [i for i in simplified.graph.input if i.name not in detached]
    used = {name for node in simplified.graph.node for name in node.input}
    del simplified.graph.input[:]
    simplified.graph.input.extend(real_inputs)
    simplified.graph.initializer.extend(t for name, t in detached.items() if name in used)
    assert len(real_inputs) == n_inputs
    for node in simplified.graph.node:  # onnxsim drops node metadata: the module path is put back
        if scopes.get(node.name):
            node.metadata_props.add(key=MODULE_SCOPE_KEY, value=scopes[node.name])
    onnx.save(simplified, str(path))
    return before, len(simplified.graph.node)


def check_onnx(path: Path) -> None:
    """onnx.checker by path (works past protobuf's 2 GB limit), with full shape inference."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def describe_io(path: Path) -> dict[str, list[dict]]:
    """Input/output names, shapes and dtypes of an ONNX model, from its graph alone."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [
            {
                "name": v.name,
                "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            }
            for v in values
        ]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def ort_session(path: Path, optimization: str = "basic", optimized_path: Path | None = None, low_memory: bool = False):
    """An ONNX Runtime CPU session. ``optimized_path`` saves the optimised graph (weights external);
    ``low_memory`` for checks and calibration feeds: a few calls, peak memory near the live tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if low_memory:
        # No buffer-reuse plan, as ort_worker.compiled_session says why: exported full-size UNet, one
        # call, 7.92 GB / 42.2 s with the arena off → 5.20 GB / 30.9 s (issue 13). No prepacked copies
        # of the GEMM weights either (1.3 GiB on the full UNet), no slower for a few calls.
        options.enable_mem_reuse = False
        options.enable_mem_pattern = False  # nor a second-call block beside the arena (ort_worker.compiled_session)
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3  # warnings about unfoldable nodes are noise here
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{optimized_path.stem}.data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # ort_graph's row chunks slice their input one chunk at a time; this fusion would make every slice
    # at once (one Split), a whole copy of the input alive beside it.
    disabled = ["GatherSliceToSplitFusion"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run_onnx(path: Path, inputs: dict[str, np.ndarray], *, run_options=None) -> np.ndarray:
    """The first output of one call (``run_options``: an ``onnxruntime.RunOptions``, whose
    ``terminate`` stops the call from another thread)."""
    session = ort_session(path, low_memory=True)
    return session.run(None, inputs, run_options)[0]


# The exporter shares one ones/zeros pair among all GroupNorms with the same group count (all of the
# VAE encoder's); ORT's QDQ quantizer refuses weights shared between nodes.
NORM_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")


def _shared_norm_parameters(graph) -> list[tuple]:
    """(node, input index) of every normalisation scale/bias initializer that another node also reads."""
    initializers = {t.name for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input[1:]:
            if name in initializers:
                readers[name] = readers.get(name, 0) + 1
    return [
        (node, index)
        for node in graph.node
        if node.op_type in NORM_OPS
        for index in range(1, len(node.input))
        if readers.get(node.input[index], 0) > 1
    ]


def unshare_norm_parameters(model) -> int:
    """Give every normalisation node its own copy of a shared scale/bias initializer (the w8a16 QDQ
    quantizes them; the copies are a few floats each); returns how many were copied."""
    initializers = {t.name: t for t in model.graph.initializer}
    seen, copies = set(), 0
    for node, index in _shared_norm_parameters(model.graph):
        name = node.input[index]
        if name in seen:
            copy = model.graph.initializer.add()
            copy.CopyFrom(initializers[name])
            copy.name = f"{name}.{node.name}"
            node.input[index] = copy.name
            copies += 1
        seen.add(name)
    return copies
