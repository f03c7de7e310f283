"""report.html (densedet.run_report): the numbers behind its sections on hand-made cases, a page that
links only files it wrote and fetches nothing, the end of a training run and ``densedet eval --report``
writing it, and (slow) the page opened in headless Chromium with every picture loaded."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.cli import main
from densedet.config import Config, to_dict
from densedet.data import load_coco
from densedet.engine import report
from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
from densedet.engine.trainer import train
from densedet.evaluation.errors import ImageResult, confusion_matrix, images_worst_first
from densedet.models import build_from_config
from densedet.run_report import (REPORT_FOLDER, ReportOptions, metrics_table, check_in_browser, find_chromium,
                                 gallery_entries, write_report)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent


class _Page(HTMLParser):
    """What a page refers to (``src`` / ``href`` of every tag), its gallery's image names in order and
    the cells of its confusion table."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.gallery: list[str] = []
        self.confusion: list[list[str]] = []
        self._in_confusion = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        if tag == "img" and "/gallery/" in attrs.get("src", "") and attrs["src"] not in self.gallery[-1:]:
            self.gallery.append(attrs["src"])
        if tag == "table" and attrs.get("class") == "confusion":
            self._in_confusion = True
        if self._in_confusion and tag == "tr":
            self.confusion.append([])
        self._in_cell = self._in_confusion and tag in ("td", "th")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_confusion = False
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell and data.strip():
            self.confusion[-1].append(data.strip())


def read_page(html: Path) -> _Page:
    page = _Page()
    page.feed(html.read_text(encoding="utf-8"))
    return page


def assert_self_contained(html: Path) -> _Page:
    """Every file the page links exists beside it; nothing is fetched from elsewhere."""
    page = read_page(html)
    text = html.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert "link" not in page.tags                              # no stylesheet or font from outside
    files = [link for link in page.links if not link.startswith("#")]
    assert files, "the page shows no pictures"
    for link in files:
        assert (html.parent / link).is_file(), link
    return page


# -- a hand-made split: three 64 px images, classes "cat" and "dog" -------------------------------------

BOXES = {1: ([[4, 4, 28, 28]], [0]),                   # one cat
         2: ([[4, 4, 28, 28], [34, 34, 60, 60]], [0, 1]),   # a cat and a dog
         3: ([[10, 10, 50, 50]], [1])}                 # one dog
RESULTS = [  # image 1: found; image 2: the dog is called a cat and there is a background box; image 3: missed
    {"image_id": 1, "category_id": 1, "bbox": [4, 4, 24, 24], "score": 0.9},
    {"image_id": 2, "category_id": 1, "bbox": [4, 4, 24, 24], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [34, 34, 26, 26], "score": 0.7},
    {"image_id": 2, "category_id": 2, "bbox": [40, 0, 20, 10], "score": 0.6},
    {"image_id": 3, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.1},
]


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand_made")
    images, annotations = [], []
    for image_id, (boxes, labels) in BOXES.items():
        Image.new("RGB", (64, 64), (40 * image_id, 120, 200)).save(root / f"im{image_id}.png")
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "width": 64, "height": 64})
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1)})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (root / "gt.json").write_text(json.dumps(doc))
    cfg = Config()
    cfg.model.arch, cfg.model.backbone, cfg.model.num_classes = "retinanet", "resnet18", 2
    cfg.model.retinanet.fpn_channels, cfg.model.retinanet.head_convs = 32, 1
    cfg.model.min_size, cfg.model.max_size, cfg.model.size_divisible = 64, 64, 64
    cfg.data.format, cfg.data.train, cfg.data.train_images = "coco", str(root / "gt.json"), str(root)
    cfg.data.val, cfg.data.val_images = str(root / "gt.json"), str(root)
    return {"root": root, "cfg": cfg, "data": load_coco(str(root / "gt.json"), str(root))}


def test_gallery_puts_the_image_with_most_errors_first_then_the_lower_recall():
    per_image = [{"image_id": 1, "errors": 0, "recall": 1.0, "objects": 1},
                 {"image_id": 2, "errors": 2, "recall": 0.5, "objects": 2},
                 {"image_id": 3, "errors": 2, "recall": 0.0, "objects": 1},
                 {"image_id": 4, "errors": 0, "recall": 1.0, "objects": 3}]
    assert images_worst_first(per_image) == [2, 1, 3, 0]    # 2 errors: recall 0 first; then more objects
    images = [ImageResult.make(i, [[0, 0, 8, 8]], [0], [[0, 0, 8, 8], [1, 1, 9, 9]], [0.2, 0.04], [0, 0])
              for i in range(1, 5)]
    entries = gallery_entries(images, per_image, count=3)
    assert [e["image"].image_id for e in entries] == [3, 2, 4]
    assert [d[2] for d in entries[0]["detections"]] == [0.2]          # below the slider's floor: not on the page


def test_themetrics_table_puts_single_scale_beside_tta():
    summary = {"AP": 0.5, "AP50": 0.7, "single_scale": {"AP": 0.4, "AP50": 0.6},
               "tta": {"scales": [96, 128], "flip": False, "merge": "vote"}, "per_class": {"cat": 0.3, "dog": -1}}
    table = metrics_table(summary)
    assert table["columns"] == ["single scale", "TTA 96/128 vote"]
    assert table["rows"] == [("AP", ["0.400", "0.500"]), ("AP50", ["0.600", "0.700"])]
    assert table["per_class"] == [("cat", "0.300"), ("dog", "-")]        # -1: no ground truth
    assert metrics_table({"AP": 0.25})["columns"] == [""]


def test_the_report_writes_every_section_and_links_only_files_it_wrote(hand_made, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "lr": 0.01, "loss": 1.0 / i,
                                                           "loss_cls": 0.5 / i}) + "\n" for i in (1, 2, 3)))
    html = write_report(run, hand_made["cfg"], hand_made["data"], RESULTS, command=["densedet", "train", "x y"],
                        run_dir=run, detections="hand-made", options=ReportOptions(analysis_images=3))
    assert html == run / "report.html"
    page = assert_self_contained(html)
    text = html.read_text()
    for picture in ("curves.png", "pr_curves.png", "analysis/box_sizes.png"):
        assert f"{REPORT_FOLDER}/{picture}" in page.links, picture
    # worst first: image 2 (a wrong class and a background box), image 3 (its dog missed), image 1
    assert [Path(src).stem.split("_", 1)[1] for src in page.gallery] == ["im2", "im3", "im1"]
    # the confusion table shows confusion_matrix's counts at the report's threshold (0.3)
    images = [ImageResult.make(i, b, l, *_dets(i)) for i, (b, l) in BOXES.items()]
    matrix = confusion_matrix(images, 2, score_thresh=0.3)
    assert matrix.tolist() == [[2, 0, 0], [1, 0, 1], [0, 1, 0]]
    cells = [row[1:] for row in page.confusion[1:]]
    assert cells == [[str(n) for n in row] for row in matrix.tolist()]
    assert "densedet train &#39;x y&#39;" in text                 # the command, quoted as a shell would
    assert "the data and anchor analysis failed" not in text
    assert 'data-score="0.1000"' in text and 'data-score="0.9000"' in text   # the slider's boxes


def _dets(image_id: int) -> tuple[list, list, list]:
    mine = [r for r in RESULTS if r["image_id"] == image_id]
    return ([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)], [r["score"] for r in mine],
            [r["category_id"] - 1 for r in mine])


def test_the_gallery_shows_16_bit_images_as_the_model_sees_them(hand_made, tmp_path):
    """PIL's own conversion clips 16-bit grayscale to white; the gallery scales it as the loader does."""
    root = tmp_path / "gray16"
    shutil.copytree(hand_made["root"], root)
    for image_id in BOXES:
        Image.fromarray(np.full((64, 64), 257 * (30 + 40 * image_id), np.uint16)).save(root / f"im{image_id}.png")
    html = write_report(tmp_path, hand_made["cfg"], load_coco(str(root / "gt.json"), str(root)), RESULTS,
                        options=ReportOptions(analysis_images=3))
    for src in assert_self_contained(html).gallery:
        image_id = int(Path(src).stem.split("_im")[1])
        gray = np.asarray(Image.open(tmp_path / src))
        assert abs(float(np.median(gray)) - (30 + 40 * image_id)) <= 2, src     # JPEG rounding


def test_a_failing_analysis_is_a_note_on_a_page_still_written(hand_made, tmp_path):
    cfg = copy.deepcopy(hand_made["cfg"])
    cfg.data.train = str(tmp_path / "missing.json")
    html = write_report(tmp_path, cfg, hand_made["data"], RESULTS, options=ReportOptions(analysis_images=3))
    assert_self_contained(html)
    assert "the data and anchor analysis failed" in html.read_text() and "missing.json" in html.read_text()
    assert "No training log" in html.read_text()                  # no run folder: no curves, no empty frame


def test_the_template_ships_in_the_wheel():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "templates/*.j2" in package_data["densedet"]
    assert (REPO / "densedet" / "templates" / "report.html.j2").is_file()
    assert "jinja2" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


# -- from the command line and at the end of training ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(make_tiny_config, tmp_path_factory):
    """An untrained tiny RetinaNet with a low score threshold (so it detects something), as a checkpoint
    in a run folder with a training log."""
    root = tmp_path_factory.mktemp("report_ckpt")
    cfg = make_tiny_config(root / "run")
    cfg.model.score_thresh = 0.01
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    path = root / "run" / "model_final.pt"
    path.parent.mkdir(parents=True)
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(10)], "category_ids": list(range(1, 11)), "iteration": 0},
                path)
    (path.parent / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "lr": 0.01, "loss": 1.5}) + "\n")
    return path


def test_eval_report_writes_the_page_for_a_checkpoint(tiny_checkpoint, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "report_here"
    assert main(["eval", "--weights", str(tiny_checkpoint), "--report", str(out), "--precision", "fp32"]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    page = assert_self_contained(out / "report.html")
    assert len(page.gallery) == 4                                 # the 4 validation scenes
    assert f"{REPORT_FOLDER}/curves.png" in page.links            # the log beside the checkpoint


def test_eval_report_refuses_bad_input_in_one_line(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "nope.pt"), "--report", str(tmp_path / "r")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["eval", "--weights", str(tiny_checkpoint), "--report", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["eval", "--results", "r.json", "--annotations", "a.json", "--report", str(tmp_path)]) == 2
    assert "--report: needs --weights" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(make_tiny_config, tmp_path_factory, keep_torch_globals):
    """A 2-iteration run of the tiny config: its folder, with report.html written by finish_run."""
    cfg = make_tiny_config(tmp_path_factory.mktemp("report_run") / "run")
    cfg.train.max_iters, cfg.model.score_thresh = 2, 0.01
    lines: list[str] = []
    with keep_torch_globals():
        train(cfg, log=lines.append)
    return {"out": Path(cfg.train.output_dir), "log": lines}


def test_the_run_report_reads_the_run_folder_and_shows_single_scale_beside_tta(tiny_checkpoint, digit_scenes,
                                                                               tmp_path, restore_torch_globals):
    from densedet.engine.checkpoint import model_from_checkpoint
    model, cfg, _ = model_from_checkpoint(tiny_checkpoint)
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parent, run)
    (run / "metrics.json").write_text(json.dumps({"AP": 0.5, "single_scale": {"AP": 0.25}, "per_class": {"0": 0.1},
                                                  "tta": {"scales": [96, 128], "flip": True, "rotate": True,
                                                          "merge": "vote"}}))
    lines: list[str] = []
    data = load_coco(digit_scenes["val_json"], digit_scenes["val_images"])
    html = report.write_run_report(cfg, model, data, torch.device("cpu"), None, run, lines.append,
                                   ReportOptions(gallery_size=2, analysis_images=2))
    assert html == run / "report.html" and lines[0].startswith(f"report: {html}")
    page = assert_self_contained(html)
    assert len(page.gallery) == 2 and f"{REPORT_FOLDER}/curves.png" in page.links
    text = html.read_text()
    assert "<th>single scale</th><th>TTA 96/128 flip turns vote</th>" in text
    assert "<td>0.250</td><td>0.500</td>" in text


@pytest.mark.slow
def test_training_ends_with_the_report(tiny_run):
    out = tiny_run["out"]
    assert any(line.startswith("report: ") for line in tiny_run["log"]), tiny_run["log"][-5:]
    page = assert_self_contained(out / "report.html")
    assert f"{REPORT_FOLDER}/curves.png" in page.links and len(page.gallery) == 4
    assert "max_iters: 2" in (out / "report.html").read_text()    # the config is on the page


def test_a_failing_report_is_said_and_the_run_still_finishes(tiny_config, restore_torch_globals, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("jinja exploded")

    monkeypatch.setattr(report, "write_run_report", broken)
    monkeypatch.setattr(report, "plot_curves", lambda *a, **k: None)
    monkeypatch.setattr(report, "draw_predictions", lambda *a, **k: None)
    cfg = tiny_config()
    cfg.train.max_iters = 1
    lines: list[str] = []
    train(cfg, log=lines.append)
    assert "(could not write report.html: jinja exploded)" in lines
    assert (Path(cfg.train.output_dir) / "model_final.pt").is_file() and lines[-1].startswith("run folder:")


# -- in a real browser -------------------------------------------------------------------------------------

def _chromium() -> str:
    """Chromium's path, installed with apt when missing and we are root; skips otherwise."""
    if find_chromium() is None:
        if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900)
        if find_chromium() is None:
            pytest.skip("no Chromium on PATH and cannot install it (not root, or apt-get install chromium failed)")
    return find_chromium()


@pytest.mark.slow
def test_the_report_of_a_tiny_run_loads_in_headless_chromium(tiny_run):
    browser = _chromium()
    out = tiny_run["out"]
    result = check_in_browser(out / "report.html", out / REPORT_FOLDER / "screenshot.png", browser=browser)
    page = read_page(out / "report.html")
    assert result["images"] == len([link for link in page.links if link.endswith((".png", ".jpg"))])
    assert (result["broken"], result["errors"]) == (0, 0), result["error_messages"]
    assert result["console"] == [], result["console"]
    with Image.open(result["screenshot"]) as shot:
        assert shot.size == (1400, 3000)
        assert np.asarray(shot.convert("L")).std() > 10          # not a blank page
