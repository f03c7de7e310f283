"""CPU deploy backends: a densedet model exported to ONNX or OpenVINO, fp32 or int8, behind the same
call as the PyTorch model.

    densedet export --weights model.pt --format openvino --out model.xml --int8 --calib-images 100
    densedet predict images/ --weights model.xml --backend openvino --out preds/
    Predictor("model.onnx", backend="onnxruntime")(["a.jpg"])

Backends: ``torch`` (the checkpoint itself), ``onnxruntime`` (``.onnx``), ``openvino`` (``.xml`` or
``.onnx``). The non-torch ones need the optional extra ``pip install 'densedet[deploy]'`` (onnx,
onnxruntime, openvino, nncf); a missing package is a :class:`MissingExtraError` naming it.
Modules: :mod:`.common` (runner interface, sidecar, preprocessing), :mod:`.onnxruntime`,
:mod:`.openvino`, :mod:`.quantize` (int8 by ONNX Runtime and NNCF), :mod:`.export`.
"""

from __future__ import annotations

from pathlib import Path

from .common import (BACKENDS, DeployedDetector, DeployError, DeployFileError, MissingExtraError, default_threads,
                     read_sidecar)
from .export import FORMATS, calibration_images, export_deployable

__all__ = ["BACKENDS", "FORMATS", "DeployedDetector", "DeployError", "DeployFileError", "MissingExtraError",
           "load_deployed", "export_deployable", "calibration_images", "read_sidecar", "default_threads"]


def load_deployed(path: str | Path, backend: str | None = None, threads: int | None = None) -> DeployedDetector:
    """Open an exported model with ``backend`` ("onnxruntime" or "openvino"; default by the file:
    ``.xml`` → openvino, else onnxruntime) and ``threads`` (default: torch's thread count)."""
    if backend is None:
        backend = "openvino" if Path(path).suffix.lower() == ".xml" else "onnxruntime"
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeDetector
        return OnnxRuntimeDetector(path, threads)
    if backend == "openvino":
        from .openvino import OpenVinoDetector
        return OpenVinoDetector(path, threads)
    raise DeployError(f"backend must be one of {BACKENDS[1:]} for an exported model, got {backend!r}")
