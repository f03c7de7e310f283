"""CPU deploy backends (densedet.deploy): onnxruntime and OpenVINO, fp32 and int8, behind the torch
Predictor's interface.

fp32: every backend gives PyTorch's detections on a small model — same count, one-to-one match with
the same label, score within 1e-4 and box within 0.01 px (``test_export``'s policy, ``_match``).
int8: the files carry quantize nodes in the network body only; the post-processing stays fp32. The
accuracy bound (AP lower by at most 0.01 on a trained tiny checkpoint) is the slow test at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from densedet.cli import main
from densedet.config import to_dict
from densedet.deploy import (DeployError, DeployFileError, MissingExtraError, export_deployable, load_deployed,
                             read_sidecar)
from densedet.deploy.quantize import body_and_head_outputs, cpu_has_vnni
from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, model_from_checkpoint
from densedet.export import sidecar_path
from densedet.models import build_from_config
from densedet.predict import Predictor
from densedet.tta import TTAConfig

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
openvino = pytest.importorskip("openvino", reason="openvino not installed (pip install 'densedet[deploy]')")
pytest.importorskip("nncf", reason="nncf not installed (pip install 'densedet[deploy]')")

from test_export import _calibrate_retinanet, _match, _spread_scores  # noqa: E402
from test_main_paths_export import _images  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FP32_FILES = {"onnxruntime": "fp32.onnx", "openvino": "fp32.xml"}


@pytest.fixture(scope="module")
def checkpoint(make_tiny_config, digit_scenes, tmp_path_factory):
    """The tiny RetinaNet of the tests' config (128 px, fit resize), its head set to give ~100 varied
    scores per image, saved as a checkpoint whose config reads the tests' digit scenes."""
    root = tmp_path_factory.mktemp("deploy")
    cfg = make_tiny_config(root / "run")
    cfg.model.score_thresh, cfg.model.detections_per_img = 0.05, 50
    torch.manual_seed(0)
    model = build_from_config(cfg.model).eval()
    _spread_scores(model, _images(digit_scenes), _calibrate_retinanet, per_image=100)
    path = root / "model.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(10)], "category_ids": list(range(1, 11)), "iteration": 0},
                path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint exported through the CLI as fp32 ONNX and fp32 OpenVINO IR."""
    paths = {}
    for backend, name in FP32_FILES.items():
        out = checkpoint.parent / name
        fmt = "openvino" if name.endswith(".xml") else "onnx"
        assert main(["export", "--weights", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
        paths[backend] = out
    return paths


def _torch_detections(checkpoint, images):
    model, _, _ = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        return model(images)


def _assert_same(refs, dets):
    for i, (ref, det) in enumerate(zip(refs, dets)):
        assert len(det["scores"]) == len(ref["scores"]), f"image {i}: {len(det['scores'])} vs {len(ref['scores'])}"
        missing, extra = _match(ref, det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy())
        assert not missing and not len(extra), f"image {i}: unmatched {ref['scores'][missing].tolist()}"


# -- fp32: the same detections as PyTorch ---------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_backend_gives_torch_detections(checkpoint, exported, digit_scenes, backend):
    images = _images(digit_scenes)
    refs = _torch_detections(checkpoint, images)
    assert all(len(r["scores"]) > 10 for r in refs)                     # something to compare
    predictor = Predictor(exported[backend], backend=backend)
    dets = predictor(images)
    _assert_same(refs, dets)
    assert dets[0]["labels"].dtype == torch.int64 and predictor.class_names == [str(i) for i in range(10)]


def test_openvino_runs_the_onnx_file_too(checkpoint, exported, digit_scenes):
    images = _images(digit_scenes)
    _assert_same(_torch_detections(checkpoint, images), load_deployed(exported["onnxruntime"], "openvino")(images))


def test_predictor_tiles_and_raises_the_threshold_with_a_backend(checkpoint, exported, digit_scenes):
    """Tiling goes through the backend like through PyTorch; a higher score_thresh filters."""
    image = torch.cat(_images(digit_scenes)[:2], dim=2)                 # 128 x 256: two tiles of 128
    ref = Predictor(checkpoint, tile_size=128, tile_overlap=32, precision="fp32")(image)[0]
    got = Predictor(exported["onnxruntime"], backend="onnxruntime", tile_size=128, tile_overlap=32)(image)[0]
    _assert_same([ref], [got])
    thresh = float(got["scores"].median())
    high = Predictor(exported["onnxruntime"], backend="onnxruntime", score_thresh=thresh)(image)[0]
    assert 0 < len(high["scores"]) < len(got["scores"]) and (high["scores"] > thresh).all()
    with pytest.raises(DeployError, match="below"):
        Predictor(exported["onnxruntime"], backend="onnxruntime", score_thresh=0.01)


def test_fit_resize_follows_the_models_min_and_max_size(digit_scenes, tmp_path):
    """A fixed-size export larger than the model's resized images (min_size = max_size = 100,
    padded to 128 like deepforest's 400 -> 448): the backend resizes as the model does, not up to
    the export size, so it gives PyTorch's detections."""
    import densedet
    torch.manual_seed(0)
    model = densedet.build_model("retinanet_r18_fpn", num_classes=3, min_size=100, max_size=100, size_divisible=64,
                                 fpn_channels=32, head_convs=1, score_thresh=0.05, detections_per_img=50).eval()
    scene = _images(digit_scenes)[0]
    images = [scene[:, :100, :], scene[:, 10:110, 20:120]]                # 100 x 128 and 100 x 100
    _spread_scores(model, images, _calibrate_retinanet, per_image=40)
    path = export_deployable(model, tmp_path / "fit.onnx", dynamic_size=False)
    meta = read_sidecar(path)
    assert meta["input_size"] == [128, 128] and (meta["min_size"], meta["max_size"]) == (100, 100)
    with torch.no_grad():
        refs = model(images)
    assert all(len(r["scores"]) > 5 for r in refs)
    _assert_same(refs, load_deployed(path)(images))


def test_runtimes_use_torchs_thread_count(exported):
    threads = torch.get_num_threads()
    ort_model = load_deployed(exported["onnxruntime"])
    assert ort_model.session.get_session_options().intra_op_num_threads == threads
    ov_model = load_deployed(exported["openvino"])
    assert int(ov_model.compiled.get_property("INFERENCE_NUM_THREADS")) == threads
    assert "float32" in str(ov_model.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    assert load_deployed(exported["onnxruntime"], threads=1).threads == 1


def test_sidecar_carries_precision_format_and_config(checkpoint, exported):
    for backend, path in exported.items():
        meta = read_sidecar(path)
        assert meta["precision"] == "fp32" and meta["model_format"] == ("openvino" if backend == "openvino" else "onnx")
        assert meta["config"]["model"]["num_classes"] == 10 and meta["category_ids"] == list(range(1, 11))
    assert exported["openvino"].with_suffix(".bin").is_file()


# -- the commands ------------------------------------------------------------------------------------

def test_eval_backend_gives_torchs_metrics(checkpoint, exported, tmp_path):
    numbers = {}
    for backend, weights in [("torch", checkpoint), ("onnxruntime", exported["onnxruntime"])]:
        out = tmp_path / f"{backend}.json"
        assert main(["eval", "--weights", str(weights), "--backend", backend, "--precision", "fp32",
                     "--out", str(out)]) == 0
        numbers[backend] = json.loads(out.read_text())
    assert numbers["onnxruntime"]["AP"] == pytest.approx(numbers["torch"]["AP"], abs=1e-4)
    assert numbers["onnxruntime"]["AR100"] == pytest.approx(numbers["torch"]["AR100"], abs=1e-4)


def test_predict_backend_writes_torchs_results(checkpoint, exported, digit_scenes, tmp_path):
    images = digit_scenes["val_images"]
    assert main(["predict", images, "--weights", str(checkpoint), "--device", "cpu", "--precision", "fp32",
                 "--out", str(tmp_path / "torch")]) == 0
    assert main(["predict", images, "--weights", str(exported["openvino"]), "--backend", "openvino",
                 "--out", str(tmp_path / "ov")]) == 0
    ref = json.loads((tmp_path / "torch" / "detections.json").read_text())
    got = json.loads((tmp_path / "ov" / "detections.json").read_text())
    assert len(got) == len(ref) > 0
    key = lambda d: (d["image_id"], d["category_id"], d["score"])  # noqa: E731
    got, ref = sorted(map(key, got)), sorted(map(key, ref))
    assert [k[:2] for k in got] == [k[:2] for k in ref]
    assert [k[2] for k in got] == pytest.approx([k[2] for k in ref], abs=1e-4)


# -- errors ------------------------------------------------------------------------------------------

def test_missing_extra_names_the_extra(exported, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)          # import openvino -> ImportError
    with pytest.raises(MissingExtraError, match=r"densedet\[deploy\]"):
        load_deployed(exported["openvino"])
    assert main(["predict", str(exported["openvino"]), "--weights", str(exported["openvino"]),
                 "--backend", "openvino", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "densedet[deploy]" in err and "Traceback" not in err
    assert main(["export", "--weights", str(exported["openvino"].parent / "model.pt"), "--format", "openvino",
                 "--out", str(exported["openvino"].parent / "unused.xml")]) == 2
    err = capsys.readouterr().err
    assert "'openvino'" in err and "densedet[deploy]" in err and "Traceback" not in err


def test_bad_files_are_refused_clearly(exported, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    sidecar_path(garbage).write_text(sidecar_path(exported["onnxruntime"]).read_text())
    with pytest.raises(DeployFileError, match="garbage.onnx: onnxruntime cannot load"):
        load_deployed(garbage)
    bad_xml = tmp_path / "garbage.xml"
    bad_xml.write_text("<net>")
    sidecar_path(bad_xml).write_text(sidecar_path(exported["openvino"]).read_text())
    with pytest.raises(DeployFileError, match="OpenVINO cannot load"):
        load_deployed(bad_xml)
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(exported["onnxruntime"].read_bytes())
    with pytest.raises(DeployFileError, match="sidecar not found"):
        load_deployed(lone)
    with pytest.raises(DeployFileError, match="runs .onnx files"):
        load_deployed(exported["openvino"], "onnxruntime")
    with pytest.raises(DeployFileError, match="not found"):
        load_deployed(tmp_path / "absent.onnx")
    assert main(["eval", "--weights", str(garbage), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "garbage.onnx" in err and "Traceback" not in err


def test_cli_refuses_what_a_backend_cannot_do(checkpoint, exported, tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--weights", str(exported["onnxruntime"]), "--backend", "onnxruntime",
                 "--tta", "flip", "--out", str(tmp_path / "o")]) == 2
    assert "--tta flip" in capsys.readouterr().err
    assert main(["export", "--weights", str(checkpoint), "--format", "openvino", "--out",
                 str(tmp_path / "m.onnx")]) == 2
    assert ".xml" in capsys.readouterr().err


def test_predictor_refuses_what_a_backend_cannot_run(checkpoint, exported):
    model, _, _ = model_from_checkpoint(checkpoint)
    with pytest.raises(DeployError, match="exported model file"):
        Predictor(model, backend="onnxruntime")
    with pytest.raises(DeployError, match="backend must be one of"):
        Predictor(exported["onnxruntime"], backend="tensorrt")
    with pytest.raises(DeployError, match="test-time augmentation"):
        Predictor(exported["onnxruntime"], backend="onnxruntime", tta=TTAConfig())


def test_cpu_vnni_detection_reads_cpuinfo_flags(tmp_path):
    avx2 = tmp_path / "zen3"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    vnni = tmp_path / "xeon"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_vnni(avx2) and cpu_has_vnni(vnni) and not cpu_has_vnni(tmp_path / "absent")


# -- int8 --------------------------------------------------------------------------------------------

def _dequantized_inputs(path) -> list[tuple[str, str]]:
    """(post-processing node, the op whose output it reads through Q/DQ) of a QDQ ONNX file. A
    ``Shape`` node reads no values (a dynamic-size export cuts its anchors by the input's shape)."""
    import onnx
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    _, post, _ = body_and_head_outputs(path)
    found = []
    for node in graph.node:
        if node.name in set(post) and node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape"):
            for name in node.input:
                if name in producer and producer[name].op_type == "DequantizeLinear":
                    q = producer.get(producer[name].input[0])
                    source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
                    found.append((node.name, source.name if source is not None else producer[name].input[0]))
    return found


def test_int8_quantizes_the_body_only(checkpoint, digit_scenes, tmp_path, caplog):
    """ONNX Runtime QDQ: the post-processing reads no dequantized tensor except the heads' last
    convolutions' outputs (int8 convs whose outputs are dequantized), and none with
    --fp32-head-outputs. NNCF: FakeQuantize ops in the body, none feeding the post-processing."""
    out = tmp_path / "int8.onnx"
    assert main(["export", "--weights", str(checkpoint), "--out", str(out), "--int8", "--calib-images", "2"]) == 0
    meta = read_sidecar(out)
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 2
    assert meta["quantization"]["reduce_range"] == (not cpu_has_vnni())
    _, post, last_convs = body_and_head_outputs(out)
    sources = {source for _, source in _dequantized_inputs(out)}
    assert sources and sources <= set(last_convs), sorted(sources - set(last_convs))
    fp32_heads = tmp_path / "int8_fp32_heads.onnx"
    assert main(["export", "--weights", str(checkpoint), "--out", str(fp32_heads), "--int8", "--calib-images", "2",
                 "--fp32-head-outputs"]) == 0
    assert _dequantized_inputs(fp32_heads) == []
    xml = tmp_path / "int8.xml"
    assert main(["export", "--weights", str(checkpoint), "--format", "openvino", "--out", str(xml),
                 "--int8", "--calib-images", "2"]) == 0
    model = openvino.Core().read_model(str(xml))
    fq = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert fq
    post_names = set(post)
    for op in fq:
        for target in op.output(0).get_target_inputs():
            if target.get_node().get_type_name() == "ShapeOf":       # reads no values
                continue
            name = target.get_node().get_friendly_name()
            assert name.startswith("/") and name.count("/") >= 2 and name not in post_names \
                and name.rsplit("/", 1)[0] not in post_names, f"FakeQuantize feeds post-processing op {name}"
    # int8 runs and detects (accuracy: the slow test below)
    images = _images(digit_scenes)
    for path in (out, xml):
        dets = load_deployed(path)(images)
        assert all(len(d["scores"]) > 0 for d in dets)
    # the quantizers' logs were quieted for their run only: other code's warnings still reach the handlers
    caplog.clear()
    logging.getLogger("densedet.evaluation.coco").warning("after quantizing")
    assert "after quantizing" in caplog.text


@pytest.mark.slow
def test_int8_ap_within_001_of_fp32_on_a_trained_checkpoint(tmp_path, monkeypatch):
    """The demo's R18-FPN (``runs/demo/model_final.pt`` of ``make demo``, or the checkpoint in
    $DENSEDET_DEPLOY_CKPT; else trained here for 10 minutes) on its 100 validation scenes, single
    scale: int8 (ONNX Runtime and OpenVINO, 100 calibration images) loses at most 0.01 AP against
    torch fp32, and the fp32 export loses nothing (1e-4)."""
    monkeypatch.chdir(REPO)                      # the demo config's data.root is relative to the repository
    ckpt = Path(os.environ.get("DENSEDET_DEPLOY_CKPT", REPO / "runs" / "demo" / "model_final.pt"))
    if not ckpt.is_file():
        assert main(["demo", "--output-dir", str(tmp_path / "run"), "test.tta_scales=[]"]) == 0
        ckpt = tmp_path / "run" / "model_final.pt"
    aps = {}
    for name, fmt, flags in [("torch", None, []), ("ort_fp32", "onnx", []), ("ort_int8", "onnx", ["--int8"]),
                             ("ov_int8", "openvino", ["--int8"])]:
        weights, backend = ckpt, "torch"
        if fmt is not None:
            weights = tmp_path / f"{name}.{'xml' if fmt == 'openvino' else 'onnx'}"
            backend = "openvino" if fmt == "openvino" else "onnxruntime"
            assert main(["export", "--weights", str(ckpt), "--format", fmt, "--out", str(weights), *flags,
                         "--calib-images", "100"]) == 0
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--weights", str(weights), "--backend", backend, "--precision", "fp32",
                     "--out", str(out), "test.tta_scales=[]"]) == 0
        aps[name] = json.loads(out.read_text())["AP"]
    assert aps["torch"] > 0.3, f"the checkpoint is too weak to bound anything: {aps}"
    assert aps["ort_fp32"] == pytest.approx(aps["torch"], abs=1e-4), aps
    assert aps["ort_int8"] >= aps["torch"] - 0.01 and aps["ov_int8"] >= aps["torch"] - 0.01, aps
