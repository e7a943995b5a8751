"""A component split into parts, each its own ONNX graph, so each fits one HTP context.

Parts run in order; a part's inputs are component inputs or outputs of earlier parts (same names).
"""

from __future__ import annotations

import numpy as np

from mvd_deploy.onnx_tools import ort_session


def graph_feeds(graphs, feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each graph's input feed when the graphs run in order on the component input ``feed``
    (ONNX Runtime CPU, the exported fp32 graphs); a single whole graph gets ``feed`` itself."""
    available = dict(feed)
    feeds = []
    for index, graph in enumerate(graphs):
        feeds.append({spec["name"]: available[spec["name"]] for spec in graph.inputs})
        if index < len(graphs) - 1:
            session = ort_session(graph.onnx, arena=False)
            names = [o["name"] for o in graph.outputs]
            available.update(zip(names, session.run(names, feeds[-1]), strict=True))
            del session
    return feeds
