"""Every verb refuses bad input cleanly: one line ``densedet VERB: error: FILE: what is wrong`` on
stderr, exit code 2, no traceback; valid but unusual input (1x1 and 16-bit images, 4000x30 strips,
empty results) works. A bug (an unexpected exception) is one line with exit code 1, and ``--debug``
or ``DENSEDET_DEBUG=1`` shows its traceback.

The cases run in-process through :func:`densedet.cli.main` (fast); a handful also run as real
subprocesses (``python -m densedet``), and ``-m slow`` runs every case as a subprocess.
docs/robustness.md lists the cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.cli import main
from densedet.config import save_config
from densedet.errors import DensedetError

REPO = Path(__file__).resolve().parent.parent


def _tiny_checkpoint(path: Path) -> Path:
    """A random-weight RetinaNet R18 checkpoint small enough to build in a second (as in test_predict)."""
    from densedet.config import Config, to_dict
    from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from densedet.models import build_from_config
    cfg = Config()
    m = cfg.model
    m.backbone, m.num_classes, m.retinanet.fpn_channels, m.retinanet.head_convs = "resnet18", 10, 16, 1
    m.min_size, m.max_size, m.retinanet.prior_prob, m.score_thresh, m.detections_per_img = 64, 96, 0.1, 0.05, 20
    m.size_divisible = 32
    torch.manual_seed(0)
    model = build_from_config(m)
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(10)], "category_ids": None, "iteration": 0}, path)
    return path


GT = {"images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 100},
                 {"id": 2, "file_name": "b.png", "height": 100, "width": 100}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
                      {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 25]}],
      "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
DET = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}


def _gt(**changes):
    doc = json.loads(json.dumps(GT))
    for key, value in changes.items():
        doc[key] = value
    return doc


def _ann(**changes):
    return [{**GT["annotations"][0], **changes}, GT["annotations"][1]]


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_tiny_config):
    """Every input file of the cases, built once: ``files[name]`` is its path (a str)."""
    root = tmp_path_factory.mktemp("cli_errors")
    paths: dict[str, str] = {}

    def put(name: str, content) -> None:
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content, allow_nan=True))
        paths[name] = str(path)

    ckpt = _tiny_checkpoint(root / "tiny.pt")
    paths["ckpt"] = str(ckpt)
    whole = ckpt.read_bytes()
    put("ckpt_cut.pt", whole[: len(whole) // 2])
    put("ckpt_empty.pt", b"")
    put("ckpt_text.pt", "this is not a checkpoint\n")
    put("ckpt_json.pt", {"model": {}})
    torch.save({"weights": torch.zeros(3)}, root / "ckpt_foreign.pt")
    paths["ckpt_foreign.pt"] = str(root / "ckpt_foreign.pt")

    put("gt.json", GT)
    text = json.dumps(GT)
    put("gt_cut.json", text[: len(text) // 2])
    put("gt_binary.json", whole[:300])
    put("gt_empty.json", b"")
    put("gt_list.json", [GT])
    put("gt_no_images.json", {k: v for k, v in GT.items() if k != "images"})
    put("gt_images_dict.json", _gt(images={"1": "a.png"}))
    put("gt_dup_image.json", _gt(images=GT["images"] + [GT["images"][0]]))
    put("gt_dup_category.json", _gt(categories=GT["categories"] + [{"id": 2, "name": "bird"}]))
    put("gt_dup_ann.json", _gt(annotations=[GT["annotations"][0], {**GT["annotations"][1], "id": 1}]))
    put("gt_ann_unknown_image.json", _gt(annotations=_ann(image_id=7)))
    put("gt_ann_unknown_category.json", _gt(annotations=_ann(category_id=9)))
    put("gt_bbox_string.json", _gt(annotations=_ann(bbox="10 10 30 30")))
    put("gt_negative_width.json", _gt(annotations=_ann(bbox=[10, 10, -30, 30])))
    put("gt_zero_height.json", _gt(annotations=_ann(bbox=[10, 10, 30, 0])))
    put("gt_nan_box.json", _gt(annotations=_ann(bbox=[10, float("nan"), 30, 30])))

    put("res.json", [DET, {**DET, "image_id": 2, "category_id": 2, "score": 0.4}])
    put("res_empty_list.json", [])
    put("res_cut.json", json.dumps([DET] * 3)[:50])
    put("res_binary.json", whole[:300])
    put("res_empty.json", b"")
    put("res_dict.json", {"results": [DET]})
    put("res_not_dicts.json", [[1, 1, 10, 10, 30, 30, 0.9]])
    put("res_no_score.json", [DET, {k: v for k, v in DET.items() if k != "score"}])
    put("res_nan_box.json", [{**DET, "bbox": [10, 10, float("nan"), 30]}])
    put("res_inf_score.json", [{**DET, "score": float("inf")}])
    put("res_score_string.json", [{**DET, "score": "0.9"}])
    put("res_bbox_3.json", [{**DET, "bbox": [10, 10, 30]}])
    put("res_bbox_null.json", [{**DET, "bbox": None}])
    put("res_negative_width.json", [{**DET, "bbox": [40, 10, -30, 30]}])
    put("res_unknown_image.json", [DET, {**DET, "image_id": 999}])
    put("res_unknown_category.json", [DET, {**DET, "category_id": 7}])
    put("res_float_image_id.json", [{**DET, "image_id": 1.5}])

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "ok.png")
    paths["ok.png"] = str(root / "ok.png")
    png = (root / "ok.png").read_bytes()
    put("cut.png", png[: len(png) // 3])
    put("zero.png", b"")
    put("text.png", "not an image\n")
    for name, array in [("one.png", np.full((1, 1, 3), 200, np.uint8)),
                        ("wide.png", rng.integers(0, 256, (30, 4000, 3), dtype=np.uint8)),
                        ("tall.png", rng.integers(0, 256, (4000, 30, 3), dtype=np.uint8)),
                        ("gray.png", rng.integers(0, 256, (40, 50), dtype=np.uint8)),
                        ("gray16.png", rng.integers(0, 65536, (40, 50), dtype=np.uint16))]:
        Image.fromarray(array).save(root / name)
        paths[name] = str(root / name)
    (root / "no_images").mkdir()
    paths["no_images"] = str(root / "no_images")

    config = root / "tiny.yaml"
    save_config(make_tiny_config(root / "run_never"), config)
    paths["config"] = str(config)
    put("config_binary.yaml", whole[:300])
    put("config_list.yaml", "- model\n- data\n")
    put("config_cut.yaml", "model:\n  backbone: [resnet18\n")
    paths["missing"] = str(root / "missing.json")
    paths["out"] = str(root / "out")
    paths["root"] = str(root)
    return paths


def _args(*parts):
    """A case's argv: ``{name}`` in a part is replaced by ``files[name]``."""
    return list(parts)


def R(res, gt="gt.json", *extra):
    return _args("eval", "--results", "{" + res + "}", "--annotations", "{" + gt + "}", *extra)


def P(image, *extra, weights="ckpt"):
    return _args("predict", "{" + image + "}", "--weights", "{" + weights + "}", "--out", "{out}", *extra)


def A(*overrides, config="{config}", budget=("--budget-iters", "1"), gammas=("2",), out="{out}"):
    """``densedet ablate`` of one γ run and no loss comparison."""
    return _args("ablate", config, *overrides, *budget, "--out", out, "--gammas", *gammas, "--methods")


def B(*extra):
    """``densedet bench`` of its quickest suite (``peak``) unless ``extra`` names another."""
    return _args("bench", "--quick", "--suite", "peak", *extra)


# (case id, argv with {file} placeholders, exit code, what stderr must name (a file placeholder or a key))
CASES = [
    # -- train
    ("train-missing-config", _args("train", "{missing}"), 2, "{missing}"),
    ("train-binary-config", _args("train", "{config_binary.yaml}"), 2, "{config_binary.yaml}"),
    ("train-list-config", _args("train", "{config_list.yaml}"), 2, "{config_list.yaml}"),
    ("train-truncated-config", _args("train", "{config_cut.yaml}"), 2, "{config_cut.yaml}"),
    ("train-unknown-key", _args("train", "{config}", "solver.no_such_key=1"), 2, "solver.no_such_key"),
    ("train-wrong-type", _args("train", "{config}", "solver.lr=fast"), 2, "solver.lr"),
    ("train-score-thresh-above-1", _args("train", "{config}", "model.score_thresh=5"), 2, "model.score_thresh"),
    ("train-nms-thresh-zero", _args("train", "{config}", "model.nms_thresh=0"), 2, "model.nms_thresh"),
    ("train-output-dir-is-a-file", _args("train", "{config}", "--output-dir", "{ok.png}"), 2,
     "--output-dir {ok.png}: is a file"),
    ("train-config-output-dir-is-a-file", _args("train", "{config}", "train.output_dir={ok.png}"), 2,
     "train.output_dir {ok.png}: is a file"),
    ("demo-minutes-0", _args("demo", "--minutes", "0", "--output-dir", "{out}/demo"), 2, "--minutes 0"),
    ("demo-minutes-nan", _args("demo", "--minutes", "nan", "--output-dir", "{out}/demo"), 2, "--minutes nan"),
    ("demo-output-dir-is-a-file", _args("demo", "--output-dir", "{ok.png}"), 2, "--output-dir {ok.png}: is a file"),
    ("train-focal-gamma-negative", _args("train", "{config}", "model.retinanet.focal_gamma=-1"), 2,
     "model.retinanet.focal_gamma"),
    ("train-focal-alpha-above-1", _args("train", "{config}", "model.retinanet.focal_alpha=25"), 2,
     "model.retinanet.focal_alpha"),
    ("train-truncated-annotations", _args("train", "{config}", "data.train={gt_cut.json}"), 2, "{gt_cut.json}"),
    ("train-annotations-list", _args("train", "{config}", "data.train={gt_list.json}"), 2, "{gt_list.json}"),
    ("train-resume-without-run", _args("train", "{config}", "--resume"), 2, "last.pt"),
    ("train-truncated-init-weights", _args("train", "{config}", "--weights", "{ckpt_cut.pt}"), 2, "{ckpt_cut.pt}"),
    # -- eval --results
    ("eval-results-missing", R("missing"), 2, "{missing}"),
    ("eval-max-dets-not-distinct", R("res.json", "gt.json", "--max-dets", "0", "0", "0"), 2, "--max-dets"),
    ("eval-results-truncated", R("res_cut.json"), 2, "{res_cut.json}"),
    ("eval-results-binary", R("res_binary.json"), 2, "{res_binary.json}"),
    ("eval-results-zero-bytes", R("res_empty.json"), 2, "{res_empty.json}"),
    ("eval-results-not-a-list", R("res_dict.json"), 2, "{res_dict.json}"),
    ("eval-results-records-not-objects", R("res_not_dicts.json"), 2, "record #0"),
    ("eval-results-no-score", R("res_no_score.json"), 2, "'score'"),
    ("eval-results-nan-box", R("res_nan_box.json"), 2, "{res_nan_box.json}"),
    ("eval-results-nan-box-voc", R("res_nan_box.json", "gt.json", "--metric", "voc07"), 2, "{res_nan_box.json}"),
    ("eval-results-inf-score", R("res_inf_score.json"), 2, "score"),
    ("eval-results-score-string", R("res_score_string.json"), 2, "score"),
    ("eval-results-bbox-3-numbers", R("res_bbox_3.json"), 2, "bbox"),
    ("eval-results-bbox-null", R("res_bbox_null.json"), 2, "bbox"),
    ("eval-results-negative-width", R("res_negative_width.json"), 2, "record #0"),
    ("eval-results-unknown-image", R("res_unknown_image.json"), 2, "999"),
    ("eval-results-unknown-category", R("res_unknown_category.json"), 2, "record #1"),
    ("eval-results-float-image-id", R("res_float_image_id.json"), 2, "image_id"),
    ("eval-results-empty-list-is-valid", R("res_empty_list.json"), 0, None),
    ("eval-results-without-annotations", _args("eval", "--results", "{res.json}"), 2, "--annotations"),
    ("eval-annotations-missing", R("res.json", "missing"), 2, "{missing}"),
    ("eval-annotations-truncated", R("res.json", "gt_cut.json"), 2, "{gt_cut.json}"),
    ("eval-annotations-binary", R("res.json", "gt_binary.json"), 2, "{gt_binary.json}"),
    ("eval-annotations-zero-bytes", R("res.json", "gt_empty.json"), 2, "{gt_empty.json}"),
    ("eval-annotations-a-list", R("res.json", "gt_list.json"), 2, "{gt_list.json}"),
    ("eval-annotations-without-images", R("res.json", "gt_no_images.json"), 2, "'images'"),
    ("eval-annotations-images-not-a-list", R("res.json", "gt_images_dict.json"), 2, "'images'"),
    ("eval-annotations-duplicate-image-id", R("res.json", "gt_dup_image.json"), 2, "duplicate image id"),
    ("eval-annotations-duplicate-category-id", R("res.json", "gt_dup_category.json"), 2, "duplicate category id"),
    ("eval-annotations-duplicate-annotation-id", R("res.json", "gt_dup_ann.json"), 2, "duplicate annotation id"),
    ("eval-annotations-unknown-image", R("res.json", "gt_ann_unknown_image.json"), 2, "image id 7"),
    ("eval-annotations-unknown-category", R("res.json", "gt_ann_unknown_category.json"), 2, "category id 9"),
    ("eval-annotations-bbox-string", R("res.json", "gt_bbox_string.json"), 2, "bbox"),
    ("eval-annotations-negative-width-reported", R("res.json", "gt_negative_width.json"), 0,
     "{gt_negative_width.json}"),
    ("eval-annotations-negative-width-strict", R("res.json", "gt_negative_width.json", "--strict"), 2,
     "annotation id 1"),
    ("eval-annotations-zero-height-strict", R("res.json", "gt_zero_height.json", "--strict"), 2, "annotation id 1"),
    ("eval-annotations-nan-box-reported", R("res.json", "gt_nan_box.json"), 0, "{gt_nan_box.json}"),
    ("eval-annotations-nan-box-strict", R("res.json", "gt_nan_box.json", "--strict"), 2, "NaN"),
    # -- eval --weights
    ("eval-weights-missing", _args("eval", "--weights", "{missing}"), 2, "{missing}"),
    ("eval-weights-truncated", _args("eval", "--weights", "{ckpt_cut.pt}"), 2, "{ckpt_cut.pt}"),
    ("eval-weights-zero-bytes", _args("eval", "--weights", "{ckpt_empty.pt}"), 2, "{ckpt_empty.pt}"),
    ("eval-weights-text-file", _args("eval", "--weights", "{ckpt_text.pt}"), 2, "{ckpt_text.pt}"),
    ("eval-weights-not-densedet", _args("eval", "--weights", "{ckpt_foreign.pt}"), 2, "{ckpt_foreign.pt}"),
    ("eval-weights-unknown-override", _args("eval", "--weights", "{ckpt}", "model.no_such_key=1"), 2,
     "model.no_such_key"),
    ("eval-weights-truncated-val-annotations", _args("eval", "--weights", "{ckpt}", "data.format=coco",
                                                     "data.val={gt_cut.json}", "data.val_images={root}"), 2,
     "{gt_cut.json}"),
    # -- predict
    ("predict-missing-image", P("missing"), 2, "{missing}"),
    ("predict-empty-folder", P("no_images"), 2, "{no_images}"),
    ("predict-zero-byte-image", P("zero.png"), 2, "{zero.png}"),
    ("predict-truncated-image", P("cut.png"), 2, "{cut.png}"),
    ("predict-text-as-image", P("text.png"), 2, "{text.png}"),
    ("predict-truncated-checkpoint", P("ok.png", weights="ckpt_cut.pt"), 2, "{ckpt_cut.pt}"),
    ("predict-zero-byte-checkpoint", P("ok.png", weights="ckpt_empty.pt"), 2, "{ckpt_empty.pt}"),
    ("predict-tile-overlap-not-below-tile", P("ok.png", "--tile", "32", "--tile-overlap", "32"), 2, "--tile-overlap"),
    ("predict-negative-tile", P("ok.png", "--tile", "-8"), 2, "--tile: must be >= 0"),
    ("predict-score-thresh-above-1", P("ok.png", "--score-thresh", "15"), 2, "--score-thresh: must be a score"),
    ("predict-draw-thresh-negative", P("ok.png", "--score-thresh-draw", "-0.3"), 2, "--score-thresh-draw"),
    ("predict-out-is-a-file", P("ok.png", "--out", "{ok.png}"), 2, "{ok.png}: is a file"),
    ("predict-batch-size-0", P("ok.png", "--batch-size", "0"), 2, "--batch-size"),
    ("predict-1x1-image", P("one.png"), 0, None),
    ("predict-16-bit-png", P("gray16.png"), 0, None),
    ("predict-device-unknown", P("ok.png", "--device", "tpu0"), 2, "--device tpu0"),
    ("predict-grayscale", P("gray.png"), 0, None),
    ("predict-4000x30", P("wide.png"), 0, None),
    ("predict-30x4000", P("tall.png"), 0, None),
    ("predict-4000x30-tiled", P("wide.png", "--tile", "64", "--tile-overlap", "16"), 0, None),
    # -- export
    ("export-missing-weights", _args("export", "--weights", "{missing}", "--out", "{out}/m.onnx"), 2, "{missing}"),
    ("export-truncated-weights", _args("export", "--weights", "{ckpt_cut.pt}", "--out", "{out}/m.onnx"), 2,
     "{ckpt_cut.pt}"),
    ("export-json-as-weights", _args("export", "--weights", "{ckpt_json.pt}", "--out", "{out}/m.onnx"), 2,
     "{ckpt_json.pt}"),
    ("export-size-not-divisible", _args("export", "--weights", "{ckpt}", "--out", "{out}/m.onnx", "--size", "50",
                                        "50"), 2, "--size"),
    ("export-size-zero", _args("export", "--weights", "{ckpt}", "--out", "{out}/m.onnx", "--size", "0", "64"), 2,
     "--size"),
    ("export-score-thresh-above-1", _args("export", "--weights", "{ckpt}", "--out", "{out}/m.onnx",
                                          "--score-thresh", "30"), 2, "--score-thresh"),
    ("export-opset-too-old", _args("export", "--weights", "{ckpt}", "--out", "{out}/m.onnx", "--opset", "9"), 2,
     "--opset"),
    # -- analyze
    ("analyze-missing-config", _args("analyze", "{missing}"), 2, "{missing}"),
    ("analyze-unknown-key", _args("analyze", "{config}", "model.no_such_key=1"), 2, "model.no_such_key"),
    ("analyze-truncated-annotations", _args("analyze", "{config}", "data.train={gt_cut.json}"), 2, "{gt_cut.json}"),
    ("analyze-binary-annotations", _args("analyze", "{config}", "data.train={gt_binary.json}"), 2,
     "{gt_binary.json}"),
    ("analyze-max-images-negative", _args("analyze", "{config}", "--max-images", "-1", "--out", "{out}"), 2,
     "--max-images"),
    ("analyze-out-is-a-file", _args("analyze", "{config}", "--out", "{ok.png}"), 2, "{ok.png}: is a file"),
    # -- ablate (every case is refused before the first run trains)
    ("ablate-unknown-key", A("model.no_such_key=1"), 2, "model.no_such_key"),
    ("ablate-budget-iters-0", A(budget=("--budget-iters", "0")), 2, "--budget-iters"),
    ("ablate-budget-minutes-negative", A(budget=("--budget-minutes", "-2")), 2, "--budget-minutes"),
    ("ablate-budget-minutes-nan", A(budget=("--budget-minutes", "nan")), 2, "--budget-minutes"),
    ("ablate-gammas-negative", A(gammas=("-1",)), 2, "--gammas"),
    ("ablate-nothing-to-run", A(gammas=()), 2, "--methods"),
    ("ablate-out-is-a-file", A(out="{ok.png}"), 2, "{ok.png}: is a file"),
    ("ablate-refinedet-config", A(config="refinedet_demo_digits"), 2, "model.arch is refinedet"),
    ("ablate-truncated-annotations", A("data.train={gt_cut.json}"), 2, "{gt_cut.json}"),
    # -- bench (refused before any timing)
    ("bench-unknown-model", B("--models", "retinanet_r18"), 2, "--models"),
    ("bench-repeat-0", B("--repeat", "0"), 2, "--repeat"),
    ("bench-threads-negative", B("--threads", "-1"), 2, "--threads"),
    ("bench-sizes-0", B("--suite", "infer", "--sizes", "0"), 2, "--sizes"),
    ("bench-batches-0", B("--suite", "infer", "--sizes", "64", "--batches", "0"), 2, "--batches"),
    ("bench-device-unknown", B("--device", "tpu0"), 2, "--device tpu0"),
    ("bench-out-is-a-folder", B("--out", "{no_images}"), 2, "{no_images}: is a folder"),
    ("bench-out-under-a-file", B("--out", "{ok.png}/bench.md"), 2, "{ok.png} is a file"),
]

# Run as real subprocesses in the default (fast) suite as well.
SUBPROCESS_CASES = {"eval-results-truncated", "eval-annotations-a-list", "train-resume-without-run",
                    "predict-4000x30", "eval-weights-truncated"}


def _fill(value: str | None, files: dict[str, str]) -> str | None:
    if value is None:
        return None
    for name, path in files.items():
        value = value.replace("{" + name + "}", path)
    return value


def _check(case_id: str, code: int, named: str | None, got: int, err: str, files: dict[str, str]) -> None:
    assert "Traceback" not in err, f"{case_id}: traceback on stderr:\n{err}"
    assert got == code, f"{case_id}: exit code {got}, expected {code}; stderr:\n{err}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith(f"densedet {case_id.split('-')[0]}: error: ")]
        assert len(lines) == 1, f"{case_id}: expected one error line, got:\n{err}"
    if named is not None:
        assert _fill(named, files) in err, f"{case_id}: stderr does not name {_fill(named, files)!r}:\n{err}"


@pytest.mark.parametrize("case_id, argv, code, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case_id, argv, code, named, files, capsys, caplog, restore_torch_globals,
                              monkeypatch):
    monkeypatch.delenv("DENSEDET_DEBUG", raising=False)
    argv = [_fill(a, files) for a in argv]
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        got = exit_.code
    err = capsys.readouterr().err + caplog.text
    _check(case_id, code, named, got, err, files)
    if code == 0 and argv[0] == "predict":
        assert json.loads((Path(files["out"]) / "images.json").read_text())[0]["width"] > 0


def _run_subprocess(argv: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DENSEDET_DEBUG"}
    env.update(PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "densedet", *argv], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=600)


@pytest.mark.parametrize("case_id, argv, code, named", [c for c in CASES if c[0] in SUBPROCESS_CASES],
                         ids=[c[0] for c in CASES if c[0] in SUBPROCESS_CASES])
def test_bad_input_as_a_subprocess(case_id, argv, code, named, files):
    proc = _run_subprocess([_fill(a, files) for a in argv])
    _check(case_id, code, named, proc.returncode, proc.stderr, files)


@pytest.mark.slow
@pytest.mark.parametrize("case_id, argv, code, named", CASES, ids=[c[0] for c in CASES])
def test_every_case_as_a_subprocess(case_id, argv, code, named, files):
    proc = _run_subprocess([_fill(a, files) for a in argv])
    _check(case_id, code, named, proc.returncode, proc.stderr, files)


def test_there_are_at_least_40_cases_over_every_verb():
    assert len(CASES) >= 40
    assert {c[1][0] for c in CASES} >= {"train", "eval", "predict", "export", "analyze", "ablate", "bench"}
    assert any("--weights" in c[1] for c in CASES if c[1][0] == "eval")
    assert len({c[0] for c in CASES}) == len(CASES)


# -- a bug is not bad input -----------------------------------------------------------------------

def _broken_verb(monkeypatch):
    from densedet.commands import eval as eval_command

    def boom(args):
        raise KeyError("an internal key")

    monkeypatch.setattr(eval_command, "run", boom)   # add_parser reads it when main builds the parser


def test_an_unexpected_exception_is_one_line_saying_it_is_a_bug(monkeypatch, capsys):
    monkeypatch.delenv("DENSEDET_DEBUG", raising=False)
    _broken_verb(monkeypatch)
    assert main(["eval", "--results", "r.json"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "densedet eval: error:" in err and "bug" in err and "KeyError" in err and "an internal key" in err
    assert "--debug" in err and "DENSEDET_DEBUG=1" in err


@pytest.mark.parametrize("how", ["--debug first", "--debug after the verb", "DENSEDET_DEBUG=1"])
def test_debug_shows_the_traceback(how, monkeypatch, capsys):
    monkeypatch.delenv("DENSEDET_DEBUG", raising=False)
    _broken_verb(monkeypatch)
    argv = ["eval", "--results", "r.json"]
    if how == "--debug first":
        argv = ["--debug"] + argv
    elif how == "--debug after the verb":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv("DENSEDET_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal key" in err


def test_debug_shows_the_traceback_of_bad_input_too(files, capsys):
    assert main(["--debug", "eval", "--results", files["res_cut.json"], "--annotations", files["gt.json"]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("densedet eval: error: ")


def test_densedet_errors_share_one_base_and_keep_their_old_ones():
    from densedet.config import ConfigError
    from densedet.data import DatasetError
    from densedet.engine.checkpoint import CheckpointError
    from densedet.engine.trainer import TrainingError
    from densedet.serialization import UnreadableFile
    for cls, old in [(ConfigError, ValueError), (DatasetError, ValueError), (CheckpointError, ValueError),
                     (TrainingError, RuntimeError), (UnreadableFile, ValueError)]:
        assert issubclass(cls, DensedetError) and issubclass(cls, old)
