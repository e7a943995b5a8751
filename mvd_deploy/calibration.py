"""MinMax calibration for static quantisation with bounded memory, shared by every backend that
quantises activations (ort-cpu int8-static, the NPU's w8a16)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mvd_deploy.onnx_tools import augment_for_min_max
from mvd_deploy.progress import progress_bar

logger = logging.getLogger(__name__)


def calibration_reader(samples: list, feed):
    """ORT's CalibrationDataReader over ``samples``, each turned into a feed by ``feed`` when read."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Makes each sample's feed when asked (at most one in memory); ``set_range`` picks the samples
        of one ``collect_data`` call."""

        def __init__(self):
            self.set_range(0, len(samples))

        def __len__(self):
            return len(samples)

        def set_range(self, start_index: int, end_index: int):
            self.position, self.end = start_index, end_index

        def get_next(self):
            if self.position >= self.end:
                return None
            self.position += 1
            return feed(samples[self.position - 1])

    return Reader()


def calibrate_min_max(
    source: Path, reader, cache: Path, *, op_types: list[str] | None = None, symmetric: bool = False
) -> Path:
    """Every calibrated tensor's min/max over the reader's samples, written as ORT's calibration cache
    (``op_types``: the inputs and outputs of those ops only; None: every float tensor).

    ORT's MinMax calibrator, with two changes that bound memory. Its graph is augmented with a
    ReduceMin/ReduceMax of every tensor as extra outputs; in ORT's default execution order those
    reductions all run after the last original node, so every activation stays alive until the end of
    the run: the full-size UNet part 0 passed 18 GB for one sample. In priority-based order each
    reduction runs as soon as its tensor exists: 5.1 GB peak, 12.7 s (the same part and sample; the
    session is made here for that, and with the CPU arena off so freed tensors go back at once). And
    the collected reductions are folded into running ranges after every sample."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, save_tensors_data

    scratch = cache.with_suffix(".calibration")  # the augmented model and its (uuid-named) weights copy
    scratch.mkdir()
    try:
        calibrator = MinMaxCalibrater(
            str(source),
            op_types_to_calibrate=op_types,
            augmented_model_path=str(scratch / "augmented.onnx"),
            symmetric=symmetric,
            use_external_data_format=True,
        )
        augment_for_min_max(calibrator)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT does
        options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        calibrator.infer_session = onnxruntime.InferenceSession(
            calibrator.augmented_model_path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        for index in progress_bar(logger, range(len(reader)), desc="      calibration", unit="sample", leave=False):
            reader.set_range(index, index + 1)
            calibrator.collect_data(reader)  # runs one sample and folds its min/max into the ranges
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cache
