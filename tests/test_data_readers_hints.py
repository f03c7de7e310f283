"""Hints in "image file not found" errors: a same-named file with an extension beside the missing
one, and Pascal VOC's Annotations/ + JPEGImages/ layout read without --images."""

import os
import re

import pytest
from PIL import Image

from densedet.data import (DatasetError, DetectionDataset, ImageRecord, load_csv, load_image, load_voc,
                           record_size)


def picture(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6)).save(path)
    return path


def voc_xml(path, filename, width=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>6</height>"
                    f"</size><object><name>tree</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax>"
                    f"<ymax>4</ymax></bndbox></object></annotation>")
    return str(path)


def test_filename_without_extension_suggests_the_image_beside_it(tmp_path):
    picture(tmp_path / "im33_004.jpg")
    xml = voc_xml(tmp_path / "im33_004.xml", "im33_004")  # a .xml of that stem too: not offered
    dataset = DetectionDataset(load_voc(xml))
    missing = os.path.join(str(tmp_path), "im33_004")
    with pytest.raises(DatasetError) as err:
        dataset[0]
    assert str(err.value) == f"{missing}: image file not found; did you mean im33_004.jpg?"


def test_other_extension_or_case_is_suggested_and_no_hint_without_one(tmp_path):
    picture(tmp_path / "a.PNG")
    picture(tmp_path / "a.png.bak.png")  # another stem: not offered
    with pytest.raises(DatasetError, match=r"a\.jpg: image file not found; did you mean a\.PNG\?$"):
        load_image(str(tmp_path / "a.jpg"))
    with pytest.raises(DatasetError, match=r"b\.jpg: image file not found$"):
        load_image(str(tmp_path / "b.jpg"))
    with pytest.raises(DatasetError, match=r"c\.jpg: image file not found$"):  # folder missing too
        load_image(str(tmp_path / "nowhere" / "c.jpg"))


def test_voc_layout_read_without_images_suggests_jpegimages(tmp_path):
    picture(tmp_path / "VOC" / "JPEGImages" / "000001.jpg")
    annotations = tmp_path / "VOC" / "Annotations"
    voc_xml(annotations / "000001.xml", "000001.jpg", width=0)  # no size: it is read from the file
    data = load_voc(str(annotations))
    jpeg = os.path.join(str(tmp_path), "VOC", "JPEGImages")
    with pytest.raises(DatasetError, match=rf"000001\.jpg' \(id 1\) has no width/height in the annotations "
                                           rf"and its file cannot be read; 000001\.jpg is in {re.escape(jpeg)}: "
                                           rf"pass --images {re.escape(jpeg)}$"):
        record_size(data.records[0], data.source)
    # where the annotation file is not known (the image loader), only the same-name hint is given
    with pytest.raises(DatasetError, match=r"000001\.jpg: image file not found$"):
        load_image(data.records[0].file_name)
    assert record_size(load_voc(str(annotations), image_dir=jpeg).records[0], data.source) == (6, 8)


def test_csv_in_a_labels_folder_suggests_the_images_folder(tmp_path):
    picture(tmp_path / "set" / "images" / "x.png")
    csv_path = tmp_path / "set" / "labels" / "boxes.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("x.png,1,2,3,4,tree\n")
    data = load_csv(str(csv_path))
    images = os.path.join(str(tmp_path), "set", "images")
    folder = re.escape(images)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(csv_path))}: image .*x\.png' \(id 1\) .*cannot be "
                                           rf"read; x\.png is in {folder}: pass --images {folder}$"):
        record_size(data.records[0], data.source)
    record = ImageRecord(str(tmp_path / "set" / "labels" / "y.png"), 2, None, None, boxes=[], labels=[])
    with pytest.raises(DatasetError, match=r"y\.png' \(id 2\) .*cannot be read$"):  # in no images folder
        record_size(record, data.source)
