"""Annotation readers (COCO json, Pascal VOC xml, CSV): real deepforest files, repairs, errors."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from densedet.data import (DatasetError, DetectionData, ImageRecord, load_coco, load_csv,
                           load_detection_data, load_voc, save_coco, to_coco_dict)

DEEPFOREST_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("deepforest").origin),
                               "data")


def df(name: str) -> str:
    return os.path.join(DEEPFOREST_DATA, name)


# ---- real data: deepforest's aerial tree-crown photos ---------------------------------------

def test_voc_counts_per_file_and_classes():
    data = load_voc(DEEPFOREST_DATA)
    counts = {os.path.basename(r.file_name): len(r) for r in data.records}
    assert counts == {"2019_YELL_2_528000_4978000_image_crop2.png": 574,
                      "2019_YELL_2_541000_4977000_image_crop.png": 279,
                      "OSBS_029.tif": 61, "SOAP_061.png": 37}
    assert data.class_names == ["Alive", "Dead", "Tree"]
    assert [r.image_id for r in data.records] == [1, 2, 3, 4]
    soap = data.records[3]
    assert (soap.height, soap.width) == (400, 400)
    assert np.bincount(soap.labels, minlength=3).tolist() == [9, 28, 0]
    assert data.report.images == 4 and data.report.boxes == 951
    assert data.report.dropped == 0 and data.report.clipped == 0


def test_voc_first_box_converted_from_one_based():
    # OSBS_029.xml object 0: <xmin>203 <ymin>67 <xmax>227 <ymax>90 (1-based inclusive).
    record = load_voc(df("OSBS_029.xml")).records[0]
    assert record.boxes[0].tolist() == [202.0, 66.0, 227.0, 90.0]
    # 1-based maxima reach the image size (xmax 400 in a 400-wide image): no clipping needed.
    assert record.boxes[:, 2].max() == 400.0 and record.boxes[:, 0].min() == 0.0


@pytest.mark.parametrize("xml_name, csv_name", [("OSBS_029.xml", "OSBS_029.csv"),
                                                ("SOAP_061.xml", "testfile_multi.csv")])
def test_voc_and_csv_of_the_same_image_agree(xml_name, csv_name):
    """deepforest writes the VOC integers verbatim into its CSVs: the CSV boxes equal the VOC
    boxes read without the 1-based shift, i.e. the converted VOC boxes plus (1, 1, 0, 0)."""
    voc = load_voc(df(xml_name))
    raw_voc = load_voc(df(xml_name), one_based=False)
    table = load_csv(df(csv_name))
    assert len(table.records) == 1 and len(table.records[0]) == len(voc.records[0])
    assert table.class_names == voc.class_names
    np.testing.assert_array_equal(table.records[0].boxes, raw_voc.records[0].boxes)
    np.testing.assert_array_equal(table.records[0].boxes,
                                  voc.records[0].boxes + np.float32([1, 1, 0, 0]))
    np.testing.assert_array_equal(table.records[0].labels, voc.records[0].labels)
    # The CSV gives no size: it was read from the image header.
    assert (table.records[0].height, table.records[0].width) == (400, 400)


def test_csv_counts_per_file():
    assert len(load_csv(df("example.csv")).records[0]) == 79
    assert len(load_csv(df("testfile_deepforest.csv")).records[0]) == 61


def test_coco_round_trip_of_voc_records(tmp_path):
    voc = load_voc(DEEPFOREST_DATA)
    path = tmp_path / "trees.json"
    save_coco(voc, str(path), image_root=DEEPFOREST_DATA)
    coco = load_coco(str(path), DEEPFOREST_DATA)
    assert coco.class_names == voc.class_names
    assert coco.category_ids == [1, 2, 3]
    assert len(coco.records) == len(voc.records)
    for a, b in zip(voc.records, coco.records):
        assert (a.file_name, a.image_id, a.height, a.width) == \
            (b.file_name, b.image_id, b.height, b.width)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
    # pycocotools reads what we write (the evaluator builds its ground truth this way).
    from pycocotools.coco import COCO
    gt = COCO(str(path))
    assert len(gt.getAnnIds()) == 951 and sorted(gt.getCatIds()) == [1, 2, 3]


def test_load_detection_data_dispatches_on_the_extension():
    assert len(load_detection_data(df("OSBS_029.xml")).records[0]) == 61
    assert len(load_detection_data(df("OSBS_029.csv")).records[0]) == 61
    assert len(load_detection_data(DEEPFOREST_DATA).records) == 4


# ---- COCO -----------------------------------------------------------------------------------

def write_json(tmp_path, doc, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def coco_doc(**changes):
    doc = {
        "images": [{"id": 10, "file_name": "a.png", "height": 100, "width": 200},
                   {"id": 11, "file_name": "b.png", "height": 50, "width": 50}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 9, "bbox": [10, 20, 30, 40],
                         "iscrowd": 0},
                        {"id": 2, "image_id": 10, "category_id": 5, "bbox": [0, 0, 200, 100],
                         "iscrowd": 1}],
        "categories": [{"id": 9, "name": "cat"}, {"id": 5, "name": "dog"}],
    }
    doc.update(changes)
    return doc


def test_coco_categories_sorted_by_id_crowd_kept_negatives_kept(tmp_path):
    data = load_coco(write_json(tmp_path, coco_doc()), "/imgs")
    assert data.class_names == ["dog", "cat"] and data.category_ids == [5, 9]
    first, second = data.records
    assert first.file_name == os.path.join("/imgs", "a.png")
    assert first.boxes.tolist() == [[10, 20, 40, 60], [0, 0, 200, 100]]
    assert first.labels.tolist() == [1, 0]  # category 9 -> label 1, 5 -> 0
    assert first.iscrowd.tolist() == [False, True]
    assert len(second) == 0 and data.report.negative_images == 1
    assert data.category_id(0) == 5 and data.category_id(1) == 9


def test_coco_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"broken\.json: malformed JSON at line 1 column 13"):
        load_coco(str(path), ".")


def test_coco_missing_keys(tmp_path):
    doc = coco_doc()
    del doc["categories"]
    with pytest.raises(DatasetError, match=r"ann\.json: missing key\(s\) 'categories'"):
        load_coco(write_json(tmp_path, doc), ".")
    doc = coco_doc()
    del doc["annotations"][1]["bbox"]
    with pytest.raises(DatasetError, match=r"annotation id 2: missing key\(s\) 'bbox'"):
        load_coco(write_json(tmp_path, doc), ".")
    doc = coco_doc()
    del doc["images"][1]["file_name"]
    with pytest.raises(DatasetError, match=r"images\[1\]: missing key\(s\) 'file_name'"):
        load_coco(write_json(tmp_path, doc), ".")


def test_coco_unknown_category_names_the_annotation(tmp_path):
    doc = coco_doc()
    doc["annotations"][1]["category_id"] = 99
    with pytest.raises(DatasetError, match=r"annotation id 2: unknown category id 99"):
        load_coco(write_json(tmp_path, doc), ".")


def test_coco_duplicate_image_id(tmp_path):
    doc = coco_doc()
    doc["images"][1]["id"] = 10
    with pytest.raises(DatasetError, match=r"image id 10: duplicate image id"):
        load_coco(write_json(tmp_path, doc), ".")


def test_coco_image_ids_must_be_integers(tmp_path):
    doc = coco_doc()
    doc["images"][0]["id"] = "a"
    with pytest.raises(DatasetError, match=r"image id 'a': image ids must be integers"):
        load_coco(write_json(tmp_path, doc), ".")


def test_coco_annotation_for_missing_image(tmp_path):
    doc = coco_doc()
    doc["annotations"][0]["image_id"] = 12
    with pytest.raises(DatasetError, match=r"annotation id 1: refers to image id 12, which is "
                                           r"not in 'images'"):
        load_coco(write_json(tmp_path, doc), ".")


def test_coco_bad_bbox_value(tmp_path):
    doc = coco_doc()
    doc["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(DatasetError, match=r"annotation id 1: 'bbox' must be a list of 4"):
        load_coco(write_json(tmp_path, doc), ".")


def test_coco_nan_box_dropped_and_counted_strict_raises(tmp_path):
    doc = coco_doc()
    doc["annotations"][0]["bbox"] = [math.nan, 2, 3, 4]  # json.dumps writes NaN
    path = write_json(tmp_path, doc)
    data = load_coco(path, ".")
    assert len(data.records[0]) == 1 and data.report.dropped_nonfinite == 1
    assert "non-finite" in str(data.report)
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 1 \(image id 10\): "
                                           r"non-finite box coordinates \[nan, 2\.0"):
        load_coco(path, ".", strict=True)


def test_box_repairs_clip_and_drop(tmp_path):
    doc = coco_doc()
    doc["annotations"] = [
        {"id": 1, "image_id": 10, "category_id": 5, "bbox": [-10, 50, 30, 80]},  # clipped
        {"id": 2, "image_id": 10, "category_id": 5, "bbox": [250, 10, 10, 10]},  # outside
        {"id": 3, "image_id": 10, "category_id": 5, "bbox": [10, 10, 0, 10]},  # zero width
        {"id": 4, "image_id": 10, "category_id": 5, "bbox": [10, 10, 5, -3]},  # negative h
    ]
    path = write_json(tmp_path, doc)
    data = load_coco(path, ".")
    assert data.records[0].boxes.tolist() == [[0, 50, 20, 100]]
    report = data.report
    assert (report.clipped, report.dropped_outside, report.dropped_degenerate) == (1, 1, 2)
    assert report.boxes == 1 and "1 boxes clipped" in report.summary()
    with pytest.raises(DatasetError, match=r"annotation id 1 .*clipped to the 200x100 image"):
        load_coco(path, ".", strict=True)


def test_coco_one_picture_listed_under_two_image_ids_is_refused(tmp_path):
    """Two entries for one file would split its boxes between two records (and a random split
    could put the picture in both training and validation)."""
    doc = coco_doc()
    doc["images"] = [{"id": 3, "file_name": "a/x.jpg"}, {"id": 5, "file_name": "b.png"},
                     {"id": 17, "file_name": "a/./x.jpg"}]
    doc["annotations"] = [{"id": 1, "image_id": 3, "category_id": 5, "bbox": [1, 2, 3, 4]},
                          {"id": 2, "image_id": 17, "category_id": 9, "bbox": [5, 6, 7, 8]}]
    with pytest.raises(DatasetError, match=r"^\S*ann\.json: images 3 and 17 both name a/x\.jpg "
                                           r"\(as 'a/x\.jpg' and 'a/\./x\.jpg'\); an image must be listed "
                                           r"once \(merge their annotations under one id\)$"):
        load_coco(write_json(tmp_path, doc), ".")
    doc["images"][2]["file_name"] = "a/x.jpg"  # the same spelling twice: no "(as ...)"
    with pytest.raises(DatasetError, match=r"ann\.json: images 3 and 17 both name a/x\.jpg; an image"):
        load_coco(write_json(tmp_path, doc), ".")
    doc["images"][2]["file_name"] = "b/x.jpg"  # same base name in another folder: another picture
    assert [r.image_id for r in load_coco(write_json(tmp_path, doc), ".").records] == [3, 5, 17]


# ---- VOC ------------------------------------------------------------------------------------

VOC_XML = """<annotation>
  <filename>{filename}</filename>
  <size><width>{width}</width><height>60</height><depth>3</depth></size>
  <object><name>cat</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>80</xmax><ymax>60</ymax></bndbox></object>
  <object><name>{name}</name>
    <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>{xmax}</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def write_voc(tmp_path, file="a.xml", **fields):
    values = {"filename": "a.jpg", "width": 80, "name": "dog", "xmax": 30}
    values.update(fields)
    path = tmp_path / file
    path.write_text(VOC_XML.format(**values))
    return str(path)


def test_voc_fields_difficult_and_image_dir(tmp_path):
    data = load_voc(write_voc(tmp_path), image_dir="/images")
    record = data.records[0]
    assert record.file_name == os.path.join("/images", "a.jpg")
    assert record.boxes.tolist() == [[0, 0, 80, 60], [10, 20, 30, 40]]
    assert record.difficult.tolist() == [True, False]
    assert data.class_names == ["cat", "dog"] and record.labels.tolist() == [0, 1]
    assert load_voc(write_voc(tmp_path)).records[0].file_name == str(tmp_path / "a.jpg")


def test_voc_size_zero_means_unknown(tmp_path):
    record = load_voc(write_voc(tmp_path, width=0, xmax=500)).records[0]
    assert record.width is None and record.boxes[1].tolist() == [10, 20, 500, 40]


def test_voc_malformed_xml_names_the_file(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text("<annotation><filename>a.jpg</filename>")
    with pytest.raises(DatasetError, match=r"bad\.xml: malformed XML: .*line 1"):
        load_voc(str(path))


def test_voc_field_errors_name_the_object(tmp_path):
    with pytest.raises(DatasetError, match=r"a\.xml: object 1 \(dog\) <bndbox>: <xmax> is not a "
                                           r"number: 'abc'"):
        load_voc(write_voc(tmp_path, xmax="abc"))
    with pytest.raises(DatasetError, match=r"a\.xml: object 1 \(bird\): unknown class name "
                                           r"'bird'"):
        load_voc(write_voc(tmp_path, name="bird"), class_names=["cat", "dog"])
    path = tmp_path / "nofile.xml"
    path.write_text("<annotation><object><name>x</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"nofile\.xml: missing <filename>"):
        load_voc(str(path))


def write_voc_names(path, names):
    objects = "".join(f"<object><name>{name}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                      f"<ymax>5</ymax></bndbox></object>" for name in names)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{objects}</annotation>")
    return str(path)


def test_voc_integer_class_names_sort_numerically(tmp_path):
    write_voc_names(tmp_path / "a.xml", ["10", "2"])
    write_voc_names(tmp_path / "b.xml", ["1", "2"])
    data = load_voc(str(tmp_path))
    assert data.class_names == ["1", "2", "10"]  # not the text order 1, 10, 2
    assert [r.labels.tolist() for r in data.records] == [[2, 1], [0, 1]]
    write_voc_names(tmp_path / "c.xml", ["cat"])
    assert load_voc(str(tmp_path)).class_names == ["1", "10", "2", "cat"]  # not all integers: text
    given = load_voc(str(tmp_path / "a.xml"), class_names=["10", "2"])
    assert given.class_names == ["10", "2"] and given.records[0].labels.tolist() == [0, 1]


# ---- CSV ------------------------------------------------------------------------------------

def write_csv(tmp_path, text, name="boxes.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_csv_grouping_negatives_and_no_header(tmp_path):
    path = write_csv(tmp_path, "a.png,1,2,3,4,cat\nb.png,,,,,\na.png,5.5,6,7,8,dog\n"
                               "c.png,0,0,1,1,cat\n")
    data = load_csv(path)
    assert [os.path.basename(r.file_name) for r in data.records] == ["a.png", "b.png", "c.png"]
    assert [r.image_id for r in data.records] == [1, 2, 3]
    assert data.records[0].boxes.tolist() == [[1, 2, 3, 4], [5.5, 6, 7, 8]]
    assert data.records[0].labels.tolist() == [0, 1] and data.class_names == ["cat", "dog"]
    assert len(data.records[1]) == 0 and data.report.negative_images == 1
    assert data.records[0].height is None  # no such image file: size unknown, nothing clipped
    assert load_csv(path, image_root="/x").records[0].file_name == os.path.join("/x", "a.png")


def test_csv_spellings_of_one_path_are_one_image(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    path = write_csv(tmp_path, "x.png,1,2,3,4,cat\ny.png,,,,,\n./x.png,5,6,50,8,cat\n"
                               "sub/../x.png,9,10,11,12,dog\n./y.png,,,,,\n")
    data = load_csv(path)
    assert [r.image_id for r in data.records] == [1, 2]
    x, y = data.records
    assert x.file_name == os.path.join(str(tmp_path), "x.png")  # the first spelling
    assert x.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 40, 8], [9, 10, 11, 12]]  # all three, clipped
    assert x.labels.tolist() == [0, 0, 1] and (x.height, x.width) == (30, 40)
    assert len(y) == 0 and y.file_name == os.path.join(str(tmp_path), "y.png")
    assert data.report.images == 2 and data.report.boxes == 3 and data.report.clipped == 1
    first = load_csv(write_csv(tmp_path, "./x.png,1,2,3,4,cat\nx.png,5,6,7,8,cat\n")).records
    assert len(first) == 1 and first[0].file_name == os.path.join(str(tmp_path), "./x.png")


def test_csv_integer_labels_sort_numerically(tmp_path):
    data = load_csv(write_csv(tmp_path, "a.png,1,2,3,4,10\na.png,1,2,3,4,2\nb.png,1,2,3,4,1\n"))
    assert data.class_names == ["1", "2", "10"]  # not the text order 1, 10, 2
    assert data.records[0].labels.tolist() == [2, 1] and data.records[1].labels.tolist() == [0]
    mixed = load_csv(write_csv(tmp_path, "a.png,1,2,3,4,10\na.png,1,2,3,4,2\nb.png,1,2,3,4,b\n"))
    assert mixed.class_names == ["10", "2", "b"]  # not all integers: text order
    signed = load_csv(write_csv(tmp_path, "a.png,1,2,3,4,-3\na.png,1,2,3,4,12\nb.png,1,2,3,4,+4\n"))
    assert signed.class_names == ["-3", "+4", "12"]
    given = load_csv(write_csv(tmp_path, "a.png,1,2,3,4,10\na.png,1,2,3,4,2\n"), class_names=["10", "2"])
    assert given.class_names == ["10", "2"] and given.records[0].labels.tolist() == [0, 1]


def test_csv_header_both_spellings(tmp_path):
    for header in ("image_path,x1,y1,x2,y2,label", "image_path,xmin,ymin,xmax,ymax,label"):
        data = load_csv(write_csv(tmp_path, header + "\na.png,1,2,3,4,cat\n"))
        assert data.records[0].boxes.tolist() == [[1, 2, 3, 4]]


def test_csv_header_in_wrong_order_names_the_expected_order(tmp_path):
    path = write_csv(tmp_path, "image_path,x1,x2,y1,y2,label\na.png,1,2,3,4,cat\n")
    with pytest.raises(DatasetError, match=r"boxes\.csv: header columns are in the wrong order"
                                           r".*expected exactly 'image_path,x1,y1,x2,y2,label'"):
        load_csv(path)
    with pytest.raises(DatasetError, match=r"unexpected header"):
        load_csv(write_csv(tmp_path, "path,a,b,c,d,e\n"))


def test_csv_malformed_rows_name_the_row(tmp_path):
    cases = [("a.png,1,2,3,4,cat\na.png,1,2,3\n", r"row 2: expected 6 fields"),
             ("a.png,1,2,3,4,cat\na.png,1,,3,4,cat\n", r"row 2: box fields must be all filled"),
             ("a.png,1,2,3,4,cat\na.png,1,2,3,4x,cat\n", r"row 2: box fields are not numbers"),
             ("a.png,1,2,3,4,\n", r"row 1: box without a label"),
             ('a.png,1,2,3,4,"cat\n', r"row 1: malformed CSV: unexpected end of data")]
    for text, message in cases:
        with pytest.raises(DatasetError, match=r"boxes\.csv: " + message):
            load_csv(write_csv(tmp_path, text))
    with pytest.raises(DatasetError, match=r"row 1: unknown label 'cow'"):
        load_csv(write_csv(tmp_path, "a.png,1,2,3,4,cow\n"), class_names=["cat"])


def test_csv_nan_box_dropped_and_counted(tmp_path):
    path = write_csv(tmp_path, "a.png,nan,2,3,4,cat\na.png,1,2,3,4,cat\n")
    data = load_csv(path)
    assert data.records[0].boxes.tolist() == [[1, 2, 3, 4]]
    assert data.report.dropped_nonfinite == 1
    with pytest.raises(DatasetError, match=r"boxes\.csv: row 1: non-finite"):
        load_csv(path, strict=True)


def test_missing_annotation_files_are_dataset_errors(tmp_path):
    for loader, name in ((lambda p: load_coco(p, "."), "x.json"), (load_voc, "x.xml"),
                         (load_csv, "x.csv")):
        with pytest.raises(DatasetError, match=r"x\.\w+: annotation file not found"):
            loader(str(tmp_path / name))


# ---- records --------------------------------------------------------------------------------

def test_image_record_normalises_arrays():
    record = ImageRecord("a.png", 1, None, None, boxes=[[1, 2, 3, 4]], labels=[2])
    assert record.boxes.dtype == np.float32 and record.boxes.shape == (1, 4)
    assert record.labels.dtype == np.int64
    assert record.iscrowd.tolist() == [False] and record.difficult.tolist() == [False]
    data = DetectionData([record], ["a", "b", "c"], None, "test")
    assert data.num_classes == 3 and data.category_id(2) == 3
    assert to_coco_dict(data)["annotations"][0]["bbox"] == [1, 2, 2, 2]
