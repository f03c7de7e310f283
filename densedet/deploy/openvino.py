"""The OpenVINO backend: an exported ``.xml``/``.bin`` (or an ``.onnx``, which OpenVINO reads too),
compiled for the CPU in fp32 (int8 where NNCF put quantize nodes) with torch's thread count.

``INFERENCE_PRECISION_HINT`` is pinned to f32: on CPUs with AMX or AVX512-BF16 OpenVINO would
otherwise run the fp32 parts in bf16, which changes scores by ~1e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import DeployedDetector, DeployFileError, default_threads, read_sidecar, require

__all__ = ["OpenVinoDetector", "convert_onnx", "compile_model"]


def convert_onnx(onnx_path: str | Path):
    """An ``openvino.Model`` from an exported ONNX file (the post-processing converts too:
    ``NonMaxSuppression``, ``TopK`` and ``GatherElements`` are OpenVINO operations)."""
    ov = require("openvino", "the openvino export")
    return ov.convert_model(str(onnx_path))


def compile_model(model_or_path, threads: int | None = None):
    """Compile for the CPU: fp32 precision hint, latency mode, ``threads`` inference threads."""
    ov = require("openvino", "the openvino backend")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": int(threads or default_threads()), "INFERENCE_PRECISION_HINT": "f32",
              "PERFORMANCE_HINT": "LATENCY"}
    try:
        model = core.read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
        return core.compile_model(model, "CPU", config)
    except RuntimeError as err:
        raise DeployFileError(f"{model_or_path}: OpenVINO cannot load it: "
                              f"{str(err).strip().splitlines()[0][:300]}") from None


class OpenVinoDetector(DeployedDetector):
    """``OpenVinoDetector("model.xml")(images)`` → per image ``{"boxes", "scores", "labels"}``
    (see :class:`~densedet.deploy.common.DeployedDetector`)."""

    backend = "openvino"

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        if Path(model_path).suffix.lower() not in (".xml", ".onnx"):
            raise DeployFileError(f"{model_path}: the openvino backend runs .xml (with its .bin) or .onnx files")
        meta = read_sidecar(model_path)
        super().__init__(model_path, meta)
        self.threads = int(threads or default_threads())
        self.compiled = compile_model(model_path, self.threads)
        self.request = self.compiled.create_infer_request()
        self.output_names = [out.get_any_name() for out in self.compiled.outputs]

    def run(self, batch: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        results = self.request.infer({"images": batch, "image_sizes": image_sizes})
        by_name = {out.get_any_name(): value for out, value in results.items()}
        return tuple(np.asarray(by_name[name]) for name in ("boxes", "scores", "labels", "num_detections"))
