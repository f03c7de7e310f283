"""Which reader an annotation path needs: COCO json, Pascal VOC xml (a file, a folder, a glob) or CSV.

:func:`detect_format` looks at the path first (a folder or ``.xml`` names: VOC; ``.json``: COCO;
``.csv``: CSV) and, for any other name, at the start of the file's text (``{`` a JSON object, ``<``
XML, a comma-separated first line of six fields a CSV). When neither tells, it raises a
:class:`DatasetError` naming the file and the formats it accepts, rather than guessing.
"""

from __future__ import annotations

import os

from .records import DatasetError

__all__ = ["detect_format", "FORMATS"]

FORMATS = ("coco", "voc", "csv")
_SUFFIXES = {".json": "coco", ".xml": "voc", ".csv": "csv"}
ACCEPTED = ("a COCO .json file, a Pascal VOC .xml file, a folder or glob of them, or a CSV file "
            "(image_path,x1,y1,x2,y2,label)")


def detect_format(paths: list[str]) -> str:
    """``coco``, ``voc`` or ``csv`` for annotation ``paths`` (already resolved: files or one folder)."""
    if not paths:
        raise DatasetError(f"no annotation path given; expected {ACCEPTED}")
    kinds = {_kind(p) for p in paths}
    if len(kinds) > 1:
        raise DatasetError(f"{', '.join(paths[:3])}: annotation files of different formats ({', '.join(sorted(kinds))})")
    kind = kinds.pop()
    if kind != "voc" and len(paths) > 1:
        raise DatasetError(f"{paths[0]}: a {kind} annotation set is one file, got {len(paths)} files")
    return kind


def _kind(path: str) -> str:
    if os.path.isdir(path):
        if any(name.lower().endswith(".xml") for name in os.listdir(path)):
            return "voc"
        raise DatasetError(f"{path}: a folder without .xml files; expected {ACCEPTED}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    return _sniff(path)


def _sniff(path: str) -> str:
    """The format from the first characters of a file whose name does not tell."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not text (a binary file?); expected {ACCEPTED}") from None
    text = head.lstrip()
    if text.startswith("{"):
        return "coco"
    if text.startswith("<"):
        return "voc"
    first = text.splitlines()[0] if text else ""
    if first.count(",") == 5:
        return "csv"
    raise DatasetError(f"{path}: cannot tell the annotation format from the name or the content; expected "
                       f"{ACCEPTED} (name it .json, .xml or .csv)")
