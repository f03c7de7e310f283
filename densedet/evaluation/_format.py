"""Text table shared by the COCO and VOC reports."""

from __future__ import annotations

import math
from collections.abc import Mapping


def _cell(value: float, percent: bool) -> str:
    # -1 (COCO) and nan (VOC) both mean "no ground truth for this class".
    if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0:
        return "-"
    return f"{100.0 * value:.2f}" if percent else f"{value:.3f}"


def format_per_class_table(per_class: Mapping[str, float], value_name: str = "AP", columns: int = 3,
                           percent: bool = True) -> str:
    """Per-class values in [0, 1], printed as percentages (VOC's convention) or as fractions
    (``percent=False``, COCO's, matching its summary), ``columns`` (class, value) pairs per row."""
    items = [(str(name), _cell(value, percent)) for name, value in per_class.items()]
    if not items:
        return ""
    name_width = max(len("class"), *(len(n) for n, _ in items))
    value_width = max(len(value_name), *(len(v) for _, v in items))
    pairs_per_row = max(1, min(columns, len(items)))
    header = " | ".join(f"{'class':<{name_width}} {value_name:>{value_width}}" for _ in range(pairs_per_row))
    rule = "-+-".join("-" * (name_width + 1 + value_width) for _ in range(pairs_per_row))
    rows = [header, rule]
    for start in range(0, len(items), pairs_per_row):
        chunk = items[start : start + pairs_per_row]
        rows.append(" | ".join(f"{n:<{name_width}} {v:>{value_width}}" for n, v in chunk))
    return "\n".join(rows)
