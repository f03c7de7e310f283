"""Post-training static int8 quantization of an exported detector's network body, by the libraries
made for it: ONNX Runtime's ``quantize_static`` (QDQ) and NNCF's ``nncf.quantize`` (OpenVINO).

Only the network body is quantized: the backbone, the neck and the head towers — the nodes the
TorchScript exporter names inside a module scope (``/backbone/...``, ``/fpn/...``, ``/head/...``).
The post-processing that :class:`~densedet.export.OnnxDetector` appends at the top level
(``/Sigmoid``, box decoding, ``/TopK``, ``/NonMaxSuppression``, ...) stays fp32: quantized scores
would collapse to 256 levels and reorder detections, and so does everything downstream of the
heads' last convolutions (the classification logits and box deltas: the body's convolutions that
feed no other convolution), which reshapes and concatenates the levels' outputs. The last
convolutions themselves are quantized (their inputs and weights int8, their outputs dequantized
before the post-processing) unless ``quantize_head_outputs=False`` keeps them fp32 — with 91 COCO
classes the logits convolution is a large share of the head's work. On the demo checkpoint (digits,
100 validation scenes, 100 calibration images) both choices stayed within 0.005 AP of fp32; see
``benchmarks/deploy.py``.

Calibration: N preprocessed training images (batch 1 each), fed through the same
:func:`~densedet.deploy.common.preprocess_images` a deployed model uses.

CPUs without VNNI (AVX2 only, e.g. AMD Zen 3): the u8 x s8 dot product (``vpmaddubsw``) sums pairs
into int16 and can saturate with full-range 8-bit weights; ONNX Runtime's ``reduce_range`` (7-bit
weights) avoids it. ``reduce_range=None`` picks it from the CPU this runs on (:func:`cpu_has_vnni`);
a model quantized on a VNNI machine for an AVX2 one should pass ``reduce_range=True``. OpenVINO's
CPU plugin handles this itself (NNCF's default target device ``ANY`` quantizes for both).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torch import Tensor

from .common import preprocess_images, require

__all__ = ["cpu_has_vnni", "calibration_inputs", "body_and_head_outputs", "quantize_onnx", "quantize_openvino"]
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has an int8 dot-product instruction without int16 saturation (AVX512-VNNI,
    AVX-VNNI or AMX-INT8), from the ``flags`` line of ``/proc/cpuinfo`` (False where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(flag in flags for flag in _VNNI_FLAGS)


def calibration_inputs(images: Iterable[Tensor], meta: dict) -> list[dict[str, np.ndarray]]:
    """Per image the graph's inputs ``{"images": [1, 3, H, W], "image_sizes": [1, 2]}`` (float32)."""
    feeds = []
    for image in images:
        batch, sizes = preprocess_images([image], meta)
        feeds.append({"images": batch.numpy(), "image_sizes": np.asarray(sizes, np.float32)})
    if not feeds:
        raise ValueError("int8 calibration needs at least one image")
    return feeds


def body_and_head_outputs(onnx_path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """Node names of an exported graph: (body, post-processing, the body's last convolutions).

    Last convolutions: ``Conv`` nodes inside a module scope from which no other ``Conv`` is
    reachable (a head's logits and box-delta convs). Post-processing: nodes outside every module
    scope (a name without ``/module/``) and everything downstream of a last convolution. Body: the
    other nodes.
    """
    onnx = require("onnx", "int8 quantization")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    is_body = {n.name: n.name.startswith("/") and n.name.count("/") >= 2 for n in graph.node}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: n.name for n in graph.node for out in n.output}
    conv_below: dict[str, bool] = {}
    for node in reversed(graph.node):          # ONNX graphs are topologically sorted
        conv_below[node.name] = any(c.op_type == "Conv" or conv_below.get(c.name, False)
                                    for out in node.output for c in consumers.get(out, []))
    last_convs = [n.name for n in graph.node if is_body[n.name] and n.op_type == "Conv" and not conv_below[n.name]]
    # what follows the last convs inside the head's scope (reshaping and concatenating the levels'
    # logits / deltas) is post-processing too: a Q/DQ pair there would round the logits to 8 bits
    after = set(last_convs)
    for node in graph.node:
        if any(producer.get(name) in after for name in node.input):
            after.add(node.name)
            is_body[node.name] = False
    body = [n.name for n in graph.node if is_body[n.name] and n.name not in last_convs]
    post = [n.name for n in graph.node if not is_body[n.name]]
    return body, post, last_convs


def _inline_shared_weights(onnx_path: str | Path, out_path: str | Path) -> None:
    """Rewire ``Identity(initializer)`` nodes to the initializer itself. The exporter writes a weight
    shared by several calls (a head applied to every pyramid level) once and an ``Identity`` per
    use; ONNX Runtime's quantizer then cannot see the conv bias as a constant, leaves it fp32 and
    the convolution unfused."""
    onnx = require("onnx", "int8 quantization")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    constants = {init.name for init in graph.initializer} | {
        out for n in graph.node if n.op_type == "Constant" for out in n.output}
    outputs = {out.name for out in graph.output}
    alias: dict[str, str] = {}
    for node in graph.node:                 # topological order: Identity(Identity(w)) resolves to w
        source = alias.get(node.input[0], node.input[0]) if node.input else None
        if node.op_type == "Identity" and source in constants and node.output[0] not in outputs:
            alias[node.output[0]] = source
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in alias:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)          # a detached copy: the repeated field is cleared below
        for i, name in enumerate(copy.input):
            copy.input[i] = alias.get(name, name)
        kept.append(copy)
    graph.ClearField("node")
    graph.node.extend(kept)
    onnx.save(model, str(out_path))


@contextlib.contextmanager
def _quiet_logger(name: str | None = None):
    """Keep a library's logger (default: the root logger) to errors while it runs, then restore its
    level. ONNX Runtime's quantizer logs advice through the root logger at WARNING; NNCF logs one
    INFO line per post-processing op it leaves alone. (``nncf.set_log_level`` would also lower the
    levels of the handlers it finds for good, which silenced other code's warnings afterwards.)"""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration: Sequence[dict[str, np.ndarray]],
                  reduce_range: bool | None = None, quantize_head_outputs: bool = True,
                  per_channel: bool = True) -> dict:
    """ONNX Runtime static quantization (QDQ: uint8 asymmetric activations, int8 symmetric weights,
    per output channel, MinMax calibration) of the body of ``fp32_path``, written to ``out_path``.

    MinMax only: ORT's histogram calibrators (Percentile, Entropy) record every float tensor of the
    graph and stack them across images, which fails on the post-processing's data-dependent shapes
    (after NMS); MinMax already stays within 0.005 AP on the demo (module docstring).

    Returns the settings used (recorded in the sidecar)."""
    require("onnx", "int8 quantization")
    ortq = require("onnxruntime.quantization", "int8 quantization with onnxruntime")
    reduce_range = (not cpu_has_vnni()) if reduce_range is None else bool(reduce_range)

    class _Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(calibration)

        def get_next(self):
            return next(self._items, None)

    with tempfile.TemporaryDirectory(prefix="densedet-quant-") as tmp, _quiet_logger():
        inlined = Path(tmp) / "inlined.onnx"
        _inline_shared_weights(fp32_path, inlined)
        _, post, last_convs = body_and_head_outputs(inlined)
        exclude = post + ([] if quantize_head_outputs else last_convs)
        ortq.quantize_static(
            str(inlined), str(out_path), _Reader(), quant_format=ortq.QuantFormat.QDQ, per_channel=per_channel,
            reduce_range=reduce_range, activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=exclude, calibrate_method=ortq.CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activations": "uint8",
            "weights": "int8 per-channel" if per_channel else "int8", "calibration_method": "minmax",
            "calibration_images": len(calibration), "reduce_range": reduce_range,
            "quantize_head_outputs": bool(quantize_head_outputs), "excluded_nodes": len(exclude)}


def quantize_openvino(ov_model, fp32_onnx_path: str | Path, calibration: Sequence[dict[str, np.ndarray]],
                      preset: str = "performance", fast_bias_correction: bool = True,
                      quantize_head_outputs: bool = True):
    """NNCF post-training static quantization of an ``openvino.Model`` converted from ``fp32_onnx_path``
    (whose node names say what is body and what is post-processing); returns (model, settings)."""
    nncf = require("nncf", "int8 quantization with OpenVINO")
    _, post, last_convs = body_and_head_outputs(fp32_onnx_path)
    ignored = _openvino_ops_named(ov_model, set(post) | (set() if quantize_head_outputs else set(last_convs)))
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    with _quiet_logger("nncf"):
        quantized = nncf.quantize(ov_model, nncf.Dataset(list(calibration)), preset=presets[preset],
                                  subset_size=len(calibration), fast_bias_correction=fast_bias_correction,
                                  ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    return quantized, {"tool": "nncf.quantize", "preset": preset, "fast_bias_correction": fast_bias_correction,
                       "calibration_images": len(calibration), "quantize_head_outputs": bool(quantize_head_outputs),
                       "ignored_ops": len(ignored)}


def _openvino_ops_named(ov_model, onnx_names: set[str]) -> list[str]:
    """The computing ops of an ``openvino.Model`` that come from the ONNX nodes ``onnx_names``, or
    from no module scope at all. OpenVINO keeps the ONNX node names as friendly names, and splits a
    Conv with bias into ``<name>/WithoutBiases`` (Convolution) and ``<name>`` (Add)."""
    names = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        name = op.get_friendly_name()
        in_scope = name.startswith("/") and name.count("/") >= 2
        if name in onnx_names or name.rsplit("/", 1)[0] in onnx_names or not in_scope:
            names.append(name)
    return names
