"""What ``densedet train --data`` and the training engine do with a validation file that differs from the
training annotations (another class order, another format, missing or mis-sized images), with repairs
made by a reader before a split, and with budgets too short to train."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.cli import main
from densedet.commands.eval import _split_for
from densedet.config import load_config
from densedet.data import DatasetError, align_classes, load_coco, load_csv, to_coco_dict
from densedet.data.split import split_by_image
from densedet.evaluation import detections_to_coco, evaluate_coco
from densedet.engine.data import check_image_files, load_split, shrink_to_input
from tests.test_train_data import write_coco_set

pytestmark = pytest.mark.usefixtures("no_plots", "restore_torch_globals")

QUICK = ["train.max_iters=1", "train.pretrain_minutes=0", "train.pretrain_iters=0", "test.num_vis=0",
         "train.precision=fp32", "test.tta_choose=false"]


def reorder_categories(json_path: str, out_path: str) -> None:
    """The same annotations with the categories' ids swapped: "a" is id 2 and "b" id 1, listed b first."""
    doc = json.loads(open(json_path).read())
    for ann in doc["annotations"]:
        ann["category_id"] = 3 - ann["category_id"]
    doc["categories"] = [{"id": 1, "name": "b"}, {"id": 2, "name": "a"}]
    with open(out_path, "w") as f:
        json.dump(doc, f)


def test_align_classes_renumbers_labels_by_name_and_keeps_coco_ids(tmp_path):
    train = load_coco(write_coco_set(tmp_path / "set"), str(tmp_path / "set"))
    reorder_categories(str(tmp_path / "set" / "train.json"), str(tmp_path / "set" / "val.json"))
    other = load_coco(str(tmp_path / "set" / "val.json"), str(tmp_path / "set"))
    assert other.class_names == ["b", "a"] and train.class_names == ["a", "b"]
    aligned = align_classes(other, train.class_names)
    assert aligned.class_names == ["a", "b"] and aligned.category_ids == [2, 1]
    for mine, theirs in zip(train.records, aligned.records):
        np.testing.assert_array_equal(mine.labels, theirs.labels)      # the same boxes, the same classes
    # the ground truth written for scoring keeps the file's own ids, each under its own name
    gt = to_coco_dict(aligned)
    assert {c["name"]: c["id"] for c in gt["categories"]} == {"a": 2, "b": 1}
    assert [a["category_id"] for a in gt["annotations"]] == [a["category_id"] for a in
                                                             json.loads(open(tmp_path / "set" / "val.json").read())["annotations"]]
    assert align_classes(train, ["a", "b"]) is train
    # perfect detections of "a" alone, written as the engine writes them: AP 1 under "a", 0 under "b"
    dets = [{"boxes": torch.from_numpy(r.boxes[r.labels == 0]), "labels": torch.zeros(int((r.labels == 0).sum()), dtype=torch.int64),
             "scores": torch.ones(int((r.labels == 0).sum()))} for r in aligned.records]
    results = detections_to_coco(dets, [r.image_id for r in aligned.records], aligned.category_ids)
    per_class = evaluate_coco(results, gt)["per_class"]
    assert per_class["a"] == pytest.approx(1.0) and per_class["b"] == 0.0


def test_align_classes_gives_a_missing_class_an_unused_id_and_refuses_an_unknown_one(tmp_path):
    train = load_coco(write_coco_set(tmp_path / "set"), str(tmp_path / "set"))
    wider = align_classes(train, ["c", "a", "b"])
    assert wider.category_ids == [3, 1, 2]                              # "c": an id the file does not use
    assert {int(label) for r in wider.records for label in r.labels} <= {1, 2}
    with pytest.raises(DatasetError, match=r"train.json: classes 'b' are not among the 1 training classes \(a\)"):
        align_classes(train, ["a"])


def test_a_coco_val_with_another_category_order_trains_and_scores_by_name(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set")
    val = str(tmp_path / "set" / "val.json")
    reorder_categories(data, val)
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--val", val, "--minutes", "0.1", "--output-dir", str(run), *QUICK]) == 0
    assert json.loads((run / "metrics.json").read_text())["AP"] >= 0       # refused before: "classes differ"
    # read from the run's config, the file keeps its own order; the trainer and `densedet eval` match it
    # to the model's classes by name
    cfg = load_config(run / "config.yaml")
    assert load_split(cfg.data, "val").class_names == ["b", "a"]
    args = argparse.Namespace(split="val", weights=str(run / "model_final.pt"))
    assert _split_for(cfg, args, ["a", "b"]).category_ids == [2, 1]
    assert main(["eval", "--weights", str(run / "model_final.pt"), "--precision", "fp32"]) == 0


def test_a_csv_train_with_a_coco_val_reads_each_with_its_own_reader(tmp_path):
    data = write_coco_set(tmp_path / "set")
    doc = json.loads(open(data).read())
    names = {1: "a", 2: "b"}
    rows = [f"{i['file_name']},,,,," for i in doc["images"]]
    rows += [f"{doc['images'][a['image_id'] - 1]['file_name']},{a['bbox'][0]},{a['bbox'][1]},"
             f"{a['bbox'][0] + a['bbox'][2]},{a['bbox'][1] + a['bbox'][3]},{names[a['category_id']]}"
             for a in doc["annotations"]]
    (tmp_path / "set" / "train.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "set" / "train.csv"), "--val", data, "--minutes", "0.1",
                 "--output-dir", str(run), *QUICK]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.data.format == "csv" and cfg.data.val_format == "coco"
    val = load_split(cfg.data, "val")
    assert val.class_names == ["a", "b"] and len(val.records) == len(doc["images"])


def test_a_validation_file_without_objects_is_refused_before_training(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set")
    doc = json.loads(open(data).read())
    empty = tmp_path / "set" / "empty_val.json"
    empty.write_text(json.dumps({**doc, "annotations": [dict(a, iscrowd=1) for a in doc["annotations"][:2]]}))
    assert main(["train", "--data", data, "--val", str(empty), "--minutes", "0.1",
                 "--output-dir", str(tmp_path / "run"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "hold no objects" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_fine_tuning_a_one_scale_checkpoint_resizes_as_the_new_data_says(tmp_path):
    # a checkpoint trained with every image at one factor (model.scale_as), fine-tuned on images of one
    # size: the architecture and anchors come from the checkpoint, how images are resized from the data
    data = write_coco_set(tmp_path / "set")
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--data", data, "--minutes", "0.1", "--output-dir", str(first), "model.scale_as=[64,64]",
                 *QUICK]) == 0
    assert load_config(first / "config.yaml").model.scale_as == [64, 64]
    assert main(["train", "--data", data, "--weights", str(first / "model_final.pt"), "--minutes", "0.1",
                 "--output-dir", str(second), *QUICK]) == 0
    assert load_config(second / "config.yaml").model.scale_as is None


def test_a_detection_checkpoint_of_another_model_or_class_count_is_refused_before_any_setting(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set")
    first = tmp_path / "first"
    assert main(["train", "--data", data, "--minutes", "0.1", "--output-dir", str(first), *QUICK]) == 0
    weights = str(first / "model_final.pt")
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--weights", weights, "--model", "refinedet320_r18",
                 "--output-dir", str(run)]) == 2
    assert f"{weights}: a retinanet resnet18 detector; --model refinedet320_r18 names another" in capsys.readouterr().err
    doc = json.loads(open(data).read())
    doc["categories"].append({"id": 3, "name": "c"})
    doc["annotations"][0]["category_id"] = 3
    three = tmp_path / "set" / "three.json"
    three.write_text(json.dumps(doc))
    assert main(["train", "--data", str(three), "--weights", weights, "--output-dir", str(run)]) == 2
    assert f"{weights}: a detector of 2 classes; the data has 3" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_a_budget_of_no_minutes_is_refused_by_its_flag(tmp_path, capsys, minutes):
    data = write_coco_set(tmp_path / "set", n_images=4)
    assert main(["train", "--data", data, "--minutes", minutes, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--minutes {minutes}" in err and "more than 0 minutes" in err and "Traceback" not in err


def test_a_split_keeps_the_readers_repairs(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    rows = []
    for i in range(10):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,4,4,12,12,a")
    rows += ["0.png,20,20,40,40,a", "1.png,9,9,3,3,a"]            # one box clipped, one dropped
    (folder / "boxes.csv").write_text("\n".join(rows) + "\n")
    data = load_csv(str(folder / "boxes.csv"))
    assert (data.report.clipped, data.report.dropped) == (1, 1)
    parts = split_by_image(data, 0.1, 0.1, seed=0)
    assert all((part.report.clipped, part.report.dropped) == (1, 1) for part in parts.values())
    assert "1 boxes clipped" in parts["train"].report.summary()


def test_missing_or_missized_held_out_images_are_found_before_training(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set")
    doc = json.loads(open(data).read())
    doc["images"][3]["file_name"] = "gone.png"
    (tmp_path / "set" / "val.json").write_text(json.dumps(doc))
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--val", str(tmp_path / "set" / "val.json"), "--minutes", "5",
                 "--output-dir", str(run), "train.pretrain_minutes=0", "train.pretrain_iters=0"]) == 2
    assert "gone.png: image file not found" in capsys.readouterr().err
    assert not (run / "last.pt").exists()                             # not one step was trained
    doc["images"][3]["file_name"] = "3.png"
    doc["images"][3]["width"] = 120                                   # the file is 96 px wide
    val = load_coco_dict(tmp_path, doc)
    with pytest.raises(DatasetError, match="annotation says 120x96 .* decodes to 96x96"):
        check_image_files(val)


def test_a_missized_training_image_stops_the_command_before_any_setting_is_derived(tmp_path, capsys):
    """Sizes the files disagree with (an EXIF turn the annotations did not follow) would derive every
    setting from wrong sizes and report sound boxes as lying outside their images."""
    data = write_coco_set(tmp_path / "set")
    doc = json.loads(open(data).read())
    doc["images"][2]["height"] = 120                                  # the file is 96 px high
    (tmp_path / "set" / "train.json").write_text(json.dumps(doc))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "set" / "train.json"), "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "annotation says 96x120 (w x h) but the image decodes to 96x96" in err
    assert "settings derived" not in err and "outside" not in err and not run.exists()


def load_coco_dict(tmp_path, doc: dict):
    path = tmp_path / "set" / "other.json"
    path.write_text(json.dumps(doc))
    return load_coco(str(path), str(tmp_path / "set"))


def test_shrinking_at_load_checks_the_annotated_size_against_the_file(tmp_path):
    data = write_coco_set(tmp_path / "set", n_images=3)
    doc = json.loads(open(data).read())
    doc["images"][1].update(width=192, height=192)                    # the file is 96 x 96
    with pytest.raises(DatasetError, match="annotation says 192x192"):
        shrink_to_input(load_coco_dict(tmp_path, doc), 48, 48)


def test_a_budget_that_ends_inside_the_warm_up_says_it_is_too_short(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set", n_images=6)
    assert main(["train", "--data", data, "--minutes", "0.001", "--output-dir", str(tmp_path / "run"),
                 "train.pretrain_minutes=0", "train.pretrain_iters=0", "test.num_vis=0", "train.precision=fp32",
                 "test.tta_choose=false"]) == 0
    assert "inside the learning rate's warm-up (20 steps): too short to learn" in capsys.readouterr().err


def test_too_few_images_to_hold_out_names_the_annotation_file(tmp_path, capsys):
    data = write_coco_set(tmp_path / "set", n_images=2)
    assert main(["train", "--data", data, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: {data}: only 2 training image(s)" in err and "--val" in err


def test_under_torchrun_one_process_prints_the_table_and_writes_the_run_folder(tmp_path, capsys, monkeypatch):
    data = write_coco_set(tmp_path / "set")
    monkeypatch.setenv("RANK", "1")            # a second process: it derives the same config and trains
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--minutes", "0.1", "--output-dir", str(run), *QUICK]) == 0
    assert "settings derived" not in capsys.readouterr().err
    assert not (run / "derived.txt").exists() and not (run / "data_statistics.json").exists()
