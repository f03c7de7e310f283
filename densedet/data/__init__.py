"""Data: annotation readers, the digits demo set, datasets and box-aware transforms.

Readers (`load_coco`, `load_voc`, `load_csv`) produce a `DetectionData` of `ImageRecord`s with
boxes in continuous (x1, y1, x2, y2) pixel coordinates; `DetectionDataset` / `TiledDataset` turn
it into (image [3, H, W] float in [0, 1], target dict) items, torchvision style.
"""

import os

from .coco import load_coco, save_coco, to_coco_dict
from .csv import load_csv
from .dataset import DetectionDataset, TiledDataset, collate, record_target
from .digits import CLASS_NAMES as DIGIT_CLASS_NAMES
from .digits import make_digit_scenes
from .images import image_size, load_image, load_record_image, record_size
from .records import DataReport, DatasetError, DetectionData, ImageRecord, align_classes
from .transforms import (Compose, RandomHorizontalFlip, RandomObjectCrop, RandomRotate90, ResizeFixed,
                         ResizeShortestEdge, crop_target, resize, tile_grid, tile_image)
from .voc import load_voc

__all__ = [
    "DataReport", "DatasetError", "DetectionData", "ImageRecord", "align_classes",
    "load_coco", "save_coco", "to_coco_dict", "load_voc", "load_csv", "load_detection_data",
    "make_digit_scenes", "DIGIT_CLASS_NAMES",
    "load_image", "load_record_image", "image_size", "record_size", "DetectionDataset", "TiledDataset", "collate", "record_target",
    "Compose", "RandomHorizontalFlip", "RandomRotate90", "RandomObjectCrop", "ResizeShortestEdge", "ResizeFixed",
    "resize", "tile_image", "tile_grid", "crop_target",
]


def load_detection_data(path: str, image_root: str | None = None, class_names=None,
                        strict: bool = False) -> DetectionData:
    """Read annotations by their kind: a .json file (COCO), a .csv file, or .xml file(s) / a
    directory of them (Pascal VOC). `image_root` defaults to the annotation file's folder."""
    path = str(path)
    if os.path.isdir(path) or path.lower().endswith(".xml"):
        return load_voc(path, image_dir=image_root, class_names=class_names, strict=strict)
    if path.lower().endswith(".csv"):
        return load_csv(path, image_root=image_root, class_names=class_names, strict=strict)
    if path.lower().endswith(".json"):
        if class_names is not None:
            raise ValueError("class_names comes from the COCO file's categories; leave it None")
        return load_coco(path, image_root if image_root is not None else os.path.dirname(path),
                         strict=strict)
    raise DatasetError(f"{path}: unknown annotation format (expected .json, .csv, .xml or a "
                       f"directory of .xml files)")
