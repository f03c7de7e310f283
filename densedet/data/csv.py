"""CSV annotations: one box per row, `image_path,x1,y1,x2,y2,label`.

- The header is optional; when present it must name exactly these columns in this order, with
  xmin/ymin/xmax/ymax accepted for x1/y1/x2/y2 (deepforest writes `image_path,xmin,ymin,xmax,ymax,label`).
- Coordinates are continuous pixel coordinates (no 1-based conversion).
- A row whose four box fields are empty marks an image without objects (a negative).
- Rows of the same image are grouped, in order of first appearance; image ids are 1, 2, ...
  Paths are compared after `os.path.normpath` (`x.jpg`, `./x.jpg` and `sub/../x.jpg` are one
  image); the record keeps the first spelling.

deepforest note: its CSVs copy the integers of its VOC xml files verbatim (OSBS_029.csv and
OSBS_029.xml hold the same numbers), so the CSV boxes equal `load_voc(...)` boxes plus
(1, 1, 0, 0), or exactly `load_voc(..., one_based=False)`.
"""

from __future__ import annotations

import csv as _csv
import os
from collections.abc import Sequence

from .images import image_size
from .records import DataReport, DatasetError, DetectionData, make_record, sorted_class_names

HEADER = ("image_path", "x1", "y1", "x2", "y2", "label")
_SYNONYMS = {"xmin": "x1", "ymin": "y1", "xmax": "x2", "ymax": "y2"}


def _is_header(row: list[str]) -> bool:
    """A header row has a non-empty, non-numeric box field; a data row never does."""
    for field in row[1:5]:
        text = field.strip()
        if text:
            try:
                float(text)
            except ValueError:
                return True
    return False


def _check_header(row: list[str], path: str) -> None:
    names = tuple(_SYNONYMS.get(f.strip().lower(), f.strip().lower()) for f in row)
    if names == HEADER:
        return
    expected = ",".join(HEADER)
    if sorted(names) == sorted(HEADER):
        raise DatasetError(f"{path}: header columns are in the wrong order: {','.join(row)!r}; "
                           f"expected exactly {expected!r} (or xmin,ymin,xmax,ymax)")
    raise DatasetError(f"{path}: unexpected header {','.join(row)!r}; expected {expected!r} "
                       f"(or xmin,ymin,xmax,ymax for x1,y1,x2,y2), or no header")


def _group_rows(rows: list[list[str]], csv_path: str) -> dict[str, tuple[str, list]]:
    """``{normalised image path: (its first spelling, [(box, label, where), ...])}`` in order of first
    appearance, every row checked. Paths are grouped after ``os.path.normpath``: ``x.jpg``,
    ``./x.jpg`` and ``sub/../x.jpg`` are one image with all its boxes, not three partial ones."""
    grouped: dict[str, tuple[str, list]] = {}
    for line, row in enumerate(rows, start=1):
        if not row or all(not field.strip() for field in row):
            continue  # blank line
        where = f"{csv_path}: row {line}"
        if line == 1 and _is_header(row):
            _check_header(row, csv_path)
            continue
        if len(row) != len(HEADER):
            raise DatasetError(f"{where}: expected {len(HEADER)} fields "
                               f"({','.join(HEADER)}), got {len(row)}: {row!r}")
        image_path = row[0].strip()
        if not image_path:
            raise DatasetError(f"{where}: empty image_path")
        _, boxes = grouped.setdefault(os.path.normpath(image_path), (image_path, []))
        fields = [f.strip() for f in row[1:5]]
        if not any(fields):
            continue  # negative image marker
        if not all(fields):
            raise DatasetError(f"{where}: box fields must be all filled or all empty, got "
                               f"{row[1:5]!r}")
        try:
            box = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: box fields are not numbers: {row[1:5]!r}") from None
        label = row[5].strip()
        if not label:
            raise DatasetError(f"{where}: box without a label")
        boxes.append((box, label, where))
    return grouped


def load_csv(csv_path: str, image_root: str | None = None,
             class_names: Sequence[str] | None = None, strict: bool = False) -> DetectionData:
    """Read a box-per-row CSV (see the module docstring for the format).

    Image paths are joined with `image_root` (default: the CSV's directory). Image sizes are
    read from the image headers when the files exist (so that boxes can be clipped), else left
    None. `class_names` None -> the sorted set of labels found (numerically when every label is an
    integer: 1, 2, 10; see `sorted_class_names`). Raises `DatasetError` naming the file and the
    row (1-based line number) for a wrong field count, non-numeric or partly empty box fields, a
    missing label, an unknown label, and a wrong header.
    """
    csv_path = str(csv_path)
    if image_root is None:
        image_root = os.path.dirname(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = _csv.reader(f, strict=True)  # strict: an unclosed quote is an error
            try:
                rows = list(reader)
            except _csv.Error as e:
                raise DatasetError(f"{csv_path}: row {reader.line_num}: malformed CSV: {e}"
                                   ) from None
    except FileNotFoundError:
        raise DatasetError(f"{csv_path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{csv_path}: not UTF-8 text: {e}") from None

    grouped = _group_rows(rows, csv_path)
    found = sorted_class_names({label for _, boxes in grouped.values() for _, label, _ in boxes})
    class_names = found if class_names is None else [str(c) for c in class_names]
    label_of = {name: i for i, name in enumerate(class_names)}
    report = DataReport(source=f"csv {csv_path}")
    records = []
    for image_id, (image_path, boxes) in enumerate(grouped.values(), start=1):
        for _, label, where in boxes:
            if label not in label_of:
                raise DatasetError(f"{where}: unknown label {label!r} (class_names: "
                                   f"{class_names})")
        file_name = os.path.join(str(image_root), image_path)
        height, width = image_size(file_name) or (None, None)
        records.append(make_record(
            file_name=file_name, image_id=image_id, height=height, width=width,
            boxes=[box for box, _, _ in boxes], labels=[label_of[lab] for _, lab, _ in boxes],
            iscrowd=[False] * len(boxes), difficult=[False] * len(boxes),
            box_names=[w for *_, w in boxes], report=report, strict=strict))
    return DetectionData(records=records, class_names=class_names, category_ids=None,
                         source=csv_path, report=report)

