"""Pascal VOC xml annotations.

Coordinate convention: VOC `bndbox` values are 1-based inclusive pixel indices — a box covering
the whole W x H image is (1, 1, W, H). We convert to continuous coordinates, where that box is
(0, 0, W, H), as mmdetection does: (xmin - 1, ymin - 1, xmax, ymax). Width and height are then
plain differences, with no "+1" anywhere downstream. `one_based=False` reads the values as
continuous coordinates unchanged, for tools that write 0-based boxes into VOC files.
"""

from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from .records import DataReport, DatasetError, DetectionData, make_record, sorted_class_names


def _xml_files(xml_paths_or_dir: str | Sequence[str]) -> list[str]:
    if isinstance(xml_paths_or_dir, (str, os.PathLike)):
        path = str(xml_paths_or_dir)
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.xml")))
            if not files:
                raise DatasetError(f"{path}: no .xml files in this directory")
            return files
        return [path]
    return [str(p) for p in xml_paths_or_dir]


def _text(element: ET.Element, tag: str, where: str, required: bool = True) -> str | None:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DatasetError(f"{where}: missing <{tag}>")
        return None
    return child.text.strip()


def _number(element: ET.Element, tag: str, where: str) -> float:
    text = _text(element, tag, where)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: <{tag}> is not a number: {text!r}") from None


def _parse(path: str) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML: {e}") from None


def _size(root: ET.Element, path: str) -> tuple[int | None, int | None]:
    """(height, width) from <size>; None when absent or 0 (some exporters write 0)."""
    size = root.find("size")
    if size is None:
        return None, None
    dims = []
    for tag in ("height", "width"):
        text = _text(size, tag, f"{path}: <size>", required=False)
        try:
            value = int(float(text)) if text is not None else 0
        except (ValueError, OverflowError):   # "abc", "nan" / "inf"
            raise DatasetError(f"{path}: <size>/<{tag}> is not a finite number: {text!r}") from None
        dims.append(value if value > 0 else None)
    return dims[0], dims[1]


def load_voc(xml_paths_or_dir: str | Sequence[str], image_dir: str | None = None,
             class_names: Sequence[str] | None = None, strict: bool = False, *,
             one_based: bool = True) -> DetectionData:
    """Read Pascal VOC xml files (a directory of them, one path, or a list of paths).

    Images are read from `image_dir` / <filename>, or next to the xml file when `image_dir` is
    None. `class_names` None -> the sorted set of object names found (numerically when every name
    is an integer: 1, 2, 10); otherwise an object whose name is not in the list is an error. image
    ids are 1, 2, ... in file order. Boxes are converted from 1-based inclusive to continuous
    coordinates (see the module docstring) and repaired as `records.sanitize_boxes` documents.
    Raises `DatasetError` naming the file and object index for malformed XML, missing fields and
    non-numeric coordinates.
    """
    files = _xml_files(xml_paths_or_dir)
    parsed = []
    for path in files:
        root = _parse(path)
        filename = _text(root, "filename", path)
        height, width = _size(root, path)
        objects = []
        for k, obj in enumerate(root.findall("object")):
            obj_where = f"{path}: object {k}"
            name = _text(obj, "name", obj_where)
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise DatasetError(f"{obj_where} ({name}): missing <bndbox>")
            box = [_number(bndbox, tag, f"{obj_where} ({name}) <bndbox>")
                   for tag in ("xmin", "ymin", "xmax", "ymax")]
            if one_based:
                box[0] -= 1.0
                box[1] -= 1.0
            difficult_text = _text(obj, "difficult", obj_where, required=False) or "0"
            if difficult_text not in ("0", "1"):
                raise DatasetError(f"{obj_where}: <difficult> must be 0 or 1, got "
                                   f"{difficult_text!r}")
            objects.append((name, box, difficult_text == "1", f"{obj_where} ({name})"))
        parsed.append((path, filename, height, width, objects))

    if class_names is None:
        class_names = sorted_class_names(name for *_, objects in parsed for name, *_ in objects)
    class_names = list(class_names)
    label_of = {name: i for i, name in enumerate(class_names)}

    source = (str(xml_paths_or_dir) if isinstance(xml_paths_or_dir, (str, os.PathLike))
              else f"{len(files)} xml files")
    report = DataReport(source=f"voc {source}")
    records = []
    for image_id, (path, filename, height, width, objects) in enumerate(parsed, start=1):
        for name, _, _, obj_where in objects:
            if name not in label_of:
                raise DatasetError(f"{obj_where}: unknown class name {name!r} "
                                   f"(class_names: {class_names})")
        folder = image_dir if image_dir is not None else os.path.dirname(path)
        records.append(make_record(
            file_name=os.path.join(str(folder), filename), image_id=image_id, height=height,
            width=width, boxes=[box for _, box, _, _ in objects],
            labels=[label_of[name] for name, *_ in objects], iscrowd=[False] * len(objects),
            difficult=[d for _, _, d, _ in objects], box_names=[w for *_, w in objects],
            report=report, strict=strict))
    return DetectionData(records=records, class_names=class_names, category_ids=None,
                         source=source,
                         report=report)
