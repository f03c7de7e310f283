"""``densedet train --data``: annotations alone in, a derived config out (written, rerunnable), training run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from densedet.cli import main
from densedet.config import load_config

pytestmark = pytest.mark.usefixtures("no_plots", "restore_torch_globals")


def write_coco_set(folder, n_images: int = 12, size: int = 96, seed: int = 0) -> str:
    """``n_images`` images of ``size`` px with 1-3 squares of 12-24 px (red: class "a", blue: "b"), one
    image without objects; a COCO json beside them. Returns the json's path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        for _ in range(0 if i == 0 else int(rng.integers(1, 4))):
            side = int(rng.integers(12, 25))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            label = int(rng.integers(0, 2))
            pixels[y:y + side, x:x + side] = (220, 30, 30) if label == 0 else (30, 30, 220)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0})
        Image.fromarray(pixels).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": size, "width": size})
    path = folder / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return str(path)


def test_train_from_data_alone_writes_a_config_that_train_config_reruns(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set")
    run = tmp_path / "run"
    code = main(["train", "--data", data, "--minutes", "0.1", "--top-down", "--output-dir", str(run),
                 "train.max_iters=2", "train.pretrain_minutes=0", "train.pretrain_iters=2",
                 "train.pretrain_batch_size=8", "test.num_vis=0", "train.precision=fp32"])
    assert code == 0
    err = capsys.readouterr().err
    assert "model.anchor_sizes" in err and "IoU >= 0.5" in err           # the table of values and reasons
    saved = load_config(run / "config.yaml")
    assert saved.model.num_classes == 2 and saved.data.format == "coco"
    assert saved.data.val_fraction == 0.1 and saved.data.tune_fraction == 0.1 and saved.test.tta_choose
    assert saved.train.max_iters == 2                                     # overrides on top of the derived values
    assert saved.data.rotate90                                            # --top-down: quarter turns
    metrics = json.loads((run / "metrics.json").read_text())
    assert "tta_choice" in metrics                                        # the TTA chosen on the tune split
    chosen = metrics["tta_choice"]["chosen"]
    assert saved.test.tta_scales == (chosen["scales"] if chosen else [])
    # the written config reruns as any config
    again = tmp_path / "again"
    assert main(["train", str(run / "config.yaml"), "--output-dir", str(again), "test.tta_choose=false"]) == 0
    assert (again / "metrics.json").is_file()
    # a finished run folder resumes with its own config: nothing left to train, evaluated again
    assert main(["train", "--resume", "--output-dir", str(again)]) == 0
    assert "resumed" in capsys.readouterr().err


def test_train_needs_a_config_or_data(capsys):
    assert main(["train"]) == 2
    assert "--data" in capsys.readouterr().err


def test_data_of_unknown_format_names_the_file(tmp_path, capsys):
    path = tmp_path / "boxes.txt"
    path.write_text("hello world\n")
    assert main(["train", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "boxes.txt" in err and "cannot tell the annotation format" in err


def test_data_with_a_config_is_refused(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set", n_images=4)
    assert main(["train", "demo_digits", "--data", data]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["train", "demo_digits", "--top-down"]) == 2
    assert "data.rotate90=true" in capsys.readouterr().err


@pytest.mark.slow
def test_refinedet_from_data_keeps_its_caffe_settings(tmp_path):
    data = write_coco_set(tmp_path / "set")
    run = tmp_path / "run"
    # --model refinedet: its own derived settings; a fixed step count keeps the test short
    assert main(["train", "--data", data, "--model", "refinedet320_r18", "--no-flip", "--output-dir", str(run),
                 "train.max_iters=1", "train.max_minutes=0", "test.tta_choose=false", "test.num_vis=0",
                 "model.refinedet.image_size=64", "train.precision=fp32"]) == 0
    tree = yaml.safe_load((run / "config.yaml").read_text())
    assert tree["model"]["arch"] == "refinedet" and tree["data"]["hflip_prob"] == 0.0
    assert tree["model"]["bbox_reg_weights"] == [10.0, 10.0, 5.0, 5.0]   # RefineDet's Caffe settings stay


def test_read_annotations_detects_each_format(tmp_path):
    from densedet.commands.train import read_annotations
    write_coco_set(tmp_path / "set", n_images=3)
    (tmp_path / "boxes.csv").write_text("set/1.png,1,2,30,40,cat\nset/2.png,,,,,\n")
    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "1.xml").write_text("<annotation><filename>1.png</filename><size><width>96</width><height>96</height>"
                               "</size><object><name>cat</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
                               "<ymax>30</ymax></bndbox></object></annotation>")
    data, kind, _, _ = read_annotations(str(tmp_path / "set" / "train.json"), None)
    assert kind == "coco" and len(data.records) == 3
    data, kind, _, _ = read_annotations(str(tmp_path / "boxes.csv"), None)
    assert kind == "csv" and data.class_names == ["cat"] and len(data.records[1]) == 0
    data, kind, _, images = read_annotations(str(voc), str(tmp_path / "set"))
    assert kind == "voc" and data.records[0].file_name == str(tmp_path / "set" / "1.png") and images
    data, kind, _, _ = read_annotations(str(voc / "*.xml"), None)
    assert kind == "voc" and data.class_names == ["cat"]


def test_images_in_a_folder_named_as_the_annotation_file(tmp_path):
    from densedet.commands.train import read_annotations
    write_coco_set(tmp_path / "train", n_images=2)
    (tmp_path / "train" / "train.json").rename(tmp_path / "train.json")     # train.json beside train/
    data, _, _, images = read_annotations(str(tmp_path / "train.json"), None)
    assert images == str(tmp_path / "train") and data.records[0].file_name.startswith(images)


def test_images_in_a_jpegimages_or_images_folder_beside_the_annotations(tmp_path):
    """Pascal VOC's Annotations/ + JPEGImages/, and the annotations/ + images/ of many exports, are
    read without --images."""
    from densedet.commands.train import read_annotations
    write_coco_set(tmp_path / "VOC" / "JPEGImages", n_images=2)
    annotations = tmp_path / "VOC" / "Annotations"
    annotations.mkdir()
    (annotations / "1.xml").write_text("<annotation><filename>1.png</filename><object><name>cat</name><bndbox>"
                                       "<xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox>"
                                       "</object></annotation>")
    data, kind, _, images = read_annotations(str(annotations), None)
    assert kind == "voc" and images == str(tmp_path / "VOC" / "JPEGImages")
    assert data.records[0].file_name == os.path.join(images, "1.png")
    write_coco_set(tmp_path / "set" / "images", n_images=2)
    (tmp_path / "set" / "annotations").mkdir()
    (tmp_path / "set" / "images" / "train.json").rename(tmp_path / "set" / "annotations" / "train.json")
    data, kind, _, images = read_annotations(str(tmp_path / "set" / "annotations" / "train.json"), None)
    assert kind == "coco" and images == str(tmp_path / "set" / "images")
    assert os.path.isfile(data.records[1].file_name)


def test_weights_file_kinds(tmp_path):
    import torch
    from densedet.commands.train import weights_kind
    from densedet.errors import UsageError
    torch.save({"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "r18.pth")
    torch.save({"model": {"backbone.body.conv1.weight": torch.zeros(1)}, "config": {}}, tmp_path / "det.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "odd.pt")
    assert weights_kind(str(tmp_path / "r18.pth")) == "imagenet"
    assert weights_kind(str(tmp_path / "det.pt")) == "detection"
    with pytest.raises(UsageError, match="odd.pt"):
        weights_kind(str(tmp_path / "odd.pt"))
