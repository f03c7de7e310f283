"""The ONNX Runtime backend: an exported ``.onnx`` (fp32, or int8 QDQ from :mod:`densedet.deploy.quantize`)
run on the CPU execution provider with torch's thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import DeployedDetector, DeployFileError, default_threads, read_sidecar, require

__all__ = ["OnnxRuntimeDetector", "ort_session"]


def ort_session(path: str | Path, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU: ``threads`` intra-op threads (default
    :func:`~densedet.deploy.common.default_threads`), one inter-op thread (the graph is a chain)."""
    ort = require("onnxruntime", "the onnxruntime backend")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or default_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types for a bad file
        raise DeployFileError(f"{path}: onnxruntime cannot load it as an ONNX model: "
                              f"{str(err).strip().splitlines()[0][:300]}") from None


class OnnxRuntimeDetector(DeployedDetector):
    """``OnnxRuntimeDetector("model.onnx")(images)`` → per image ``{"boxes", "scores", "labels"}``
    (see :class:`~densedet.deploy.common.DeployedDetector`)."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        if Path(model_path).suffix.lower() != ".onnx":
            raise DeployFileError(f"{model_path}: the onnxruntime backend runs .onnx files "
                                  "(an OpenVINO .xml runs with --backend openvino)")
        meta = read_sidecar(model_path)
        super().__init__(model_path, meta)
        self.session = ort_session(model_path, threads)
        self.threads = self.session.get_session_options().intra_op_num_threads

    def run(self, batch: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {"images": batch, "image_sizes": image_sizes}))
