"""Decoding image files into RGB uint8 tensors, whatever their mode, with EXIF rotation applied."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .records import DatasetError
from .transforms import resize

# EXIF orientations 5..8 swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
# Extensions a "did you mean" hint may offer: a same-named .xml or .txt beside the image is not it.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Where Pascal VOC (Annotations/ + JPEGImages/) and many exports (labels/ + images/) keep the pictures.
_IMAGE_FOLDERS = ("JPEGImages", "images")


def rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 from any PIL mode.

    16-bit grayscale ("I;16*", and "I", which is how PIL represents 16-bit PNGs) is scaled by
    255 / 65535 — PIL's own convert("RGB") would clip it to white. Alpha is ignored (the colour
    channels are used as stored, as torchvision's read_image does in RGB mode); palette images
    with transparency go through RGBA for the same reason.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        gray = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(gray * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def load_image(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 tensor [3, H, W] (RGB), EXIF orientation applied.

    Grayscale, RGBA, palette and 16-bit images are converted to RGB (see `rgb_array`).
    Raises `DatasetError` naming the file when it is missing, truncated or not an image.
    """
    path = str(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that truncation errors surface here
            image = ImageOps.exif_transpose(image)
            array = rgb_array(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found{missing_image_hint(path)}") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, not an image file") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and truncated data
        # as OSError/SyntaxError/EOFError depending on the codec.
        raise DatasetError(f"{path}: cannot decode image: {e}") from None
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    if not chw.flags.writeable:  # a 1x1 image: already contiguous, so still PIL's read-only buffer
        chw = chw.copy()
    return torch.from_numpy(chw)


def load_record_image(record) -> torch.Tensor:
    """The pixels of an image record as uint8 [3, H, W]: its file, or the rectangle of it that the
    record's ``region`` names (a :class:`DatasetError` when the file is smaller than that), resized
    to the record's ``resize`` when it has one."""
    image = load_image(record.file_name)
    if record.region is not None:
        x0, y0, x1, y1 = record.region
        if x1 > image.shape[-1] or y1 > image.shape[-2]:
            raise DatasetError(f"{record.file_name}: region {list(record.region)} lies outside the "
                               f"{image.shape[-1]}x{image.shape[-2]} image")
        image = image[:, y0:y1, x0:x1].clone()  # a copy: a view would keep the whole photo alive
    if record.resize is not None and tuple(record.resize) != tuple(image.shape[-2:]):
        # as the model's preprocessor resizes (bilinear, antialiased), rounded back to uint8
        image = resize(image.float().div_(255.0), None, *record.resize)[0].mul_(255.0).round_().to(torch.uint8)
    return image


def record_size(record, source: str = "") -> tuple[int, int]:
    """(height, width) of an image record: from the annotations, else from the image file's header.
    A record with neither is a :class:`DatasetError` naming ``source`` and the file."""
    if record.height is not None and record.width is not None:
        return int(record.height), int(record.width)
    size = image_size(record.file_name)
    if size is None:
        hint = ""
        if not os.path.exists(record.file_name):   # here the annotation file is known: both hints
            hint = missing_image_hint(record.file_name, source)
        raise DatasetError(f"{source + ': ' if source else ''}image {record.file_name!r} (id {record.image_id}) "
                           f"has no width/height in the annotations and its file cannot be read{hint}")
    return int(size[0]), int(size[1])


def image_size(path: str) -> tuple[int, int] | None:
    """(height, width) of an image file after EXIF rotation, reading only its header.

    Returns None when the file is missing or unreadable (the error is raised later, by the
    dataset, when the image is actually needed).
    """
    if not os.path.isfile(path):
        return None
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, EOFError):
        return None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def missing_image_hint(path: str, source: str | None = None) -> str:
    """``"; did you mean ...?"`` / ``"; pass --images DIR"`` for an image that is not at ``path``, or "".

    Called only on the error path, and cheap there (one listing of the image's folder, two isfile):
    a file of the same name plus an extension beside it (a VOC <filename> written without one), or
    of the same stem with another image extension; and, when ``source`` (a :class:`DetectionData`'s:
    the annotation file or folder, a split's part named after it) names an annotation path that
    exists, the file in a JPEGImages/ or images/ folder beside the annotations' folder (Pascal VOC's
    layout, read without ``--images``).
    """
    hints = []
    near = _same_name_beside(path)
    if near:
        hints.append(f"did you mean {' or '.join(near)}?")
    annotation_path = (source or "").split(" (")[0].split(",")[0]     # a split appends " (val: ...)"
    if annotation_path and os.path.exists(annotation_path):
        folder = image_folder_beside(os.path.basename(path), annotation_path)
        if folder is not None:
            hints.append(f"{os.path.basename(path)} is in {folder}: pass --images {folder}")
    return "".join(f"; {h}" for h in hints)


def _same_name_beside(path: str) -> list[str]:
    """Image files beside ``path`` named as it plus an extension, or as its stem with another
    extension (any case); at most three, sorted."""
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:                     # the folder is missing too: nothing to suggest
        return []
    wanted = {name.lower(), os.path.splitext(name)[0].lower()}
    return sorted(n for n in names if n != name and os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS
                  and os.path.splitext(n)[0].lower() in wanted)[:3]


def image_folder_beside(name: str, annotation_path: str) -> str | None:
    """The JPEGImages/ or images/ folder beside the annotations' folder that holds ``name``, if any."""
    folder = annotation_path if os.path.isdir(annotation_path) else os.path.dirname(annotation_path)
    parent = os.path.normpath(os.path.join(folder, os.pardir))
    for sub in _IMAGE_FOLDERS:
        candidate = os.path.normpath(os.path.join(parent, sub))
        if os.path.isfile(os.path.join(candidate, name)):
            return candidate
    return None
