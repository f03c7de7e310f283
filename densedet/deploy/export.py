"""Write a detector for a CPU runtime: ONNX (onnxruntime) or OpenVINO IR, fp32 or int8.

:func:`export_deployable` folds the eval-mode norms into the convolutions (a copy; the caller's
model is untouched), exports ONNX with the post-processing inside (:func:`densedet.export.export_onnx`),
then converts (``openvino.convert_model``) and/or quantizes the network body
(:mod:`densedet.deploy.quantize`). Every file gets the sidecar ``<file>.json`` with ``precision``
(``fp32`` / ``int8``), ``model_format`` and, for int8, the quantization settings.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path
from typing import Sequence

from torch import Tensor, nn

from ..export import export_onnx, fuse_conv_bn, sidecar_path
from .common import read_sidecar, require
from .quantize import calibration_inputs, quantize_onnx, quantize_openvino

__all__ = ["export_deployable", "FORMATS", "calibration_images"]

FORMATS = ("onnx", "openvino")


def calibration_images(data, count: int, seed: int = 0) -> list[Tensor]:
    """``count`` images of a :class:`~densedet.data.DetectionData` split (a seeded sample, in file
    order), as float ``[3, H, W]`` in [0, 1]."""
    from ..data import load_record_image
    if count < 1:
        raise ValueError(f"the number of calibration images must be >= 1, got {count}")
    picked = sorted(random.Random(seed).sample(range(len(data.records)), min(count, len(data.records))))
    return [load_record_image(data.records[i]).float() / 255 for i in picked]


def export_deployable(model: nn.Module, path: str | Path, fmt: str = "onnx", image_size: Sequence[int] | None = None,
                      int8: bool = False, calibration: Sequence[Tensor] | None = None, batch_size: int = 1,
                      opset: int = 17, dynamic_batch: bool = True, dynamic_size: bool | None = None,
                      class_names: list[str] | None = None,
                      sidecar_extra: dict | None = None,
                      reduce_range: bool | None = None, quantize_head_outputs: bool = True,
                      nncf_preset: str = "performance") -> Path:
    """Export ``model`` as ``fmt`` ("onnx": ``path`` is a ``.onnx``; "openvino": a ``.xml`` beside
    its ``.bin``), int8 with ``calibration`` images (float ``[3, H, W]``, e.g. :func:`calibration_images`)
    when ``int8``. The remaining arguments are :func:`~densedet.export.export_onnx`'s and
    :mod:`~densedet.deploy.quantize`'s. Returns ``path``; the sidecar is ``<path>.json``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if int8 and not calibration:
        raise ValueError("int8 export needs calibration images")
    path = Path(path)
    if fmt == "openvino" and path.suffix.lower() != ".xml":
        raise ValueError(f"{path}: an OpenVINO export is written as a .xml (with a .bin beside it)")
    if fmt == "onnx" and path.suffix.lower() != ".onnx":
        raise ValueError(f"{path}: an ONNX export is written as a .onnx")
    if fmt == "onnx":
        require("onnx", "the onnx export")
    else:
        require("openvino", "the openvino export")
    if int8:
        require("onnxruntime", "int8 calibration")   # both quantizers' calibration runs need a runtime
        if fmt == "openvino":
            require("nncf", "int8 quantization with OpenVINO")
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = fuse_conv_bn(copy.deepcopy(model).eval())
    extra = {**(sidecar_extra or {}), "model_format": fmt, "precision": "int8" if int8 else "fp32"}
    with tempfile.TemporaryDirectory(prefix="densedet-export-") as tmp:
        direct = fmt == "onnx" and not int8
        onnx_path = path if direct else Path(tmp) / "fp32.onnx"
        export_onnx(folded, onnx_path, image_size=image_size, batch_size=batch_size, opset=opset,
                    dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, class_names=class_names,
                    sidecar_extra=extra)
        if direct:
            return path
        meta = read_sidecar(onnx_path)
        feeds = calibration_inputs(calibration, meta) if int8 else []
        if fmt == "onnx":
            meta["quantization"] = quantize_onnx(onnx_path, path, feeds, reduce_range=reduce_range,
                                                 quantize_head_outputs=quantize_head_outputs)
        else:
            ov = require("openvino", "the openvino export")
            ov_model = ov.convert_model(str(onnx_path))
            if int8:
                ov_model, meta["quantization"] = quantize_openvino(ov_model, onnx_path, feeds, preset=nncf_preset,
                                                                   quantize_head_outputs=quantize_head_outputs)
            ov.save_model(ov_model, str(path), compress_to_fp16=False)
    sidecar_path(path).write_text(json.dumps(meta, indent=2))
    return path
