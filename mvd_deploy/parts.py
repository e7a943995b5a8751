"""A component split into parts, each its own ONNX graph, so each fits one HTP context.

The Snapdragon HTP limits one context to ~2 GB and the offline compiler's memory grows with the
graph (the whole fp16 UNet had not compiled after 25 min at 12.6 GB here), so a large component is
compiled as several graphs run in order. Parts are cut from the exported, validated ONNX model
itself — never from a second export — so they compute exactly what it computes:

1. walk the nodes in their (topological) order, counting the weight bytes each prefix uses;
2. for part k of n, look around the point where the prefix holds k/n of the weights and cut where
   the fewest activation bytes cross (block boundaries: the UNet's skips cross any cut, so the
   cheapest cut is where nothing else does);
3. each part gets the nodes between its cuts, the weights they use (bytes copied from the export's
   ``.data`` into the part's own, so nothing is ever loaded whole), inputs = the component inputs
   and earlier parts' outputs it reads, outputs = what later parts or the component output need;
4. the chained parts are run against the whole on ONNX Runtime CPU (fp32, ≥ 80 dB; bit-identical
   in practice) before the parts are recorded in the manifest.

Parts run in order; a part's inputs are component inputs or outputs of earlier parts (same names).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mvd_deploy.build import Build, Graph
from mvd_deploy.errors import MvdError, ValidationFailed
from mvd_deploy.fileio import umask_permissions
from mvd_deploy.htp import WEIGHT_BYTES, check_fits, weight_elements
from mvd_deploy.metrics import compare
from mvd_deploy.onnx_tools import describe_io, ort_session

CHAIN_MIN_PSNR_DB = 80.0
WINDOW = 0.25  # a cut may move this share of one part's weights away from the balanced point
ALIGN = 4096  # weights in a part's .data start on page boundaries (memory-mapped by ONNX Runtime)
PARTS_DIR = "parts"


@dataclass(frozen=True)
class Cut:
    position: int  # nodes [previous cut, position) go to the part before it
    crossing_bytes: int  # activation bytes handed from the parts before to the parts after


def graph_feeds(graphs, feed: dict[str, np.ndarray], sessions: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Each graph's input feed when the graphs run in order on the component input ``feed``
    (ONNX Runtime CPU, the exported fp32 graphs); a single whole graph gets ``feed`` itself.
    ``sessions`` (graph name → session) keeps the sessions open across calls (calibration draws
    ~100 samples); without it each call opens and frees its own."""
    sessions = {} if sessions is None else sessions
    available = dict(feed)
    feeds = []
    for index, graph in enumerate(graphs):
        feeds.append({spec["name"]: available[spec["name"]] for spec in graph.inputs})
        if index < len(graphs) - 1:
            if graph.name not in sessions:
                sessions[graph.name] = ort_session(graph.onnx, low_memory=True)
            names = [o["name"] for o in graph.outputs]
            available.update(zip(names, sessions[graph.name].run(names, feeds[-1]), strict=True))
    return feeds


def run_chain(graphs, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The component output of ``graphs`` run in order on ONNX Runtime CPU."""
    last = graphs[-1]
    [last_feed] = graph_feeds(graphs, feed)[-1:]
    session = ort_session(last.onnx, low_memory=True)
    return session.run([last.outputs[0]["name"]], last_feed)[0]


# -- planning the cuts ------------------------------------------------------------------------------
def _tensor_bytes(value_info) -> int:
    import onnx

    tensor = value_info.type.tensor_type
    dims = [d.dim_value for d in tensor.shape.dim]
    if not dims or any(d <= 0 for d in dims):
        return 0
    return math.prod(dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize


def _initializer_bytes(tensor) -> int:
    import onnx

    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def plan_cuts(model, parts: int) -> list[Cut]:
    """Where to cut ``model``'s node list into ``parts`` graphs (see the module docstring)."""
    import onnx

    graph = model.graph
    nodes = list(graph.node)
    weights = {t.name: _initializer_bytes(t) for t in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    sizes = {v.name: _tensor_bytes(v) for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    last_use = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    # weight bytes used by the first i nodes, and activation bytes live between node i-1 and node i
    used, prefix_weights, crossing, live = set(), [0], [0], {}
    for index, node in enumerate(nodes):
        added = sum(weights[n] for n in node.input if n in weights and n not in used)
        used.update(n for n in node.input if n in weights)
        prefix_weights.append(prefix_weights[-1] + added)
        for name in node.output:
            if last_use.get(name, -1) > index and node.op_type != "Constant":
                live[name] = sizes.get(name, 0)
        for name in node.input:
            if last_use.get(name) == index:
                live.pop(name, None)
        crossing.append(sum(live.values()))
    total, share = prefix_weights[-1], prefix_weights[-1] / parts
    cuts, previous = [], 0
    for k in range(1, parts):
        target = k * share
        window = [
            i
            for i in range(previous + 1, len(nodes))
            if abs(prefix_weights[i] - target) <= WINDOW * share and prefix_weights[i] > prefix_weights[previous]
        ]
        if not window:
            raise MvdError(f"cannot cut the graph into {parts} parts of balanced weights (total {total:,} bytes)")
        best = min(window, key=lambda i: (crossing[i], abs(prefix_weights[i] - target)))
        cuts.append(Cut(best, crossing[best]))
        previous = best
    return cuts


# -- writing the parts ------------------------------------------------------------------------------
def _write_part(model, source_dir: Path, nodes, inputs, outputs, path: Path) -> None:
    """One part as its own ONNX model + ``.data``: weight bytes copied range by range from the
    export's external data (never all in memory)."""
    import onnx
    from onnx import external_data_helper, helper

    graph = model.graph
    used = {name for node in nodes for name in node.input}
    # Constant-free subgraph references: Constant nodes outside the part that it reads are copied in.
    produced = {name for node in nodes for name in node.output}
    constants = [n for n in graph.node if n.op_type == "Constant" and n.output[0] in used - produced]
    initializers = [onnx.TensorProto.FromString(t.SerializeToString()) for t in graph.initializer if t.name in used]
    data_path = path.with_suffix(".data")
    sources: dict[str, object] = {}
    try:
        with open(data_path, "wb") as data:
            for tensor in initializers:
                if not external_data_helper.uses_external_data(tensor):
                    continue
                info = {entry.key: entry.value for entry in tensor.external_data}
                location = source_dir / info["location"]
                if location not in sources:
                    sources[location] = open(location, "rb")  # noqa: SIM115 - closed below
                source = sources[location]
                source.seek(int(info.get("offset", 0)))
                length = int(info["length"])
                padding = -data.tell() % ALIGN
                data.write(b"\0" * padding)
                offset = data.tell()
                remaining = length
                while remaining:
                    block = source.read(min(remaining, 64 * 2**20))
                    if not block:
                        raise MvdError(f"{location}: ends before the weights of {tensor.name} (truncated export?)")
                    data.write(block)
                    remaining -= len(block)
                del tensor.external_data[:]
                for key, value in (("location", data_path.name), ("offset", offset), ("length", length)):
                    tensor.external_data.add(key=key, value=str(value))
    finally:
        for handle in sources.values():
            handle.close()
    part = helper.make_graph(
        [*constants, *nodes],
        path.stem,
        inputs,
        outputs,
        initializer=initializers,
    )
    part_model = helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
    part_model.functions.extend(model.functions)
    onnx.save(part_model, str(path))


def split_onnx(source: Path, out_dir: Path, parts: int) -> list[dict]:
    """Cut the ONNX model ``source`` into ``parts`` graphs in ``out_dir``; returns their records."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    cuts = plan_cuts(model, parts)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    value_info = {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    weights = {t.name for t in graph.initializer}
    nodes = list(graph.node)
    bounds = [0, *(c.position for c in cuts), len(nodes)]
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    graph_outputs = {o.name for o in graph.output}
    records = []
    for k in range(parts):
        start, stop = bounds[k], bounds[k + 1]
        span = nodes[start:stop]
        produced = {name for node in span for name in node.output}
        constants = {n.output[0] for n in nodes if n.op_type == "Constant"}
        needed = [
            name
            for name in dict.fromkeys(name for node in span for name in node.input)
            if name and name not in produced and name not in weights and name not in constants
        ]
        handed = [
            name
            for node in span
            for name in node.output
            if name in graph_outputs or any(i >= stop for i in consumers.get(name, []))
        ]
        if any(name not in value_info for name in needed + handed):
            missing = next(name for name in needed + handed if name not in value_info)
            raise MvdError(f"{source}: no inferred shape for tensor {missing!r}; cannot cut the graph there")
        path = out_dir / f"{source.stem}.part{k}.onnx"
        _write_part(model, source.parent, span, [value_info[n] for n in needed], [value_info[n] for n in handed], path)
        onnx.checker.check_model(str(path), full_check=True)
        records.append(
            {
                "name": f"{source.stem}.part{k}",
                "nodes": [start, stop],
                "crossing_bytes": cuts[k - 1].crossing_bytes if k else 0,
                "weight_elements": weight_elements(path),
                **describe_io(path),
            }
        )
    return records


# -- in a build -------------------------------------------------------------------------------------
def parts_needed(build: Build, component: str, precision: str, max_part_weights_mb: float) -> int:
    """How many parts keep each part's weights, at ``precision``, within ``max_part_weights_mb``."""
    total = weight_elements(build.onnx_path(component)) * WEIGHT_BYTES[precision]
    return max(1, math.ceil(total / (max_part_weights_mb * 2**20)))


def split_component(build: Build, component: str, parts: int) -> list[Graph]:
    """Split ``component`` into ``parts`` graphs in the build (``parts/<component>/``), check the
    chain against the whole, and record them; a build already split that way is reused. ``parts``
    1 removes any split (the whole model is the one graph)."""
    record = build.components[component]
    existing = record.get("parts")
    if parts <= 1:
        if existing:
            shutil.rmtree(build.path / PARTS_DIR / component, ignore_errors=True)
            del record["parts"]
            build.save_manifest()
        return build.graphs(component)
    if existing and existing.get("count") == parts:
        return build.graphs(component)
    relative = f"{PARTS_DIR}/{component}"
    with build.staged(relative, label=f"parts-{component}") as staged:
        graphs = split_onnx(build.onnx_path(component), staged, parts)
        for graph in graphs:
            graph["onnx"] = f"{relative}/{graph['name']}.onnx"
            graph["data"] = f"{relative}/{graph['name']}.data"
        chain = _check_chain(build, component, staged, graphs)
        umask_permissions(staged)
    record["parts"] = {"count": parts, "graphs": graphs, "chain_validation": chain}
    build.save_manifest()
    return build.graphs(component)


def _check_chain(build: Build, component: str, staged: Path, graphs: list[dict]) -> dict:
    """The parts run in order against the whole exported model (ONNX Runtime CPU, fp32)."""
    feed = build.random_inputs(component, seed=0)
    chain = [Graph(component, g["name"], staged / f"{g['name']}.onnx", None, g["inputs"], g["outputs"]) for g in graphs]
    whole = ort_session(build.onnx_path(component), low_memory=True).run(None, feed)[0]
    validation = compare(run_chain(chain, feed), whole) | {
        "min_psnr_db": CHAIN_MIN_PSNR_DB,
        "reference": f"exported {component}.onnx",
    }
    if not validation["psnr_db"] >= CHAIN_MIN_PSNR_DB:
        raise ValidationFailed(
            f"{component}: its {len(graphs)} parts chained give {validation['psnr_db']} dB PSNR against the "
            f"whole model, below {CHAIN_MIN_PSNR_DB} dB; the parts were not written"
        )
    return validation


def split_for_targets(build: Build, plan) -> None:
    """Make ``build`` ready to compile for phone targets: ``plan`` is [(device profile, precision)].

    Each component is split into as many parts as the most demanding target needs (its
    ``max_part_weights_mb`` at its precision; a build already in more parts is kept, so AI Hub and
    offline compiles share one split), then every graph is checked against every target's context
    limit — refused, one line naming graph, bytes and limit, before anything is compiled or uploaded.
    """
    for component in build.components:
        needed = max((parts_needed(build, component, p, t.max_part_weights_mb) for t, p in plan), default=1)
        if needed > len(build.graphs(component)):
            split_component(build, component, needed)
    for target, precision in plan:
        for component in build.components:
            check_fits(build.graphs(component), precision, target.context_limit_mb, f"{target.name} ({target.source})")
