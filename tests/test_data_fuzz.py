"""Property-based fuzzing of the three annotation readers.

Whatever bytes or structures a reader is given, it either raises densedet's own ``DatasetError``
whose message names the file, or returns data whose records are what the input really holds —
never a KeyError, TypeError, IndexError, a crash deep inside, or garbage that comes back as
silently empty data. "What the input really holds" is worked out here, independently of the
reader, from the file itself (``json``, ``xml.etree`` and ``csv`` of the standard library): one
record per image the file lists, and every box the file holds is either kept (with its label,
clipped to the image when its size is known) or counted as dropped in the returned report.
Each reader is fed generated malformed inputs of three kinds: random text, valid-looking
documents with fields mutated to wrong types / missing / non-finite, and truncations of valid files.
"""

from __future__ import annotations

import csv
import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from densedet.data import DatasetError, load_coco, load_csv, load_voc

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Counted in the issue note: examples per property x properties below.

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=10)


def _valid_coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                       {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0,
                             "area": 200},
                            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [0, 0, 5, 5], "iscrowd": 1,
                             "area": 25}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}]}


def _mutate(doc, path: list, value):
    """Replace (or delete, when value is the sentinel ...) the element at ``path``."""
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is Ellipsis:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            node.pop(path[-1])
    else:
        node[path[-1]] = value
    return doc


COCO_PATHS = [["images"], ["annotations"], ["categories"], ["images", 0], ["images", 0, "id"],
              ["images", 0, "width"], ["images", 1, "height"], ["images", 0, "file_name"],
              ["annotations", 0], ["annotations", 0, "bbox"], ["annotations", 0, "bbox", 2],
              ["annotations", 0, "category_id"], ["annotations", 1, "image_id"], ["annotations", 0, "iscrowd"],
              ["categories", 0, "id"], ["categories", 1, "name"], ["categories", 0]]


def _expect_reader_contract(read, path, holds):
    """``read()`` either raises a DatasetError naming ``path``, or returns data that ``holds``
    (the independent reading of the same file) accepts."""
    try:
        data = read()
    except DatasetError as err:
        assert str(path) in str(err), f"a DatasetError must name the file {path}, got: {err}"
        return None
    holds(data)
    return data


def _clip(box: list[float], height: int | None, width: int | None) -> list[float]:
    """The documented repair of a kept box: clipped to the image when its size is known."""
    x1, y1, x2, y2 = box
    if height is not None and width is not None:
        x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
        y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
    return [x1, y1, x2, y2]


def _float32_faithful(box: list[float]) -> bool:
    """Whether storing ``box`` as float32 keeps what a float64 check would see: finite stays
    finite and a positive width / height stays positive. Boxes that are not (|v| > 3.4e38, or a side
    below float32's resolution) are dropped by the reader since it checks boxes as stored (pinned by
    ``test_boxes_beyond_float32_are_dropped_not_kept_as_inf_or_empty``); the properties, whose
    expectations are computed in float64, skip them."""
    b64 = np.asarray(box, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        b32 = b64.astype(np.float32).astype(np.float64)
        return bool((np.isfinite(b64) == np.isfinite(b32)).all()
                    and ((b64[2:] > b64[:2]) == (b32[2:] > b32[:2])).all())


def _check_records_hold(data, images: list[tuple[str, int | None, int | None, list]]) -> None:
    """``data`` holds exactly ``images``: per image of the file, in file order, (file name, height,
    width, [(box x1 y1 x2 y2 as written, label index)]). Every box is kept (clipped, in file order,
    with its label) or counted in the report as dropped; nothing disappears silently."""
    assume(all(_float32_faithful(raw) and _float32_faithful(_clip(raw, height, width))
               for _, height, width, boxes in images for raw, _ in boxes))
    assert len(data.records) == len(images), "one record per image the file lists"
    assert data.report.images == len(data.records)
    total = sum(len(boxes) for *_, boxes in images)
    kept = sum(len(record) for record in data.records)
    assert kept + data.report.dropped == total, \
        f"{total} boxes in the file, {kept} kept, only {data.report.dropped} reported as dropped"
    assert data.report.boxes == kept
    for record, (name, height, width, boxes) in zip(data.records, images):
        assert record.file_name.endswith(name)
        assert (record.height, record.width) == (height, width)
        assert np.isfinite(record.boxes).all() and (record.boxes[:, 2:] > record.boxes[:, :2]).all()
        assert ((record.labels >= 0) & (record.labels < data.num_classes)).all()
        candidates = iter(boxes)  # the kept boxes are, in order, some of the image's boxes
        for box, label in zip(record.boxes.tolist(), record.labels.tolist()):
            for raw, raw_label in candidates:
                if raw_label == label and np.allclose(box, np.asarray(_clip(raw, height, width), dtype=np.float64),
                                                      rtol=1e-6, atol=1e-6):
                    break
            else:
                raise AssertionError(f"kept box {box} (label {label}) is not one of {name}'s boxes {boxes}")


def _coco_holds(text: str):
    def check(data):
        doc = json.loads(text)  # a reader that returned data has read valid JSON
        categories = sorted(doc["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: label for label, c in enumerate(categories)}
        assert data.category_ids == [c["id"] for c in categories]
        assert len(data.class_names) == len(categories)
        assert all(n == c["name"] for n, c in zip(data.class_names, categories) if isinstance(c["name"], str))
        images = []
        for img in doc["images"]:
            boxes = [([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                      label_of[a["category_id"]])
                     for a in doc.get("annotations", []) if a["image_id"] == img["id"]]
            height, width = (None if img.get(k) is None else int(img[k]) for k in ("height", "width"))
            images.append((img["file_name"], height, width, boxes))
        _check_records_hold(data, images)
    return check


def _label_order(names: set[str]) -> list[str]:
    """The readers' documented class order: by number when every name is an integer, else as text."""
    if names and all(re.fullmatch(r"[+-]?\d+", name, flags=re.ASCII) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _voc_holds(text: str, class_names: list[str] | None):
    def check(data):
        root = ET.fromstring(text)  # a reader that returned data has read well-formed XML
        objects = root.findall("object")
        names = (list(class_names) if class_names is not None
                 else _label_order({obj.findtext("name").strip() for obj in objects}))
        assert data.class_names == names
        boxes = []
        for obj in objects:
            x1, y1, x2, y2 = (float(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append(([x1 - 1, y1 - 1, x2, y2], names.index(obj.findtext("name").strip())))  # 1-based

        def size(tag):  # absent, empty or <= 0: unknown
            text = root.findtext(f"size/{tag}")
            value = int(float(text)) if text is not None and text.strip() else 0
            return value if value > 0 else None
        _check_records_hold(data, [(root.findtext("filename").strip(), size("height"), size("width"), boxes)])
    return check


CSV_HEADERS = (["image_path", "x1", "y1", "x2", "y2", "label"], ["image_path", "xmin", "ymin", "xmax", "ymax", "label"])


def _csv_holds(path, sizes: dict | None = None):
    """``sizes``: {image path: (height, width)} of the image files that exist (others: unknown)."""
    sizes = sizes or {}

    def check(data):
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, strict=True))
        per_image: dict[str, list] = {}
        for line, row in enumerate(rows, start=1):
            if not any(field.strip() for field in row):
                continue  # blank
            if line == 1 and [field.strip().lower() for field in row] in CSV_HEADERS:
                continue
            assert len(row) == 6, f"row {line} {row!r} is not image_path,x1,y1,x2,y2,label"
            fields = [field.strip() for field in row[1:5]]
            boxes = per_image.setdefault(row[0].strip(), [])
            if any(fields):  # all empty: an image without boxes
                boxes.append(([float(v) for v in fields], row[5].strip()))
        names = _label_order({label for boxes in per_image.values() for _, label in boxes})
        assert data.class_names == names
        _check_records_hold(data, [(name, *sizes.get(name, (None, None)),
                                    [(box, names.index(label)) for box, label in boxes])
                                   for name, boxes in per_image.items()])
    return check


@SETTINGS
@given(text=st.text(max_size=300))
def test_coco_reader_random_text_only_raises_dataset_error(tmp_path, text):
    path = tmp_path / "ann.json"
    path.write_text(text)
    _expect_reader_contract(lambda: load_coco(str(path), str(tmp_path)), path, _coco_holds(text))


@SETTINGS
@given(where=st.sampled_from(COCO_PATHS), value=st.one_of(json_values, st.just(Ellipsis)))
def test_coco_reader_mutated_fields_only_raise_dataset_error(tmp_path, where, value):
    doc = _mutate(_valid_coco(), where, value)
    path = tmp_path / "ann.json"
    text = json.dumps(doc, allow_nan=True)
    path.write_text(text)
    _expect_reader_contract(lambda: load_coco(str(path), str(tmp_path)), path, _coco_holds(text))


@SETTINGS
@given(cut=st.integers(0, 450))
@example(cut=len(json.dumps(_valid_coco())))  # the whole file
def test_coco_reader_truncated_file_only_raises_dataset_error(tmp_path, cut):
    text = json.dumps(_valid_coco())
    path = tmp_path / "ann.json"
    kept = text[:cut]
    path.write_text(kept)
    data = _expect_reader_contract(lambda: load_coco(str(path), str(tmp_path)), path, _coco_holds(kept))
    # only the whole file reads; every cut of it is malformed JSON
    assert (data is not None) == (kept == text)
    if data is not None:
        assert [r.boxes.tolist() for r in data.records] == [[[1.0, 2.0, 11.0, 22.0]], [[0.0, 0.0, 5.0, 5.0]]]
        assert [r.labels.tolist() for r in data.records] == [[0], [1]]
        assert [r.iscrowd.tolist() for r in data.records] == [[False], [True]]


# Near-valid inputs: every field has the right type, so the reader returns data far more often than
# for the mutations above, and box repairs (clipping, dropping degenerate / outside / non-finite
# boxes) happen; the independent reading checks that every dropped box is counted.
coordinate = st.one_of(st.integers(-40, 120), st.floats(-40, 120, allow_nan=False),
                       st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))
# [x, y, w, h]: any four coordinates, or a box of positive size (that may still overhang the image)
xywh = st.one_of(st.lists(coordinate, min_size=4, max_size=4),
                 st.tuples(st.integers(-20, 100), st.integers(-20, 100), st.integers(1, 60), st.integers(1, 60)).map(list))
# the same as (x1, y1, x2, y2)
corners = st.one_of(st.lists(coordinate, min_size=4, max_size=4),
                    xywh.map(lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]))


@SETTINGS
@given(bboxes=st.lists(st.tuples(st.integers(1, 2), st.sampled_from([3, 5]), xywh), max_size=6),
       sizes=st.tuples(st.sampled_from([None, 48, 64]), st.sampled_from([None, 32, 100])))
def test_coco_reader_near_valid_boxes_are_kept_or_counted(tmp_path, bboxes, sizes):
    doc = _valid_coco()
    doc["images"][0]["height"], doc["images"][0]["width"] = sizes
    doc["annotations"] = [{"id": i + 1, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0}
                          for i, (image_id, cat, bbox) in enumerate(bboxes)]
    text = json.dumps(doc, allow_nan=True)
    path = tmp_path / "ann.json"
    path.write_text(text)
    data = _expect_reader_contract(lambda: load_coco(str(path), str(tmp_path)), path, _coco_holds(text))
    assert data is not None, "a well-typed file reads (bad boxes are repaired or dropped, not refused)"


VOC_TEMPLATE = """<annotation><filename>{fn}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>
</annotation>"""

xml_field = st.one_of(st.integers(-50, 500).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                      st.text(alphabet="abc<>&/ 01.-", max_size=6))


@SETTINGS
@given(fields=st.fixed_dictionaries({k: xml_field for k in ("w", "h", "d", "x1", "y1", "x2", "y2")}),
       name=st.sampled_from(["tree", "Tree", "", "<x>"]))
def test_voc_reader_mutated_fields_only_raise_dataset_error(tmp_path, fields, name):
    path = tmp_path / "a.xml"
    text = VOC_TEMPLATE.format(fn="a.png", name=name, **fields)
    path.write_text(text)
    _expect_reader_contract(lambda: load_voc([str(path)], str(tmp_path), class_names=["tree"]), path,
                            _voc_holds(text, ["tree"]))


VOC_OBJECT = ("<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
              "<ymax>{y2}</ymax></bndbox></object>")


@SETTINGS
@given(objects=st.lists(st.tuples(st.sampled_from(["tree", "bush"]), corners), max_size=5),
       size=st.tuples(st.integers(-5, 100), st.integers(-5, 100)))
def test_voc_reader_near_valid_boxes_are_kept_or_counted(tmp_path, objects, size):
    text = ("<annotation><filename>a.png</filename><size><width>{}</width><height>{}</height></size>{}"
            "</annotation>").format(*size, "".join(VOC_OBJECT.format(name=n, x1=b[0], y1=b[1], x2=b[2], y2=b[3])
                                                   for n, b in objects))
    path = tmp_path / "a.xml"
    path.write_text(text)
    data = _expect_reader_contract(lambda: load_voc([str(path)], str(tmp_path), class_names=["bush", "tree"]),
                                   path, _voc_holds(text, ["bush", "tree"]))
    assert data is not None, "a well-formed file reads (bad boxes are repaired or dropped, not refused)"


@SETTINGS
@given(text=st.text(max_size=300))
def test_voc_reader_random_text_only_raises_dataset_error(tmp_path, text):
    path = tmp_path / "a.xml"
    path.write_text(text)
    _expect_reader_contract(lambda: load_voc([str(path)], str(tmp_path)), path, _voc_holds(text, None))


@SETTINGS
@given(cut=st.integers(0, 500))
def test_voc_reader_truncated_file_only_raises_dataset_error(tmp_path, cut):
    text = VOC_TEMPLATE.format(fn="a.png", name="tree", w=64, h=48, d=0, x1=1, y1=2, x2=30, y2=40)
    path = tmp_path / "a.xml"
    path.write_text(text[:cut])
    data = _expect_reader_contract(lambda: load_voc([str(path)], str(tmp_path), class_names=["tree"]), path,
                                   _voc_holds(text[:cut], ["tree"]))
    assert (data is not None) == (cut >= len(text))  # every cut of the file is malformed XML
    if data is not None:
        (record,) = data.records
        assert record.boxes.tolist() == [[0.0, 1.0, 30.0, 40.0]] and record.labels.tolist() == [0]
        assert (record.height, record.width) == (48, 64)


csv_cell = st.one_of(st.integers(-50, 500).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                     st.just(""), st.text(alphabet='ab,"\n 1.-', max_size=5))


@SETTINGS
@given(rows=st.lists(st.lists(csv_cell, min_size=0, max_size=8), max_size=5),
       header=st.sampled_from(["", "image_path,x1,y1,x2,y2,label\n", "x1,image_path,y1,x2,y2,label\n"]))
def test_csv_reader_malformed_rows_only_raise_dataset_error(tmp_path, rows, header):
    path = tmp_path / "ann.csv"
    path.write_text(header + "\n".join(",".join(r) for r in rows))
    _expect_reader_contract(lambda: load_csv(str(path), str(tmp_path)), path, _csv_holds(path))


@SETTINGS
@given(rows=st.lists(st.tuples(st.sampled_from(["a.png", "b.png", " c.png"]),
                               st.one_of(corners, st.just(["", "", "", ""])),
                               st.sampled_from(["x", "y "])), max_size=8),
       header=st.sampled_from(["", "image_path,x1,y1,x2,y2,label\n", "image_path,xmin,ymin,xmax,ymax,label\n"]))
def test_csv_reader_near_valid_rows_are_kept_or_counted(tmp_path, rows, header):
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")  # a known size: a.png's boxes are clipped
    path = tmp_path / "ann.csv"
    path.write_text(header + "\n".join(",".join([name, *map(str, box), label]) for name, box, label in rows))
    data = _expect_reader_contract(lambda: load_csv(str(path), str(tmp_path)), path,
                                   _csv_holds(path, {"a.png": (30, 40)}))
    assert data is not None, "a well-formed file reads (bad boxes are repaired or dropped, not refused)"


@SETTINGS
@given(text=st.text(max_size=300))
def test_csv_reader_random_text_only_raises_dataset_error(tmp_path, text):
    path = tmp_path / "ann.csv"
    path.write_text(text)
    _expect_reader_contract(lambda: load_csv(str(path), str(tmp_path)), path, _csv_holds(path))


def test_reader_error_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json"):
        load_coco(str(path), str(tmp_path))


def test_nan_box_is_dropped_and_counted_or_refused_in_strict_mode(tmp_path):
    doc = _valid_coco()
    doc["annotations"][0]["bbox"] = [1, 2, math.inf, 20]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    data = load_coco(str(path), str(tmp_path))
    assert sum(len(r.boxes) for r in data.records) == 1
    with pytest.raises(DatasetError, match="ann.json"):
        load_coco(str(path), str(tmp_path), strict=True)


def test_empty_dataset_is_refused_with_its_file_named(tmp_path):
    from densedet.config import DataConfig
    from densedet.engine.data import load_split
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    cfg = DataConfig(format="coco", train=str(path), train_images=str(tmp_path))
    with pytest.raises(DatasetError, match=r"empty\.json.*no images"):
        load_split(cfg, "train")


def test_boxes_beyond_float32_are_dropped_not_kept_as_inf_or_empty(tmp_path):
    path = tmp_path / "ann.csv"
    path.write_text("a.png,1,2,1e300,5,x\nb.png,0,0,1,1e-200,x\n")
    with np.errstate(over="ignore"):
        data = load_csv(str(path), str(tmp_path))
    for record in data.records:
        assert np.isfinite(record.boxes).all(), record
        assert (record.boxes[:, 2:] > record.boxes[:, :2]).all(), record
    assert data.report.dropped == 2 - sum(len(r) for r in data.records)
