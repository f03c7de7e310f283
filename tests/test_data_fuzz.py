"""Property-based fuzzing of the three annotation readers.

Whatever bytes or structures a reader is given, it either returns data or raises densedet's own
``DatasetError`` (with the file named) — never a KeyError, TypeError, IndexError or a crash deep
inside. Each reader is fed generated malformed inputs of three kinds: random text, valid-looking
documents with fields mutated to wrong types / missing / non-finite, and truncations of valid files.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
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


def _expect_reader_contract(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except DatasetError as err:
        assert str(err), "a DatasetError must say what is wrong"


@SETTINGS
@given(text=st.text(max_size=300))
def test_coco_reader_random_text_only_raises_dataset_error(tmp_path, text):
    path = tmp_path / "ann.json"
    path.write_text(text)
    _expect_reader_contract(load_coco, str(path), str(tmp_path))


@SETTINGS
@given(where=st.sampled_from(COCO_PATHS), value=st.one_of(json_values, st.just(Ellipsis)))
def test_coco_reader_mutated_fields_only_raise_dataset_error(tmp_path, where, value):
    doc = _mutate(_valid_coco(), where, value)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    _expect_reader_contract(load_coco, str(path), str(tmp_path))


@SETTINGS
@given(cut=st.integers(0, 400))
def test_coco_reader_truncated_file_only_raises_dataset_error(tmp_path, cut):
    text = json.dumps(_valid_coco())
    path = tmp_path / "ann.json"
    path.write_text(text[: cut % (len(text) + 1)])
    _expect_reader_contract(load_coco, str(path), str(tmp_path))


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
    path.write_text(VOC_TEMPLATE.format(fn="a.png", name=name, **fields))
    _expect_reader_contract(load_voc, [str(path)], str(tmp_path), class_names=["tree"])


@SETTINGS
@given(text=st.text(max_size=300))
def test_voc_reader_random_text_only_raises_dataset_error(tmp_path, text):
    path = tmp_path / "a.xml"
    path.write_text(text)
    _expect_reader_contract(load_voc, [str(path)], str(tmp_path))


@SETTINGS
@given(cut=st.integers(0, 500))
def test_voc_reader_truncated_file_only_raises_dataset_error(tmp_path, cut):
    text = VOC_TEMPLATE.format(fn="a.png", name="tree", w=64, h=48, d=0, x1=1, y1=2, x2=30, y2=40)
    path = tmp_path / "a.xml"
    path.write_text(text[:cut])
    _expect_reader_contract(load_voc, [str(path)], str(tmp_path), class_names=["tree"])


csv_cell = st.one_of(st.integers(-50, 500).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                     st.just(""), st.text(alphabet='ab,"\n 1.-', max_size=5))


@SETTINGS
@given(rows=st.lists(st.lists(csv_cell, min_size=0, max_size=8), max_size=5),
       header=st.sampled_from(["", "image_path,x1,y1,x2,y2,label\n", "x1,image_path,y1,x2,y2,label\n"]))
def test_csv_reader_malformed_rows_only_raise_dataset_error(tmp_path, rows, header):
    path = tmp_path / "ann.csv"
    path.write_text(header + "\n".join(",".join(r) for r in rows))
    _expect_reader_contract(load_csv, str(path), str(tmp_path))


@SETTINGS
@given(text=st.text(max_size=300))
def test_csv_reader_random_text_only_raises_dataset_error(tmp_path, text):
    path = tmp_path / "ann.csv"
    path.write_text(text)
    _expect_reader_contract(load_csv, str(path), str(tmp_path))


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
